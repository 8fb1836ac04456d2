"""Reports people look at, end to end (pytester, in a subprocess): the terminal table, the
results directory (images, ``metrics.json``), the self-contained HTML report rendered in a
real headless Chromium, JUnit properties and the GitHub step summary, under ``-n 0`` and
``-n 2`` (pytest-mpl's reports came out empty under xdist; ours must not).

One scenario serves every test here and in ``test_review.py`` (a model run costs seconds):
record the baselines with two workers (``--diffeval-results-always``, and
``--diffeval-baseline-images`` so the report can show the baseline's images), darken the
model, then run the failing suite once serially and once with two workers.  It runs once
per session, also when this suite itself runs under xdist (a file lock, as in
pytest-xdist's docs)."""

from __future__ import annotations

import base64
import hashlib
import html
import io
import json
import os
import re
import shutil
import subprocess
import tempfile
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from filelock import FileLock
from test_baselines import darken

USER_TEST = """
import pytest
from conftest import PIPE
from pytest_diffeval import assert_metric
from pytest_diffeval.metrics import register_metric

# The tests that read the shared recorded project run on one xdist worker: another worker
# asking for it would wait while the first records it (pyproject: --dist loadgroup).
pytestmark = pytest.mark.xdist_group("report-scenario")


@register_metric("brightness", higher_is_better=True, absolute_tolerance=1.0)
def brightness(images):
    return images.images.reshape(len(images), -1).mean(axis=1)

PROMPTS = ["a red digit 3 on a blue background", "a green circle left of a red square", "a photo of a cat"]

def test_alignment(generate, diffeval_baseline):
    images = generate(PIPE, PROMPTS, seeds=range(2), num_inference_steps=2)
    diffeval_baseline.assert_no_regression(images, ["clip_score", "brightness"])

def test_not_black(generate):
    images = generate(PIPE, PROMPTS[:2], seeds=range(2), num_inference_steps=2)
    assert_metric(images, "brightness", at_least=0.0)
"""
FAILING, PASSING = "test_user.py::test_alignment", "test_user.py::test_not_black"
TINY_SIZE = 32  # conftest's tiny pipeline makes 32x32 images


@dataclass
class Run:
    """One pytest run of the user project and where it wrote its outputs."""

    name: str
    ret: int
    stdout: str
    outcomes: dict[str, int]
    results: str
    report: str
    junit: str
    step_summary: str

    @property
    def metrics(self) -> dict[str, Any]:
        return json.loads((Path(self.results) / "metrics.json").read_text())

    @property
    def html(self) -> str:
        return Path(self.report).read_text(encoding="utf-8")


@dataclass
class Scenario:
    root: str
    recorded: Run  # -n 2 --snapshot-update --diffeval-results-always --diffeval-baseline-images, every check passes
    serial: Run  # darkened model, -n 0, default results dir and report path
    parallel: Run  # darkened model, -n 2, --diffeval-results / --diffeval-report elsewhere


STEP_SUMMARY_BEFORE = "## an earlier step's summary\n\n"


def _run(pytester: pytest.Pytester, name: str, *args: str, results: str | None = None,
         report: str | None = None) -> Run:
    root = pytester.path
    summary = root / f"{name}-step-summary.md"
    summary.write_text(STEP_SUMMARY_BEFORE)
    junit = root / f"{name}-junit.xml"
    options = [*args, f"--junitxml={junit}", "-p", "no:cacheprovider"]
    options += [f"--diffeval-results={results}"] if results else []
    options += [f"--diffeval-report={report}"] if report else []
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("GITHUB_STEP_SUMMARY", str(summary))
        # One torch thread in every run.  Under -n the plugin gives each worker cores/workers
        # threads (plugin.options.limit_worker_threads) unless OMP_NUM_THREADS is set, while a -n 0
        # run takes every core: on a 2-core machine 1 thread vs 2, whose float sums round
        # differently, so a few pixels (and per-sample values) of the serial and the -n 2
        # runs differed and the "-n 2 is as complete as -n 0" comparisons failed whenever
        # this suite ran without OMP_NUM_THREADS=1 in its environment.  MKL reads its own.
        mp.setenv("OMP_NUM_THREADS", "1")
        mp.setenv("MKL_NUM_THREADS", "1")
        for leaked in ("PYTEST_XDIST_WORKER", "PYTEST_XDIST_WORKER_COUNT"):  # when this suite runs under -n
            mp.delenv(leaked, raising=False)
        # A -n 0 run is in-process: the variables above reach only the -n 2 runs' workers, so this
        # process runs on one thread too (it had 2 when this file ran alone, not under -n).
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            result = pytester.runpytest(*options)
        finally:
            torch.set_num_threads(threads)
    results_dir = root / (results or "diffeval-results")
    return Run(name, int(result.ret), result.stdout.str(), result.parseoutcomes(), str(results_dir),
               str(root / report) if report else str(results_dir / "report.html"), str(junit), str(summary))


