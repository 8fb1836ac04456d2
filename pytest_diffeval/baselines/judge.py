"""Judging a check against its stored entry: the outcomes (a Comparison, Corrupt, NoEntry or
signature differences), the verdict under ``--snapshot-update`` and the regression message.
Pure functions of the record, the stored data and the tolerance."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..hardware import hardware_entries, hardware_key, select_entry
from ..metrics import get_metric
from ..verdicts import Comparison, compare_paired, compare_values
from .files import _short, _test_name
from .records import BaselineCheck, StoredCheck, entry_problem, per_sample_map, signature_differences
from .tolerance import SPREAD_FACTOR, derive_tolerance


@dataclass
class Corrupt:
    """What the extension returns for a baseline file that cannot be parsed."""

    path: str
    reason: str


@dataclass
class NoEntry:
    """The baseline file has the metric, but for other hardware only."""

    key: str
    available: list[str]


def judge(record: Mapping[str, Any], stored: Any, tolerance: float | None) -> Any:
    """A :class:`Comparison`, or a :class:`Corrupt` / :class:`NoEntry` / list of signature
    differences.  Malformed or non-finite stored data is :class:`Corrupt`, never compared."""
    if isinstance(stored, Corrupt):
        return stored
    metric_name = record["metric"]
    if not isinstance(stored, dict):
        return Corrupt("", f"checks.{metric_name} is {_short(stored)}, expected an object")
    if "hardware" in stored and not isinstance(stored["hardware"], dict):
        return Corrupt("", f"checks.{metric_name}.hardware is {_short(stored['hardware'])}, expected an object")
    if "hardware" not in stored and "value" not in stored:
        return Corrupt("", f"the entry for {metric_name!r} lacks 'value' or 'signature'")
    key = hardware_key(record.get("provenance", {}))
    chosen, entry = select_entry(stored, key)
    if chosen is None:
        return NoEntry(key, sorted(hardware_entries(stored)))
    problem = entry_problem(metric_name, chosen, entry)
    if problem:
        return Corrupt("", problem)
    differences = signature_differences(entry["signature"], record["signature"])
    if differences:
        return differences
    stored_sha = entry.get("details", {}).get("statistics_sha256")
    if stored_sha is not None and record.get("details", {}).get("statistics_sha256") != stored_sha:
        return Corrupt("", f"the {metric_name} statistics file beside it is missing or was changed after the "
                           f"baseline was recorded (the baseline expects sha256 {stored_sha})")
    metric = get_metric(metric_name)
    tol, source = derive_tolerance(metric, entry, tolerance)
    if "samples" in entry and "samples" in record:  # pass/fail values (metric.binary): McNemar
        comparison = compare_paired(metric_name, record["backbone"], record["higher_is_better"],
                                    per_sample_map(record), per_sample_map(entry), record["value"],
                                    float(entry["value"]), tol, binary=metric.binary)
    else:
        comparison = compare_values(metric_name, record["backbone"], record["higher_is_better"],
                                    record["value"], float(entry["value"]), tol)
    comparison.tolerance_source = source
    spread = entry.get("details", {}).get("spread")
    comparison.spread = float(spread) if spread is not None else None
    return comparison


def judge_check(check: BaselineCheck, recalled: Any) -> Any:
    """The outcome of ``check`` against what syrupy recalled for it: None when nothing is
    stored for its metric, else what :func:`judge` returns.  A file recorded for another test
    (two test ids that cleaned to one file name in an older version) and an entry whose data
    breaks the comparison are :class:`Corrupt`.  The extension's ``matches`` and the fixture
    (from syrupy's own assertion result) both call it, so both reach the same outcome."""
    if recalled is None:
        return None
    stored = recalled
    if isinstance(recalled, StoredCheck):
        if recalled.test is not None and _test_name(recalled.test) != _test_name(check.test_id):
            return Corrupt(recalled.path, f"it was recorded for test {recalled.test!r}, not for this test "
                                          f"{check.test_id!r} (two test ids that clean to one file name?)")
        stored = recalled.check
        if stored is None:
            return None
    try:
        return judge(check.record, stored, check.tolerance)
    except (TypeError, ValueError, KeyError, AttributeError, IndexError, ArithmeticError, RecursionError) as exc:
        return Corrupt("", f"its entry cannot be compared ({type(exc).__name__}: {exc})")


def update_verdict(matched: bool, outcome: Any, execution: Any) -> str:
    """The verdict of a check under ``--snapshot-update``: ``"pass"`` when the stored entry
    was kept (within tolerance), ``"updated"`` when an existing entry was rewritten (its
    row keeps the replaced baseline and the change), ``"recorded"`` when there was none
    for this hardware.  A rewritten regression is never a pass."""
    if matched and execution is not None and not (execution.updated or execution.created):
        return "pass"
    return "recorded" if outcome is None or isinstance(outcome, NoEntry) else "updated"


def _node_for_cli(test_id: str) -> str:
    return f"'{test_id}'" if any(c in test_id for c in " []") else test_id


def regression_message(c: Comparison, location: Path, rerun: str) -> str:
    """The failure text of a regressed check.  One sign convention throughout: every change,
    interval and bound is this run minus the baseline, so for a lower-is-better metric a
    regression is a positive change (FID +20.26 beyond +tolerance)."""
    direction = "higher" if c.higher_is_better else "lower"
    sign = 1.0 if c.higher_is_better else -1.0  # c.effect and c.bound are signed "+ better"
    beyond = f"< -tolerance {c.tolerance:.4f}" if c.higher_is_better else f"> +tolerance {c.tolerance:.4f}"
    lines = [
        f"{c.metric} regressed against the baseline ({c.backbone}; {direction} is better; "
        "changes are this run - baseline)",
        f"  this run: {c.value:.4f}   baseline: {c.baseline:.4f}   change: {c.delta:+.4f}",
    ]
    if c.note:
        lines.append(f"  {c.note}: a non-finite measurement never passes (look for NaN/inf images or a diverged model)")
    elif c.method in ("paired-t", "mcnemar"):
        lo, hi = sorted(sign * x for x in (c.interval or (c.effect, c.effect)))
        if c.method == "mcnemar" and c.discordant is not None:
            worse, better = c.discordant
            lines.append(f"  paired over {c.n} (prompt, seed) pass/fail samples: McNemar exact, {worse} of "
                         f"{worse + better} discordant pairs worse (one-sided p = {c.p_value:.3g})")
        lines.append(f"  paired over {c.n} (prompt, seed) samples: mean change {sign * c.effect:+.4f} "
                     f"(95% CI {lo:+.4f} .. {hi:+.4f}); one-sided 95% bound {sign * c.bound:+.4f} {beyond}")
        lines.append("  samples that moved most (baseline -> this run):")
        lines += [f"    {m['change']:+8.3f}  {m['baseline']:.3f} -> {m['value']:.3f}  seed {m['seed']}  {m['prompt']!r}"
                  for m in c.moved]
    else:
        lines.append(f"  change {sign * c.effect:+.4f} is beyond the tolerance: {beyond}")
        if c.spread is not None:
            band = SPREAD_FACTOR * c.spread
            lines.append(f"  resampling spread of the baseline: {c.spread:.4f}; spread-based band: baseline "
                         f"± {SPREAD_FACTOR:g} x spread = {c.baseline - band:.4f} .. {c.baseline + band:.4f}")
    if c.tolerance_source:
        lines.append(f"  tolerance {c.tolerance:.4f} from: {c.tolerance_source}")
    lines.append(f"  baseline file: {location}")
    lines.append(f"  if the change is intended, update the baseline: {rerun}")
    return "\n".join(lines)
