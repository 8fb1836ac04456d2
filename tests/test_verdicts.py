"""Verdicts (verdicts.py): the paired t decision, checked against scipy.stats (an
independent implementation), and the guarantees a verdict must keep whatever the data:
a non-finite measurement never passes, a non-finite baseline is refused."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from pytest_diffeval.verdicts import CONFIDENCE, compare_paired, compare_values


def paired(diffs: np.ndarray, *, tolerance: float = 1.0, higher_is_better: bool = True, base: float = 30.0):
    """Run compare_paired on baseline samples ``base + noise`` and this run's shifted by ``diffs``."""
    rng = np.random.default_rng(len(diffs))
    baseline = {f"{i}|prompt {i}": base + float(x) for i, x in enumerate(rng.normal(0, 1, len(diffs)))}
    sign = 1.0 if higher_is_better else -1.0
    current = {k: v + sign * float(d) for (k, v), d in zip(baseline.items(), diffs)}
    return compare_paired("m", "bb", higher_is_better, current, baseline, float(np.mean(list(current.values()))),
                          float(np.mean(list(baseline.values()))), tolerance)


def around(mean: float, spread: float, n: int, seed: int = 0) -> np.ndarray:
    """``n`` paired differences with exactly this mean and sample standard deviation."""
    x = np.random.default_rng(seed).normal(size=n)
    x = (x - x.mean()) / x.std(ddof=1)
    return mean + spread * x


def test_a_noisy_drop_beyond_the_tolerance_is_not_a_regression() -> None:
    """Mean change -1.5 with tolerance 1, but samples scattered by ±4: the one-sided 95% bound
    is above -1, so the drop is not established beyond the tolerance."""
    diffs = around(-1.5, 4.0, 12)
    c = paired(diffs)
    assert c.effect == pytest.approx(-1.5)
    assert c.bound > -1.0 and c.verdict == "pass" and c.passed


def test_a_tight_drop_beyond_the_tolerance_regresses() -> None:
    diffs = around(-1.5, 0.1, 12)
    c = paired(diffs)
    assert c.effect == pytest.approx(-1.5)
    assert c.bound < -1.0 and c.verdict == "regressed" and not c.passed


def test_the_interval_is_the_paired_t_interval_of_scipy() -> None:
    diffs = around(-0.7, 1.3, 9, seed=3)
    c = paired(diffs)
    sem = stats.sem(diffs)
    expected = stats.t.interval(CONFIDENCE, len(diffs) - 1, loc=diffs.mean(), scale=sem)
    assert c.interval == pytest.approx(expected, rel=1e-9)
    # The verdict's bound is the one-sided 95% upper bound (a regression must be below it).
    one_sided = diffs.mean() + stats.t.ppf(CONFIDENCE, len(diffs) - 1) * sem
    assert c.bound == pytest.approx(one_sided, rel=1e-9)
    assert c.n == len(diffs) and c.method == "paired-t"


def test_lower_is_better_metrics_are_signed_so_negative_means_worse() -> None:
    c = paired(around(-1.5, 0.1, 8), higher_is_better=False)
    assert c.verdict == "regressed" and c.delta > 0  # the raw value went up: worse for a lower-is-better metric


def test_an_improvement_beyond_the_tolerance_is_improved() -> None:
    c = paired(around(2.5, 0.1, 8))
    assert c.verdict == "improved" and c.passed
    assert compare_values("fid", "bb", False, 10.0, 15.0, 1.0).verdict == "improved"


def test_moved_lists_the_worst_samples_first() -> None:
    diffs = np.array([0.1, -3.0, 0.2, -1.0, 0.0])
    c = paired(diffs, tolerance=10.0)
    assert [m["change"] for m in c.moved[:2]] == pytest.approx([-3.0, -1.0])
    assert c.moved[0]["prompt"] == "prompt 1" and c.moved[0]["seed"] == 1


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_a_non_finite_measurement_never_passes(bad: float) -> None:
    value = compare_values("fid", "bb", False, bad, 10.0, 1e9)
    assert value.verdict == "regressed" and "non-finite" in value.note
    baseline = {"0|a": 1.0, "1|b": 2.0}
    sample = compare_paired("clip", "bb", True, {"0|a": bad, "1|b": 2.0}, baseline, 1.5, 1.5, 1e9)
    assert sample.verdict == "regressed" and "seed 0 'a'" in sample.note
    mean = compare_paired("clip", "bb", True, dict(baseline), baseline, bad, 1.5, 1e9)
    assert mean.verdict == "regressed"


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_a_non_finite_baseline_is_refused_not_compared(bad: float) -> None:
    with pytest.raises(ValueError, match="non-finite value.*corrupt.*--snapshot-update"):
        compare_values("fid", "bb", False, 10.0, bad, 1.0)
    with pytest.raises(ValueError, match="non-finite value"):
        compare_paired("clip", "bb", True, {"0|a": 1.0}, {"0|a": bad}, 1.0, 1.0, 1.0)


@pytest.mark.parametrize("tolerance", [math.nan, -1.0, math.inf])
def test_a_tolerance_that_cannot_decide_is_refused(tolerance: float) -> None:
    with pytest.raises(ValueError, match="tolerance for fid must be a finite number >= 0"):
        compare_values("fid", "bb", False, 10.0, 10.0, tolerance)
