"""What every check shares: the row kept for reports, the run's images saved under the results
directory, and the failure that says what was measured and where those images are."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from . import distributed, settings
from ._io import distinct_name

if TYPE_CHECKING:
    from .metrics import MetricResult


def current_test_id(images: Any = None) -> str:
    test_id = getattr(images, "test_id", None)
    if test_id:
        return test_id
    current = os.environ.get("PYTEST_CURRENT_TEST", "")
    return current.rsplit(" (", 1)[0] or "outside-pytest"


def results_folder(test_id: str) -> Path:
    """The test's image folder under the results directory, unique per test id: the file part
    keeps a readable form (``tests/test_x.py`` -> ``tests_test_x.py``); a test name that
    sanitising changed (``x/y`` and ``x_y`` both read ``x_y``) or a long id gets a short hash
    of the id appended (:func:`_io.distinct_name`, as baseline files do)."""
    def safe(text: str) -> str:
        return re.sub(r"[^A-Za-z0-9_.\-\[\]]+", "_", text)

    file, separator, name = test_id.partition("::")
    head, name = (f"{safe(file)}__", name) if separator else ("", test_id)
    original = f"{head}{name}"
    cleaned = f"{head}{safe(name)}".strip("._") or "test"
    return Path(settings.current().results_dir) / distinct_name(cleaned, original, limit=180)


def save_images(images: Any) -> Path | None:
    """Save the run's images (once) under the results directory; return the folder."""
    if images is None or not hasattr(images, "save"):
        return None
    if hasattr(images, "gather_rows"):  # torchrun: every rank gathers the pixels (a collective), rank 0 saves
        images.gather()
    if not distributed.is_writer():
        return None
    if images.saved_to is None:
        images.save(results_folder(current_test_id(images)))
    return images.saved_to


def record_check(test_id: str, result: MetricResult, images: Any, *, verdict: str, threshold: float | None = None,
                 baseline_file: str | None = None, comparison: Any = None) -> dict[str, Any]:
    """Keep one row per metric check for the terminal summary and reports."""
    row: dict[str, Any] = {
        "test": test_id, "metric": result.metric, "backbone": result.backbone, "value": result.value,
        "higher_is_better": result.higher_is_better, "verdict": verdict, "threshold": threshold,
        "baseline": comparison.baseline if comparison is not None else None,
        "tolerance": comparison.tolerance if comparison is not None else None,
        "delta": comparison.delta if comparison is not None else None,
        "baseline_file": baseline_file,
        "per_sample": None if result.per_sample is None else [float(v) for v in result.per_sample],
        # For reports (metrics.json, HTML): sample i's prompt and seed, and the model's provenance.
        "prompts": [str(p) for p in getattr(images, "prompts", None) or []] or None,
        "seeds": [int(s) for s in getattr(images, "seeds", None) or []] or None,
        "provenance": json.loads(json.dumps(getattr(images, "provenance", None) or {}, default=str)) or None,
        "details": {k: v for k, v in result.details.items() if isinstance(v, (str, int, float, bool, list))},
    }
    if verdict not in {"pass", "improved", "recorded", "partial"} or settings.current().results_always:
        row["images"] = str(save_images(images)) if images is not None else None
    settings.current().records.append(row)
    return row


def failure_text(images: Any, message: str) -> str:
    """``message`` as a failure says it: prefixed, with the folder the images were saved to."""
    folder = save_images(images)
    where = f"\n  images of this run: {folder} (grid.png shows them all)" if folder else ""
    return f"pytest-diffeval: {message}{where}"


def fail(images: Any, message: str, *, error: type[Exception] = AssertionError) -> NoReturn:
    """Raise ``error`` with ``message`` and the folder the images were saved to."""
    __tracebackhide__ = True
    raise error(failure_text(images, message))


def check_failed(images: Any, message: str) -> None:
    """A check's verdict is a failure.  Inside a test's call phase the failure is kept and the
    test goes on, so its later checks run and are reported too; the hooks fail the test once at
    its end with every kept failure (:func:`failed_checks_message`).  Anywhere else (a fixture,
    a script, inside :func:`raise_at_once`) it raises ``AssertionError`` at once."""
    __tracebackhide__ = True
    deferred = settings.current().deferred_checks
    # The running test's own list only: PYTEST_CURRENT_TEST is "<node id> (call)" during its call.
    if deferred is not None and os.environ.get("PYTEST_CURRENT_TEST") == f"{deferred[0]} (call)":
        deferred[1].append(failure_text(images, message))
        return
    fail(images, message)


@contextmanager
def raise_at_once() -> Iterator[None]:
    """Within this block a failed check raises ``AssertionError`` at once instead of failing
    the test at its end: for ``pytest.raises`` around a check (a negative control)."""
    current = settings.current()
    before, current.deferred_checks = current.deferred_checks, None
    try:
        yield
    finally:
        current.deferred_checks = before


def failed_checks_message(messages: list[str]) -> str:
    """One failure for every failed check of a test: a single check's message as it is;
    several, numbered, each with its own images folder."""
    if len(messages) == 1:
        return messages[0]
    return f"pytest-diffeval: {len(messages)} checks of this test failed (every check ran):\n" + _numbered(messages)


def failed_checks_note(messages: list[str]) -> str:
    """The note added to an error the test itself raised after some of its checks failed."""
    return f"pytest-diffeval: before this error, {len(messages)} check(s) of this test failed:\n" + _numbered(messages)


def _numbered(messages: list[str]) -> str:
    rule = "\n" + "-" * 60 + "\n"
    return rule.join(f"[{i}] {m.removeprefix('pytest-diffeval: ')}" for i, m in enumerate(messages, 1))
