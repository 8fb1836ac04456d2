"""The release suite (``model_tests/``) on the embedded model, in both directions: over the
benign variations it passes every time, and on every member of the regression zoo it
fails, naming the tests and the metrics (or tripwire) that caught it.  Each run is a real
``pytest model_tests/`` in a fresh process (about a minute each on one core)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FAILED_VERDICTS = ("regressed", "out of bounds", "below threshold", "above threshold")

pytestmark = pytest.mark.slow


def run_suite(tmp_path: Path, *args: str, threads: int = 1) -> tuple[int, str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": str(threads)}
    for name in ("PYTEST_XDIST_WORKER", "PYTEST_XDIST_WORKER_COUNT", "PYTEST_ADDOPTS", "GITHUB_STEP_SUMMARY"):
        env.pop(name, None)
    command = [sys.executable, "-m", "pytest", "model_tests/", "-p", "no:cacheprovider", "-q",
               f"--diffeval-results={tmp_path / 'results'}", *args]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    return done.returncode, done.stdout + done.stderr


def caught(output: str) -> set[tuple[str, str]]:
    """(test, metric) pairs whose check failed, read from the terminal summary table."""
    rows = set()
    for line in output.splitlines():
        cells = line.split()
        if len(cells) > 2 and "test_" in cells[0] and line.rstrip().endswith(FAILED_VERDICTS):
            rows.add((cells[0].split("::")[-1].split("[")[0], cells[1]))
    return rows


@pytest.fixture(scope="module")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        from make_regressions import make_variants
    finally:
        sys.path.pop(0)
    return make_variants(tmp_path_factory.mktemp("zoo"))


BENIGN = {
    "1 thread": ((), 1),
    "2 threads": ((), 2),
    "batch size 1": (("--diffeval-batch-size=1",), 1),
    "xdist -n 2": (("-n", "2"), 1),
}


@pytest.mark.parametrize("variation", sorted(BENIGN))
def test_shipped_model_passes_under_benign_variation(variation: str, tmp_path: Path) -> None:
    args, threads = BENIGN[variation]
    code, output = run_suite(tmp_path, *args, threads=threads)
    assert code == 0, output[-6000:]
    assert re.search(r"\b11 passed", output), output[-2000:]
    assert not caught(output)


ZOO = ["undertrained", "noise-0.3", "noise-1.0", "text-zeroed", "prompts-shuffled", "scheduler-swapped",
       "overflow-nan"]


@pytest.mark.parametrize("member", ZOO)
def test_regression_zoo_member_fails_naming_what_caught_it(member: str, zoo: dict[str, Path], tmp_path: Path) -> None:
    code, output = run_suite(tmp_path, f"--diffeval-model={zoo[member]}")
    assert code == 1, output[-6000:]
    hits = caught(output)
    tripped = "TripwireError" in output
    print(f"{member}: caught by {sorted(hits)}{' and tripwires' if tripped else ''}")
    assert hits or tripped, output[-6000:]
    assert re.search(r"FAILED model_tests/test_embedded_t2i.py::test_heldout_prompts_against_baseline", output)
    if member == "overflow-nan":
        assert "tripwire: " in output and "had NaN/inf" in output
    elif member == "text-zeroed":  # every prompt gives the same image: the tripwire says so
        assert "different prompts gave identical images" in output
    else:
        assert any(test == "test_heldout_prompts_against_baseline" for test, _ in hits), sorted(hits)
