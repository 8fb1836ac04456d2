"""Figure 1: the embedded model's release suite under pytest-diffeval vs a hand-written
script doing the same generations and the same torchmetrics calls.

    /work/venv/bin/python benchmarks/suite_vs_script.py [--repeat 3] [--threads 1]

Both run in one process, warm (each is run once first, unmeasured: file caches, bytecode),
without caches: the suite with ``--diffeval-no-cache`` and an empty cache dir per run (so
reference statistics are recomputed too), the script has none.  Runs alternate (suite,
script, suite, ...) so a change of the machine's load hits both; the figure is the ratio
of the median wall times of the whole processes (startup and imports included).
Goal: <= 1.05.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import ROOT, check_exit, figure, header, median, pytest_command, pytest_seconds, timed  # noqa: E402


def suite(work: Path, threads: int) -> tuple[float, str]:
    cache = Path(tempfile.mkdtemp(dir=work))
    wall, output, code = timed(pytest_command("model_tests/", "-q", "--diffeval-no-cache", f"--diffeval-cache-dir={cache}",
                                              f"--diffeval-results={work / 'results'}"), threads=threads)
    check_exit(code, output)
    return wall, output


def script(threads: int) -> tuple[float, str]:
    wall, output, code = timed([sys.executable, str(ROOT / "benchmarks" / "handwritten_suite.py")], threads=threads)
    check_exit(code, output, (0,))
    return wall, output


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="CPU threads per process (default 1)")
    args = parser.parse_args()
    header("pytest model_tests/ vs a hand-written script (same generations, same torchmetrics calls)",
           "suite / script <= 1.05")
    with tempfile.TemporaryDirectory(prefix="diffeval-bench-") as tmp:
        work = Path(tmp)
        suite(work, args.threads)  # warm-up
        script(args.threads)
        suites, scripts, sessions = [], [], []
        for run in range(args.repeat):
            wall, output = suite(work, args.threads)
            suites.append(wall)
            sessions.append(pytest_seconds(output) or float("nan"))
            wall_script, script_output = script(args.threads)
            scripts.append(wall_script)
            print(f"   run {run + 1}: suite {wall:.2f}s (pytest session {sessions[-1]:.2f}s), script {wall_script:.2f}s",
                  flush=True)
        print("   script's own breakdown (last run):\n" + "\n".join(f"     {line}" for line in script_output.splitlines()
                                                                   if line.endswith("s")))
    ratio = median(suites) / median(scripts)
    figure("suite / script (median wall, whole process)", f"{ratio:.3f}  ({median(suites):.2f}s / {median(scripts):.2f}s,"
           f" {args.repeat} runs each, {args.threads} thread(s) per process)", "<= 1.05", ratio <= 1.05)


if __name__ == "__main__":
    main()
