"""Stored baselines: one JSON file per test under ``baselines/``, built on syrupy.

``baselines/<test file path>/<test name>.json`` holds one entry per metric the test
checks: per-sample values (one per ``(prompt, seed)``), the value, the backbone and the
run's signature and provenance.  Syrupy drives the workflow: ``pytest --snapshot-update``
records or refreshes entries and reports (and with the flag deletes) unused ones.  Each
test owns its file, and every write replaces the file atomically, so parallel workers
(``-n``) never lose entries and a killed run leaves the old or the new file, never half.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from syrupy.data import Snapshot, SnapshotCollection, SnapshotCollections
from syrupy.extensions.base import AbstractSyrupyExtension

from . import settings
from .metrics import MetricResult, compute_metric, get_metric
from .verdicts import Comparison, compare_paired, compare_values

FORMAT_VERSION = 1
SPREAD_FACTOR = 2.0
NOISE_FACTOR = 3.0
# Benign perturbations for --diffeval-calibrate, cycled: none of them changes the model.
PERTURBATIONS = ({"threads": 1}, {"batch_size": 1}, {"threads": 2}, {"batch_size": 64})
_METRIC_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


class BaselineError(AssertionError):
    """A baseline that is missing, unreadable or recorded under other conditions.
    Always a failure: never a skip, never a silent comparison."""


@dataclass
class Corrupt:
    """What the extension returns for a baseline file that cannot be parsed."""

    path: str
    reason: str


# --------------------------------------------------------------------------- records


def signature(result: MetricResult, images: Any, options: dict[str, Any]) -> dict[str, Any]:
    """What must be equal for two runs' numbers to be comparable."""
    prompts_sha = hashlib.sha256("\n".join(images.prompts).encode()).hexdigest()[:16]
    return {
        "metric": result.metric,
        "backbone": result.backbone,
        "image_size": list(images.image_size),
        "n_samples": len(images),
        "prompts_sha256": prompts_sha,
        "seeds": sorted(set(images.seeds)),
        "call_kwargs": images.call_kwargs,
        "metric_options": {k: v for k, v in options.items() if isinstance(v, (str, int, float, bool))},
    }


