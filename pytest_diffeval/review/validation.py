"""What a results ``metrics.json`` may hold: every field a merge or a diff reads, writes or
shows is checked before use (a shard's file may come from anywhere), and a bad one is a
:class:`ReviewError` naming the file, the field, the value and the fix."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from ..exceptions import ReviewError
from ..report import FORMAT_VERSION

RESULTS_FIX = ("metrics.json is written by a pytest-diffeval run: merge the results directories as the runs wrote "
               "them, from runs you trust, or rerun that shard to write it again")
_NUMBER_FIELDS = ("value", "threshold", "baseline", "tolerance", "delta")  # finite numbers or null
_TEXT_FIELDS = ("backbone", "verdict", "baseline_file")  # strings or null ("images": _image_folder_name)
_META_TEXT = ("created", "shard", "pytest_diffeval", "rootdir", "results_dir", "report")


def _number(value: Any) -> bool:
    """A finite JSON number (not a bool, not a string such as ``"NaN"``)."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an integer too large for a float
        return False


def _samples_ok(samples: list[Any]) -> bool:
    """Whether every sample is well formed, checked in bulk (a large merge holds hundreds of
    thousands); when not, the loop of :func:`validate_results` names the first bad one."""
    if not all(type(s) is dict for s in samples):
        return False
    if not ({type(s.get("prompt")) for s in samples} <= {str, type(None)}
            and {type(s.get("seed")) for s in samples} <= {int, type(None)}):
        return False
    numbers = [s.get("value") for s in samples]
    numbers += [s[k] for s in samples for k in ("baseline", "change") if s.get(k) is not None]
    if not {type(v) for v in numbers} <= {int, float}:  # type(): a bool or a string is refused
        return False
    try:
        return bool(np.isfinite(np.asarray(numbers, dtype=np.float64)).all())
    except OverflowError:  # an integer too large for a float
        return False


