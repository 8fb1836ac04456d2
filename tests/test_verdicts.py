"""Verdicts (verdicts.py): the paired t decision, checked against scipy.stats (an
independent implementation), and the guarantees a verdict must keep whatever the data:
a non-finite measurement never passes, a non-finite baseline is refused."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from pytest_diffeval import ImageSet
from pytest_diffeval.baselines import build_record, judge, regression_message
from pytest_diffeval.baselines.judge import replaced_model
from pytest_diffeval.metrics import _REGISTRY, MetricResult, get_metric, register_metric
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


# ---------------------------------------------------------------- McNemar (0/1 per-sample values)


def pass_fail(worse: int, better: int, n: int = 64, *, tolerance: float = 0.0, binary: bool | None = None):
    """compare_paired on ``n`` pass/fail samples: ``worse`` passed in the baseline and fail now,
    ``better`` the reverse, the rest pass in both."""
    baseline = {f"{i}|prompt {i}": 1.0 if i < worse else 0.0 if i < worse + better else 1.0 for i in range(n)}
    current = {k: 0.0 if i < worse else 1.0 for i, k in enumerate(baseline)}
    return compare_paired("digit_match", "checker", True, current, baseline, float(np.mean(list(current.values()))),
                          float(np.mean(list(baseline.values()))), tolerance, binary=binary)


def test_pass_fail_samples_are_judged_by_the_exact_mcnemar_test_of_scipy() -> None:
    c = pass_fail(7, 2)
    assert c.method == "mcnemar" and c.discordant == (7, 2)
    expected = stats.binomtest(7, 9, 0.5, alternative="greater").pvalue
    assert c.p_value == pytest.approx(expected, rel=1e-12)
    assert c.effect == pytest.approx((2 - 7) / 64)
    assert c.verdict == ("regressed" if expected < 1 - CONFIDENCE else "pass")
    strong = pass_fail(9, 0)
    assert strong.p_value == pytest.approx(stats.binomtest(9, 9, 0.5, alternative="greater").pvalue, rel=1e-12)
    assert strong.verdict == "regressed" and strong.bound < 0


@pytest.mark.parametrize("worse,better", [(w, b) for w in range(0, 12) for b in range(0, 5)])
def test_with_no_tolerance_mcnemar_regresses_exactly_when_its_p_value_is_below_5_percent(worse, better) -> None:
    """The bound is the exact (Clopper-Pearson) one, the inversion of the same binomial test."""
    c = pass_fail(worse, better)
    p = stats.binomtest(worse, worse + better, 0.5, alternative="greater").pvalue if worse + better else 1.0
    assert (c.verdict == "regressed") == (p < 1 - CONFIDENCE)


def test_mcnemar_not_the_t_test_decides_sparse_pass_fail_changes() -> None:
    """4 of 64 samples worse, none better: the t-test's normal approximation calls it a
    regression; the exact p-value is 1/16, no evidence at the 5% level."""
    t = pass_fail(4, 0, binary=False)
    assert t.method == "paired-t" and t.verdict == "regressed"
    c = pass_fail(4, 0)
    assert c.method == "mcnemar" and c.verdict == "pass"
    assert c.p_value == pytest.approx(stats.binomtest(4, 4, 0.5, alternative="greater").pvalue, rel=1e-12)


def test_the_tolerance_still_applies_to_pass_fail_changes() -> None:
    """9 of 64 worse is significant (p = 0.002) but a mean drop of 0.14 is within a tolerance of 0.2."""
    assert pass_fail(9, 0, tolerance=0.0).verdict == "regressed"
    assert pass_fail(9, 0, tolerance=0.2).verdict == "pass"
    assert pass_fail(0, 9).verdict == "improved"


def test_values_other_than_0_and_1_keep_the_paired_t() -> None:
    assert paired(around(-1.5, 0.1, 12)).method == "paired-t"


# ---------------------------------------------------------------- failure messages (baselines.judge)


def test_a_pass_fail_regression_names_the_mcnemar_test_and_its_counts() -> None:
    c = pass_fail(9, 2)
    assert c.verdict == "regressed"
    message = regression_message(c, Path("b.json"), "pytest --snapshot-update t")
    p = stats.binomtest(9, 11, 0.5, alternative="greater").pvalue
    assert f"McNemar exact, 9 of 11 discordant pairs worse (one-sided p = {p:.3g})" in message


@pytest.mark.parametrize("higher_is_better", [True, False])
def test_a_regression_message_uses_one_sign_convention(higher_is_better: bool) -> None:
    """Every change in the message is this run minus the baseline: a FID that rose by 20.26
    prints +20.26 everywhere, never -20.26 as well."""
    worse = -20.26 if higher_is_better else 20.26
    value = compare_values("fid", "bb", higher_is_better, 4.74 + worse, 4.74, 1.9)
    sample = paired(around(-1.5, 0.1, 8), higher_is_better=higher_is_better)  # 1.5 worse per sample
    for c in (value, sample):
        assert c.verdict == "regressed"
        message = regression_message(c, Path("b.json"), "pytest --snapshot-update t")
        raw = c.value - c.baseline
        assert f"change: {raw:+.4f}" in message and f"{-raw:+.4f}" not in message
        if c is sample:
            assert f"mean change {raw:+.4f}" in message
        bound = "< -tolerance" if higher_is_better else "> +tolerance"
        assert f"{bound} {c.tolerance:.4f}" in message


@pytest.mark.parametrize("metric", ["kid", "cmmd"])
def test_a_negative_kid_or_cmmd_is_explained_in_its_message(metric: str) -> None:
    """The unbiased MMD² of two indistinguishable sets is about 0 of either sign: a negative
    baseline or value is explained, a positive one is not (and FID never is)."""
    negative = compare_values(metric, "bb", False, 0.0095, -0.0003, 0.002)
    positive = compare_values(metric, "bb", False, 0.0095, 0.0003, 0.002)
    fid = compare_values("fid", "bb", False, 0.0095, -0.0003, 0.002)
    assert negative.verdict == positive.verdict == fid.verdict == "regressed"
    explained = f"a negative {metric} is not an error: it is an unbiased MMD² estimate, about 0"
    assert explained in regression_message(negative, Path("b.json"), "pytest --snapshot-update t")
    assert "is not an error" not in regression_message(positive, Path("b.json"), "pytest --snapshot-update t")
    assert "is not an error" not in regression_message(fid, Path("b.json"), "pytest --snapshot-update t")


def test_a_regression_under_a_replacement_model_says_so_before_it_suggests_an_update() -> None:
    c = compare_values("fid", "bb", False, 30.0, 4.7, 1.9)
    rerun = "pytest --snapshot-update t"
    plain = regression_message(c, Path("b.json"), rerun)
    assert "replacement" not in plain and f"if the change is intended, update the baseline: {rerun}" in plain
    c.hint = "this baseline was recorded without per-image features ...; upgrade it with: pytest --snapshot-update"
    replaced = regression_message(c, Path("b.json"), rerun, replacement="/models/candidate").splitlines()
    said = next(i for i, line in enumerate(replaced) if "this run used a replacement model" in line)
    assert "/models/candidate" in replaced[said]
    assert said < next(i for i, line in enumerate(replaced) if "--snapshot-update" in line)
    assert not any("if the change is intended" in line for line in replaced)


@pytest.mark.parametrize("override,model,expected", [
    (None, "m", None), ("/new", "/new", "/new"), ("/new", "diffeval/tiny-t2i", None),
    ("diffeval/tiny-t2i=/new", "/new", "/new"), ("diffeval/tiny-t2i=/new", "other", None), ("/new", None, None)])
def test_the_replacement_is_named_only_when_the_images_came_from_it(override, model, expected) -> None:
    """``--diffeval-model=NEW`` or ``ORIGINAL=NEW``: a test whose images' provenance names NEW."""
    assert replaced_model(override, {"model": model} if model is not None else {}) == expected


