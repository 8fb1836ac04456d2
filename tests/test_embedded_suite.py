"""The release suite (``model_tests/``) on the embedded model: it passes on the shipped
checkpoint and fails on each regressed variant, naming the tests and metrics that caught
it.  Each run is a real ``pytest model_tests/`` in a subprocess (about a minute each)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FAILED_VERDICTS = {"regressed", "out of bounds", "below threshold", "above threshold"}

pytestmark = pytest.mark.slow


def run_suite(tmp_path: Path, *args: str) -> tuple[int, str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("PYTEST_XDIST_WORKER", None)
    env.pop("PYTEST_ADDOPTS", None)
    command = [sys.executable, "-m", "pytest", "model_tests/", "-p", "no:cacheprovider", "-q",
               f"--diffeval-results={tmp_path / 'results'}", *args]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    return done.returncode, done.stdout + done.stderr


def caught(output: str) -> set[tuple[str, str]]:
    """(test, metric) pairs whose check failed, read from the terminal summary table."""
    rows = set()
    for line in output.splitlines():
        if line.startswith("model_tests/") and any(line.rstrip().endswith(v) for v in FAILED_VERDICTS):
            test, metric = line.split()[:2]
            rows.add((test.split("::")[1].split("[")[0], metric))
    return rows


@pytest.fixture(scope="module")
def variants(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        from make_regressions import make_variants
    finally:
        sys.path.pop(0)
    return make_variants(tmp_path_factory.mktemp("regressions"))


def test_shipped_model_passes(tmp_path: Path) -> None:
    code, output = run_suite(tmp_path)
    assert code == 0, output[-5000:]
    assert re.search(r"\d+ passed", output) and "failed" not in output.splitlines()[-1]


@pytest.mark.parametrize("variant", ["undertrained", "perturbed", "text-broken"])
def test_regressed_variant_fails_naming_tests_and_metrics(variant: str, variants: dict[str, Path], tmp_path: Path) -> None:
    code, output = run_suite(tmp_path, f"--diffeval-model={variants[variant]}")
    assert code == 1, output[-5000:]
    hits = caught(output)
    print(variant, sorted(hits))
    assert ("test_heldout_prompts_against_baseline", "clip_score") in hits or \
           ("test_heldout_prompts_against_baseline", "digit_match") in hits, output[-5000:]
    assert "regressed against the baseline" in output
    assert re.search(r"FAILED model_tests/test_embedded_t2i.py::test_heldout_prompts_against_baseline", output)