def _make_scenario(user: pytest.Pytester) -> Scenario:
    user.makepyfile(test_user=USER_TEST)
    recorded = _run(user, "recorded", "-n", "2", "--snapshot-update", "--diffeval-results-always",
                    "--diffeval-baseline-images", results="results-recorded")
    darken(user.path / "model", amount=0.3)  # darker by ~40 of 255: a clear regression, images still visible
    serial = _run(user, "serial")
    parallel = _run(user, "parallel", "-n", "2", results="results-n2", report="reports/n2.html")
    return Scenario(str(user.path), recorded, serial, parallel)


_SCENARIO: dict[str, Scenario] = {}


@pytest.fixture
def scenario(project: pytest.Pytester, tmp_path_factory: pytest.TempPathFactory, worker_id: str) -> Scenario:
    """The recorded / failing serial / failing ``-n 2`` runs, made once per session."""
    return shared_scenario(project, tmp_path_factory, worker_id)


def shared_scenario(project: pytest.Pytester, tmp_path_factory: pytest.TempPathFactory, worker_id: str) -> Scenario:
    """The scenario's runs, made by the first test (of any module, any worker) that asks."""
    if "scenario" not in _SCENARIO:
        shared = tmp_path_factory.getbasetemp()
        shared = shared.parent if worker_id != "master" else shared
        stored = shared / "diffeval-report-scenario.json"
        with FileLock(str(stored) + ".lock"):
            if stored.is_file():
                raw = json.loads(stored.read_text())
                runs = (Run(**raw[k]) for k in ("recorded", "serial", "parallel"))
                _SCENARIO["scenario"] = Scenario(raw["root"], *runs)
            else:
                _SCENARIO["scenario"] = _make_scenario(project)
                stored.write_text(json.dumps(asdict(_SCENARIO["scenario"])))
    return _SCENARIO["scenario"]


def _check(metrics: dict[str, Any], test: str, metric: str) -> dict[str, Any]:
    [check] = [c for c in metrics["checks"] if c["test"] == test and c["metric"] == metric]
    return check


# --------------------------------------------------------------------------- the runs themselves


def test_runs_fail_on_the_regression_only(scenario: Scenario) -> None:
    def tests(run: Run) -> dict[str, int]:  # outcomes without "warnings" (e.g. an improvement's ratchet hint)
        return {k: v for k, v in run.outcomes.items() if k not in {"warnings", "warning"}}

    assert tests(scenario.recorded) == {"passed": 2}, scenario.recorded.stdout
    for run in (scenario.serial, scenario.parallel):
        assert run.ret == 1 and tests(run) == {"failed": 1, "passed": 1}, run.stdout
        assert "brightness regressed against the baseline" in run.stdout


# --------------------------------------------------------------------------- terminal


def test_terminal_table_has_a_row_per_check_and_names_the_report(scenario: Scenario) -> None:
    for run in (scenario.serial, scenario.parallel):
        out = run.stdout
        table = out[out.index("diffeval: metric checks"):].splitlines()[1:]
        assert re.match(r"test\s+metric\s+backbone\s+value\s+baseline ± tol / threshold\s+delta\s+verdict", table[0])
        rows = {(line.split()[0], line.split()[1]): line for line in table[1:4]}
        assert set(rows) == {(FAILING, "brightness"), (FAILING, "clip_score"), (PASSING, "brightness")}, table
        metrics = run.metrics
        regressed = _check(metrics, FAILING, "brightness")
        line = rows[FAILING, "brightness"]
        assert f"{regressed['value']:#.4g}" in line and f"{regressed['baseline']:#.4g} ± 1" in line
        assert f"{regressed['delta']:+#.4g}" in line and regressed["delta"] < -1.0
        assert line.rstrip().endswith("regressed")
        for (test, metric), cells in rows.items():  # the backbone column names each check's backbone
            assert cells.split()[2] == _check(metrics, test, metric)["backbone"], cells
        assert rows[FAILING, "clip_score"].split()[2].startswith("tiny-clip@")
        assert ">= 0" in rows[PASSING, "brightness"] and rows[PASSING, "brightness"].rstrip().endswith("pass")
        assert f"images of {FAILING}: {Path(run.results) / 'test_user.py__test_alignment'}" in out
        assert f"diffeval HTML report: {run.report}" in out
        assert f"diffeval metrics: {Path(run.results) / 'metrics.json'}" in out


# --------------------------------------------------------------------------- results directory


