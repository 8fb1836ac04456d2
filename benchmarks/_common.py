"""Shared helpers of the speed benchmarks (``benchmarks/*.py``): run a command in a fresh
process with a pinned thread count, time it, and print a figure with its goal and the
machine's load.  Nothing here is a test: the scripts print numbers."""

from __future__ import annotations

import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

ROOT = Path(__file__).resolve().parents[1]


def environment(threads: int) -> dict[str, str]:
    """The environment of every measured process: offline, unbuffered, ``threads`` CPU
    threads per process (on a shared 2-core machine, torch's default of one thread per
    core oversubscribes the CPU as soon as anything else runs and slows it down ~10x)."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTEST_ADDOPTS", "PYTEST_XDIST_WORKER",
                                                             "PYTEST_CURRENT_TEST")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1", OMP_NUM_THREADS=str(threads),
               MKL_NUM_THREADS=str(threads), PYTHONPATH=str(ROOT))
    return env


def load() -> str:
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.2f} {five:.2f} {fifteen:.2f} on {os.cpu_count()} CPUs"


def timed(command: Sequence[str], *, threads: int, cwd: Path = ROOT, timeout: float = 1800) -> tuple[float, str, int]:
    """Run ``command``; return (wall seconds, stdout+stderr, exit status)."""
    start = time.perf_counter()
    done = subprocess.run(list(command), cwd=cwd, env=environment(threads), capture_output=True, text=True,
                          timeout=timeout)
    return time.perf_counter() - start, done.stdout + done.stderr, done.returncode


def pytest_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *args]


def pytest_seconds(output: str) -> float | None:
    """The session time pytest reports (``... in 12.34s``)."""
    found = re.findall(r" in ([\d.]+)s", output)
    return float(found[-1]) if found else None


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def header(title: str, goal: str) -> None:
    print(f"== {title}\n   goal: {goal}\n   {load()}", flush=True)


def figure(name: str, value: str, goal: str, met: bool | None) -> None:
    verdict = "" if met is None else ("  [goal met]" if met else "  [goal NOT met]")
    print(f"   {name}: {value}   (goal {goal}){verdict}\n   {load()}", flush=True)


def check_exit(code: int, output: str, allowed: Sequence[int] = (0, 1)) -> None:
    """Exit 1 (failed tests) is allowed: the benchmarks time the suite, pass or fail."""
    if code not in allowed:
        sys.stderr.write(output[-4000:])
        raise SystemExit(f"command failed with exit status {code}")
