"""Figure 4: ``pytest model_tests/ -n 2`` vs ``-n 0`` wall time on this machine.

    /work/venv/bin/python benchmarks/xdist_speedup.py [--repeat 3] [--threads 1]

Cold runs (a new, empty cache dir each), alternating -n 0 and -n 2 so load changes hit
both.  One CPU thread per process by default: -n 0 then uses one core, -n 2 two (with
--threads 2, -n 0 uses both cores and -n 2 oversubscribes them).  Also printed: each
worker's tests and CPU seconds (the ``-v`` lines) to show how evenly the model's tests
were spread, and the machine's load average, since another process using a core takes
the second core that -n 2 needs.  Goal: (-n 2) / (-n 0) <= 0.6.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import check_exit, figure, header, load, median, pytest_command, timed  # noqa: E402


def run(work: Path, workers: int, threads: int, index: int) -> tuple[float, str]:
    cache = work / f"cache-n{workers}-{index}"
    wall, output, code = timed(pytest_command("model_tests/", "-v", "-n", str(workers), f"--diffeval-cache-dir={cache}",
                                              f"--diffeval-results={work / 'results'}"), threads=threads)
    check_exit(code, output)
    return wall, output


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="CPU threads per process (default 1)")
    args = parser.parse_args()
    header("pytest model_tests/ -n 2 vs -n 0 (cold)", "(-n 2) / (-n 0) <= 0.6")
    serial, parallel = [], []
    with tempfile.TemporaryDirectory(prefix="diffeval-bench-") as tmp:
        work = Path(tmp)
        run(work, 0, args.threads, -1)  # warm-up: file caches, bytecode
        for index in range(args.repeat):
            wall0, _ = run(work, 0, args.threads, index)
            wall2, output = run(work, 2, args.threads, index)
            serial.append(wall0)
            parallel.append(wall2)
            print(f"   run {index + 1}: -n 0 {wall0:.2f}s, -n 2 {wall2:.2f}s   ({load()})", flush=True)
            for line in output.splitlines():
                if line.startswith(("diffeval work in", "diffeval images in gw")):
                    print(f"     {line}")
    ratio = median(parallel) / median(serial)
    figure("(-n 2) / (-n 0) (median wall)", f"{ratio:.2f}  ({median(parallel):.2f}s / {median(serial):.2f}s, "
           f"{args.repeat} runs each, {args.threads} thread(s) per process)", "<= 0.6", ratio <= 0.6)


if __name__ == "__main__":
    main()
