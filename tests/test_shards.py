"""Beyond one machine: ``--diffeval-shard=i/N`` picks a deterministic 1/N of the tests with
each model's tests together (one CI runner per shard), and ``python -m pytest_diffeval
results merge`` joins the runners' results directories into one, HTML report included."""

from __future__ import annotations

import json
import re
import shutil
import textwrap
from pathlib import Path

import numpy as np
import pytest

from pytest_diffeval.__main__ import main
from pytest_diffeval.generation import ImageSet
from pytest_diffeval.report import write_outputs
from pytest_diffeval.scheduling import Entry, assign_shards, parse_shard


def suite(models: int, per_model: int, free: int = 0) -> list[Entry]:
    out = [Entry(f"t{m}.py::test[{i}]", f"model:M{m}") for i in range(per_model) for m in range(models)]
    return out + [Entry(f"free.py::test[{i}]", None) for i in range(free)]


@pytest.mark.parametrize("models, shards", [(5, 2), (5, 3), (2, 4), (1, 3)])
def test_shards_partition_the_suite_keeping_models_together_where_they_can(models: int, shards: int) -> None:
    entries = suite(models, per_model=6, free=4)
    assigned = assign_shards(entries, shards)
    assert set(assigned) == {e.nodeid for e in entries} and set(assigned.values()) <= set(range(shards))
    assert assign_shards(list(entries), shards) == assigned  # deterministic
    sizes = [list(assigned.values()).count(s) for s in range(shards)]
    assert max(sizes) - min(sizes) <= 6  # balanced to within one model's tests
    per_model = {m: {assigned[e.nodeid] for e in entries if e.group == f"model:M{m}"} for m in range(models)}
    if models >= shards:
        assert all(len(s) == 1 for s in per_model.values())  # each model on one runner only
    else:
        assert all(len(s) == shards // models for s in per_model.values())  # spread over an equal share
        assert all(not a & b for a in per_model.values() for b in per_model.values() if a is not b)


def test_shard_values_are_checked() -> None:
    assert parse_shard("2/4") == (2, 4)
    for bad in ("0/4", "5/4", "x", "1/2/3"):
        with pytest.raises(ValueError, match="--diffeval-shard"):
            parse_shard(bad)


SHARDED = """
    import pytest

    @pytest.mark.diffeval_model("model-a")
    @pytest.mark.parametrize("i", range(3))
    def test_a(i):
        pass

    @pytest.mark.diffeval_model("model-b")
    @pytest.mark.parametrize("i", range(3))
    def test_b(i):
        pass

    def test_free():
        pass
"""


def test_shard_option_selects_complementary_shards(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_sharded=textwrap.dedent(SHARDED))
    selected = []
    for index in (1, 2):
        result = pytester.runpytest("--co", "-q", f"--diffeval-shard={index}/2")
        selected.append({line for line in result.outlines if "::" in line})
    assert not selected[0] & selected[1] and len(selected[0] | selected[1]) == 7
    for shard in selected:
        assert len({re.sub(r"\[\d\]", "", n) for n in shard if "test_free" not in n}) == 1  # one model per runner
    bad = pytester.runpytest("--diffeval-shard=3/2")
    assert bad.ret != 0
    bad.stderr.fnmatch_lines(["*--diffeval-shard=3/2: i must be between 1 and N*"])


# --------------------------------------------------------------------------- results merge


def results_dir(root: Path, test: str, value: float, verdict: str, shard: str) -> Path:
    """A results directory as one runner leaves it: metrics.json, report.html and the images
    of its (failed) check, written by the report code the plugin uses."""
    out = root / f"results-{shard.replace('/', '-of-')}"
    images = ImageSet(images=np.full((2, 8, 8, 3), 7 * len(test), dtype=np.uint8), prompts=["a cat", "a dog"],
                      seeds=[0, 0])
    folder = images.save(out / re.sub(r"\W+", "_", test))
    row = {"test": test, "metric": "clip_score", "backbone": "tiny-clip@1", "value": value, "higher_is_better": True,
           "verdict": verdict, "threshold": 30.0, "baseline": None, "tolerance": None, "delta": None,
           "baseline_file": None, "per_sample": [value - 1, value + 1], "prompts": ["a cat", "a dog"], "seeds": [0, 0],
           "provenance": {"model": "m"}, "details": {}, "images": str(folder)}
    write_outputs([row], results_dir=out, report=out / "report.html",
                  meta={"created": "2026-01-01T00:00:00Z", "exitstatus": 0 if verdict == "pass" else 1, "shard": shard},
                  outcomes={test: "passed" if verdict == "pass" else "failed"})
    return out


def test_results_merge_joins_runners_into_one_metrics_json_and_report(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    one = results_dir(tmp_path / "runner1", "test_m.py::test_a", 31.5, "pass", "1/2")
    two = results_dir(tmp_path / "runner2", "test_m.py::test_b", 12.0, "below threshold", "2/2")
    out = tmp_path / "merged"
    assert main(["results", "merge", str(one), str(two), "--out", str(out)]) == 0
    assert "2 tests (1 failed), 2 metric checks (1 failed)" in capsys.readouterr().out
    merged = json.loads((out / "metrics.json").read_text())
    assert merged["summary"] == {"tests": 2, "failed_tests": 1, "checks": 2, "failed_checks": 1}
    assert [c["test"] for c in merged["checks"]] == ["test_m.py::test_b", "test_m.py::test_a"]  # failed first
    assert merged["exitstatus"] == 1 and [m["shard"] for m in merged["merged_from"]] == ["1/2", "2/2"]
    for check in merged["checks"]:
        folder = Path(check["images"])
        assert folder.parent == out.resolve() and (folder / "samples.json").is_file()
        assert [s["value"] for s in check["samples"]] == [check["value"] - 1, check["value"] + 1]
    report = (out / "report.html").read_text()
    assert "2 of 2 metric checks" not in report and "1 of 2 tests failed" in report
    assert report.count("data:image/png;base64,") == 4  # both runners' images, inlined
    assert "test_m.py::test_a" in report and "test_m.py::test_b" in report


@pytest.mark.parametrize("verdict", ["below threshold", "updated"])
def test_a_merge_of_one_runner_writes_the_head_its_run_wrote(tmp_path: Path, verdict: str) -> None:
    """``metrics.json`` has one builder of its head (``report.document_head``): a merge of one
    runner's directory has the summary and test entries that runner wrote (an updated check,
    not judged, is not counted as failed by either)."""
    one = results_dir(tmp_path / "runner1", "test_m.py::test_b", 12.0, verdict, "1/1")
    assert main(["results", "merge", str(one), "--out", str(tmp_path / "merged")]) == 0
    written = json.loads((one / "metrics.json").read_text())
    merged = json.loads((tmp_path / "merged" / "metrics.json").read_text())
    assert merged["summary"] == written["summary"] and merged["summary"]["checks"] == 1
    assert merged["summary"]["failed_checks"] == (verdict != "updated")
    assert merged["tests"] == written["tests"] and merged["format_version"] == written["format_version"]


def test_results_merge_refuses_overlap_and_input_that_is_not_results(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    one = results_dir(tmp_path / "runner1", "test_m.py::test_a", 31.5, "pass", "1/2")
    again = results_dir(tmp_path / "runner2", "test_m.py::test_a", 30.0, "pass", "2/2")
    out = tmp_path / "merged"
    assert main(["results", "merge", str(one), str(again), "--out", str(out)]) == 2
    assert "test_m.py::test_a is in both" in capsys.readouterr().err
    assert main(["results", "merge", str(one), str(again), "--out", str(out), "--allow-duplicates"]) == 0
    assert json.loads((out / "metrics.json").read_text())["checks"][0]["value"] == 30.0  # the later one
    assert main(["results", "merge", str(one), str(tmp_path), "--out", str(out)]) == 2
    assert "no metrics.json here" in capsys.readouterr().err
    assert main(["results", "merge", str(one), "--out", str(one)]) == 2
    assert "the output directory is one of the inputs" in capsys.readouterr().err


# --------------------------------------------------------------------------- results merge: untrusted input


def _tree(root: Path) -> dict[str, bytes | None]:
    """Every path under ``root`` with its bytes (None for folders): to prove nothing changed."""
    return {str(p.relative_to(root)): (None if p.is_dir() else p.read_bytes()) for p in sorted(root.rglob("*"))}


def _edit_check(results: Path, **changes: object) -> None:
    metrics = json.loads((results / "metrics.json").read_text())
    metrics["checks"][0].update(changes)
    (results / "metrics.json").write_text(json.dumps(metrics))


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A folder next to the results that a forged metrics.json must not reach."""
    folder = tmp_path / "outside" / "private"
    folder.mkdir(parents=True)
    (folder / "secret.png").write_bytes(b"not yours")
    return folder


@pytest.mark.parametrize("images, message", [
    ("..", "which contains '..' and could lead outside the results directory"),
    ("../../outside/private", "which contains '..' and could lead outside the results directory"),
    ("/", "which names no folder inside the results directory"),
    (".", "which names no folder inside the results directory"),
    (["a", "b"], "not a folder path"),
], ids=["dotdot", "relative-climb", "root", "dot", "not-a-string"])
def test_results_merge_refuses_image_folders_outside_the_results(
        tmp_path: Path, outside: Path, capsys: pytest.CaptureFixture[str], images: object, message: str) -> None:
    one = results_dir(tmp_path / "runner1", "test_m.py::test_a", 31.5, "pass", "1/2")
    two = results_dir(tmp_path / "runner2", "test_m.py::test_b", 12.0, "below threshold", "2/2")
    _edit_check(two, images=images)
    before = _tree(tmp_path)
    out = tmp_path / "runner2" / "merged"  # "images": ".." once made the merge delete out's parent
    assert main(["results", "merge", str(one), str(two), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"error: {two / 'metrics.json'}: the 'images' of 'test_m.py::test_b' is {images!r}, {message}" in err
    assert "Fix: 'images' names the check's image folder" in err
    assert _tree(tmp_path) == before  # nothing written, copied or deleted anywhere


def test_results_merge_never_follows_an_image_folder_out_of_the_results(
        tmp_path: Path, outside: Path, capsys: pytest.CaptureFixture[str]) -> None:
    one = results_dir(tmp_path / "runner1", "test_m.py::test_a", 31.5, "pass", "1/2")
    two = results_dir(tmp_path / "runner2", "test_m.py::test_b", 12.0, "below threshold", "2/2")
    out = tmp_path / "merged"

    # An absolute path elsewhere: only its name is looked up inside the results directory.
    _edit_check(two, images=str(outside))
    before = _tree(outside.parent)
    assert main(["results", "merge", str(one), str(two), "--out", str(out)]) == 0
    assert f"note: images of a check are missing: no folder 'private' in {two}" in capsys.readouterr().err
    assert not (out / "private").exists() and _tree(outside.parent) == before
    assert json.loads((out / "metrics.json").read_text())["checks"][0]["images"] is None

    # A symbolic link in the results directory that leads out of it.
    (two / "private").symlink_to(outside, target_is_directory=True)
    assert main(["results", "merge", str(one), str(two), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"error: {two / 'metrics.json'}: image folder 'private' resolves to {outside.resolve()}, outside {two}" in err
    assert _tree(outside.parent) == before

    # The output's folder of that name is a link out of --out: it is never replaced or deleted.
    (two / "private").unlink()
    shutil.copytree(two / "test_m_py_test_b", two / "private")
    (out / "private").symlink_to(outside, target_is_directory=True)
    assert main(["results", "merge", str(one), str(two), "--out", str(out)]) == 2
    assert f"image folder 'private' resolves to {outside.resolve()}, outside {out}" in capsys.readouterr().err
    assert _tree(outside.parent) == before


def test_results_merge_refuses_samples_json_naming_files_outside_its_folder(
        tmp_path: Path, outside: Path, capsys: pytest.CaptureFixture[str]) -> None:
    one = results_dir(tmp_path / "runner1", "test_m.py::test_a", 31.5, "pass", "1/2")
    two = results_dir(tmp_path / "runner2", "test_m.py::test_b", 12.0, "below threshold", "2/2")
    listing = two / "test_m_py_test_b" / "samples.json"
    data = json.loads(listing.read_text())
    forged = "../../../outside/private/secret.png"
    data["samples"][0]["file"] = forged
    listing.write_text(json.dumps(data))
    out = tmp_path / "merged"
    assert main(["results", "merge", str(one), str(two), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"error: {listing}: sample file {forged!r} contains '..'" in err
    assert "Fix: samples.json lists the images beside it by file name" in err
    assert not out.exists()


def test_results_merge_reads_baseline_files_only_under_root(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    one = results_dir(tmp_path / "runner1", "test_m.py::test_a", 31.5, "pass", "1/2")
    root = tmp_path / "checkout"
    inside_root = root / "baselines" / "test_m" / "test_a.json"
    inside_root.parent.mkdir(parents=True)
    inside_root.write_text("{}")
    elsewhere = tmp_path / "elsewhere" / "test_a.json"
    elsewhere.parent.mkdir()
    elsewhere.write_text("{}")
    out = tmp_path / "merged"
    for recorded, expected in [("/runner/work/repo/baselines/test_m/test_a.json", str(inside_root.resolve())),
                               (str(elsewhere), None), ("../../elsewhere/test_a.json", None)]:
        _edit_check(one, baseline_file=recorded)
        assert main(["results", "merge", str(one), "--out", str(out), "--root", str(root)]) == 0
        assert json.loads((out / "metrics.json").read_text())["checks"][0]["baseline_file"] == expected
        err = capsys.readouterr().err
        assert (expected is None) == (f"baseline file {recorded} of test_m.py::test_a is not under --root" in err)


# --------------------------------------------------------------------------- results merge: every field checked


@pytest.mark.parametrize("field, value, message", [
    ("delta", "<img src=x onerror=alert(1)>", "'delta' is '<img src=x onerror=alert(1)>', not a finite number"),
    ("value", "NaN", "'value' is 'NaN', not a finite number"),
    ("value", float("inf"), "'value' is inf, not a finite number"),
    ("verdict", ["pass"], "'verdict' is ['pass'], not a string"),
    ("higher_is_better", "yes", "'higher_is_better' is 'yes', not true or false"),
], ids=["script-in-delta", "nan-string", "infinity", "verdict-list", "direction-string"])
def test_results_merge_refuses_fields_of_the_wrong_type_before_writing(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], field: str, value: object, message: str) -> None:
    one = results_dir(tmp_path / "runner1", "test_m.py::test_a", 31.5, "pass", "1/2")
    two = results_dir(tmp_path / "runner2", "test_m.py::test_b", 12.0, "below threshold", "2/2")
    _edit_check(two, **{field: value})
    out = tmp_path / "merged"
    assert main(["results", "merge", str(one), str(two), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"error: {two / 'metrics.json'}: checks[0] (test_m.py::test_b, clip_score) {message}" in err
    assert "Fix: metrics.json is written by a pytest-diffeval run" in err
    assert not out.exists()  # nothing written


def test_results_merge_refuses_a_string_sample_value_and_an_image_folder_named_like_its_outputs(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    one = results_dir(tmp_path / "runner1", "test_m.py::test_a", 31.5, "pass", "1/2")
    two = results_dir(tmp_path / "runner2", "test_m.py::test_b", 12.0, "below threshold", "2/2")
    metrics = json.loads((two / "metrics.json").read_text())
    metrics["checks"][0]["samples"][1]["value"] = "13.0"  # float() reads it; the report's arithmetic did not
    (two / "metrics.json").write_text(json.dumps(metrics))
    out = tmp_path / "merged"
    assert main(["results", "merge", str(one), str(two), "--out", str(out)]) == 2
    assert (f"error: {two / 'metrics.json'}: checks[0] (test_m.py::test_b, clip_score) samples[1] 'value' is '13.0', "
            "not a finite number") in capsys.readouterr().err
    assert not out.exists()

    metrics["checks"][0]["samples"][1]["value"] = 13.0
    (two / "report.html").unlink()  # the run wrote its report elsewhere (--diffeval-report)
    (two / "test_m_py_test_b").rename(two / "report.html")
    metrics["checks"][0]["images"] = str(two / "report.html")
    (two / "metrics.json").write_text(json.dumps(metrics))
    assert main(["results", "merge", str(one), str(two), "--out", str(out)]) == 2
    assert (f"error: {two / 'metrics.json'}: the image folder of 'test_m.py::test_b' is named 'report.html', a file "
            f"the merge writes in {out}. Fix: 'images' names") in capsys.readouterr().err
    assert not out.exists()


def test_results_merge_refuses_two_shards_whose_image_folders_share_a_name(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    one = results_dir(tmp_path / "runner1", "test_m.py::test_a", 31.5, "pass", "1/2")
    two = results_dir(tmp_path / "runner2", "test_m.py::test_b", 12.0, "below threshold", "2/2")
    (two / "test_m_py_test_b").rename(two / "test_m_py_test_a")  # as a run before folders were unique per id
    _edit_check(two, images=str(two / "test_m_py_test_a"))
    out = tmp_path / "merged"
    assert main(["results", "merge", str(one), str(two), "--out", str(out)]) == 2
    assert (f"error: {two / 'metrics.json'}: the image folder 'test_m_py_test_a' of 'test_m.py::test_b' has the name "
            f"of the image folder of 'test_m.py::test_a' in {one}: merged, one test would show the other's images"
            ) in capsys.readouterr().err
    assert not out.exists()


def test_the_report_escapes_every_field_it_shows() -> None:
    from pytest_diffeval.report import render_html

    attack = "<img src=x onerror=alert(1)>"
    row = {"test": "t.py::test_x", "metric": "clip_score", "value": attack, "delta": attack, "baseline": attack,
           "tolerance": 1.0, "verdict": "below threshold", "per_sample": [1.0], "prompts": ["p"], "seeds": [0]}
    html = render_html([row], {"created": attack})
    assert attack not in html and html.count("&lt;img src=x onerror=alert(1)&gt;") >= 3


def _big_results(root: Path, tests: int, samples: int) -> Path:
    checks = [{"test": f"test_big.py::test_{t}", "metric": "clip_score", "backbone": "b", "value": 31.5,
               "higher_is_better": True, "verdict": "pass", "threshold": 30.0, "passed": True,
               "samples": [{"prompt": f"prompt {i % 50} of test {t}", "seed": i // 50, "value": 30.0 + i % 7}
                           for i in range(samples)]} for t in range(tests)]
    root.mkdir(parents=True)
    (root / "metrics.json").write_text(json.dumps({"format_version": 1, "checks": checks}, indent=2))
    return root


def test_results_merge_holds_one_parsed_input_and_streams_its_output(tmp_path: Path) -> None:
    """Measured on an 83 MB input (200 tests x 3500 samples, 2-core machine): 6.8 s CPU and
    855 MB peak RSS before (two parses, Python's indenting JSON encoder, the whole output
    built as one string), 3.1 s and 426 MB now.  Here, in miniature, the peak Python
    allocation relative to the input's size: 13.7x before, 4.6x now (json.loads itself takes ~4x)."""
    import tracemalloc

    from pytest_diffeval.review import merge_results

    source = _big_results(tmp_path / "big", tests=20, samples=2000)
    size = (source / "metrics.json").stat().st_size
    tracemalloc.start()
    try:
        merged = merge_results([source], tmp_path / "merged")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert merged.checks == 20 and json.loads((tmp_path / "merged" / "metrics.json").read_text())["summary"]["checks"] == 20
    assert peak < 6 * size, f"peak {peak / 1e6:.1f} MB for a {size / 1e6:.1f} MB input"