def validate_results(path: Path, data: Any) -> None:
    """Check every field of a results ``metrics.json`` that a merge or a diff reads, writes
    or shows: :class:`ReviewError` naming the file, the field, the value and the fix.  A
    shard's file may come from anywhere, so nothing but finite numbers, strings, booleans and
    the documented structure gets into the merged ``metrics.json`` and ``report.html``."""
    def bad(where: str, value: Any, expected: str) -> ReviewError:
        shown = repr(value)
        shown = shown if len(shown) <= 80 else shown[:77] + "..."
        return ReviewError(f"{path}: {where} is {shown}, not {expected}. Fix: {RESULTS_FIX}")

    if not isinstance(data, dict) or not isinstance(data.get("checks"), list):
        raise ReviewError(f"{path}: not a pytest-diffeval metrics.json (no 'checks' list)")
    version = data.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version > FORMAT_VERSION:
        raise ReviewError(f"{path}: format_version {version!r} is not one this "
                          f"pytest-diffeval reads ({FORMAT_VERSION}); upgrade pytest-diffeval")
    for key in ("exitstatus", "workers"):
        if data.get(key) is not None and (not isinstance(data[key], int) or isinstance(data[key], bool)):
            raise bad(f"{key!r}", data[key], "an integer")
    for key in _META_TEXT:
        if data.get(key) is not None and not isinstance(data[key], str):
            raise bad(f"{key!r}", data[key], "a string")
    if data.get("args") is not None and not (isinstance(data["args"], list)
                                              and all(isinstance(a, str) for a in data["args"])):
        raise bad("'args'", data["args"], "a list of strings")
    if data.get("results_always") is not None and not isinstance(data["results_always"], bool):
        raise bad("'results_always'", data["results_always"], "true or false")
    tests = data.get("tests")
    if tests is not None and not isinstance(tests, list):
        raise bad("'tests'", tests, "a list")
    for index, test in enumerate(tests or []):
        where = f"tests[{index}]"
        if not isinstance(test, dict) or not isinstance(test.get("test"), str) or not test["test"]:
            raise bad(f"{where}", test, "an object with a 'test' id")
        if test.get("outcome") is not None and not isinstance(test["outcome"], str):
            raise bad(f"{where} 'outcome'", test["outcome"], "a string")
        if test.get("failed") is not None and not isinstance(test["failed"], bool):
            raise bad(f"{where} 'failed'", test["failed"], "true or false")
        if test.get("checks") is not None and not (isinstance(test["checks"], list)
                                                   and all(isinstance(c, str) for c in test["checks"])):
            raise bad(f"{where} 'checks'", test["checks"], "a list of metric names")
    for index, check in enumerate(data["checks"]):
        if not isinstance(check, dict) or "test" not in check or "metric" not in check:
            raise ReviewError(f"{path}: checks[{index}] lacks 'test' or 'metric'. Fix: {RESULTS_FIX}")
        for key in ("test", "metric"):
            if not isinstance(check[key], str) or not check[key]:
                raise bad(f"checks[{index}] {key!r}", check[key], "a non-empty string")
        where = f"checks[{index}] ({check['test']}, {check['metric']})"
        for key in _NUMBER_FIELDS:
            if check.get(key) is not None and not _number(check[key]):
                raise bad(f"{where} {key!r}", check[key], "a finite number")
        for key in _TEXT_FIELDS:
            if check.get(key) is not None and not isinstance(check[key], str):
                raise bad(f"{where} {key!r}", check[key], "a string")
        if check.get("images") is not None:
            image_folder_name(check, path.parent)
        for key in ("higher_is_better", "passed"):
            if check.get(key) is not None and not isinstance(check[key], bool):
                raise bad(f"{where} {key!r}", check[key], "true or false")
        for key in ("details", "provenance"):
            if check.get(key) is not None and not isinstance(check[key], dict):
                raise bad(f"{where} {key!r}", check[key], "an object")
        samples = check.get("samples")
        if samples is not None and not isinstance(samples, list):
            raise bad(f"{where} 'samples'", samples, "a list")
        if samples and _samples_ok(samples):
            continue
        for number, sample in enumerate(samples or []):
            at = f"{where} samples[{number}]"
            if not isinstance(sample, dict):
                raise bad(at, sample, "an object with prompt, seed and value")
            if sample.get("prompt") is not None and not isinstance(sample["prompt"], str):
                raise bad(f"{at} 'prompt'", sample["prompt"], "a string")
            seed = sample.get("seed")
            if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
                raise bad(f"{at} 'seed'", seed, "an integer")
            if not _number(sample.get("value")):
                raise bad(f"{at} 'value'", sample.get("value"), "a finite number")
            for key in ("baseline", "change"):
                if sample.get(key) is not None and not _number(sample[key]):
                    raise bad(f"{at} {key!r}", sample[key], "a finite number")


IMAGES_FIX = ("'images' names the check's image folder, which the run wrote inside its results directory "
              "(beside metrics.json); merge results directories as the runs wrote them, from runs you trust")


def image_folder_name(check: dict[str, Any], source: Path) -> str:
    """The name of a check's image folder inside ``source``: the last part of the path the run
    recorded (an absolute path on the runner; the artifact may live elsewhere now).  A value
    that is not a path, holds ``..`` or ends in no folder name (``/``, ``.``) is refused."""
    value = check.get("images")
    where = f"{source / 'metrics.json'}: the 'images' of {check.get('test')!r} is {value!r}"
    if not isinstance(value, str) or not value.strip() or "\x00" in value:
        raise ReviewError(f"{where}, not a folder path. Fix: {IMAGES_FIX}")
    path = Path(value)
    if ".." in path.parts:
        raise ReviewError(f"{where}, which contains '..' and could lead outside the results directory {source}. "
                          f"Fix: {IMAGES_FIX}")
    if path.name in ("", "."):
        raise ReviewError(f"{where}, which names no folder inside the results directory {source}. Fix: {IMAGES_FIX}")
    return path.name

