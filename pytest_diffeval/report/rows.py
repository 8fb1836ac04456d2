"""Check rows, the one record of a metric check: verdicts, ordering, per-sample values and the
``metrics.json`` document built from them (:func:`document_head` is the one builder of its
head, used by the plugin's :func:`session_document` and by ``results merge``).

Every metric check is a row (see ``recording``); the other modules of this package turn the
rows of all workers into the terminal table, the step summary and the HTML page.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable

from ..hardware import hardware_key, select_entry

FORMAT_VERSION = 1
PASSING = frozenset({"pass", "improved", "recorded", "updated", "partial"})  # verdicts that do not fail a test
# "partial": a shard's part of a split generation (split.py); `results merge` judges the whole set
# --snapshot-update wrote the baseline from this run: nothing was judged, and the baseline file
# now holds this run's own numbers (an "updated" row keeps the replaced baseline and change).
REWRITTEN = frozenset({"recorded", "updated"})


def sample_key(seed: Any, prompt: Any) -> str:
    """``"<seed>|<prompt>"``: how a sample is keyed in baselines, results and thumbnails."""
    return f"{seed}|{prompt}"


def failed(row: dict[str, Any]) -> bool:
    """Whether a check's verdict fails its test."""
    return row.get("verdict") not in PASSING


def format_value(value: Any) -> str:
    """Four significant digits, trailing zeros kept (``79.00``, ``0.8532``)."""
    return "-" if value is None else f"{value:#.4g}" if isinstance(value, float) else str(value)


def format_signed(value: Any) -> str:
    """Like :func:`format_value`, with a sign (``+0.01200``)."""
    return "-" if value is None else f"{value:+#.4g}" if isinstance(value, (int, float)) else str(value)


def reference(row: dict[str, Any]) -> str:
    """What the value was judged against: ``baseline ± tolerance`` or the threshold."""
    if row.get("baseline") is not None:
        return f"{format_value(row['baseline'])} ± {format_value(row.get('tolerance'))}"
    if row.get("threshold") is not None:
        return (">= " if row.get("higher_is_better", True) else "<= ") + format_value(row["threshold"])
    return "-"


