"""Tolerances of baseline comparisons: the one a test asks for, the one derived from the
stored entry (metric floor, seed noise, calibrated noise, resampling spread), and the
calibration runs that measure the noise."""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from typing import Any

import numpy as np

from ..metrics import MetricResult, compute_metric

SPREAD_FACTOR = 2.0
NOISE_FACTOR = 3.0
# Benign perturbations for --diffeval-calibrate, cycled: none of them changes the model.
PERTURBATIONS = ({"threads": 1}, {"batch_size": 1}, {"threads": 2}, {"batch_size": 64})


def derive_tolerance(metric: Any, entry: dict[str, Any], tolerance: float | None) -> tuple[float, str]:
    """The tolerance a comparison uses and where it came from: the test's explicit value; for a
    paired set-level entry the larger of its recorded noise floor and ``NOISE_FACTOR`` x the
    calibrated noise; else the largest of the metric's floor, drift's seed noise,
    ``NOISE_FACTOR`` x the calibrated noise and ``SPREAD_FACTOR`` x a resampling spread."""
    if tolerance is not None:
        return float(tolerance), "explicit (tolerance= in the test)"
    details, noise = entry.get("details", {}), entry.get("noise", {})
    if details.get("noise_floor") is not None:
        # Paired set-level entries (set_verdicts): the floor is measured noise, not a percentage.
        n = details.get("n", "N")
        candidates = [(float(details["noise_floor"]),
                       f"the seed-redraw noise at N={n} (each prompt's seeds split in two, 95th percentile)")]
        if noise.get("max_abs_effect") is not None:
            candidates.append((NOISE_FACTOR * float(noise["max_abs_effect"]),
                               f"{NOISE_FACTOR:g} x the calibrated noise {float(noise['max_abs_effect']):.4g}"))
        return max(candidates, key=lambda c: c[0])
    candidates = [(metric.default_tolerance(float(entry["value"])), "the metric's floor")]
    if details.get("seed_noise") is not None:
        # Drift: what re-drawing the seeds alone would cause (metrics/drift.py derives it).
        candidates.append((float(details["seed_noise"]), "the seed noise of its statistics"))
    if noise.get("max_abs_effect") is not None:
        # Calibrated: NOISE_FACTOR times the largest change benign re-runs caused.
        candidates.append((NOISE_FACTOR * float(noise["max_abs_effect"]),
                           f"{NOISE_FACTOR:g} x the calibrated noise {float(noise['max_abs_effect']):.4g}"))
    if details.get("spread") is not None:
        # Set-level metrics: twice the baseline's resampling spread (about 95% of the
        # movement other images of the same model would cause).
        candidates.append((SPREAD_FACTOR * float(details["spread"]),
                           f"{SPREAD_FACTOR:g} x the resampling spread {float(details['spread']):.4g}"))
    return max(candidates, key=lambda c: c[0])  # ties keep the earlier (the floor)


def resolve_tolerances(metrics: list[str], tolerance: Any) -> dict[str, float | None]:
    """One tolerance per metric from ``tolerance``: None (derived), a number (every metric)
    or a dict naming some of ``metrics`` (the others derived).  A dict key that is not one
    of the metrics checked is a mistake (a typo would silently keep the derived tolerance)."""
    def check(name: str, value: Any) -> float | None:
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value < 0:
            raise ValueError(f"pytest-diffeval: tolerance for {name!r} must be a finite number >= 0 (or None for "
                             f"the derived one), got {value!r}")
        return float(value)

    if isinstance(tolerance, Mapping):
        unknown = sorted(str(k) for k in tolerance if k not in metrics)
        if unknown:
            raise ValueError(f"pytest-diffeval: tolerance names {', '.join(map(repr, unknown))}, which this call does "
                             f"not check (metrics: {', '.join(map(repr, metrics))}); fix the metric name in the "
                             "tolerance dict")
        return {name: check(name, tolerance.get(name)) for name in metrics}
    return {name: check(name, tolerance) for name in metrics}


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