def test_results_directory_holds_failed_images_and_one_metrics_json(scenario: Scenario) -> None:
    results = Path(scenario.serial.results)
    assert results == Path(scenario.root) / "diffeval-results"  # the default, under the rootdir
    assert sorted(p.name for p in results.iterdir()) == ["metrics.json", "report.html", "test_user.py__test_alignment"]
    images = results / "test_user.py__test_alignment"
    pngs = sorted(p.name for p in images.glob("0*.png"))
    assert len(pngs) == 6 and pngs[0] == "0000_seed0_a-red-digit-3-on-a-blue-background.png"
    assert (images / "grid.png").is_file() and (images / "samples.json").is_file()

    metrics = scenario.serial.metrics
    assert metrics["format_version"] == 1 and metrics["exitstatus"] == 1
    assert metrics["summary"] == {"tests": 2, "failed_tests": 1, "checks": 3, "failed_checks": 1}
    assert [t["test"] for t in metrics["tests"]] == [FAILING, PASSING]  # failed first
    assert metrics["tests"][0]["failed"] and metrics["tests"][0]["outcome"] == "failed"
    regressed = _check(metrics, FAILING, "brightness")
    assert regressed["verdict"] == "regressed" and regressed["passed"] is False
    assert regressed["images"] == str(images) and regressed["provenance"]["pipeline_class"] == "StableDiffusionPipeline"
    samples = regressed["samples"]
    assert [(s["prompt"], s["seed"]) for s in samples][:2] == [("a red digit 3 on a blue background", 0),
                                                              ("a red digit 3 on a blue background", 1)]
    assert len(samples) == 6 and regressed["value"] == pytest.approx(sum(s["value"] for s in samples) / 6)
    recorded = _check(scenario.recorded.metrics, FAILING, "brightness")
    assert regressed["baseline"] == pytest.approx(recorded["value"])
    for sample, old in zip(samples, recorded["samples"]):  # the baseline's per-sample values ride along
        assert sample["baseline"] == pytest.approx(old["value"]) and sample["change"] < 0
    passing = _check(metrics, PASSING, "brightness")
    assert passing["passed"] and passing["threshold"] == 0.0 and passing["images"] is None
    assert len(passing["samples"]) == 4
    assert not list(results.rglob(".*tmp"))  # atomic writes leave no temporary files


def test_results_always_keeps_the_images_of_passing_checks(scenario: Scenario) -> None:
    assert scenario.recorded.metrics["workers"] == 2  # recorded under -n 2: the workers' images are all there
    results = Path(scenario.recorded.results)
    assert (results / "test_user.py__test_not_black" / "grid.png").is_file()
    assert len(list((results / "test_user.py__test_not_black").glob("0*.png"))) == 4
    metrics = scenario.recorded.metrics
    assert {c["verdict"] for c in metrics["checks"]} <= {"recorded", "pass"}
    assert metrics["summary"]["failed_checks"] == 0
    assert scenario.recorded.html.count('<img class="sample"') == 6 + 4


def test_no_checks_no_results_directory(pytester: pytest.Pytester) -> None:
    pytester.makepyfile("def test_plain():\n    assert True\n")
    result = pytester.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)
    assert not (pytester.path / "diffeval-results").exists()
    assert "diffeval: metric checks" not in result.stdout.str()


# --------------------------------------------------------------------------- HTML, statically


def test_html_report_is_one_self_contained_page(scenario: Scenario) -> None:
    page = scenario.serial.html
    assert page.startswith("<!DOCTYPE html>")
    for external in ("http://", "https://", "<link", "src=\"//", "@import", "url("):
        assert external not in page, external
    sources = re.findall(r'<(?:img|script|iframe|video|audio|source)\b[^>]*\bsrc="([^"]*)"', page)
    assert len(sources) == 6 + 6 and all(s.startswith("data:image/png;base64,") for s in sources)  # run + baseline
    assert "image-rendering:pixelated" in page
    sections = re.findall(r'<section class="test (\w+)"[^>]*data-test="([^"]+)"', page)
    assert sections == [("failed", FAILING), ("passed", PASSING)]
    figures = re.findall(r'<figure data-prompt="([^"]*)" data-seed="(\d+)"', page)
    assert sorted(figures) == sorted((p, str(s)) for p in ("a red digit 3 on a blue background",
                                                            "a green circle left of a red square", "a photo of a cat")
                                     for s in (0, 1))


def test_html_per_prompt_table_lists_the_worst_prompt_first(scenario: Scenario) -> None:
    page = scenario.serial.html
    card = page[page.index('data-metric="brightness" data-verdict="regressed"'):]
    card = card[: card.index("</table>")]
    shown = re.findall(r'<td class="prompt">([^<]*)</td>', card)
    samples = _check(scenario.serial.metrics, FAILING, "brightness")["samples"]
    change: dict[str, list[float]] = {}
    for s in samples:
        change.setdefault(s["prompt"], []).append(s["change"])
    expected = sorted(change, key=lambda p: sum(change[p]) / len(change[p]))  # most negative change first
    assert shown == expected
    assert "worst change against the baseline first" in card


