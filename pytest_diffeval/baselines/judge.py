"""Judging a check against its stored entry: the outcomes (a Comparison, Corrupt, NoEntry or
signature differences), the verdict under ``--snapshot-update`` and the regression message.
Pure functions of the record, the stored data and the tolerance; outcomes travel as JSON
(:func:`outcome_json`: under torchrun rank 0's are broadcast)."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..hardware import hardware_entries, hardware_key, select_entry
from ..metrics import get_metric
from ..metrics.drift import file_sha256
from ..metrics.statistics_files import read_features
from ..set_verdicts import METHOD, SET_METRICS, SetFeatures, compare_sets, state_features
from ..verdicts import Comparison, compare_paired, compare_values
from .files import _short, _test_name
from .records import BaselineCheck, StoredCheck, entry_problem, paired_entry, per_sample_map, signature_differences
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


def judge(record: Mapping[str, Any], stored: Any, tolerance: float | None, baseline_file: Path | None = None) -> Any:
    """A :class:`Comparison`, or a :class:`Corrupt` / :class:`NoEntry` / list of signature
    differences.  Malformed or non-finite stored data is :class:`Corrupt`, never compared.
    A set-level entry with per-image features (``records.paired_entry``) is compared paired
    (``set_verdicts.compare_sets``) from its features file beside ``baseline_file``."""
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
    metric = get_metric(metric_name)
    current = state_features(record.get("_state"))
    paired = paired_entry(entry) and metric_name in SET_METRICS and current is not None
    if paired and baseline_file is not None:  # the features file is read here: its content must be the recorded one
        features_file = baseline_file.with_name(entry["details"]["statistics_file"])
        if not features_file.is_file() or file_sha256(features_file) != stored_sha:
            return _changed_file(metric_name, stored_sha)
    elif stored_sha is not None and metric.keeps_state and record.get("details", {}).get("statistics_sha256") != stored_sha:
        return _changed_file(metric_name, stored_sha)
    tol, source = derive_tolerance(metric, entry, tolerance)
    if paired and baseline_file is not None:
        base_features, base_keys, _, _ = read_features(baseline_file.with_name(entry["details"]["statistics_file"]))
        comparison = compare_sets(metric_name, record["backbone"], record["higher_is_better"], record["value"],
                                  float(entry["value"]), current[0], SetFeatures(base_features, base_keys), current[1], tol,
                                  estimator=str(record.get("details", {}).get("estimator", "unbiased")))
        comparison.floor = float(entry["details"]["noise_floor"])
        share, change = entry["details"].get("mde_share"), entry["details"].get("mde_change")
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (share, change)):
            comparison.mde = {"share": float(share), "change": float(change)}
    elif "samples" in entry and "samples" in record:  # pass/fail values (metric.binary): McNemar
        comparison = compare_paired(metric_name, record["backbone"], record["higher_is_better"],
                                    per_sample_map(record), per_sample_map(entry), record["value"],
                                    float(entry["value"]), tol, binary=metric.binary)
    else:
        comparison = compare_values(metric_name, record["backbone"], record["higher_is_better"],
                                    record["value"], float(entry["value"]), tol)
    comparison.tolerance_source = source
    if comparison.method != METHOD:
        spread = entry.get("details", {}).get("spread")
        comparison.spread = float(spread) if spread is not None else None
        if metric_name in SET_METRICS and "samples" not in entry and not paired_entry(entry):
            comparison.hint = ("this baseline was recorded without per-image features, so it is compared by value "
                               "only (less sensitive); upgrade it with: pytest --snapshot-update")
    return comparison


def _changed_file(metric: str, sha: Any) -> Corrupt:
    return Corrupt("", f"the {metric} statistics file beside it is missing or was changed after the "
                       f"baseline was recorded (the baseline expects sha256 {sha})")


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
        return judge(check.record, stored, check.tolerance,
                     Path(recalled.path) if isinstance(recalled, StoredCheck) and recalled.path else None)
    except (TypeError, ValueError, KeyError, AttributeError, IndexError, ArithmeticError, RecursionError) as exc:
        return Corrupt("", f"its entry cannot be compared ({type(exc).__name__}: {exc})")


_OUTCOMES = {cls.__name__: cls for cls in (Comparison, Corrupt, NoEntry)}


def outcome_json(outcome: Any) -> Any:
    """An outcome of :func:`judge` as JSON (numpy numbers as Python's): under torchrun rank 0
    broadcasts its outcomes (``fixture``)."""
    if outcome is None or isinstance(outcome, list):
        data: Any = outcome
    else:
        data = {"type": type(outcome).__name__, "fields": dataclasses.asdict(outcome)}
    return json.loads(json.dumps(data, default=lambda value: value.item() if hasattr(value, "item") else repr(value)))


def outcome_from_json(data: Any) -> Any:
    """The outcome :func:`outcome_json` describes."""
    if data is None or isinstance(data, list):
        return data
    fields = dict(data["fields"])
    for name in ("interval", "discordant"):  # tuples in a Comparison, lists in JSON
        if isinstance(fields.get(name), list):
            fields[name] = tuple(fields[name])
    return _OUTCOMES[data["type"]](**fields)


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


def replaced_model(model_override: str | None, provenance: Mapping[str, Any] | None) -> str | None:
    """The ``--diffeval-model`` replacement this run's images came from, or None: the
    option's target (``NEW`` of ``ORIGINAL=NEW``, else the whole value) when it is the model
    the images' provenance names."""
    if not model_override:
        return None
    target = model_override.split("=", 1)[1] if "=" in model_override else model_override
    model = (provenance or {}).get("model")
    return target if model is not None and str(model) == target else None


# Estimators that are about 0, of either sign, for indistinguishable sets (metrics/distribution.py)
UNBIASED_SET_METRICS = ("kid", "cmmd")


def regression_message(c: Comparison, location: Path, rerun: str, replacement: str | None = None) -> str:
    """The failure text of a regressed check.  One sign convention throughout: every change,
    interval and bound is this run minus the baseline, so for a lower-is-better metric a
    regression is a positive change (FID +20.26 beyond +tolerance).  ``replacement``: the
    ``--diffeval-model`` this run used (:func:`replaced_model`), said before the update hint,
    since re-recording would make the replacement's numbers the baseline."""
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
    elif c.method == METHOD:
        lo, hi = sorted(sign * x for x in (c.interval or (c.effect, c.effect)))
        lines.append(f"  paired over {c.n} (prompt, seed) images, {c.resamples} joint resamples: change "
                     f"{sign * c.effect:+.4f} (95% CI {lo:+.4f} .. {hi:+.4f}); one-sided 95% bound "
                     f"{sign * c.bound:+.4f} {beyond}")
    else:
        lines.append(f"  change {sign * c.effect:+.4f} is beyond the tolerance: {beyond}")
        if c.spread is not None:
            band = SPREAD_FACTOR * c.spread
            lines.append(f"  resampling spread of the baseline: {c.spread:.4f}; spread-based band: baseline "
                         f"± {SPREAD_FACTOR:g} x spread = {c.baseline - band:.4f} .. {c.baseline + band:.4f}")
    if c.tolerance_source:
        lines.append(f"  tolerance {c.tolerance:.4f} from: {c.tolerance_source}")
    if c.floor is not None:
        lines.append(f"  noise floor {c.floor:.4g} (seed-redraw noise at N={c.n})" + (
            f"; this baseline detects >= {c.mde['share']:.1%} mismatched images (change {c.mde['change']:+.4g})"
            if c.mde and c.mde.get("share") is not None else ""))
    if c.hint:
        lines.append(f"  {c.hint}")
    if c.metric in UNBIASED_SET_METRICS and min(c.value, c.baseline) < 0:
        lines.append(f"  a negative {c.metric} is not an error: it is an unbiased MMD² estimate, about 0 (of either "
                     "sign) when the images and the reference are indistinguishable at this N")
    lines.append(f"  baseline file: {location}")
    if replacement:  # said first (line 3), before any line that suggests --snapshot-update
        lines.insert(2, f"  this run used a replacement model (--diffeval-model: {replacement}), not the model the "
                        "baseline was recorded with: the change is the replacement's")
        lines.append(f"  if the replacement is to become the baseline, update it: {rerun}")
    else:
        lines.append(f"  if the change is intended, update the baseline: {rerun}")
    return "\n".join(lines)
