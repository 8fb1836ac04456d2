"""The text summaries of a session's checks: the terminal table and the markdown table for
GitHub Actions' ``$GITHUB_STEP_SUMMARY``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .rows import failed, format_signed, format_value, is_test_failed, ordered_tests, reference

STEP_SUMMARY_MAX_ROWS = 300


def summary_lines(rows: list[dict[str, Any]], *, max_test_width: int = 70) -> list[tuple[str, bool]]:
    """The terminal table, one line per check, as ``(line, is_failure)``; then the image
    folders of failed checks."""
    header = ("test", "metric", "backbone", "value", "baseline ± tol / threshold", "delta", "verdict")
    table: list[tuple[tuple[str, ...], bool]] = [(header, False)]
    for row in rows:
        test = str(row.get("test"))
        if len(test) > max_test_width:  # keep the end: the test name and its parameters
            test = "..." + test[-(max_test_width - 3):]
        table.append(((test, str(row.get("metric")), str(row.get("backbone")), format_value(row.get("value")),
                       reference(row), format_signed(row.get("delta")), str(row.get("verdict"))), failed(row)))
    widths = [min(max_test_width if i == 0 else 40, max(len(cells[i]) for cells, _ in table))
              for i in range(len(header))]
    lines = [("  ".join(c[: widths[i]].ljust(widths[i]) for i, c in enumerate(cells)).rstrip(), bad)
             for cells, bad in table]
    lines.extend((line, False) for line in protection_lines(rows))
    seen: set[str] = set()
    for row in rows:
        folder = row.get("images")
        if folder and failed(row) and folder not in seen:
            seen.add(folder)
            lines.append((f"images of {row['test']}: {folder}", False))
    return lines


def protection_lines(rows: list[dict[str, Any]]) -> list[str]:
    """For each set-level check recorded or updated in this run, what its baseline protects:
    the noise floor it uses as tolerance and the smallest change it detects at this N
    (``set_verdicts.recording_details``), so a user knows what the test can catch."""
    lines = []
    for row in rows:
        details = row.get("details") or {}
        if row.get("verdict") not in {"recorded", "updated"} or details.get("noise_floor") is None:
            continue
        share, change = details.get("mde_share"), details.get("mde_change")
        detects = (f"detects >= {share:.1%} mismatched images (a change of {change:+.4g})" if share is not None
                   else "detects no share of mismatched images up to 50%")
        lines.append(f"{row.get('test')} {row.get('metric')}: noise floor {details['noise_floor']:.4g}; {detects} "
                     f"at N={details.get('n', '?')}")
    return lines


def _md(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def step_summary(rows: list[dict[str, Any]], *, report: Path | None = None, results_dir: Path | None = None,
                 outcomes: dict[str, str] | None = None) -> str:
    """A markdown table of the checks for ``$GITHUB_STEP_SUMMARY``."""
    tests = ordered_tests(rows, outcomes)
    bad_checks = sum(failed(r) for r in rows)
    bad_tests = sum(is_test_failed(r, (outcomes or {}).get(t)) for t, r in tests)
    lines = [f"### pytest-diffeval: {bad_checks} of {len(rows)} metric checks failed "
             f"({bad_tests} of {len(tests)} tests)", "",
             "| | test | metric | backbone | value | baseline ± tol / threshold | delta | verdict |",
             "|---|---|---|---|---:|---|---:|---|"]
    ordered = [row for _, test_rows in tests for row in sorted(test_rows, key=lambda r: not failed(r))]
    for row in ordered[:STEP_SUMMARY_MAX_ROWS]:
        mark = ":x:" if failed(row) else ":white_check_mark:"
        lines.append(f"| {mark} | `{_md(row.get('test'))}` | {_md(row.get('metric'))} | {_md(row.get('backbone'))} | "
                     f"{_md(format_value(row.get('value')))} | "
                     f"{_md(reference(row))} | {_md(format_signed(row.get('delta')))} | {_md(row.get('verdict'))} |")
    if len(ordered) > STEP_SUMMARY_MAX_ROWS:
        lines.append(f"\n... and {len(ordered) - STEP_SUMMARY_MAX_ROWS} more checks (see metrics.json)")
    if report or results_dir:
        lines += ["", f"HTML report: `{report}`; images and `metrics.json`: `{results_dir}` "
                      "(the workflow uploads it as an artifact)."]
    return "\n".join(lines) + "\n\n"

