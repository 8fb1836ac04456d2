"""Reports people look at, end to end (pytester, in a subprocess): the terminal table, the
results directory (images, ``metrics.json``), the self-contained HTML report rendered in a
real headless Chromium, JUnit properties and the GitHub step summary, under ``-n 0`` and
``-n 2`` (pytest-mpl's reports came out empty under xdist; ours must not).

One scenario serves every test here and in ``test_review.py`` (a model run costs seconds):
record the baselines (``--diffeval-results-always``), darken the model, then run the failing
suite once serially and once with two workers.  It runs once per session, also when this
suite itself runs under xdist (a file lock, as in pytest-xdist's docs)."""

from __future__ import annotations

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
from filelock import FileLock
from test_baselines import darken, project  # noqa: F401  (project: user_project with its own model copy)

USER_TEST = """
import pytest
from conftest import PIPE
from pytest_diffeval import assert_metric
from pytest_diffeval.metrics import register_metric

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
    recorded: Run  # --snapshot-update --diffeval-results-always, every check passes
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
        for leaked in ("PYTEST_XDIST_WORKER", "PYTEST_XDIST_WORKER_COUNT"):  # when this suite runs under -n
            mp.delenv(leaked, raising=False)
        result = pytester.runpytest_subprocess(*options)
    results_dir = root / (results or "diffeval-results")
    return Run(name, int(result.ret), result.stdout.str(), result.parseoutcomes(), str(results_dir),
               str(root / report) if report else str(results_dir / "report.html"), str(junit), str(summary))


def _make_scenario(user: pytest.Pytester) -> Scenario:
    user.makepyfile(test_user=USER_TEST)
    recorded = _run(user, "recorded", "--snapshot-update", "--diffeval-results-always", results="results-recorded")
    darken(user.path / "model", amount=0.3)  # darker by ~40 of 255: a clear regression, images still visible
    serial = _run(user, "serial")
    parallel = _run(user, "parallel", "-n", "2", results="results-n2", report="reports/n2.html")
    return Scenario(str(user.path), recorded, serial, parallel)


_SCENARIO: dict[str, Scenario] = {}


@pytest.fixture
def scenario(project: pytest.Pytester, tmp_path_factory: pytest.TempPathFactory,  # noqa: F811
             worker_id: str) -> Scenario:
    """The recorded / failing serial / failing ``-n 2`` runs, made once per session."""
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
    results = Path(scenario.recorded.results)
    assert (results / "test_user.py__test_not_black" / "grid.png").is_file()
    assert len(list((results / "test_user.py__test_not_black").glob("0*.png"))) == 4
    metrics = scenario.recorded.metrics
    assert {c["verdict"] for c in metrics["checks"]} <= {"recorded", "pass"}
    assert metrics["summary"]["failed_checks"] == 0
    assert scenario.recorded.html.count('<img class="sample"') == 6 + 4


def test_no_checks_no_results_directory(pytester: pytest.Pytester) -> None:
    pytester.makepyfile("def test_plain():\n    assert True\n")
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
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
    assert len(sources) == 6 and all(s.startswith("data:image/png;base64,") for s in sources)
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


def test_report_renders_in_headless_chromium(scenario: Scenario, tmp_path: Path) -> None:
    report = Path(scenario.serial.report).resolve()
    shown, dom = _rendered(report.as_uri())
    assert shown["data-render-check"] == "done"
    assert shown["data-images-total"] == shown["data-images-rendered"] == "6"
    assert int(shown["data-images-min-natural"]) == TINY_SIZE
    assert json.loads(shown["data-visible-tests"].replace("&quot;", '"')) == [FAILING, PASSING]
    assert shown["data-filter"] == "all"
    assert f'data-test="{FAILING}" data-status="failed"' in dom and "regressed" in dom

    filtered, _ = _rendered(report.as_uri() + "#failed-only")
    assert filtered["data-filter"] == "failed-only"
    assert json.loads(filtered["data-visible-tests"].replace("&quot;", '"')) == [FAILING]

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
        assert any(r.startswith("| :x: | `test_user.py::test_alignment` | brightness |") and r.endswith("| regressed |")
                   for r in rows)
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
