"""Baselines under faults (issue 21): an update that could not write fails, a rewritten entry
is "updated" (never "pass"), concurrent updates stay consistent, malformed files are a
corrupt-baseline error for that file only, and leftovers of killed updates are swept."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from test_baselines import cheap_project

from pytest_diffeval import baselines
from pytest_diffeval.baselines import BaselineFormatError, read_baseline_file

DISK_FULL_CONFTEST = """
import errno, os
if os.environ.get("DISK_FULL"):  # every baseline write fails as on a full disk
    from pytest_diffeval.baselines import extension as _extension

    def _full(path, text):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    _extension.atomic_write_text = _full
"""


def _checks(project: pytest.Pytester) -> dict[str, dict]:
    document = json.loads((project.path / "diffeval-results" / "metrics.json").read_text())
    return {c["test"]: c for c in document["checks"]} | {"summary": document["summary"]}


def test_an_update_says_updated_with_the_change_and_fails_when_nothing_was_written(
        pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    cheap_project(pytester, {"test_one": ["x", "y"]})
    (pytester.path / "conftest.py").write_text((pytester.path / "conftest.py").read_text() + DISK_FULL_CONFTEST)
    pytester.runpytest("--snapshot-update").assert_outcomes(passed=2)
    recorded = _checks(pytester)
    assert {recorded[t]["verdict"] for t in ("test_one.py::test_case[x]", "test_one.py::test_case[y]")} == {"recorded"}

    # A 30-point regression rewritten by --snapshot-update: "updated", with what it replaced.
    monkeypatch.setenv("OFFSET", "-30")
    result = pytester.runpytest("--snapshot-update")
    result.assert_outcomes(passed=2)
    updated = _checks(pytester)
    for test in ("test_one.py::test_case[x]", "test_one.py::test_case[y]"):
        row = updated[test]
        assert row["verdict"] == "updated" and row["passed"] is None  # not judged, and never passed: true
        assert row["baseline"] == pytest.approx(recorded[test]["value"])
        assert row["delta"] == pytest.approx(row["value"] - recorded[test]["value"]) and row["delta"] < -29
        line = next(line for line in result.outlines if line.startswith(test))
        assert line.split()[-2:] == [f"{row['delta']:+#.4g}", "updated"]  # the table: change, then the verdict
    assert updated["summary"]["failed_checks"] == 0
    report = (pytester.path / "diffeval-results" / "report.html").read_text()
    assert report.count('data-verdict="updated"') == 2 and 'data-verdict="pass"' not in report
    assert '<span class="badge recorded">updated</span>' in report

    # The disk is full: nothing is written, the test fails naming the file, the OS error and the fix.
    files = {p: p.read_bytes() for p in (pytester.path / "baselines").rglob("*.json")}
    monkeypatch.setenv("DISK_FULL", "1")
    monkeypatch.setenv("OFFSET", "-10")
    failed = pytester.runpytest("--snapshot-update")
    failed.assert_outcomes(failed=2)
    out = failed.stdout.str()
    for path in files:
        assert f"could not write baseline {path}: [Errno 28] No space left on device: '{path}'; nothing was " \
               "recorded" in out
    assert f"fix: make {next(iter(files)).parent} writable (or free space on its disk), then re-record with: " \
           "pytest --snapshot-update 'test_one.py::test_case[x]'" in out
    assert {p: p.read_bytes() for p in files} == files
    assert {_checks(pytester)[t]["verdict"] for t in ("test_one.py::test_case[x]", "test_one.py::test_case[y]")} \
        == {"not recorded"}


def test_update_verdict() -> None:
    from types import SimpleNamespace

    from pytest_diffeval.baselines import NoEntry, update_verdict
    from pytest_diffeval.verdicts import compare_values

    comparison = compare_values("m", "b", True, 50.0, 85.0, 1.0)
    kept = SimpleNamespace(updated=False, created=False)
    rewritten = SimpleNamespace(updated=True, created=False)
    assert update_verdict(True, comparison, kept) == "pass"
    assert update_verdict(True, comparison, rewritten) == "updated"
    assert update_verdict(True, None, SimpleNamespace(updated=False, created=True)) == "recorded"
    assert update_verdict(True, NoEntry("cpu/float32", ["cuda/x/float16"]), rewritten) == "recorded"


# --------------------------------------------------------------------------- malformed files


@pytest.mark.parametrize(("text", "reason"), [
    ("[" * 100_000 + "]" * 100_000, "nest more than 32 levels deep"),  # the parser's recursion limit
    ('{"format_version": 2, "checks": {}, "x": ' + "[" * 40 + "]" * 40 + "}", "nest more than 32 levels deep"),
    ('{"format_version": 2, "checks": {"m": ' + "9" * 400 + "}}", "it holds a 400-digit integer"),
    ('{"format_version": 2, "checks": {"m": -' + "9" * 5000 + "}}", "it holds a 5000-digit integer"),  # int() limit
], ids=["deeper-than-the-parser", "deep", "400-digit", "5000-digit"])
def test_read_baseline_file_refuses_deep_nesting_and_huge_integers(tmp_path: Path, text: str, reason: str) -> None:
    file = tmp_path / "b.json"
    file.write_text(text)
    with pytest.raises(BaselineFormatError, match=reason):
        read_baseline_file(file)


def test_malformed_baselines_fail_only_their_own_test(pytester: pytest.Pytester) -> None:
    """Deep nesting, a 400-digit value and a symlinked folder: each fails its own test with a
    corrupt-baseline error naming the file and the fix; the session and the other tests go on."""
    cheap_project(pytester, {"test_one": ["deep", "huge", "fine"], "test_two": ["linked"]})
    pytester.runpytest("--snapshot-update").assert_outcomes(passed=4)
    root = pytester.path / "baselines"
    deep, huge = root / "test_one" / "test_case[deep].json", root / "test_one" / "test_case[huge].json"
    deep.write_text("[" * 100_000 + "]" * 100_000)
    data = json.loads(huge.read_text())
    [entry] = data["checks"]["level"]["hardware"].values()
    entry["value"] = 10 ** 399
    huge.write_text(json.dumps(data))
    (root / "stray").mkdir()
    (root / "stray" / "other.json").write_text("{" * 100_000)  # a file no test owns: scanned for orphans
    elsewhere = pytester.path / "elsewhere"
    (root / "test_two").rename(elsewhere)
    (root / "test_two").symlink_to(elsewhere, target_is_directory=True)

    result = pytester.runpytest()
    result.assert_outcomes(passed=1, failed=3)
    out = result.stdout.str()
    assert "INTERNALERROR" not in out and "RecursionError" not in out
    assert f"baseline {deep} cannot be used: its lists and objects nest more than 32 levels deep" in out
    assert f"baseline {huge} cannot be used: it holds a 400-digit integer" in out
    assert "no baseline for" not in out
    assert f"baseline folder {root / 'test_two'} is a symbolic link to {elsewhere}, outside the baselines folder" in out
    assert "fix: restore it from version control, or re-record it with: pytest --snapshot-update " \
           "'test_one.py::test_case[deep]'" in out
    assert "fix: replace the link with a real folder" in out

    from pytest_diffeval.__main__ import main

    assert main(["baselines", "list", str(root)]) != 0  # reported per file, no traceback


def test_baselines_list_reports_a_deep_file_and_goes_on(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from pytest_diffeval.__main__ import main

    (tmp_path / "deep.json").write_text("[" * 100_000 + "]" * 100_000)
    (tmp_path / "good.json").write_text(json.dumps({"format_version": 2, "test": "t.py::test_g", "checks": {
        "m": {"hardware": {"cpu/float32": {"metric": "m", "value": 1.5, "signature": {}}}}}}))
    status = main(["baselines", "list", str(tmp_path)])
    captured = capsys.readouterr()
    assert f"error: {tmp_path / 'deep.json'}: its lists and objects nest more than 32 levels deep" in captured.out + \
        captured.err
    assert "t.py::test_g" in captured.out and status != 0


# --------------------------------------------------------------------------- concurrency, leftovers


def _drift_collection(file: Path, fill: float):
    import numpy as np
    from syrupy.data import Snapshot, SnapshotCollection

    record = {"metric": "drift", "backbone": "f", "higher_is_better": False, "value": 0.0, "signature": {},
              "details": {}, "provenance": {"device": "cpu", "dtype": "torch.float32"}, "_test": "t.py::test_x",
              "_state": {"tensors": {"real_features_sum": np.full(4, fill),
                                     "real_features_num_samples": np.array(8)},
                         "metadata": {"feature_id": "f", "preprocessing": "p"}}}
    collection = SnapshotCollection(location=str(file))
    collection.add(Snapshot(name="test_x[drift]", data=record))
    return collection


def _named_statistics(file: Path) -> Path:
    details = json.loads(file.read_text())["checks"]["drift"]["hardware"]["cpu/float32"]["details"]
    return file.parent / details["statistics_file"]


def test_two_concurrent_updates_leave_a_json_whose_statistics_file_exists(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Update A pauses between replacing the JSON and removing the statistics files it no
    longer names; update B of the same test runs meanwhile.  Without the folder's lock, A's
    clean-up deletes B's new statistics file, which the final JSON names."""
    file = tmp_path / "b" / "test_x.json"
    write = baselines.DiffevalBaselineExtension.write_snapshot_collection
    write(snapshot_collection=_drift_collection(file, 1.0))
    a_paused, b_done = threading.Event(), threading.Event()
    clean_up = baselines.remove_stale_sidecars

    def paused_clean_up(*args, **kwargs):
        if threading.current_thread().name == "A":
            a_paused.set()
            b_done.wait(timeout=1.5)  # B runs to its end here, unless the lock makes it wait for A
        return clean_up(*args, **kwargs)

    monkeypatch.setattr(baselines.extension, "remove_stale_sidecars", paused_clean_up)
    errors: list[BaseException] = []

    def update(fill: float, done: threading.Event | None = None) -> None:
        try:
            write(snapshot_collection=_drift_collection(file, fill))
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)
        finally:
            if done is not None:
                done.set()

    a = threading.Thread(target=update, args=(2.0,), name="A")
    a.start()
    assert a_paused.wait(timeout=120)
    b = threading.Thread(target=update, args=(3.0, b_done), name="B")
    b.start()
    a.join(timeout=120)
    b.join(timeout=120)
    assert not errors
    named = _named_statistics(file)
    assert named.is_file()
    assert hashlib.sha256(named.read_bytes()).hexdigest()[:16] == named.name.split(".")[-2]
    assert [p.name for p in file.parent.glob("*.safetensors")] == [named.name]


