"""What the VQA checks catch that CLIP score misses: the release suite on every member of the
regression zoo, tabulated from its own verdicts (README, "What VQA checks catch that CLIP
score misses").

    python benchmarks/vqa_vs_clip.py [--members colours-swapped noise-0.3 ...] [--json out.json]
    python benchmarks/vqa_vs_clip.py --real-captions   # how far each score moves for a wrong caption

Each member is a fresh ``pytest model_tests/ --diffeval-model=<member> --diffeval-no-cache``
(one CPU thread); the figures are read from the run's ``metrics.json``: the held-out set's
mean clip_score, vqa_score, soft_tifa (and its per-question mean probabilities), digit and
colour match, each with its paired verdict against the baseline and its floor verdict, plus
how many per-prompt CLIP floors failed.  Nothing is computed here that the suite did not.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

import numpy as np  # noqa: E402
from _common import check_exit, pytest_command, timed  # noqa: E402
from make_regressions import make_variants  # noqa: E402

import pytest_diffeval.embedded.metrics  # noqa: E402, F401  (registers the embedded metrics)
from pytest_diffeval import ImageSet, compute_metric  # noqa: E402
from pytest_diffeval.embedded.data import COLORS, caption, make_images, parse_caption  # noqa: E402

HELDOUT = "test_heldout_prompts_against_baseline"
PROMPT_TEST = "test_prompt_is_followed"
METRICS = ("clip_score", "vqa_score", "soft_tifa", "colour_match", "digit_match")
PASSING = ("pass", "improved", "recorded")


def question_means(details: dict) -> dict[str, float]:
    """Mean probability of the right answer per question id (the report's per-image answers)."""
    by_id: dict[str, list[float]] = {}
    for answer in details.get("answers", []):
        for question in answer["questions"]:
            by_id.setdefault(question["id"], []).append(question["p"])
    return {qid: sum(ps) / len(ps) for qid, ps in by_id.items()}


def summarise(checks: list[dict], output: str) -> dict:
    """One member's row: per metric of the held-out test, value, baseline and the verdicts of
    its paired check and its floor; the per-prompt CLIP floors; whether a tripwire fired."""
    row: dict = {"tripwire": "TripwireError" in output, "metrics": {}}
    for check in checks:
        test = check["test"].split("::")[-1].split("[")[0]
        if test == HELDOUT and check["metric"] in METRICS:
            entry = row["metrics"].setdefault(check["metric"], {})
            kind = "floor" if check["threshold"] is not None else "paired"
            entry["value"] = check["value"]
            entry[kind] = check["verdict"]
            if kind == "paired":
                entry["baseline"] = check["baseline"]
            if check["metric"] == "soft_tifa" and isinstance(check["details"], dict):
                entry["questions"] = question_means(check["details"])
    floors = [c["verdict"] for c in checks
              if c["test"].split("::")[-1].split("[")[0] == PROMPT_TEST and c["metric"] == "clip_score"]
    row["clip_prompt_floors_failed"] = [sum(v not in PASSING for v in floors), len(floors)]
    return row


def run_member(model: Path | str, work: Path) -> dict:
    results = work / "results"
    wall, output, code = timed(pytest_command("model_tests/", "-q", "--diffeval-no-cache",
                                              f"--diffeval-results={results}", f"--diffeval-model={model}"), threads=1)
    check_exit(code, output)
    metrics = results / "metrics.json"
    checks = json.loads(metrics.read_text())["checks"] if metrics.exists() else []
    return {"exit": code, "seconds": round(wall, 1), **summarise(checks, output)}


def cell(entry: dict | None, metric: str) -> str:
    if not entry or "value" not in entry:
        return "—"
    fmt = "{:.1f}" if metric == "clip_score" else "{:.3f}"
    caught = [kind for kind in ("paired", "floor") if entry.get(kind) not in (None, *PASSING)]
    return fmt.format(entry["value"]) + (f" ✘ {'+'.join(caught)}" if caught else " ✔")


def table(rows: dict[str, dict]) -> str:
    lines = ["| member | clip_score | vqa_score | soft_tifa (digit / stroke / background) | colour_match | "
             "digit_match | CLIP prompt floors failed |", "|---|---|---|---|---|---|---|"]
    for name, row in rows.items():
        m = row["metrics"]
        q = m.get("soft_tifa", {}).get("questions", {})
        qs = f" ({q['digit']:.2f} / {q['stroke']:.2f} / {q['background']:.2f})" if q else ""
        floors = "{} of {}".format(*row["clip_prompt_floors_failed"]) if row["clip_prompt_floors_failed"][1] else "—"
        trip = " (tripwire)" if row["tripwire"] else ""
        lines.append(f"| `{name}`{trip} | {cell(m.get('clip_score'), 'clip_score')} | {cell(m.get('vqa_score'), 'vqa_score')} | "
                     f"{cell(m.get('soft_tifa'), 'soft_tifa')}{qs} | {cell(m.get('colour_match'), 'c')} | "
                     f"{cell(m.get('digit_match'), 'd')} | {floors} |")
    return "\n".join(lines)


def real_captions(n: int = 64) -> None:
    """clip_score, vqa_score and soft_tifa of real held-out digits under their own captions and
    under captions with one part wrong: how far each score moves, without a generator."""
    def other(colour: str, taken: str) -> str:
        return next(c for c in COLORS[COLORS.index(colour) + 1:] + COLORS if c not in (colour, taken))

    wrong = {"own": lambda d, fg, bg: caption(d, fg, bg),
             "stroke and background swapped": lambda d, fg, bg: caption(d, bg, fg),
             "digit + 1": lambda d, fg, bg: caption((d + 1) % 10, fg, bg),
             "digit + 5": lambda d, fg, bg: caption((d + 5) % 10, fg, bg),
             "stroke colour wrong": lambda d, fg, bg: caption(d, other(fg, bg), bg),
             "background colour wrong": lambda d, fg, bg: caption(d, fg, other(bg, fg))}
    images, captions = make_images(n, seed=0, split="heldout")
    options = {"clip_score": {"clip_model": "diffeval/tiny-clip"}, "vqa_score": {"vqa_model": "diffeval/tiny-vlm"},
               "soft_tifa": {"vqa_model": "diffeval/tiny-vlm"}}
    print("| captions | clip_score | vqa_score | soft_tifa |\n|---|---|---|---|")
    for name, make in wrong.items():
        prompts = [make(*parse_caption(c)) for c in captions]
        imageset = ImageSet(images=np.ascontiguousarray(images), prompts=prompts, seeds=[0] * n)
        values = [float(compute_metric(metric, imageset, **kw).per_sample.mean()) for metric, kw in options.items()]
        print(f"| {name} | {values[0]:.1f} | {values[1]:.3f} | {values[2]:.3f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--members", nargs="*", help="zoo members (default: shipped and every member)")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    parser.add_argument("--real-captions", action="store_true", help="only score real digits under wrong captions")
    args = parser.parse_args()
    if args.real_captions:
        return real_captions()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        zoo = {"shipped": "diffeval/tiny-t2i", **make_variants(work / "zoo")}
        rows = {}
        for name in args.members or list(zoo):
            rows[name] = run_member(zoo[name], work / name)
            print(f"{name}: {json.dumps(rows[name])}", flush=True)
    print(table(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    sys.exit(main())