@pytest.mark.parametrize("binary,method", [(None, "mcnemar"), (True, "mcnemar"), (False, "paired-t")])
def test_the_metric_registration_decides_the_paired_test_of_a_baseline(binary, method) -> None:
    """``register_metric(binary=...)`` reaches the judge: None detects 0/1 values, False keeps the t."""
    import pytest_diffeval.embedded.metrics  # noqa: F401  registers digit_match / colour_match

    assert get_metric("digit_match").binary and get_metric("colour_match").binary
    assert get_metric("good_image_rate").binary and get_metric("clip_score").binary is None
    register_metric("passfail", binary=binary)(lambda images: None)
    try:
        images = ImageSet(images=np.zeros((8, 4, 4, 3), dtype=np.uint8), prompts=list("abcdefgh"), seeds=[0] * 8)
        before, after = np.ones(8), np.array([0, 0, 0, 1, 1, 1, 1, 1.0])
        record = build_record(MetricResult("passfail", float(after.mean()), "bb", True, per_sample=after), images, {})
        entry = build_record(MetricResult("passfail", 1.0, "bb", True, per_sample=before), images, {})
        c = judge(record, {"hardware": {"cpu/unknown": entry}}, 0.0)
        assert c.method == method
        if method == "mcnemar":
            assert c.discordant == (3, 0)
            assert c.p_value == pytest.approx(stats.binomtest(3, 3, 0.5, alternative="greater").pvalue, rel=1e-12)
    finally:
        _REGISTRY.pop("passfail", None)
