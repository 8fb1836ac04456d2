"""Metrics in their own environment (metrics/external.py, external_child.py): a numpy/pillow
scorer run by another interpreter over JSON; record, compare and regress end to end; each
way the child can fail (missing interpreter, crash, timeout, garbage, NaN, wrong length)
is a clear error naming the metric and the interpreter; results are cached keyed by the
child's package versions.

The scorer's interpreter is ``DIFFEVAL_SCORER_PYTHON`` (``.ci/run`` points it at a light
venv with numpy and pillow only, no torch), else this interpreter; with
``DIFFEVAL_REQUIRE_SCORER_VENV=1`` a missing one fails the run instead of falling back.
"""

from __future__ import annotations

import html
import json
import os
import shutil
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from test_baselines import darken

from pytest_diffeval import settings
from pytest_diffeval.counters import COUNTERS
from pytest_diffeval.exceptions import (
    ExternalInterpreterNotFoundError,
    ExternalMetricError,
    ExternalMetricTimeout,
    MetricError,
    NonFiniteMetricError,
)
from pytest_diffeval.generation import ImageSet
from pytest_diffeval.metrics import compute_metric
from pytest_diffeval.metrics.external import CHILD, ExternalScorer, describe, register_external_metric
from pytest_diffeval.report import render_html

SCORERS = Path(__file__).parent / "external_scorers"
BRIGHTNESS = SCORERS / "brightness.py"
FAULTY = SCORERS / "faulty.py"


def _scorer_python() -> str:
    configured = os.environ.get("DIFFEVAL_SCORER_PYTHON")
    if os.environ.get("DIFFEVAL_REQUIRE_SCORER_VENV") == "1" and not (configured and Path(configured).is_file()):
        raise RuntimeError(f"DIFFEVAL_REQUIRE_SCORER_VENV=1 but DIFFEVAL_SCORER_PYTHON={configured!r} names no "
                           "interpreter; .ci/run creates .venv-scorer and points it there")
    return configured or sys.executable


PYTHON = _scorer_python()  # an error here fails the run (collection error), never a skip


def image_set(n: int = 4, seed: int = 0) -> ImageSet:
    rng = np.random.default_rng(seed)
    return ImageSet(images=rng.integers(0, 256, (n, 8, 8, 3), dtype=np.uint8),
                    prompts=[f"prompt {i}" for i in range(n)], seeds=list(range(n)))


def brightness(images: ImageSet) -> np.ndarray:
    return images.images.reshape(len(images), -1).mean(axis=1)


def test_the_child_scores_each_png_in_order_and_reports_its_environment() -> None:
    register_external_metric("ext_brightness", python=PYTHON, module=str(BRIGHTNESS), options={"scale": 2.0})
    images = image_set()
    result = compute_metric("ext_brightness", images)
    np.testing.assert_array_equal(result.per_sample, 2.0 * brightness(images))  # PNG round trip is lossless
    assert result.value == pytest.approx(2.0 * brightness(images).mean())
    assert result.backbone == "external:brightness@1" and result.higher_is_better
    details = result.details
    assert details["interpreter"] and Path(details["interpreter"]).exists()
    assert details["python"].split()[-1].count(".") == 2 and details["protocol"] == "1"
    assert "numpy==" in details["packages"] and "pillow==" in details["packages"].lower()
    assert len(details["scorer_sha256"]) == 64
    assert compute_metric("ext_brightness", images, scale=1.0).value == pytest.approx(brightness(images).mean())
    row = {"test": "t.py::test_x", "metric": result.metric, "backbone": result.backbone, "value": result.value,
           "higher_is_better": True, "verdict": "pass", "details": result.details}
    assert f"<dt>environment</dt><dd>{html.escape(details['interpreter'])} ({details['python']}; " in render_html([row])
    if os.environ.get("DIFFEVAL_REQUIRE_SCORER_VENV") == "1":  # CI: really the light venv
        packages = describe("ext_brightness", ExternalScorer(python=PYTHON, scorer=str(BRIGHTNESS))).packages
        assert "torch" not in packages and "pytest-diffeval" not in packages, sorted(packages)


def test_the_child_runs_without_the_plugin_on_its_path(tmp_path: Path) -> None:
    """The child file is stdlib-only and needs no package beside it: a copy in another folder
    answers ``describe`` (in CI's light venv, where pytest-diffeval is not installed at all)."""
    copy = tmp_path / "child.py"
    shutil.copy(CHILD, copy)
    scorer = ExternalScorer(python=PYTHON, scorer=str(BRIGHTNESS), command=(PYTHON, str(copy)))
    environment = describe("ext_copy", scorer)
    assert environment.scorer["module"] == "brightness" and environment.scorer["info"] == {"version": "1"}
    assert "numpy" in environment.key_packages


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    previous = settings.current()
    settings.configure(cache_dir=tmp_path / "cache", result_cache=True)
    COUNTERS.reset()
    log = tmp_path / "scored.log"
    monkeypatch.setenv("DIFFEVAL_SCORER_LOG", str(log))
    yield log
    settings.configure(cache_dir=previous.cache_dir, result_cache=previous.result_cache)
    COUNTERS.reset()


