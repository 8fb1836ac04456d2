"""``python -m pytest_diffeval baselines list|diff``: what a reviewer of a baseline update
reads.  Uses the baselines and results of the scenario in ``test_report.py`` (one model run
for both files), and hand-edited copies of its baseline file for exact expectations."""

from __future__ import annotations

import copy
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from test_report import FAILING, PASSING, Scenario, shared_scenario

from pytest_diffeval.__main__ import main

# The tests that read the shared recorded project run on one xdist worker: another worker
# asking for it would wait while the first records it (pyproject: --dist loadgroup).
pytestmark = pytest.mark.xdist_group("report-scenario")


@pytest.fixture
def scenario(project: pytest.Pytester, tmp_path_factory: pytest.TempPathFactory, worker_id: str) -> Scenario:
    """test_report's recorded / failing runs (made once per session, shared with it)."""
    return shared_scenario(project, tmp_path_factory, worker_id)

BASELINE = Path("baselines") / "test_user" / "test_alignment.json"


def cli(capsys: pytest.CaptureFixture[str], *args: str | Path) -> tuple[int, str, str]:
    """Run the command line in this process: (exit status, stdout, stderr)."""
    status = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return status, out, err


def _entries(data: dict[str, Any], metric: str) -> dict[str, Any]:
    """The stored entry of ``metric`` (per-hardware layout or the older flat one)."""
    check = data["checks"][metric]
    return next(iter(check["hardware"].values())) if "hardware" in check else check


def _check(metrics: dict[str, Any], test: str, metric: str) -> dict[str, Any]:
    [check] = [c for c in metrics["checks"] if c["test"] == test and c["metric"] == metric]
    return check


