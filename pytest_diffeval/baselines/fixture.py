"""The object the ``diffeval_baseline`` fixture returns: measures a run, builds its record,
asserts it through syrupy and turns the outcome into a pass, a failure or a warning."""

from __future__ import annotations

import dataclasses
import math
import os
import re
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .. import distributed, settings
from .. import tripwires as wires
from ..exceptions import BaselineError, BaselineFormatError, SplitError
from ..hardware import hardware_key
from ..metrics import compute_metric, get_metric
from ..recording import check_failed, fail, record_check
from ..report import record_baseline_images
from ..set_verdicts import recording_details
from ..verdicts import Comparison
from .extension import DiffevalBaselineExtension
from .files import folder_refusal, read_baseline_file, refuse_newer_message
from .judge import (
    Corrupt,
    NoEntry,
    _node_for_cli,
    judge_check,
    outcome_from_json,
    outcome_json,
    regression_message,
    replaced_model,
    update_verdict,
)
from .records import BaselineCheck, build_record
from .sidecars import statistics_file_for
from .tolerance import calibrate, resolve_tolerances

_METRIC_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


class DiffevalBaseline:
    """What the ``diffeval_baseline`` fixture returns: compares a run with the test's
    stored baseline, or records it under ``--snapshot-update``."""

    def __init__(self, snapshot: Any, test_id: str) -> None:
        self._snapshot = snapshot.use_extension(DiffevalBaselineExtension)
        self.test_id = test_id

    @property
    def path(self) -> Path:
        return Path(self._snapshot.extension.get_location(test_location=self._snapshot.test_location, index=0))

    def assert_no_regression(self, images: Any, metric: str | list[str] | tuple[str, ...], *,
                             tolerance: float | Mapping[str, float | None] | None = None, tripwires: bool = True,
                             **metric_options: Any) -> Any:
        """Measure ``metric`` (or each of a list of metrics) on ``images`` and fail if it
        regressed against the stored baseline by more than ``tolerance`` (default: derived
        per metric, see README "Statistics").  ``tolerance`` is one number for every metric
        or a dict ``{metric: tolerance}`` (metrics it leaves out keep the derived one).  With
        a list every metric is checked, and the failure lists each one that regressed.  Inside
        a test a regression does not stop it: the test's later checks run, and it fails at its
        end with every failed check; a baseline that cannot be used (missing, corrupt, recorded
        under other conditions) raises :class:`BaselineError` at once."""
        __tracebackhide__ = True
        if getattr(images, "diffeval_split", None) is not None:  # split.SplitInfo: one shard's part of the set
            raise SplitError("pytest-diffeval: assert_no_regression cannot judge one shard's part of a diffeval_split "
                             "generation (baselines compare whole sets); fix: use assert_metric(images, metric, "
                             "at_most=...) or assert_fid_below(...) in a split test (`results merge` judges the whole "
                             "set), or remove the diffeval_split marker")

        metrics = [metric] if isinstance(metric, str) else list(metric)
        tolerances = resolve_tolerances(metrics, tolerance)
        if tripwires:
            wires.check(images)
        outcomes, failures, error = [], [], AssertionError
        for name in metrics:
            outcome, message, error_class = agreed(name, *self._check(images, name, tolerances[name], metric_options))
            outcomes.append(outcome)
            if message:
                failures.append(message)
                error = error_class if error is AssertionError else error

        record_baseline_images(images, self.path, self._snapshot)
        if failures and error is AssertionError:  # regressions: the test goes on, its other checks run
            check_failed(images, ("\n" + "-" * 60 + "\n").join(failures))
        elif failures:  # a baseline that cannot be used: no verdict, so the test stops here
            fail(images, ("\n" + "-" * 60 + "\n").join(failures), error=error)
        return outcomes[0] if isinstance(metric, str) else outcomes

    def _refusal(self, updating: bool) -> str | None:
        """Why this check must not use the baseline file: its folder leads outside the baselines
        folder (a symbolic link), or this update would overwrite a file a newer version wrote."""
        outside = folder_refusal(self.path.parent)
        if outside:
            return outside.removeprefix("pytest-diffeval: ")
        if not updating or not self.path.exists():
            return None
        try:
            read_baseline_file(self.path)
        except BaselineFormatError as exc:
            if exc.newer:
                return refuse_newer_message(self.path, exc)
        except (ValueError, OSError):
            pass
        return None

    def _check(self, images: Any, metric: str, tolerance: float | None,
               metric_options: dict[str, Any]) -> tuple[Any, str | None, type[Exception]]:
        """Compare one metric; return ``(comparison or None, failure message or None, error class)``."""

        if not _METRIC_NAME.match(metric):
            raise ValueError(f"pytest-diffeval: metric name {metric!r} may only hold letters, digits, '_', '.', '-'")
        updating = bool(self._snapshot.update_snapshots)
        refusal = self._refusal(updating)
        if refusal:
            return None, refusal, BaselineError
        extra: dict[str, Any] = {}
        if get_metric(metric).keeps_state:  # drift: compare with the statistics stored beside the baseline
            stats = statistics_file_for(self.path, metric, hardware_key(getattr(images, "provenance", {}) or {}))
            if stats is not None and stats.is_file():
                extra["baseline_stats"] = stats
        try:
            result = compute_metric(metric, images, **metric_options, **extra)
        except ValueError:
            if not (updating and extra):
                raise
            result = compute_metric(metric, images, **metric_options)  # unusable statistics: re-record them
        rerun = f"pytest --snapshot-update {_node_for_cli(self.test_id)}"
        location = self.path
        values = [result.value, *(result.per_sample if result.per_sample is not None else [])]
        if updating and not all(math.isfinite(float(v)) for v in values):
            record_check(self.test_id, result, images, verdict="not recorded", baseline_file=str(location))
            return None, (f"refusing to record {metric} = {result.value!r} in {location}: the run measured NaN or "
                          "infinity, and a baseline must hold finite numbers.\n  fix: find why this run's outputs "
                          f"are not finite (NaN images, a diverged model), then re-record with: {rerun}"), BaselineError
        if updating and result.state is not None:  # set-level: its noise floor and minimum detectable effect
            recorded = recording_details(metric, result.state, higher_is_better=result.higher_is_better,
                                         estimator=str(result.details.get("estimator", "unbiased")), tolerance=tolerance)
            result = dataclasses.replace(result, details={**result.details, **recorded})
        record = build_record(result, images, metric_options)
        record["_test"] = self.test_id
        try:  # the test module, relative to the baselines folder: how orphans are recognised
            record["_test_file"] = Path(os.path.relpath(Path(self._snapshot.test_location.filepath).resolve(),
                                                        settings.current().baselines_dir.resolve())).as_posix()
        except ValueError:  # another drive (Windows): such a file is never treated as an orphan
            pass
        if result.state is not None:
            record["_state"] = result.state
        if settings.current().calibrate and getattr(images, "regenerate", None) is not None:
            record["noise"] = calibrate(images, metric, result, metric_options, settings.current().calibrate)
        matched, outcome, execution = assert_check(self._snapshot, metric,
                                                   BaselineCheck(record, tolerance, updating, self.test_id))
        comparison = outcome if isinstance(outcome, Comparison) else None
        error = execution.exception if execution is not None else None
        if updating and error is not None:  # syrupy swallows what the write raised: nothing was recorded
            record_check(self.test_id, result, images, verdict="not recorded", baseline_file=str(location),
                         comparison=comparison)
            reason = str(error) if isinstance(error, BaselineError) else (
                f"could not record {metric} in {location}: {type(error).__name__}: {error}.\n  fix: restore the "
                f"file from version control or delete it, then re-record with: {rerun}")
            return None, reason.removeprefix("pytest-diffeval: "), BaselineError
        if updating:
            record_check(self.test_id, result, images, verdict=update_verdict(matched, outcome, execution),
                         baseline_file=str(location), comparison=comparison)
            return comparison, None, AssertionError
        if error is not None and outcome is None:  # the stored entry broke the comparison itself
            outcome = Corrupt("", f"its entry cannot be compared ({type(error).__name__}: {error})")
        if outcome is None or isinstance(outcome, NoEntry):
            hardware = (f" on this hardware ({outcome.key}; stored for: {', '.join(outcome.available)})"
                        if isinstance(outcome, NoEntry) else "")
            verdict, message = "missing baseline", (
                f"no baseline for {metric!r} of this test{hardware} in {location}.\n"
                f"  measured {metric} = {result.value:.4f} ({result.backbone})\n"
                f"  record it with: {rerun}")
        elif isinstance(outcome, Corrupt):
            verdict, message = "corrupt baseline", (
                f"baseline {outcome.path or location} cannot be used: {outcome.reason}.\n"
                f"  fix: restore it from version control, or re-record it with: {rerun}")
        elif isinstance(outcome, list):
            verdict, message = "baseline mismatch", (
                f"baseline {location} for {metric!r} was recorded under other conditions, so the "
                "numbers are not comparable:\n    " + "\n    ".join(outcome) +
                f"\n  fix: if the change is intended, re-record with: {rerun}")
        else:
            record_check(self.test_id, result, images, verdict=outcome.verdict, baseline_file=str(location),
                         comparison=outcome)
            if outcome.verdict == "improved":
                warnings.warn(f"pytest-diffeval: {metric} improved beyond its tolerance ({outcome.value:.4g} vs baseline "
                              f"{outcome.baseline:.4g}); ratchet the baseline with: {rerun}", UserWarning, stacklevel=3)
            replacement = replaced_model(settings.current().model_override, getattr(images, "provenance", None))
            return outcome, (None if outcome.passed else regression_message(outcome, location, rerun, replacement)), \
                AssertionError
        record_check(self.test_id, result, images, verdict=verdict, baseline_file=str(location))
        return None, message, BaselineError