def _dist(site: Path, version: str) -> None:
    for old in site.glob("diffeval_probe-*.dist-info"):
        shutil.rmtree(old)
    info = site / f"diffeval_probe-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: diffeval-probe\nVersion: {version}\n")


def test_results_are_cached_keyed_by_the_childs_package_versions(cache: Path, tmp_path: Path) -> None:
    site = tmp_path / "site"
    _dist(site, "1.0")
    own = tmp_path / "scorer" / "brightness.py"
    own.parent.mkdir()
    shutil.copy(BRIGHTNESS, own)
    register_external_metric("ext_cached", python=PYTHON, module=str(own), pythonpath=[site])
    images = image_set()
    first = compute_metric("ext_cached", images)
    assert cache.read_text().split() == ["4"] and COUNTERS.result_misses == 1
    again = compute_metric("ext_cached", images)
    assert cache.read_text().split() == ["4"] and COUNTERS.result_hits == 1  # no child scored
    np.testing.assert_array_equal(again.per_sample, first.per_sample)
    assert again.details == first.details

    time.sleep(0.01)
    _dist(site, "2.0")  # another version of a package in the child's environment: a miss
    compute_metric("ext_cached", images)
    assert cache.read_text().split() == ["4", "4"] and COUNTERS.result_misses == 2
    compute_metric("ext_cached", images)
    assert cache.read_text().split() == ["4", "4"] and COUNTERS.result_hits == 2

    own.write_text(own.read_text() + "\n# an edited scorer\n")  # the scorer's file is part of the key
    compute_metric("ext_cached", images)
    assert cache.read_text().split() == ["4", "4", "4"] and COUNTERS.result_misses == 3


def test_weights_are_hashed_here_and_name_the_backbone(cache: Path, tmp_path: Path) -> None:
    weights = tmp_path / "weights.bin"
    weights.write_bytes(b"one")
    register_external_metric("ext_weighted", python=PYTHON, module=str(BRIGHTNESS), weights=weights)
    images = image_set()
    before = compute_metric("ext_weighted", images).backbone
    weights.write_bytes(b"two")
    after = compute_metric("ext_weighted", images).backbone
    assert before.startswith("external:brightness@1+weights:") and after != before
    assert cache.read_text().split() == ["4", "4"]  # the changed weights missed the cache


README = Path(__file__).resolve().parents[1] / "README.md"


def assert_quoted(error: Exception, name: str, python: str = PYTHON) -> None:
    """The README's "Bad input" table quotes ``error``'s first line as the code writes it."""
    line = str(error).splitlines()[0].replace(f"'{name}'", "'<name>'").replace(python, "<path>")
    line = line.replace("'prompt 0'", "'<prompt>'")
    assert line.startswith("pytest-diffeval: external metric '<name>'"), line
    assert line.split("external metric '<name>'", 1)[1] in README.read_text(), line


def _error(name: str, module: str, *, python: str = PYTHON, **kwargs) -> MetricError | Exception:
    register_external_metric(name, python=python, module=module, **kwargs)
    with pytest.raises(Exception) as caught:
        compute_metric(name, image_set())
    return caught.value


def test_a_missing_interpreter_names_the_metric_and_the_path(tmp_path: Path) -> None:
    missing = str(tmp_path / "venv" / "bin" / "python")
    error = _error("ext_missing", str(BRIGHTNESS), python=missing)
    assert isinstance(error, ExternalInterpreterNotFoundError) and isinstance(error, FileNotFoundError)
    assert str(error).startswith(f"pytest-diffeval: external metric 'ext_missing': the interpreter {missing} "
                                 "does not exist; fix: create that environment")
    assert_quoted(error, "ext_missing", missing)


def test_a_crash_gives_the_exit_code_and_the_tail_of_stderr() -> None:
    error = _error("ext_crash", f"{FAULTY}:crash")
    assert isinstance(error, ExternalMetricError) and error.metric == "ext_crash" and error.interpreter == PYTHON
    assert str(error).splitlines()[0] == (f"pytest-diffeval: external metric 'ext_crash' (interpreter {PYTHON}, "
                                          "score) crashed: the child exited with code 1.")
    assert "RuntimeError: the scorer exploded on purpose" in str(error) and "fix:" in str(error)
    assert_quoted(error, "ext_crash")


