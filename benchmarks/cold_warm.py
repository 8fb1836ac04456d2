"""Figure 2: a cold run of ``pytest model_tests/`` (empty cache dir) vs a warm rerun (image,
feature and metric-result caches filled by the cold run).

    /work/venv/bin/python benchmarks/cold_warm.py [--repeat 3] [--threads 1]

Each repeat: a cold run into a new, empty cache dir, then a warm rerun on it.  The figure
is the ratio of the median wall times of the whole processes.  Also printed: the imports of
torch, torchmetrics and transformers' CLIP (timed in a fresh process; a warm rerun whose
metric results are cached no longer pays them), and the ``-v`` cache lines of the last warm run.
Goal: cold / warm >= 10.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import check_exit, figure, header, median, pytest_command, pytest_seconds, timed  # noqa: E402

IMPORTS = ("import torch, torchmetrics, transformers; from torchmetrics.functional.multimodal.clip_score "
           "import _clip_score_update; from transformers import CLIPModel, CLIPProcessor; import pytest")


def run(cache: Path, results: Path, threads: int) -> tuple[float, str]:
    wall, output, code = timed(pytest_command("model_tests/", "-v", f"--diffeval-cache-dir={cache}",
                                              f"--diffeval-results={results}"), threads=threads)
    check_exit(code, output)
    return wall, output


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="CPU threads per process (default 1)")
    args = parser.parse_args()
    header("pytest model_tests/: cold (empty caches) vs warm rerun (image, feature and result caches filled)",
           "cold / warm >= 10")
    colds, warms = [], []
    with tempfile.TemporaryDirectory(prefix="diffeval-bench-") as tmp:
        work = Path(tmp)
        run(work / "warmup", work / "results", args.threads)  # file caches, bytecode
        for index in range(args.repeat):
            cache = work / f"cache{index}"
            cold, _ = run(cache, work / "results", args.threads)
            warm, output = run(cache, work / "results", args.threads)
            colds.append(cold)
            warms.append(warm)
            print(f"   run {index + 1}: cold {cold:.2f}s, warm {warm:.2f}s (pytest session {pytest_seconds(output)}s)",
                  flush=True)
    floor, _, _ = timed([sys.executable, "-c", IMPORTS], threads=args.threads)
    print("   last warm run's cache lines:\n" + "\n".join(f"     {line}" for line in output.splitlines()
                                                      if line.startswith("diffeval ") and " in this process" in line))
    print(f"   imports alone (torch, torchmetrics, transformers CLIP, pytest) in a fresh process: {floor:.2f}s")
    ratio = median(colds) / median(warms)
    figure("cold / warm (median wall, whole process)", f"{ratio:.2f}x  ({median(colds):.2f}s / {median(warms):.2f}s, "
           f"{args.repeat} runs each)", ">= 10", ratio >= 10)
    if median(warms) > floor:  # the warm run still pays the imports: say what is left beyond them
        beyond = (median(colds) - floor) / (median(warms) - floor)
        figure("cold / warm beyond the import floor", f"{beyond:.1f}x  (({median(colds):.2f}-{floor:.2f})s / "
               f"({median(warms):.2f}-{floor:.2f})s)", ">= 10", None)
    else:
        print(f"   the warm run ({median(warms):.2f}s) took less than those imports: it imported none of them")


if __name__ == "__main__":
    main()