def _by_test(rows: Iterable[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    tests: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        tests.setdefault(str(row.get("test")), []).append(row)
    return tests


def ordered_tests(rows: list[dict[str, Any]],
                  outcomes: dict[str, str] | None = None) -> list[tuple[str, list[dict[str, Any]]]]:
    """Tests with their checks: failed tests first, then by test id (stable under ``-n``)."""
    outcomes = outcomes or {}
    tests = _by_test(rows)
    return sorted(tests.items(), key=lambda kv: (not is_test_failed(kv[1], outcomes.get(kv[0])), kv[0]))


def is_test_failed(checks: list[dict[str, Any]], outcome: str | None = None) -> bool:
    """A test failed when one of its checks did, or pytest says so (an assert after the check)."""
    return any(failed(r) for r in checks) or outcome in {"failed", "error"}


def baseline_entry(check: Any, provenance: dict[str, Any]) -> dict[str, Any] | None:
    """The stored entry of one metric that a run with ``provenance`` is compared with: the
    entry itself (one per metric), or the best match of its per-hardware entries."""
    if not isinstance(check, dict):
        return None
    if isinstance(check.get("hardware"), dict):
        _, entry = select_entry(check, hardware_key(provenance))
        return entry if isinstance(entry, dict) else None
    return check if "value" in check else None


class BaselineSamples:
    """Per-sample values of the stored baselines rows were compared with (read once each)."""

    def __init__(self) -> None:
        self._files: dict[str, dict[str, Any] | None] = {}

    def get(self, row: dict[str, Any]) -> dict[str, float]:
        """The per-sample values (by :func:`sample_key`) of the baseline ``row`` was judged
        against; empty when there is none (recorded in this run, file gone or unreadable)."""
        path = row.get("baseline_file")
        if not path or row.get("baseline") is None or row.get("verdict") in REWRITTEN:
            return {}
        if path not in self._files:
            try:
                self._files[path] = json.loads(Path(path).read_text(encoding="utf-8"))
            except (OSError, ValueError):
                self._files[path] = None
        data = self._files[path]
        checks = data.get("checks") if isinstance(data, dict) else None
        entry = baseline_entry(checks.get(row.get("metric")) if isinstance(checks, dict) else None,
                               row.get("provenance") or {})
        if entry is None:
            return {}
        try:
            return {sample_key(s["seed"], s["prompt"]): float(s["value"]) for s in entry.get("samples", [])}
        except (KeyError, TypeError, ValueError):
            return {}


def samples(row: dict[str, Any], baseline: dict[str, float] | None = None) -> list[dict[str, Any]]:
    """The check's per-sample values with prompt and seed (and the baseline's, when known)."""
    values, prompts, seeds = row.get("per_sample"), row.get("prompts"), row.get("seeds")
    if not values or not prompts or not seeds or not (len(values) == len(prompts) == len(seeds)):
        return []
    out = []
    for prompt, seed, value in zip(prompts, seeds, values):
        sample: dict[str, Any] = {"prompt": prompt, "seed": seed, "value": value}
        old = (baseline or {}).get(sample_key(seed, prompt))
        if old is not None:
            sample["baseline"] = old
            sample["change"] = value - old
        out.append(sample)
    return out


_CHECK_KEYS = ("test", "metric", "backbone", "value", "higher_is_better", "verdict", "threshold", "baseline",
               "tolerance", "delta", "baseline_file", "images", "details", "provenance")


def check_record(row: dict[str, Any], baselines: BaselineSamples | None = None) -> dict[str, Any]:
    """One check as ``metrics.json`` stores it."""
    record = {key: row.get(key) for key in _CHECK_KEYS}
    record["passed"] = None if row.get("verdict") == "updated" else not failed(row)  # updated: not judged
    record["samples"] = samples(row, baselines.get(row) if baselines else None)
    return record


def document_head(tests: list[tuple[str, list[dict[str, Any]]]], passed: list[bool | None],
                  meta: dict[str, Any] | None = None, outcomes: dict[str, str] | None = None) -> dict[str, Any]:
    """Everything ``metrics.json`` holds but its ``checks``: the format, ``meta``, the summary
    and one entry per test.  ``tests`` as :func:`ordered_tests` orders them; ``passed`` the
    ``passed`` field of every check (None: updated, not judged).  The plugin's document and a
    merge of several (``results merge``, which streams its checks) are built here alike."""
    outcomes = outcomes or {}
    return {
        "format_version": FORMAT_VERSION,
        **(meta or {}),
        "summary": {
            "tests": len(tests),
            "failed_tests": sum(is_test_failed(r, outcomes.get(t)) for t, r in tests),
            "checks": len(passed),
            "failed_checks": sum(p is False for p in passed),
        },
        "tests": [{"test": t, "failed": is_test_failed(r, outcomes.get(t)), "outcome": outcomes.get(t),
                   "checks": [c["metric"] for c in r]} for t, r in tests],
    }


def session_document(rows: list[dict[str, Any]], meta: dict[str, Any] | None = None,
                     outcomes: dict[str, str] | None = None) -> dict[str, Any]:
    """What ``metrics.json`` holds: the session, one entry per test and per check."""
    baselines = BaselineSamples()
    tests = ordered_tests(rows, outcomes)
    checks = [check_record(row, baselines) for _, test_rows in tests for row in test_rows]
    return {**document_head(tests, [c["passed"] for c in checks], meta, outcomes), "checks": checks}


def per_prompt(row: dict[str, Any], baseline: dict[str, float] | None = None) -> list[dict[str, Any]]:
    """Mean over seeds per prompt (and the baseline's), worst first: by the change against
    the baseline when there is one, else by the value."""
    groups: dict[str, dict[str, list[float]]] = {}
    for sample in samples(row, baseline):
        group = groups.setdefault(sample["prompt"], {"value": [], "baseline": [], "seeds": []})
        group["value"].append(sample["value"])
        group["seeds"].append(sample["seed"])
        if "baseline" in sample:
            group["baseline"].append(sample["baseline"])
    higher = bool(row.get("higher_is_better", True))
    out = []
    for prompt, g in groups.items():
        entry: dict[str, Any] = {"prompt": prompt, "n": len(g["value"]), "seeds": g["seeds"],
                                 "value": sum(g["value"]) / len(g["value"])}
        if len(g["baseline"]) == len(g["value"]):
            entry["baseline"] = sum(g["baseline"]) / len(g["baseline"])
            entry["change"] = entry["value"] - entry["baseline"]
        out.append(entry)
    by_change = all("change" in e for e in out) and bool(out)
    sign = 1.0 if higher else -1.0
    out.sort(key=lambda e: sign * (e["change"] if by_change else e["value"]))
    return out