def _dead(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except FileNotFoundError:
        return True
    return state in ("Z", "X")  # a zombie nobody reaped yet (no init in a container) is dead too


def test_a_timeout_kills_the_childs_process_group(tmp_path: Path) -> None:
    pid_file = tmp_path / "grandchild.pid"
    options = {"pid_file": str(pid_file)}
    describe("ext_hang", ExternalScorer(python=PYTHON, scorer=f"{FAULTY}:hang", options=options))  # remembered:
    started = time.monotonic()  # the handshake, slow on a busy machine, is not what times out below
    error = _error("ext_hang", f"{FAULTY}:hang", timeout=2, options=options)
    assert time.monotonic() - started < 30
    assert isinstance(error, ExternalMetricTimeout) and isinstance(error, TimeoutError)
    assert str(error).startswith(f"pytest-diffeval: external metric 'ext_hang' (interpreter {PYTHON}, score) gave "
                                 "no answer within 2 s; its process group was killed.")
    assert_quoted(error, "ext_hang")
    grandchild = int(pid_file.read_text())
    deadline = time.monotonic() + 5
    while not _dead(grandchild) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _dead(grandchild), "the scorer's own child outlived the timeout"


@pytest.mark.parametrize("command, expected", [
    ("print('hello')", "sent a malformed reply: not one JSON object (Expecting value"),
    ("print('[1, 2]')", "sent a malformed reply: a JSON list, not an object"),
    ("print('{\"protocol\": 2}')", "sent a malformed reply: protocol 2, this plugin speaks 1"),
], ids=["garbage", "list", "protocol"])
def test_a_malformed_reply_is_refused(command: str, expected: str) -> None:
    error = _error("ext_garbage", str(BRIGHTNESS), command=[PYTHON, "-c", command])
    assert isinstance(error, ExternalMetricError) and not isinstance(error, ExternalMetricTimeout)
    assert str(error).startswith(f"pytest-diffeval: external metric 'ext_garbage' (interpreter {PYTHON}, describe) "
                                 f"{expected}")
    if "hello" in command:  # the README quotes this one whole, the others by their reason
        assert_quoted(error, "ext_garbage")
    assert expected.split("malformed reply: ")[1] in README.read_text()


def test_values_that_are_not_numbers_or_not_one_per_image_are_refused() -> None:
    words = _error("ext_words", f"{FAULTY}:words")
    assert isinstance(words, ExternalMetricError)
    assert "score) sent a malformed reply: values[0] is 'high', not a number" in str(words).splitlines()[0]
    assert_quoted(words, "ext_words")
    short = _error("ext_short", f"{FAULTY}:short")
    assert isinstance(short, ExternalMetricError)
    assert str(short).splitlines()[0] == (f"pytest-diffeval: external metric 'ext_short' (interpreter {PYTHON}, "
                                          "score) sent 3 values for 4 images.")
    assert_quoted(short, "ext_short")


def test_a_non_finite_value_names_the_sample() -> None:
    error = _error("ext_nan", f"{FAULTY}:nan")
    assert isinstance(error, NonFiniteMetricError) and error.metric == "ext_nan"
    assert str(error).startswith(f"pytest-diffeval: external metric 'ext_nan' (interpreter {PYTHON}, score) gave a "
                                 "non-finite result: 1 of 4 per-sample values are NaN/inf: (prompt 'prompt 0', seed 0)")
    assert_quoted(error, "ext_nan")


def test_options_that_json_cannot_carry_fail_at_registration() -> None:
    with pytest.raises(ValueError, match="option blob=.* cannot be sent as JSON"):
        register_external_metric("ext_blob", python=PYTHON, module=str(BRIGHTNESS), options={"blob": object()})


USER_CONFTEST = """
from pytest_diffeval.report import render_html
from pytest_diffeval.metrics.external import register_external_metric

register_external_metric("brightness_ext", python={python!r}, module={module!r}, absolute_tolerance=1.0)
"""

USER_TEST = """
from conftest import PIPE

def test_brightness(generate, diffeval_baseline):
    images = generate(PIPE, ["a red digit 3 on a blue background", "a photo of a cat"], seeds=range(2),
                      num_inference_steps=2)
    diffeval_baseline.assert_no_regression(images, "brightness_ext")
"""


def test_record_compare_and_a_planted_regression_fails(project: pytest.Pytester) -> None:
    scorer = project.path / "scorers" / "brightness.py"
    scorer.parent.mkdir()
    shutil.copy(BRIGHTNESS, scorer)
    conftest = project.path / "conftest.py"
    conftest.write_text(conftest.read_text() + textwrap.dedent(USER_CONFTEST.format(python=PYTHON,
                                                                                     module=str(scorer))))
    project.makepyfile(test_user=USER_TEST)
    project.runpytest("--snapshot-update").assert_outcomes(passed=1)
    [file] = sorted((project.path / "baselines").rglob("*.json"))
    entry = json.loads(file.read_text())["checks"]["brightness_ext"]["hardware"]["cpu/float32"]
    assert entry["backbone"] == "external:brightness@1" and len(entry["samples"]) == 4
    assert entry["details"]["interpreter"] and "numpy==" in entry["details"]["packages"]

    project.runpytest().assert_outcomes(passed=1)
    darken(project.path / "model")
    failed = project.runpytest()
    failed.assert_outcomes(failed=1)
    assert "brightness_ext regressed against the baseline" in failed.stdout.str()
