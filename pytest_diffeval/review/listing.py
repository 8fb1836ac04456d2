"""Listing stored baselines: one line per entry, with the model that recorded it."""

from __future__ import annotations

from pathlib import Path
from typing import Any, TextIO

from ..report import format_value
from .sources import Source


def _table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return ["  ".join(c.ljust(widths[i]) for i, c in enumerate(r)).rstrip() for r in [header, *rows]]


def model_summary(provenance: dict[str, Any]) -> str:
    """``tiny-sd (hash 1a2b3c4d5e) StableDiffusionPipeline float32 cpu``: which model and how."""
    if not provenance:
        return "-"
    model = str(provenance.get("model") or "?")
    if "/" in model and (model.startswith(("/", ".", "~")) or provenance.get("model_kind") in {"local", "path"}):
        model = Path(model).name or model  # a local folder: its name says enough
    parts = [model]
    identity = provenance.get("model_hash") or provenance.get("revision")
    if identity and identity != "unknown":
        parts.append(f"({str(identity)[:10]})")
    parts += [str(provenance[k]).replace("torch.", "") for k in ("pipeline_class", "dtype", "device_kind")
              if provenance.get(k)]
    return " ".join(parts)


def list_entries(source: Source, out: TextIO) -> None:
    """Print the stored baselines, one line per entry."""
    out.write(f"baselines in {source.describe()}\n")
    rows = [(e.test, e.metric, e.hardware, str(e.backbone or "-"), format_value(e.value), str(len(e.samples) or "-"),
             e.recorded or "-", model_summary(e.provenance))
            for e in sorted(source.entries, key=lambda e: e.key)]
    for line in _table(("test", "metric", "hardware", "backbone", "value", "n", "recorded", "model"), rows):
        out.write(line + "\n")

