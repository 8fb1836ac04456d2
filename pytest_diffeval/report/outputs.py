"""The files a session leaves: ``metrics.json``, the HTML report and the step summary,
written at the session's end (a file that cannot be written is a message, not an error)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .._io import atomic_write_text
from .html import render_html
from .rows import session_document
from .text import step_summary


@dataclass
class Outputs:
    """What :func:`write_outputs` wrote (and what it could not)."""

    metrics: Path | None = None
    report: Path | None = None
    step_summary: Path | None = None
    errors: list[str] = field(default_factory=list)


def write_outputs(rows: list[dict[str, Any]], *, results_dir: Path, report: Path, meta: dict[str, Any],
                  outcomes: dict[str, str] | None = None, step_summary_file: str | None = None) -> Outputs:
    """Write ``metrics.json``, the HTML report and the step summary (when asked); a file that
    cannot be written is an error message, not an exception (the test results stand)."""
    out = Outputs()
    meta = {**meta, "results_dir": str(results_dir), "report": str(report)}
    try:
        document = session_document(rows, meta, outcomes)
        out.metrics = results_dir / "metrics.json"
        atomic_write_text(out.metrics, json.dumps(document, indent=2) + "\n")
    except OSError as exc:
        out.errors.append(f"could not write {results_dir / 'metrics.json'}: {exc}")
        out.metrics = None
    try:
        atomic_write_text(report, render_html(rows, meta, outcomes))
        out.report = report
    except OSError as exc:
        out.errors.append(f"could not write the HTML report {report}: {exc}")
    if step_summary_file:
        try:
            with open(step_summary_file, "a", encoding="utf-8") as handle:
                handle.write(step_summary(rows, report=out.report, results_dir=results_dir, outcomes=outcomes))
            out.step_summary = Path(step_summary_file)
        except OSError as exc:
            out.errors.append(f"could not append to GITHUB_STEP_SUMMARY {step_summary_file}: {exc}")
    return out
