"""Turning the session's metric checks into something a person reads."""

from __future__ import annotations

from typing import Any


def _fmt(value: Any) -> str:
    return "-" if value is None else f"{value:.4g}" if isinstance(value, float) else str(value)


def format_summary(rows: list[dict[str, Any]]) -> list[str]:
    """One line per metric check: test, metric, backbone, value, reference, delta, verdict."""
    header = ("test", "metric", "backbone", "value", "baseline±tol / threshold", "delta", "verdict")
    table = [header]
    for row in rows:
        if row.get("baseline") is not None:
            reference = f"{_fmt(row['baseline'])} ± {_fmt(row['tolerance'])}"
        elif row.get("threshold") is not None:
            reference = (">= " if row["higher_is_better"] else "< ") + _fmt(row["threshold"])
        else:
            reference = "-"
        table.append((row["test"], row["metric"], row["backbone"], _fmt(row["value"]), reference,
                      _fmt(row.get("delta")), row["verdict"]))
    widths = [min(60, max(len(str(r[i])) for r in table)) for i in range(len(header))]
    lines = ["  ".join(str(cell)[: widths[i]].ljust(widths[i]) for i, cell in enumerate(r)).rstrip() for r in table]
    failed = [row for row in rows if row.get("images")]
    lines += [f"images of {row['test']} ({row['metric']}): {row['images']}" for row in failed]
    return lines