def test_remove_leftovers_waits_for_a_live_writer(tmp_path: Path) -> None:
    """A statistics file a writer holding the folder's lock has written, but whose JSON is not
    written yet, is not a leftover: the sweep waits for the lock."""
    file = tmp_path / "test_x.json"
    statistics = tmp_path / "test_x.drift.cpu-float32.0123456789abcdef.safetensors"
    swept: list[list[Path]] = []
    with baselines.folder_lock(tmp_path):
        statistics.write_bytes(b"new statistics")
        sweeper = threading.Thread(target=lambda: swept.append(baselines.remove_leftovers(tmp_path)))
        sweeper.start()
        sweeper.join(timeout=0.5)
        assert sweeper.is_alive() and statistics.exists()  # waiting for the lock
        file.write_text(json.dumps({"format_version": 2, "checks": {"drift": {"hardware": {"cpu/float32": {
            "value": 0.0, "signature": {}, "details": {"statistics_sha256": "0123456789abcdef",
                                                       "statistics_file": statistics.name}}}}}}))
    sweeper.join(timeout=60)
    assert swept == [[]] and statistics.exists()


def test_an_update_session_sweeps_leftovers_of_every_test(pytester: pytest.Pytester) -> None:
    """Killed updates leave temp files and statistics files no JSON names.  Any
    ``--snapshot-update`` session removes them, also where no baseline is rewritten; a
    live writer's temp file, a file of a JSON this version cannot read and a user's own
    ``.safetensors`` stay."""
    cheap_project(pytester, {"test_one": ["x"], "test_two": ["y"]})
    pytester.runpytest("--snapshot-update").assert_outcomes(passed=2)
    one, two = pytester.path / "baselines" / "test_one", pytester.path / "baselines" / "test_two"
    dead = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True, check=True).stdout)  # a process that has exited
    content = b"statistics of a killed update"
    sha = hashlib.sha256(content).hexdigest()[:16]
    leftovers = [one / f".test_case[x].json.{dead}.1.tmp", one / f"test_case[x].drift.cpu-float32.{sha}.safetensors",
                 two / f"gone.drift.cpu-float32.{sha}.safetensors",  # its JSON was deleted: content-addressed
                 two / "test_case[y].level.cpu-float32.safetensors"]
    kept = [one / f".test_case[x].json.{os.getpid()}.1.tmp",  # a writer that is still running
            two / "reference.safetensors",  # not a name this plugin writes
            two / f"broken.drift.cpu-float32.{'f' * 16}.safetensors"]  # may belong to broken.json
    (two / "broken.json").write_text("{not json")
    for path in [*leftovers, *kept]:
        path.write_bytes(content)
    before = {p: p.read_bytes() for p in pytester.path.joinpath("baselines").rglob("*.json")}

    pytester.runpytest("--snapshot-update", "-p", "no:randomly").assert_outcomes(passed=2)
    assert {p: p.read_bytes() for p in before} == before  # nothing rewritten: the sweep alone removed them
    assert [p for p in leftovers if p.exists()] == []
    assert all(p.exists() for p in kept)
