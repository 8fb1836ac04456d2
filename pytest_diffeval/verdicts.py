"""Deciding whether a run regressed against its baseline.

Per-sample metrics are compared **paired**: sample ``(prompt, seed)`` of this run with
the same sample of the baseline.  The effect is the mean paired difference, signed so
that negative means worse; a one-sided 95% Student-t bound on it is computed.  A run
*regressed* when even that bound is worse than ``-tolerance``: the drop is larger than
the tolerance with 95% confidence, so a few noisy samples cannot fail a test, while a
real drop shared by many samples does.  Set-level metrics (FID, KID, CMMD, drift) are
compared paired too, over joint resamples of both runs' per-image features
(:mod:`~pytest_diffeval.set_verdicts`); baselines recorded without those features compare
the two numbers directly (:func:`compare_values`).

Pass/fail per-sample metrics (every value 0 or 1: ``digit_match``, ``colour_match``,
``good_image_rate``) are compared with the exact **McNemar** test instead: only the
discordant samples (passed in one run, failed in the other) carry information, and the
number that got worse is Binomial(d, 1/2) when nothing changed.  The t-test's normal
approximation is wrong for such sparse 0/1 differences (4 of 64 samples worse and none
better: t says regressed, the exact p-value is 1/16).  The verdict's bound is the
one-sided 95% bound of the mean change from the exact (Clopper-Pearson) bound of the
worse share among the d discordant samples, ``(d/n) * (1 - 2 * share_low)``; with a zero
tolerance it regresses exactly when the one-sided McNemar p-value is below 0.05.

A measured value that is NaN or infinite is never a pass: it is a regression whose
message says so (``nan`` compares false with everything, so a naive ``effect < -tol``
check would let it through).  A non-finite *baseline* is refused with ``ValueError``:
that is corrupt data, not a verdict (``baselines.judge`` reports it before comparing).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Any

import numpy as np

CONFIDENCE = 0.95


@dataclass
class Comparison:
    """The outcome of comparing one metric of a run with its baseline."""

    metric: str
    backbone: str
    higher_is_better: bool
    value: float
    baseline: float
    tolerance: float
    effect: float  # mean paired change (or change of the value), + better / - worse
    interval: tuple[float, float] | None  # two-sided 95% interval of the effect, paired only
    bound: float  # the one-sided 95% bound the verdict uses (the effect itself if unpaired)
    n: int
    method: str  # "paired-t", "mcnemar" (0/1 per-sample values), "paired-bootstrap" (set_verdicts) or "value"
    verdict: str  # "pass", "regressed" or "improved"
    moved: list[dict[str, Any]] = field(default_factory=list)  # samples that moved most, worst first
    tolerance_source: str = ""  # where the tolerance came from (explicit, floor, 2x spread, calibrated noise)
    spread: float | None = None  # set-level metrics: the baseline's resampling spread
    note: str = ""  # why a verdict was forced (a non-finite measurement)
    p_value: float | None = None  # McNemar: the exact one-sided p-value of the verdict's direction
    discordant: tuple[int, int] | None = None  # McNemar: (samples worse, samples better) than the baseline
    resamples: int | None = None  # paired-bootstrap (set_verdicts): joint resamples behind spread and bound
    floor: float | None = None  # the baseline's noise floor (seed-redraw noise at its N), when it records one
    mde: dict[str, Any] | None = None  # the baseline's minimum detectable effect, when it records one
    hint: str = ""  # advice on the baseline itself (an old-format entry: how to upgrade it)

    @property
    def passed(self) -> bool:
        return self.verdict != "regressed"

    @property
    def delta(self) -> float:
        return self.value - self.baseline


def _t_quantile(p: float, df: int) -> float:
    """Student's t quantile: ``scipy.special.stdtrit``, what ``scipy.stats.t.ppf`` computes
    (the same numbers), without importing scipy.stats (half a second on a warm rerun)."""
    from scipy.special import stdtrit

    return float(stdtrit(df, p))


def _require_tolerance(metric: str, tolerance: float) -> None:
    if isinstance(tolerance, bool) or not isinstance(tolerance, numbers.Real) or not (
            math.isfinite(tolerance) and tolerance >= 0):
        raise ValueError(f"pytest-diffeval: the tolerance for {metric} must be a finite number >= 0, got {tolerance!r}")


def _require_finite_baseline(metric: str, values: list[float]) -> None:
    bad = [v for v in values if not math.isfinite(v)]
    if bad:
        raise ValueError(f"pytest-diffeval: the {metric} baseline holds a non-finite value ({bad[0]!r}); "
                         "it is corrupt: restore it from version control or re-record it with --snapshot-update")


def compare_paired(metric: str, backbone: str, higher_is_better: bool, current: dict[str, float],
                   baseline: dict[str, float], value: float, baseline_value: float, tolerance: float,
                   top: int = 5, binary: bool | None = None) -> Comparison:
    """Compare per-sample values keyed alike (``"<seed>|<prompt>"``): the paired t, or the exact
    McNemar test when the values are pass/fail (``binary``; None: when every value is 0 or 1)."""
    _require_tolerance(metric, tolerance)
    _require_finite_baseline(metric, [baseline_value, *baseline.values()])
    keys = [k for k in baseline if k in current]
    nonfinite = [k for k in keys if not math.isfinite(current[k])]
    if nonfinite or not math.isfinite(value):
        shown = ", ".join(f"seed {k.split('|', 1)[0]} {k.split('|', 1)[1]!r}" for k in nonfinite[:3])
        note = (f"this run measured a non-finite {metric} ({value!r}"
                + (f"; {len(nonfinite)} sample(s) non-finite: {shown}" if nonfinite else "") + ")")
        return Comparison(metric, backbone, higher_is_better, value, baseline_value, tolerance, math.nan, None,
                          math.nan, len(keys), "paired-t", "regressed", note=note)
    sign = 1.0 if higher_is_better else -1.0
    diffs = np.array([sign * (current[k] - baseline[k]) for k in keys], dtype=np.float64)
    n = len(diffs)
    effect = float(diffs.mean()) if n else 0.0
    if binary is None:
        binary = n > 0 and all(current[k] in (0.0, 1.0) and baseline[k] in (0.0, 1.0) for k in keys)
    p_value, discordant = None, None
    if binary and n:
        worse, better = int((diffs < 0).sum()), int((diffs > 0).sum())
        interval, upper, lower, p_worse, p_better = _mcnemar(worse, better, n)
        discordant = (worse, better)
    elif n >= 2 and float(diffs.std(ddof=1)) > 0:
        se = float(diffs.std(ddof=1)) / math.sqrt(n)
        half = _t_quantile(0.5 + CONFIDENCE / 2, n - 1) * se
        interval: tuple[float, float] | None = (effect - half, effect + half)
        one_sided = _t_quantile(CONFIDENCE, n - 1) * se
        upper, lower = effect + one_sided, effect - one_sided
    else:
        interval, upper, lower = ((effect, effect) if n else None), effect, effect
    if upper < -tolerance:
        verdict, bound = "regressed", upper
    elif lower > tolerance:
        verdict, bound = "improved", lower
    else:
        verdict, bound = "pass", upper
    if discordant is not None:
        p_value = p_better if verdict == "improved" else p_worse
    order = np.argsort(diffs)[:top]
    moved = [
        {"key": keys[i], "seed": int(keys[i].split("|", 1)[0]), "prompt": keys[i].split("|", 1)[1],
         "baseline": baseline[keys[i]], "value": current[keys[i]], "change": float(diffs[i] * sign)}
        for i in order
    ]
    return Comparison(metric, backbone, higher_is_better, value, baseline_value, tolerance, effect, interval,
                      bound, n, "mcnemar" if discordant is not None else "paired-t", verdict, moved,
                      p_value=p_value, discordant=discordant)


def _mcnemar(worse: int, better: int, n: int) -> tuple[tuple[float, float], float, float, float, float]:
    """The exact McNemar test of ``n`` paired 0/1 samples, ``worse`` of them 1 -> 0 and ``better``
    0 -> 1: the two-sided 95% interval of the mean change, its one-sided 95% upper and lower
    bounds, and the one-sided p-values of "worse" and of "better" (``scipy.stats.binomtest``
    on the discordant counts; the bounds are its exact Clopper-Pearson bounds, conditional
    on the number of discordant samples)."""
    d = worse + better
    if d == 0:  # nothing moved: no evidence either way
        return (0.0, 0.0), 0.0, 0.0, 1.0, 1.0
    from scipy.stats import binomtest

    scale = d / n  # mean change = scale * (share better - share worse) = scale * (1 - 2 * share worse)
    test_worse = binomtest(worse, d, 0.5, alternative="greater")
    test_better = binomtest(better, d, 0.5, alternative="greater")
    low, high = binomtest(worse, d, 0.5).proportion_ci(CONFIDENCE, method="exact")
    upper = scale * (1 - 2 * test_worse.proportion_ci(CONFIDENCE, method="exact").low)
    lower = -scale * (1 - 2 * test_better.proportion_ci(CONFIDENCE, method="exact").low)
    return ((scale * (1 - 2 * high), scale * (1 - 2 * low)), upper, lower,
            float(test_worse.pvalue), float(test_better.pvalue))


def compare_values(metric: str, backbone: str, higher_is_better: bool, value: float, baseline_value: float,
                   tolerance: float) -> Comparison:
    """Compare a set-level value (FID, KID, ...) with the baseline's."""
    _require_tolerance(metric, tolerance)
    _require_finite_baseline(metric, [baseline_value])
    if not math.isfinite(value):
        return Comparison(metric, backbone, higher_is_better, value, baseline_value, tolerance, math.nan, None,
                          math.nan, 1, "value", "regressed", note=f"this run measured a non-finite {metric} ({value!r})")
    sign = 1.0 if higher_is_better else -1.0
    effect = sign * (value - baseline_value)
    verdict = "regressed" if effect < -tolerance else "improved" if effect > tolerance else "pass"
    return Comparison(metric, backbone, higher_is_better, value, baseline_value, tolerance, effect, None,
                      effect, 1, "value", verdict)