_ERRORS = {kind.__name__: kind for kind in (AssertionError, BaselineError)}


def agreed(metric: str, outcome: Any, message: str | None,
           error_class: type[Exception]) -> tuple[Any, str | None, type[Exception]]:
    """One check's ``(comparison, failure message, error class)``; under torchrun rank 0's on
    every rank.  Rank 0 decides: it alone holds a set-level check's per-image features for the
    paired verdict, and it alone wrote (or failed to write) the baseline; every rank then runs
    the same code after the check (the same failures, images gathered for the same report)."""
    group = distributed.current()
    if group is None:
        return outcome, message, error_class
    mine = [outcome_json(outcome), message, error_class.__name__] if group.rank == 0 else None
    decided, message, name = group.broadcast_json(mine, f"agree on the verdict of {metric}")
    return outcome_from_json(decided), message, _ERRORS[name]


def assert_check(snapshot: Any, metric: str, check: BaselineCheck) -> tuple[bool, Any, Any]:
    """Assert ``check`` as the snapshot named ``metric`` and return ``(matched, outcome,
    assertion result)``.  The outcome is judged again, by the same pure :func:`judge_check`
    the extension's ``matches`` used, from what syrupy's own assertion result recalled: no
    state passes through the extension instance."""
    assertion = snapshot(name=metric)
    matched = assertion == check
    execution = assertion.executions.get(assertion.num_executions - 1)
    recalled = execution.recalled_data if execution is not None else None
    return matched, (judge_check(check, recalled) if recalled is not None else None), execution
