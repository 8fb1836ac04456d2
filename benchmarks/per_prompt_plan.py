"""Figure 5: 32 per-prompt tests (one test per prompt) vs one test of the 32 prompts, on
the embedded model, with and without ``@pytest.mark.diffeval_plan``.

    /work/venv/bin/python benchmarks/per_prompt_plan.py [--repeat 3] [--threads 1]

Three pytest projects, each run in a fresh process without caches (``--diffeval-no-cache``:
the plan then batches through its in-memory store), alternating: 32 tests with a plan,
32 tests without (each generates its prompt at batch size 1), one test of 32 prompts.
Every test scores its images with CLIP.  Figures: the ratio of median wall times of the
whole pytest processes, and of the time inside the tests (JUnit XML, setup + call).
Goal: planned per-prompt / one test <= 1.2.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import textwrap
import xml.etree.ElementTree as ET
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import check_exit, figure, header, median, pytest_command, timed  # noqa: E402

COMMON = """
    import pytest
    from pytest_diffeval import compute_metric
    from pytest_diffeval.embedded.data import HELDOUT_PROMPTS

    MODEL = "diffeval/tiny-t2i"
    SAMPLING = {"num_inference_steps": 20, "guidance_scale": 5.0}
    PROMPTS = HELDOUT_PROMPTS[:32]
"""
PROJECTS = {
    "per-prompt, plan": COMMON + """
    @pytest.mark.diffeval_plan(MODEL, PROMPTS, seeds=[0], **SAMPLING)
    @pytest.mark.parametrize("prompt", PROMPTS)
    def test_prompt(generate, prompt):
        images = generate(MODEL, [prompt], seeds=[0], **SAMPLING)
        assert compute_metric("clip_score", images).value >= 0
""",
    "per-prompt, no plan": COMMON + """
    @pytest.mark.parametrize("prompt", PROMPTS)
    def test_prompt(generate, prompt):
        images = generate(MODEL, [prompt], seeds=[0], **SAMPLING)
        assert compute_metric("clip_score", images).value >= 0
""",
    "one test, 32 prompts": COMMON + """
    def test_all_prompts(generate):
        images = generate(MODEL, PROMPTS, seeds=[0], **SAMPLING)
        assert compute_metric("clip_score", images).value >= 0
""",
}


def run(project: Path, threads: int) -> tuple[float, float]:
    """(wall seconds of the process, seconds inside tests)."""
    junit = project / "junit.xml"
    wall, output, code = timed(pytest_command("-q", "--diffeval-no-cache", f"--junitxml={junit}"), threads=threads,
                               cwd=project)
    check_exit(code, output, (0,))
    inside = sum(float(case.get("time", 0)) for case in ET.parse(junit).getroot().iter("testcase"))
    return wall, inside


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    header("32 per-prompt tests vs one test of 32 prompts (embedded model)", "planned per-prompt / one test <= 1.2")
    with tempfile.TemporaryDirectory(prefix="diffeval-bench-") as tmp:
        projects = {}
        for index, (name, source) in enumerate(PROJECTS.items()):
            project = Path(tmp) / f"project{index}"
            project.mkdir()
            (project / "test_prompts.py").write_text(textwrap.dedent(source))
            (project / "pytest.ini").write_text("[pytest]\ndiffeval_clip_model = diffeval/tiny-clip\n"
                                                "filterwarnings = ignore::FutureWarning\n")
            projects[name] = project
            run(project, args.threads)  # warm-up
        walls: dict[str, list[float]] = {name: [] for name in projects}
        inside: dict[str, list[float]] = {name: [] for name in projects}
        for index in range(args.repeat):
            for name, project in projects.items():
                wall, seconds = run(project, args.threads)
                walls[name].append(wall)
                inside[name].append(seconds)
            print("   run " + str(index + 1) + ": " + ", ".join(f"{n} {walls[n][-1]:.2f}s (tests {inside[n][-1]:.2f}s)"
                                                            for n in projects), flush=True)
    base_wall, base_inside = median(walls["one test, 32 prompts"]), median(inside["one test, 32 prompts"])
    for name in ("per-prompt, plan", "per-prompt, no plan"):
        wall_ratio, inside_ratio = median(walls[name]) / base_wall, median(inside[name]) / base_inside
        goal = "<= 1.2" if name.endswith(", plan") else "(context, no goal)"
        met = wall_ratio <= 1.2 and inside_ratio <= 1.2 if name.endswith(", plan") else None
        figure(f"{name} / one test", f"{wall_ratio:.2f} whole process ({median(walls[name]):.2f}s / {base_wall:.2f}s), "
               f"{inside_ratio:.2f} inside the tests ({median(inside[name]):.2f}s / {base_inside:.2f}s)", goal, met)


if __name__ == "__main__":
    main()