# --------------------------------------------------------------------------- HTML, in Chromium


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    pytest.fail("Chromium is not installed, and the HTML report must be checked in a real browser: "
                "apt-get install chromium (on Debian/Ubuntu; .ci/run installs it)", pytrace=False)


def _chromium_run(*args: str) -> str:
    with tempfile.TemporaryDirectory() as profile:
        command = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                   "--disable-background-networking", "--disable-component-update", "--disable-sync",
                   "--hide-scrollbars", f"--user-data-dir={profile}", "--virtual-time-budget=5000", *args]
        done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def _rendered(url: str) -> tuple[dict[str, str], str]:
    dom = _chromium_run("--dump-dom", url)
    tag = re.search(r"<html\b([^>]*)>", dom)
    assert tag, dom[:500]
    attributes = dict(re.findall(r'([\w-]+)="([^"]*)"', tag.group(1)))
    return attributes, dom


def _json_attribute(value: str) -> Any:
    return json.loads(html.unescape(value))


def _expected_grid(run: Run) -> list[list[Any]]:
    """What the failing test's grid must show, from ``metrics.json``: one row per prompt, worst
    prompt first, labelled with the prompt; one figure per seed captioned "seed N", each beside
    one baseline thumbnail."""
    regressed = _check(run.metrics, FAILING, "brightness")
    change: dict[str, list[float]] = {}
    seeds: dict[str, list[int]] = {}
    for sample in regressed["samples"]:
        change.setdefault(sample["prompt"], []).append(sample["change"])
        seeds.setdefault(sample["prompt"], []).append(sample["seed"])
    order = sorted(change, key=lambda p: sum(change[p]) / len(change[p]))
    return [[FAILING, prompt, [[f"seed {seed}", 1] for seed in seeds[prompt]]] for prompt in order]


def _check_rendered_report(run: Run) -> None:
    """Load ``run``'s report in headless Chromium and check what the browser shows."""
    report = Path(run.report).resolve()
    shown, dom = _rendered(report.as_uri())
    assert shown["data-render-check"] == "done"
    assert shown["data-images-total"] == shown["data-images-rendered"] == str(6 + 6)  # this run's and the baseline's
    assert shown["data-baseline-images-rendered"] == "6"
    assert int(shown["data-images-min-natural"]) == TINY_SIZE  # 32 px thumbnails: stored as they are (<= 64)
    assert _json_attribute(shown["data-visible-tests"]) == [FAILING, PASSING]
    assert shown["data-filter"] == "all"
    assert f'data-test="{FAILING}" data-status="failed"' in dom
    failing = [[c["test"], c["metric"]] for c in run.metrics["checks"] if not c["passed"]]
    assert failing == [[FAILING, "brightness"]]
    assert _json_attribute(shown["data-failing-metrics"]) == failing  # the visible red check cards, by their text
    assert _json_attribute(shown["data-grid-labels"]) == _expected_grid(run)  # visible prompt labels, "seed N"

    filtered, _ = _rendered(report.as_uri() + "#failed-only")
    assert filtered["data-filter"] == "failed-only"
    assert _json_attribute(filtered["data-visible-tests"]) == [FAILING]
    assert _json_attribute(filtered["data-failing-metrics"]) == failing


@pytest.mark.browser
def test_report_renders_in_headless_chromium(scenario: Scenario, tmp_path: Path) -> None:
    _check_rendered_report(scenario.serial)
    report = Path(scenario.serial.report).resolve()

    from PIL import Image

    shot = tmp_path / "report.png"
    _chromium_run(f"--screenshot={shot}", "--window-size=1200,900", report.as_uri())
    with Image.open(shot) as image:
        assert image.size == (1200, 900)
        pixels = np.asarray(image.convert("RGB")).astype(int)
    red = (np.abs(pixels - [0xC0, 0x39, 0x2B]).max(axis=-1) < 8).sum()
    assert red > 200  # the failure is visible: the header's red counters and badges
    if os.environ.get("DIFFEVAL_UPDATE_SCREENSHOT"):
        _chromium_run(f"--screenshot={Path(__file__).parents[1] / 'docs' / 'report.png'}", "--window-size=1200,1400",
                      report.as_uri())


@pytest.mark.browser
def test_xdist_report_renders_in_headless_chromium(scenario: Scenario) -> None:
    _check_rendered_report(scenario.parallel)


# --------------------------------------------------------------------------- baseline thumbnails


def _decode(uri: str) -> np.ndarray:
    from PIL import Image

    with Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))) as image:
        return np.asarray(image.convert("RGB"))