def test_list_shows_every_stored_baseline(scenario: Scenario, capsys: pytest.CaptureFixture[str],
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    root = Path(scenario.root)
    monkeypatch.chdir(root)
    status, out, err = cli(capsys, "baselines", "list")  # default: ./baselines
    assert status == 0 and err == ""
    lines = out.splitlines()
    assert lines[0] == "baselines in baselines (1 baseline file, 2 entries)"
    assert lines[1].split() == ["test", "metric", "hardware", "backbone", "value", "n", "recorded", "model"]
    stored = json.loads((root / BASELINE).read_text())
    for line, metric in zip(lines[2:], ["brightness", "clip_score"]):
        entry = _entries(stored, metric)
        fields = line.split()
        assert fields[:2] == [FAILING, metric]
        assert fields[4:7] == [f"{entry['value']:#.4g}", "6", entry["recorded"]]
        assert re.match(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", fields[6])
        assert fields[7:] == ["model", f"({entry['provenance']['model_hash'][:10]})", "StableDiffusionPipeline",
                              "float32", "cpu"]
    assert len(lines) == 4


def test_diff_baselines_against_a_failing_run(scenario: Scenario, capsys: pytest.CaptureFixture[str]) -> None:
    root = Path(scenario.root)
    status, out, err = cli(capsys, "baselines", "diff", root / "baselines", scenario.serial.results, "--top", "2")
    assert status == 0 and err == ""
    metrics = scenario.serial.metrics
    regressed = _check(metrics, FAILING, "brightness")
    block = out[out.index("  brightness [cpu/float32]"):out.index("  clip_score")]
    assert (f"old {regressed['baseline']:#.4g}   new {regressed['value']:#.4g}   delta {regressed['delta']:+#.4g}"
            in block)
    assert "worse; this run's verdict: regressed" in block
    old_hash = _entries(json.loads((root / BASELINE).read_text()), "brightness")["provenance"]["model_hash"]
    assert f"note: model_hash: {old_hash} -> {regressed['provenance']['model_hash']}" in block  # the model changed
    assert "samples: 6 of 6 paired (prompt, seed) samples changed" in block
    moved = sorted(regressed["samples"], key=lambda s: -abs(s["change"]))[:2]
    shown = re.findall(r"^\s+([+-][\d.e+-]+)\s+\S+ -> \S+\s+seed (\d+)\s+'([^']*)'$", block, re.M)
    assert shown == [(f"{m['change']:+#.4g}", str(m["seed"]), m["prompt"]) for m in moved]
    assert f"{PASSING}\n  brightness [cpu/float32] (custom; higher is better): only in B (added)" in out
    assert out.rstrip().endswith("2 compared (1 worse, 1 better, 0 unchanged), 1 only in B (added), "
                                 "0 only in A (removed)")


def test_diff_of_serial_and_xdist_results_is_empty(scenario: Scenario, capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = cli(capsys, "baselines", "diff", Path(scenario.serial.results) / "metrics.json",
                         scenario.parallel.results)
    assert status == 0
    assert out.rstrip().endswith("3 compared (0 worse, 0 better, 3 unchanged), 0 only in B (added), "
                                 "0 only in A (removed)")


def test_diff_of_a_baseline_update_shows_the_samples_that_moved(scenario: Scenario, tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    stored = json.loads((Path(scenario.root) / BASELINE).read_text())
    old_dir, new_dir = tmp_path / "old", tmp_path / "new"
    (old_dir / "test_user").mkdir(parents=True)
    (new_dir / "test_user").mkdir(parents=True)
    # The old side in the older layout (one entry per metric), the new one per hardware.
    flat = {**stored, "checks": {m: _entries(stored, m) for m in stored["checks"]}}
    (old_dir / "test_user" / "test_alignment.json").write_text(json.dumps(flat))
    updated = copy.deepcopy(stored)
    entry = _entries(updated, "brightness")
    moved = entry["samples"][4]
    moved["value"] -= 30.0
    entry["value"] -= 5.0
    del updated["checks"]["clip_score"]
    (new_dir / "test_user" / "test_alignment.json").write_text(json.dumps(updated))
    other = copy.deepcopy(updated)
    other["test"] = "test_user.py::test_new"
    (new_dir / "test_user" / "test_new.json").write_text(json.dumps(other))

    status, out, err = cli(capsys, "baselines", "diff", old_dir, new_dir)
    assert status == 0 and err == ""
    old_value = _entries(stored, "brightness")["value"]
    assert f"old {old_value:#.4g}   new {old_value - 5:#.4g}   delta -5.000 " in out and "worse" in out
    assert "samples: 1 of 6 paired (prompt, seed) samples changed" in out
    assert re.search(rf"^\s+-30.00\s+\S+ -> \S+\s+seed {moved['seed']}\s+'{re.escape(moved['prompt'])}'$", out, re.M)
    assert "clip_score [cpu/float32] (tiny-clip@" in out and "only in A (removed)" in out
    assert "test_user.py::test_new\n  brightness [cpu/float32] (custom; higher is better): only in B (added)" in out
    assert out.rstrip().endswith("1 compared (1 worse, 0 better, 0 unchanged), 1 only in B (added), "
                                 "1 only in A (removed)")

    # Two single files work too.
    status, out, _ = cli(capsys, "baselines", "diff", old_dir / "test_user" / "test_alignment.json",
                         new_dir / "test_user" / "test_alignment.json")
    assert status == 0 and "1 compared (1 worse" in out


@pytest.mark.parametrize("content, message", [
    ('{"format_version": 1, "checks": {', "not valid JSON"),
    ('{"format_version": 99, "checks": {}}', "format_version 99 is newer"),
    ('{"format_version": 1, "checks": {"clip_score": {"metric": "clip_score"}}}',
     "the entry for 'clip_score' has no 'value'"),
    ('[1, 2]', "not a pytest-diffeval baseline"),
], ids=["truncated", "newer-format", "no-value", "not-a-baseline"])
def test_unreadable_input_is_an_error_naming_the_file(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                      content: str, message: str) -> None:
    good = {"format_version": 1, "test": "t.py::test_ok",
            "checks": {"m": {"metric": "m", "backbone": "b", "higher_is_better": True, "value": 1.0}}}
    folder = tmp_path / "baselines"
    folder.mkdir()
    (folder / "test_ok.json").write_text(json.dumps(good))
    bad = folder / "test_bad.json"
    bad.write_text(content)
    status, out, err = cli(capsys, "baselines", "list", folder)
    assert status == 2
    assert "t.py::test_ok" in out  # the readable files are still listed
    assert f"error: {bad}: " in err and message in err
    status, out, err = cli(capsys, "baselines", "diff", folder / "test_ok.json", bad)
    assert status == 2 and out == "" and f"error: {bad}: " in err and message in err


def test_unreadable_paths_and_results(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "nowhere"
    status, _, err = cli(capsys, "baselines", "list", missing)
    assert status == 2 and err == f"error: {missing}: no such file or directory\n"
    status, _, err = cli(capsys, "baselines", "list", tmp_path)
    assert status == 2 and f"error: {tmp_path}: holds no baseline files" in err
    results = tmp_path / "results"
    results.mkdir()
    (results / "metrics.json").write_text('{"format_version": 1, "checks": [')
    status, _, err = cli(capsys, "baselines", "diff", results, results)
    assert status == 2 and f"error: {results / 'metrics.json'}: not valid JSON" in err


def test_python_m_entry_point_runs_without_torch(scenario: Scenario) -> None:
    probe = ("import runpy, sys\n"
             "sys.argv = ['pytest_diffeval', 'baselines', 'diff', 'baselines', 'diffeval-results']\n"
             "try:\n    runpy.run_module('pytest_diffeval', run_name='__main__')\n"
             "except SystemExit as exit:\n    assert exit.code == 0, exit.code\n"
             "assert 'torch' not in sys.modules, 'review imported torch'\n")
    done = subprocess.run([sys.executable, "-c", probe], cwd=scenario.root, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "worse; this run's verdict: regressed" in done.stdout
    done = subprocess.run([sys.executable, "-m", "pytest_diffeval", "baselines", "list"], cwd=scenario.root,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and FAILING in done.stdout, done.stderr
