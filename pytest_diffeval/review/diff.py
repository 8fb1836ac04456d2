"""Diffing two sets of numbers (baselines or results): per test and metric the old value,
the new one and the change, with the samples that moved most."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable, TextIO

from ..report import format_signed, format_value
from .sources import Entry, Source


@dataclass
class Change:
    """One number in A and B (or in one of them)."""

    old: Entry | None
    new: Entry | None

    @property
    def entry(self) -> Entry:
        return self.new or self.old  # type: ignore[return-value]

    @property
    def delta(self) -> float | None:
        return None if self.old is None or self.new is None else self.new.value - self.old.value

    @property
    def direction(self) -> str:
        delta = self.delta
        if delta is None:
            return "added" if self.old is None else "removed"
        if abs(delta) <= 1e-12 * max(1.0, abs(self.old.value)):  # type: ignore[union-attr]
            return "unchanged"
        return "better" if (delta > 0) == self.entry.higher_is_better else "worse"


def pair(a: Iterable[Entry], b: Iterable[Entry]) -> list[Change]:
    """Match entries by (test, metric, hardware); an entry left alone on each side of the same
    (test, metric) is paired too (a run on other hardware than the baseline's)."""
    old = {e.key: e for e in a}
    new = {e.key: e for e in b}
    changes = [Change(old.pop(k), new.pop(k)) for k in list(old) if k in new]
    by_metric_old: dict[tuple[str, str], list[Entry]] = {}
    by_metric_new: dict[tuple[str, str], list[Entry]] = {}
    for e in old.values():
        by_metric_old.setdefault((e.test, e.metric), []).append(e)
    for e in new.values():
        by_metric_new.setdefault((e.test, e.metric), []).append(e)
    for key, olds in by_metric_old.items():
        news = by_metric_new.get(key, [])
        if len(olds) == 1 and len(news) == 1:
            changes.append(Change(olds[0], news[0]))
            old.pop(olds[0].key)
            new.pop(news[0].key)
    changes += [Change(e, None) for e in old.values()] + [Change(None, e) for e in new.values()]
    return sorted(changes, key=lambda c: (c.entry.test, c.entry.metric, c.entry.hardware))


_PROVENANCE_KEYS = ("model", "model_hash", "revision", "pipeline_class", "scheduler", "dtype", "device_kind")


def _notes(old: Entry, new: Entry) -> list[str]:
    notes = []
    if old.hardware != new.hardware:
        notes.append(f"hardware: {old.hardware} -> {new.hardware}")
    if old.backbone != new.backbone:
        notes.append(f"backbone: {old.backbone} -> {new.backbone} (values are not comparable)")
    for key in _PROVENANCE_KEYS:
        a, b = old.provenance.get(key), new.provenance.get(key)
        if a != b and (a is not None or b is not None):
            notes.append(f"{key}: {a} -> {b}")
    va, vb = old.provenance.get("versions") or {}, new.provenance.get("versions") or {}
    moved = [f"{k} {va.get(k)} -> {vb.get(k)}" for k in sorted(set(va) | set(vb)) if va.get(k) != vb.get(k)]
    if moved:
        notes.append("versions: " + ", ".join(moved))
    return notes


def moved_samples(old: Entry, new: Entry, top: int) -> tuple[list[dict[str, Any]], int, int, int]:
    """The ``top`` samples whose value changed most (by size), the number that changed at
    all, and the numbers of samples only in A and only in B."""
    common = [k for k in old.samples if k in new.samples]
    moves = [{**new.samples[k], "old": old.samples[k]["value"],
              "change": new.samples[k]["value"] - old.samples[k]["value"]} for k in common]
    changed = sum(1 for m in moves if m["change"] != 0)
    moves.sort(key=lambda m: (-abs(m["change"]), m["prompt"], str(m["seed"])))
    return ([m for m in moves if m["change"] != 0][:top], changed, len(set(old.samples) - set(new.samples)),
            len(set(new.samples) - set(old.samples)))


def diff(a: Source, b: Source, out: TextIO, *, top: int = 5) -> list[Change]:
    """Print, per test and metric, the old value, the new one, the change and the samples
    that moved most; return the changes."""
    changes = pair(a.entries, b.entries)
    out.write(f"A (old): {a.describe()}\nB (new): {b.describe()}\n")
    test = None
    for change in changes:
        e = change.entry
        if e.test != test:
            test = e.test
            out.write(f"\n{test}\n")
        direction = "higher is better" if e.higher_is_better else "lower is better"
        label = f"  {e.metric} [{e.hardware}] ({e.backbone or '-'}; {direction})"
        if change.old is None or change.new is None:
            only = "B (added)" if change.old is None else "A (removed)"
            out.write(f"{label}: only in {only}, value {format_value(e.value)}\n")
            continue
        old, new, delta = change.old, change.new, change.delta or 0.0
        ratio = delta / abs(old.value) if old.value else math.nan
        relative = f" ({ratio * 100:+.1f}%)" if math.isfinite(ratio) else ""
        verdict = f"; this run's verdict: {new.verdict}" if new.verdict else ""
        out.write(f"{label}\n    old {format_value(old.value)}   new {format_value(new.value)}   delta {format_signed(delta)}{relative}"
                  f"   {change.direction}{verdict}\n")
        for note in _notes(old, new):
            out.write(f"    note: {note}\n")
        moves, changed, only_a, only_b = moved_samples(old, new, top)
        if old.samples and new.samples:
            extra = "".join(f", {n} only in {side}" for n, side in ((only_a, "A"), (only_b, "B")) if n)
            common = len(set(old.samples) & set(new.samples))
            out.write(f"    samples: {changed} of {common} paired (prompt, seed) samples changed{extra}\n")
        if moves:
            out.write("    samples that moved most (old -> new):\n")
            for m in moves:
                out.write(f"      {format_signed(m['change']):>9}  {format_value(m['old']):>9} -> {format_value(m['value']):<9}"
                          f"  seed {str(m['seed']):<4} {m['prompt']!r}\n")
    counts: dict[str, int] = {}
    for change in changes:
        counts[change.direction] = counts.get(change.direction, 0) + 1
    compared = sum(counts.get(k, 0) for k in ("worse", "better", "unchanged"))
    out.write(f"\n{compared} compared ({counts.get('worse', 0)} worse, {counts.get('better', 0)} better, "
              f"{counts.get('unchanged', 0)} unchanged), {counts.get('added', 0)} only in B (added), "
              f"{counts.get('removed', 0)} only in A (removed)\n")
    return changes