def _png(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def test_baseline_thumbnails_are_recorded_beside_the_baseline(scenario: Scenario) -> None:
    baseline = Path(scenario.root) / "baselines" / "test_user" / "test_alignment.json"
    folder = baseline.with_name("test_alignment.images")
    index = json.loads((folder / "index.json").read_text())
    assert index["baseline_sha256"] == hashlib.sha256(baseline.read_bytes()).hexdigest()  # recorded with this file
    assert index["test"] == FAILING and index["max_size"] == 64
    recorded = Path(scenario.recorded.results) / "test_user.py__test_alignment"
    listing = json.loads((recorded / "samples.json").read_text())["samples"]
    assert sorted((s["prompt"], s["seed"]) for s in index["samples"]) == sorted((s["prompt"], s["seed"]) for s in listing)
    by_key = {(s["prompt"], s["seed"]): s for s in index["samples"]}
    for sample in listing:  # each thumbnail is the recorded run's image (32 px: not downscaled)
        entry = by_key[sample["prompt"], sample["seed"]]
        thumb = folder / entry["file"]
        assert hashlib.sha256(thumb.read_bytes()).hexdigest() == entry["sha256"]
        assert np.array_equal(_png(thumb), _png(recorded / sample["file"]))
    assert sorted(p.name for p in folder.iterdir()) == sorted(["index.json", *{e["file"] for e in index["samples"]}])
    assert not (baseline.with_name("test_not_black.images")).exists()  # no baseline, no thumbnails


def test_report_shows_the_baseline_image_beside_each_sample(scenario: Scenario) -> None:
    folder = Path(scenario.root) / "baselines" / "test_user" / "test_alignment.images"
    index = json.loads((folder / "index.json").read_text())
    thumbs = {(s["prompt"], str(s["seed"])): _png(folder / s["file"]) for s in index["samples"]}
    for run in (scenario.serial, scenario.parallel):
        figures = re.findall(r'<figure data-prompt="([^"]*)" data-seed="(\d+)"[^>]*>(.*?)</figure>', run.html)
        assert len(figures) == 6
        for prompt, seed, body in figures:
            [now] = re.findall(r'<img class="sample" src="([^"]+)"', body)
            [then] = re.findall(r'<img class="baseline" src="([^"]+)"', body)
            baseline = _decode(then)
            assert np.array_equal(baseline, thumbs[html.unescape(prompt), seed])
            assert baseline.mean() > _decode(now).mean() + 20  # the model was darkened after recording
        assert f"baseline thumbnails: <code>{folder}</code>" in run.html


# --------------------------------------------------------------------------- JUnit, step summary


def _properties(junit: str) -> dict[str, dict[str, str]]:
    """Test name -> its JUnit properties."""
    return {case.get("name"): {p.get("name"): p.get("value") for p in case.iter("property")}
            for case in ET.parse(junit).iter("testcase")}


def test_junit_has_metric_properties(scenario: Scenario) -> None:
    for run in (scenario.serial, scenario.parallel):
        properties = _properties(run.junit)
        failing, passing = properties["test_alignment"], properties["test_not_black"]
        regressed = _check(run.metrics, FAILING, "brightness")
        assert failing["diffeval.brightness"] == f"{regressed['value']:.6g}"
        assert failing["diffeval.brightness.verdict"] == "regressed"
        assert failing["diffeval.clip_score.verdict"] in {"pass", "improved", "regressed"}
        assert passing["diffeval.brightness.verdict"] == "pass"


def test_github_step_summary_is_appended_once(scenario: Scenario) -> None:
    for run in (scenario.serial, scenario.parallel):
        text = Path(run.step_summary).read_text()
        assert text.startswith(STEP_SUMMARY_BEFORE)  # appended, not replaced
        assert text.count("### pytest-diffeval") == 1  # by the controller only, not by each worker
        assert "1 of 3 metric checks failed (1 of 2 tests)" in text
        rows = [line for line in text.splitlines() if line.startswith("| :")]
        assert len(rows) == 3
        backbone = _check(run.metrics, FAILING, "brightness")["backbone"]
        assert any(r.startswith(f"| :x: | `test_user.py::test_alignment` | brightness | {backbone} |")
                   and r.endswith("| regressed |") for r in rows)
        clip = _check(run.metrics, FAILING, "clip_score")["backbone"]
        assert any(f"| clip_score | {clip} |" in r for r in rows) and clip.startswith("tiny-clip@")
        assert "| | test | metric | backbone | value |" in text
        assert any("`test_user.py::test_not_black`" in r and ":white_check_mark:" in r for r in rows)


# --------------------------------------------------------------------------- xdist


def _figures(page: str) -> list[tuple[str, ...]]:
    return sorted(re.findall(r'<section class="test (\w+)"[^>]*data-test="([^"]+)"', page)) + \
        sorted(("figure",) + f for f in re.findall(r'<figure data-prompt="([^"]*)" data-seed="(\d+)"', page))


def test_xdist_reports_are_as_complete_as_serial_ones(scenario: Scenario) -> None:
    serial, parallel = scenario.serial.metrics, scenario.parallel.metrics
    assert parallel["workers"] == 2 and serial["workers"] == 0
    assert parallel["summary"] == serial["summary"]

    def rows(metrics: dict[str, Any]) -> dict[tuple[str, str], Any]:
        return {(c["test"], c["metric"]): (c["verdict"], [(s["prompt"], s["seed"], round(s["value"], 6))
                                                          for s in c["samples"]]) for c in metrics["checks"]}

    assert rows(parallel) == rows(serial) and len(rows(serial)) == 3
    assert Path(scenario.parallel.report) == Path(scenario.root) / "reports" / "n2.html"
    assert _figures(scenario.parallel.html) == _figures(scenario.serial.html)
    assert len(_figures(scenario.serial.html)) == 2 + 6
    assert (Path(scenario.parallel.results) / "test_user.py__test_alignment" / "grid.png").is_file()


# --------------------------------------------------------------------------- rendering, in process


def test_html_escapes_prompts_and_shrinks_large_images(tmp_path: Path) -> None:
    from PIL import Image

    from pytest_diffeval.report import render_html, write_outputs

    prompt = 'a <script>alert("x")</script> & "quotes"'
    folder = tmp_path / "results" / "t"
    folder.mkdir(parents=True)
    Image.new("RGB", (768, 512), (200, 30, 30)).save(folder / "0000_seed7_a.png")
    (folder / "samples.json").write_text(json.dumps({"samples": [{"file": "0000_seed7_a.png", "prompt": prompt,
                                                                  "seed": 7}]}))
    row = {"test": "t.py::test_x", "metric": "m", "backbone": "b", "value": 1.0, "higher_is_better": True,
           "verdict": "out of bounds", "threshold": 2.0, "per_sample": [1.0], "prompts": [prompt], "seeds": [7],
           "images": str(folder)}
    page = render_html([row])
    assert "<script>alert" not in page and "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt; &amp;" in page
    [uri] = re.findall(r'<img class="sample" src="([^"]+)"', page)
    assert uri.startswith("data:image/jpeg;base64,")  # 768x512 is embedded as a 384x256 thumbnail
    import base64
    import io

    with Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))) as thumb:
        assert thumb.size == (384, 256)
    assert 'width="256"' in page  # shown at most 256 px wide

    blocked = tmp_path / "file-not-dir"
    blocked.write_text("")
    outputs = write_outputs([row], results_dir=blocked, report=blocked / "report.html", meta={})
    assert outputs.metrics is None and outputs.report is None  # reported, not raised: the test results stand
    assert len(outputs.errors) == 2 and str(blocked / "metrics.json") in outputs.errors[0]