def build_record(result: MetricResult, images: Any, options: dict[str, Any]) -> dict[str, Any]:
    record: dict[str, Any] = {
        "metric": result.metric,
        "backbone": result.backbone,
        "higher_is_better": result.higher_is_better,
        "value": result.value,
        "signature": signature(result, images, options),
        "details": {k: v for k, v in result.details.items() if isinstance(v, (int, float, str, bool))},
        "provenance": images.provenance,
        "recorded": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if result.per_sample is not None:
        record["samples"] = [
            {"prompt": p, "seed": s, "value": float(v)}
            for p, s, v in zip(images.prompts, images.seeds, result.per_sample)
        ]
    return record


def state_path(baseline_file: Path, metric: str, key: str) -> Path:
    """Where a metric's stored state (drift's feature statistics) lives: beside the baseline
    JSON, one safetensors file per metric and hardware, e.g. ``test_x.drift.cpu-float32.safetensors``."""
    slug = re.sub(r"[^A-Za-z0-9]+", "-", key).strip("-").lower()
    return baseline_file.with_name(f"{baseline_file.stem}.{metric}.{slug}.safetensors")


def per_sample_map(record: dict[str, Any]) -> dict[str, float]:
    return {f"{s['seed']}|{s['prompt']}": float(s["value"]) for s in record.get("samples", [])}


def signature_differences(stored: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Human-readable differences between two signatures (empty when comparable)."""
    out = []
    for key in sorted(set(stored) | set(current)):
        if key == "prompts_sha256":
            continue
        if stored.get(key) != current.get(key):
            out.append(f"{key}: baseline {stored.get(key)!r}, this run {current.get(key)!r}")
    if stored.get("prompts_sha256") != current.get("prompts_sha256"):
        out.append("prompts: the prompt list differs from the baseline's")
    return out


# --------------------------------------------------------------------------- syrupy


def _atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{time.monotonic_ns()}.tmp")
    with open(tmp, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def read_baseline_file(path: Path) -> dict[str, Any]:
    """Parse and validate one baseline file; raise ``ValueError`` saying what is wrong."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"not valid JSON ({exc})") from None
    if not isinstance(data, dict) or not isinstance(data.get("checks"), dict):
        raise ValueError("not a pytest-diffeval baseline (no 'checks' object)")
    version = data.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ValueError(
            f"format_version {version!r} is newer than this pytest-diffeval understands ({FORMAT_VERSION}); "
            "upgrade pytest-diffeval"
        )
    return data


class DiffevalBaselineExtension(AbstractSyrupyExtension):
    """A syrupy extension: one JSON collection per test, one snapshot per metric, compared
    with a tolerance (:meth:`matches` stores the :class:`Comparison` it made)."""

    file_extension = "json"
    write_immediately = True
    root: Path = Path("baselines")  # set by the plugin from ini ``diffeval_baselines_dir``
    rootdir: Path = Path.cwd()  # the pytest rootdir, to mirror test paths under ``root``

    def __init__(self) -> None:
        super().__init__()
        self.last_outcome: Any = None
        self.tolerance: float | None = None
        self.updating = False

    # ---- storage: where
    @classmethod
    def dirname(cls, *, test_location: Any) -> str:
        test_file = Path(test_location.filepath).resolve()
        try:
            relative = test_file.relative_to(cls.rootdir.resolve())
        except ValueError:
            relative = Path(test_file.name)
        directory = (cls.root / relative.with_suffix("")).resolve()
        if not directory.is_relative_to(cls.root.resolve()):
            raise BaselineError(f"pytest-diffeval: refusing a baseline directory outside {cls.root}: {directory}")
        return str(directory)

    @staticmethod
    def _clean(name: str) -> str:
        cleaned = "".join(c for c in name if c not in '\\/?*:|"<>' and c.isprintable())
        cleaned = cleaned.lstrip(".") or "_"
        return cleaned[:200]

    @classmethod
    def get_file_basename(cls, *, test_location: Any, index: Any) -> str:
        return cls._clean(test_location.snapshot_name)

    @classmethod
    def get_snapshot_name(cls, *, test_location: Any, index: Any = 0) -> str:
        return f"{cls._clean(test_location.snapshot_name)}[{index}]"

    def discover_snapshots(self, *, test_location: Any, ignore_extensions: list[str] | None = None) -> SnapshotCollections:
        """Only this test module's ``*.json`` files are baselines (safetensors beside them are not)."""
        discovered = SnapshotCollections()
        directory = Path(self.dirname(test_location=test_location))
        if directory.is_dir():
            for path in sorted(directory.glob("*.json")):
                collection = self.read_snapshot_collection(snapshot_location=str(path))
                if collection.has_snapshots:
                    discovered.add(collection)
        return discovered

    # ---- storage: read
    def read_snapshot_collection(self, *, snapshot_location: str) -> SnapshotCollection:
        collection = SnapshotCollection(location=snapshot_location)
        stem = Path(snapshot_location).stem
        try:
            data = read_baseline_file(Path(snapshot_location))
        except (ValueError, OSError):
            return collection
        for metric in data["checks"]:
            collection.add(Snapshot(name=f"{stem}[{metric}]"))
        return collection

    def read_snapshot_data_from_location(self, *, snapshot_location: str, snapshot_name: str, session_id: str) -> Any:
        path = Path(snapshot_location)
        if not path.exists():
            return None
        try:
            data = read_baseline_file(path)
        except (ValueError, OSError) as exc:
            return Corrupt(str(path), str(exc))
        metric = snapshot_name[len(path.stem) + 1 : -1]
        return data["checks"].get(metric)

    # ---- storage: write (atomic, merging the other metrics of the same test)
    @classmethod
    def write_snapshot_collection(cls, *, snapshot_collection: SnapshotCollection, name_order: Any = None) -> None:
        path = Path(snapshot_collection.location)
        try:
            data = read_baseline_file(path) if path.exists() else None
        except (ValueError, OSError):
            data = None  # a corrupt file is replaced by the update the user asked for
        data = data or {"format_version": FORMAT_VERSION, "checks": {}}
        data["format_version"] = FORMAT_VERSION
        for snapshot in snapshot_collection:
            record = dict(snapshot.data)
            data["test"] = record.pop("_test", data.get("test"))
            state = record.pop("_state", None)
            if state is not None:  # drift: this run's statistics become the baseline's, so its distance is 0
                from .metrics.drift import save_statistics

                target = state_path(path, record["metric"], hardware_key(record.get("provenance", {})))
                record["details"] = {**record.get("details", {}), "statistics_sha256": save_statistics(state, target)}
                record["value"] = 0.0
            check = data["checks"].get(record["metric"])
            entries = hardware_entries(check) if isinstance(check, dict) else {}
            entries[hardware_key(record.get("provenance", {}))] = record
            data["checks"][record["metric"]] = {"hardware": dict(sorted(entries.items()))}
        data["checks"] = dict(sorted(data["checks"].items()))
        _atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")

    def delete_snapshots(self, *, snapshot_location: str, snapshot_names: set[str]) -> None:
        path = Path(snapshot_location)
        try:
            data = read_baseline_file(path)
        except (ValueError, OSError):
            return
        for name in snapshot_names:
            metric = name[len(path.stem) + 1 : -1]
            data["checks"].pop(metric, None)
            for stale in path.parent.glob(f"{glob.escape(path.stem)}.{glob.escape(metric)}.*.safetensors"):
                stale.unlink(missing_ok=True)
        if data["checks"]:
            _atomic_write_text(path, json.dumps(data, indent=2) + "\n")
        else:
            path.unlink(missing_ok=True)

    # ---- serialise / compare
    def serialize(self, data: Any, **kwargs: Any) -> Any:
        return data

    def matches(self, *, serialized_data: Any, snapshot_data: Any) -> bool:
        """Within tolerance.  An improvement beyond it passes a normal run but is rewritten
        by ``--snapshot-update``, so the baseline ratchets up with the model."""
        self.last_outcome = outcome = judge(serialized_data, snapshot_data, self.tolerance)
        if not isinstance(outcome, Comparison):
            return False
        return outcome.verdict == "pass" or (outcome.verdict == "improved" and not self.updating)


def hardware_key(provenance: dict[str, Any]) -> str:
    """``"cpu/float32"`` or ``"cuda/<GPU name> (sm90)/float16"``: baselines keep one entry per
    hardware, because numbers are not bit-identical across devices and dtypes."""
    device_type = str(provenance.get("device") or "cpu").split(":")[0]
    kind = provenance.get("device_kind") or device_type
    dtype = str(provenance.get("dtype") or "unknown").replace("torch.", "")
    return "/".join([device_type] + ([kind] if kind != device_type else []) + [dtype])


def hardware_entries(check: dict[str, Any]) -> dict[str, Any]:
    if "hardware" in check and isinstance(check["hardware"], dict):
        return dict(check["hardware"])
    return {hardware_key(check.get("provenance", {})): check} if "value" in check else {}


def select_entry(check: dict[str, Any], key: str) -> tuple[str | None, Any]:
    """The stored entry that best matches this run's hardware, like diffusers'
    ``Expectations``: the same device and dtype; else the same device type and dtype
    (another GPU model); else the same device type.  A CPU run never uses a GPU entry."""
    entries = hardware_entries(check)
    if key in entries:
        return key, entries[key]
    device_type, dtype = key.split("/")[0], key.split("/")[-1]
    for wanted in (lambda k: k.split("/")[0] == device_type and k.split("/")[-1] == dtype,
                   lambda k: k.split("/")[0] == device_type):
        matches = sorted(k for k in entries if wanted(k))
        if matches:
            return matches[0], entries[matches[0]]
    return None, None


@dataclass
class NoEntry:
    """The baseline file has the metric, but for other hardware only."""

    key: str
    available: list[str]


def judge(record: dict[str, Any], stored: Any, tolerance: float | None) -> Any:
    """A :class:`Comparison`, or a :class:`Corrupt` / :class:`NoEntry` / list of signature differences."""
    if isinstance(stored, Corrupt):
        return stored
    if isinstance(stored, dict):
        key = hardware_key(record.get("provenance", {}))
        chosen, entry = select_entry(stored, key)
        if chosen is None:
            return NoEntry(key, sorted(hardware_entries(stored)))
        stored = entry
    if not isinstance(stored, dict) or "value" not in stored or "signature" not in stored:
        return Corrupt("", f"the entry for {record['metric']!r} lacks 'value' or 'signature'")
    differences = signature_differences(stored["signature"], record["signature"])
    if differences:
        return differences
    stored_sha = stored.get("details", {}).get("statistics_sha256")
    if stored_sha is not None and record.get("details", {}).get("statistics_sha256") != stored_sha:
        return Corrupt("", f"the {record['metric']} statistics file beside it is missing or was changed after the "
                           f"baseline was recorded (the baseline expects sha256 {stored_sha})")
    metric = get_metric(record["metric"])
    tol = metric.default_tolerance(float(stored["value"])) if tolerance is None else float(tolerance)
    seed_noise = stored.get("details", {}).get("seed_noise")
    if tolerance is None and seed_noise is not None:
        # Drift: what re-drawing the seeds alone would cause (metrics/drift.py derives it).
        tol = max(tol, float(seed_noise))
    noise = stored.get("noise", {}).get("max_abs_effect")
    if tolerance is None and noise is not None:
        # Calibrated: NOISE_FACTOR times the largest change benign re-runs caused, at least the floor.
        tol = max(tol, NOISE_FACTOR * float(noise))
    spread = stored.get("details", {}).get("spread")
    if tolerance is None and spread is not None:
        # Set-level metrics: twice the baseline's resampling spread (about 95% of the
        # movement other images of the same model would cause), at least the metric's floor.
        tol = max(tol, SPREAD_FACTOR * float(spread))
    if "samples" in stored and "samples" in record:
        return compare_paired(record["metric"], record["backbone"], record["higher_is_better"],
                              per_sample_map(record), per_sample_map(stored), record["value"],
                              float(stored["value"]), tol)
    return compare_values(record["metric"], record["backbone"], record["higher_is_better"],
                          record["value"], float(stored["value"]), tol)


def calibrate(images: Any, metric: str, result: MetricResult, options: dict[str, Any], runs: int) -> dict[str, Any]:
    """Re-generate and re-measure ``runs`` times under benign perturbations (thread count,
    batch size) and return the noise they caused: the largest |paired mean change| (or
    |value change| for set-level metrics) and the largest per-sample change.  A fresh
    process at the same thread count is bit-identical (measured), so it adds nothing."""
    import torch

    effects, per_sample, used = [], [], []
    for run in range(runs):
        perturbation = PERTURBATIONS[run % len(PERTURBATIONS)]
        threads = torch.get_num_threads()
        try:
            torch.set_num_threads(perturbation.get("threads", threads))
            again = images.regenerate(batch_size=perturbation.get("batch_size", 8))
        finally:
            torch.set_num_threads(threads)
        other = compute_metric(metric, again, **options)
        if result.per_sample is not None and other.per_sample is not None:
            diff = np.asarray(other.per_sample) - np.asarray(result.per_sample)
            effects.append(abs(float(diff.mean())))
            per_sample.append(float(np.abs(diff).max()))
        else:
            effects.append(abs(other.value - result.value))
        used.append(perturbation)
    noise = {"runs": runs, "perturbations": used, "max_abs_effect": max(effects)}
    if per_sample:
        noise["max_abs_sample_change"] = max(per_sample)
    return noise


# --------------------------------------------------------------------------- fixture object


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
                             tolerance: float | None = None, tripwires: bool = True, **metric_options: Any) -> Any:
        """Measure ``metric`` (or each of a list of metrics) on ``images`` and fail if it
        regressed against the stored baseline by more than ``tolerance`` (default: the
        metric's, see README "Statistics").  With a list every metric is checked before
        the test fails, and the failure lists each one that regressed."""
        __tracebackhide__ = True
        from . import tripwires as wires
        from .assertions import fail

        if tripwires:
            wires.check(images)
        metrics = [metric] if isinstance(metric, str) else list(metric)
        outcomes, failures, error = [], [], AssertionError
        for name in metrics:
            outcome, message, error_class = self._check(images, name, tolerance, metric_options)
            outcomes.append(outcome)
            if message:
                failures.append(message)
                error = error_class if error is AssertionError else error
        if failures:
            fail(images, ("\n" + "-" * 60 + "\n").join(failures), error=error)
        return outcomes[0] if isinstance(metric, str) else outcomes

    def _check(self, images: Any, metric: str, tolerance: float | None,
               metric_options: dict[str, Any]) -> tuple[Any, str | None, type[Exception]]:
        """Compare one metric; return ``(comparison or None, failure message or None, error class)``."""
        from .assertions import record_check

        if not _METRIC_NAME.match(metric):
            raise ValueError(f"pytest-diffeval: metric name {metric!r} may only hold letters, digits, '_', '.', '-'")
        updating = bool(self._snapshot.update_snapshots)
        extra: dict[str, Any] = {}
        if get_metric(metric).keeps_state:  # drift: compare with the statistics stored beside the baseline
            stats = state_path(self.path, metric, hardware_key(getattr(images, "provenance", {}) or {}))
            if stats.is_file():
                extra["baseline_stats"] = stats
        try:
            result = compute_metric(metric, images, **metric_options, **extra)
        except ValueError:
            if not (updating and extra):
                raise
            result = compute_metric(metric, images, **metric_options)  # unusable statistics: re-record them
        record = build_record(result, images, metric_options)
        record["_test"] = self.test_id
        if result.state is not None:
            record["_state"] = result.state
        if settings.current().calibrate and getattr(images, "regenerate", None) is not None:
            record["noise"] = calibrate(images, metric, result, metric_options, settings.current().calibrate)
        assertion = self._snapshot(name=metric)
        extension = assertion.extension
        extension.tolerance = tolerance
        extension.last_outcome = None
        extension.updating = updating = bool(assertion.update_snapshots)
        matched = assertion == record
        outcome = extension.last_outcome
        location = self.path
        comparison = outcome if isinstance(outcome, Comparison) else None
        if updating:
            record_check(self.test_id, result, images, verdict="pass" if matched and comparison else "recorded",
                         baseline_file=str(location), comparison=comparison)
            return comparison, None, AssertionError
        rerun = f"pytest --snapshot-update {_node_for_cli(self.test_id)}"
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
                import warnings

                warnings.warn(f"pytest-diffeval: {metric} improved beyond its tolerance ({outcome.value:.4g} vs baseline "
                              f"{outcome.baseline:.4g}); ratchet the baseline with: {rerun}", UserWarning, stacklevel=3)
            return outcome, (None if outcome.passed else regression_message(outcome, location, rerun)), AssertionError
        record_check(self.test_id, result, images, verdict=verdict, baseline_file=str(location))
        return None, message, BaselineError


def _node_for_cli(test_id: str) -> str:
    return f"'{test_id}'" if any(c in test_id for c in " []") else test_id


def regression_message(c: Comparison, location: Path, rerun: str) -> str:
    direction = "higher" if c.higher_is_better else "lower"
    lines = [
        f"{c.metric} regressed against the baseline ({c.backbone}; {direction} is better)",
        f"  this run: {c.value:.4f}   baseline: {c.baseline:.4f}   change: {c.delta:+.4f}",
    ]
    if c.method == "paired-t":
        lo, hi = c.interval or (c.effect, c.effect)
        lines.append(f"  paired over {c.n} (prompt, seed) samples: mean change {c.effect:+.4f} "
                     f"(95% CI {lo:+.4f} .. {hi:+.4f}); one-sided 95% bound {c.bound:+.4f} < -tolerance {c.tolerance:.4f}")
        lines.append("  samples that moved most (baseline -> this run):")
        lines += [f"    {m['change']:+8.3f}  {m['baseline']:.3f} -> {m['value']:.3f}  seed {m['seed']}  {m['prompt']!r}"
                  for m in c.moved]
    else:
        lines.append(f"  change {c.effect:+.4f} (signed, + better) is beyond the tolerance {c.tolerance:.4f}")
    lines.append(f"  baseline file: {location}")
    lines.append(f"  if the change is intended, update the baseline: {rerun}")
    return "\n".join(lines)