def test_the_page_inlines_the_packages_stylesheet_and_script() -> None:
    """``report.css`` and ``report.js`` are package files, read with importlib.resources: the
    page inlines them whole, so it still fetches nothing from the network."""
    from importlib import resources

    from pytest_diffeval.report import render_html

    files = resources.files("pytest_diffeval.report")
    style = (files / "report.css").read_text(encoding="utf-8")
    script = (files / "report.js").read_text(encoding="utf-8")
    assert "body.failed-only .passed" in style and "data-render-check" in script  # the page's own files
    page = render_html([])
    assert f"<style>\n{style}</style>" in page and f"<script>\n{script}</script>" in page
    assert not re.search(r"(src|href)=['\"]?(https?:)?//", page)


def test_every_data_file_of_the_package_ships_in_the_wheel() -> None:
    """A file of the package that is not Python (the report's CSS and JS, the embedded
    weights) is in the wheel only when ``[tool.setuptools.package-data]`` names it: without
    it a non-editable install renders no page."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+; the package's 3.10 support is not in question here
    root = Path(__file__).resolve().parents[1]
    package = root / "pytest_diffeval"
    patterns = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    shipped = {path for pattern in patterns["pytest_diffeval"] for path in package.glob(pattern)}
    data = {path for path in package.rglob("*") if path.is_file() and path.suffix not in (".py", ".pyc")
            and "__pycache__" not in path.parts}
    assert package / "report" / "report.css" in data
    assert data <= shipped, sorted(str(p.relative_to(package)) for p in data - shipped)


def test_per_prompt_order_without_a_baseline_puts_the_worst_value_first(tmp_path: Path) -> None:
    from pytest_diffeval.report import per_prompt, render_html

    prompts = ["p-low", "p-low", "p-high", "p-high", "p-mid", "p-mid"]
    values = [0.1, 0.3, 0.9, 0.7, 0.5, 0.4]
    row = {"test": "t.py::test_x", "metric": "distance", "backbone": "b", "value": sum(values) / 6,
           "higher_is_better": False, "verdict": "above threshold", "threshold": 0.2, "per_sample": values,
           "prompts": prompts, "seeds": [0, 1] * 3}
    means: dict[str, list[float]] = {}
    for prompt, value in zip(prompts, values):
        means.setdefault(prompt, []).append(value)
    expected = sorted(means, key=lambda p: -sum(means[p]) / len(means[p]))  # lower is better: the highest is worst
    assert expected == ["p-high", "p-mid", "p-low"]
    assert [p["prompt"] for p in per_prompt(row)] == expected
    page = render_html([row])
    assert re.findall(r'<td class="prompt">([^<]*)</td>', page) == expected
    assert "worst value first" in page and "lower is better" in page
    row["higher_is_better"] = True  # the same values, higher is better: the lowest is worst
    assert [p["prompt"] for p in per_prompt(row)] == expected[::-1]


# --------------------------------------------------------------------------- untrusted file names


def test_samples_json_cannot_make_the_report_read_outside_its_folder(tmp_path: Path) -> None:
    from PIL import Image

    from pytest_diffeval.report import render_html

    outside = tmp_path / "secret"
    outside.mkdir()
    Image.new("RGB", (8, 8), (1, 2, 3)).save(outside / "private.png")
    folder = tmp_path / "results" / "t"
    folder.mkdir(parents=True)
    Image.new("RGB", (8, 8), (200, 30, 30)).save(folder / "0000_seed0_a.png")
    (folder / "link.png").symlink_to(outside / "private.png")
    bad = ["../../secret/private.png", str(outside / "private.png"), "link.png"]
    listing = {"samples": [{"file": "0000_seed0_a.png", "prompt": "a", "seed": 0}] +
               [{"file": name, "prompt": "a", "seed": i + 1} for i, name in enumerate(bad)]}
    (folder / "samples.json").write_text(json.dumps(listing))
    row = {"test": "t.py::test_x", "metric": "m", "backbone": "b", "value": 1.0, "higher_is_better": True,
           "verdict": "out of bounds", "threshold": 2.0, "per_sample": [1.0] * 4, "prompts": ["a"] * 4,
           "seeds": [0, 1, 2, 3], "images": str(folder)}
    page = html.unescape(render_html([row]))
    [uri] = re.findall(r'<img class="sample" src="([^"]+)"', page)  # only the file inside the folder
    assert _decode(uri)[0, 0].tolist() == [200, 30, 30]
    listing_file = folder / "samples.json"
    assert f"{listing_file}: sample file '../../secret/private.png' contains '..'" in page
    assert f"{listing_file}: sample file '{outside / 'private.png'}' is an absolute path" in page
    assert f"{listing_file}: sample file 'link.png' resolves to {(outside / 'private.png').resolve()}, outside {folder}" in page
    assert page.count("Fix: samples.json lists the images beside it by file name") == 3


# --------------------------------------------------------------------------- baseline thumbnails, in process


def _image_set(shade: int, size: int = 100) -> Any:
    from pytest_diffeval.generation import ImageSet

    pixels = np.full((4, size, size * 3 // 4, 3), shade, dtype=np.uint8)
    pixels[:, : size // 2] = 255 - shade  # top half differs, so downscaling has something to average
    return ImageSet(images=pixels, prompts=["a cat", "a cat", "a dog", "a dog"], seeds=[0, 1, 0, 1],
                    provenance={"model": "m", "model_hash": "abc"}, test_id="t.py::test_x")


def _baseline(root: Path, value: float = 1.0) -> Path:
    file = root / "baselines" / "t" / "test_x.json"
    file.parent.mkdir(parents=True, exist_ok=True)
    file.write_text(json.dumps({"format_version": 1, "test": "t.py::test_x", "checks": {"m": {"value": value}}}))
    return file


def test_baseline_thumbnails_are_small_content_addressed_and_replaced_atomically(tmp_path: Path) -> None:
    from pytest_diffeval.report import BASELINE_THUMBNAIL_MAX, load_baseline_images, store_baseline_images

    baseline = _baseline(tmp_path)
    folder = store_baseline_images(_image_set(40), baseline)
    assert folder == baseline.with_name("test_x.images")
    index = json.loads((folder / "index.json").read_text())
    sizes = {(s["width"], s["height"]) for s in index["samples"]}
    assert sizes == {(48, 64)} and BASELINE_THUMBNAIL_MAX == 64  # 100x75 scaled to fit in 64 px, aspect kept
    for sample in index["samples"]:
        assert sample["file"] == hashlib.sha256((folder / sample["file"]).read_bytes()).hexdigest()[:16] + ".png"
    assert len({s["file"] for s in index["samples"]}) == 1  # identical thumbnails share one file
    shown = load_baseline_images(baseline)
    assert shown.note is None and sorted(shown.images) == ["0|a cat", "0|a dog", "1|a cat", "1|a dog"]

    # Re-recording (a new baseline file) replaces the set: old thumbnails go, the index names the new ones.
    old_files = {s["file"] for s in index["samples"]}
    baseline = _baseline(tmp_path, value=2.0)
    store_baseline_images(_image_set(200), baseline)
    index = json.loads((folder / "index.json").read_text())
    assert not old_files & {p.name for p in folder.glob("*.png")}
    assert {p.name for p in folder.iterdir()} == {"index.json", *{s["file"] for s in index["samples"]}}
    assert not list(folder.glob(".*tmp"))
    assert _decode(load_baseline_images(baseline).images["0|a cat"].uri).mean() > 100


def test_stale_or_tampered_baseline_thumbnails_are_not_shown(tmp_path: Path) -> None:
    from pytest_diffeval.report import load_baseline_images, render_html, store_baseline_images

    baseline = _baseline(tmp_path)
    folder = store_baseline_images(_image_set(40), baseline)
    row = {"test": "t.py::test_x", "metric": "m", "backbone": "b", "value": 0.5, "higher_is_better": True,
           "verdict": "regressed", "baseline": 1.0, "tolerance": 0.1, "delta": -0.5, "baseline_file": str(baseline),
           "per_sample": [0.5] * 4, "prompts": ["a cat", "a cat", "a dog", "a dog"], "seeds": [0, 1, 0, 1],
           "images": str(_image_set(90).save(tmp_path / "results" / "t"))}
    assert render_html([row]).count('<img class="baseline"') == 4

    # The baseline re-recorded without --diffeval-baseline-images: its thumbnails are stale.
    fresh = baseline.read_text()
    baseline.write_text(fresh.replace("1.0", "1.5"))
    shown = load_baseline_images(baseline)
    assert shown.images == {} and "stale, the baseline test_x.json changed after these thumbnails" in shown.note
    page = html.unescape(render_html([row]))
    assert '<img class="baseline"' not in page and "--snapshot-update --diffeval-baseline-images" in page
    baseline.write_text(fresh)
    assert len(load_baseline_images(baseline).images) == 4

    index_file = folder / "index.json"
    index = json.loads(index_file.read_text())
    thumb = folder / index["samples"][0]["file"]
    original = thumb.read_bytes()
    thumb.write_bytes(original[:-8] + b"tampered")
    assert "does not match the sha256" in load_baseline_images(baseline).note
    thumb.write_bytes(original)

    from pytest_diffeval.report.thumbnails import _thumbnail_digest

    outside = tmp_path / "outside.png"
    outside.write_bytes(original)
    for name, message in [("../../../outside.png", "contains '..'"), (str(outside), "is an absolute path")]:
        forged = json.loads(json.dumps(index))
        forged["samples"][0]["file"] = name
        forged["digest"] = _thumbnail_digest(forged["samples"])  # a consistent forgery: only the path check stops it
        index_file.write_text(json.dumps(forged))
        shown = load_baseline_images(baseline)
        assert shown.images == {} and f"{index_file}: thumbnail file {name!r} {message}" in shown.note
    forged["digest"] = "0" * 64
    index_file.write_text(json.dumps(forged))
    assert "its digest does not match" in load_baseline_images(baseline).note


def test_baseline_images_option_is_off_unless_asked(tmp_path: Path) -> None:
    from pytest_diffeval.report import baseline_images_enabled, record_baseline_images

    class Config:
        def __init__(self, option: Any, ini: Any) -> None:
            self.option, self.ini = option, ini

        def getoption(self, name: str, default: Any = None) -> Any:
            assert name == "diffeval_baseline_images"
            return self.option

        def getini(self, name: str) -> Any:
            assert name == "diffeval_baseline_images"
            return self.ini

    class Snapshot:  # what syrupy's ``snapshot`` offers: update flag and the pytest session
        def __init__(self, update: bool, config: Config) -> None:
            self.update_snapshots = update
            self.session = type("S", (), {"pytest_session": type("P", (), {"config": config})()})()

    assert baseline_images_enabled(Config("true", "false")) and baseline_images_enabled(Config(None, "yes"))
    assert not baseline_images_enabled(Config(None, "false")) and not baseline_images_enabled(Config(None, ""))
    with pytest.raises(ValueError, match="diffeval_baseline_images = 'maybe' is not a boolean; use true or false"):
        baseline_images_enabled(Config(None, "maybe"))
    baseline = _baseline(tmp_path)
    assert record_baseline_images(_image_set(40), baseline, Snapshot(True, Config(None, "false"))) is None
    assert record_baseline_images(_image_set(40), baseline, Snapshot(False, Config("true", "true"))) is None
    assert not baseline.with_name("test_x.images").exists()  # neither off nor a plain run writes thumbnails
    assert record_baseline_images(_image_set(40), baseline, Snapshot(True, Config(None, "true"))).is_dir()
