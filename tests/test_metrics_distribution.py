"""KID's and CMMD's estimators against independent computations: torchmetrics' own
``poly_mmd`` and KID, the CMMD reference implementation's formula, and U-statistics written
out as loops; the unbiased estimators' expectation; their small-N guards and estimator
bookkeeping (result cache key, baseline signature)."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.spatial.distance import cdist

from pytest_diffeval.baselines.records import signature, signature_differences
from pytest_diffeval.generation import ImageSet
from pytest_diffeval.metrics import MetricInputError, compute_metric, get_metric
from pytest_diffeval.metrics import distribution
from pytest_diffeval.metrics.distribution import cmmd_mmd2, kid_mmd2
from pytest_diffeval.resampling import split_halves

from test_metrics_correctness import COV_A, COV_B, MU_A, MU_B, LookupFeatures, coded
from test_metrics_correctness import stats_cache  # noqa: F401  (autouse: a fresh statistics cache per test)


def t(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(a)


def reference_cmmd(x: np.ndarray, y: np.ndarray) -> float:
    """google-research/cmmd ``distance.py``: 1000 x (mean k(x,x') + mean k(y,y') - 2 mean k(x,y)),
    means over the FULL kernel matrices, k = exp(-|a-b|² / (2·10²))."""
    k = lambda a, b: np.exp(-cdist(a, b, "sqeuclidean") / (2 * 10.0**2)).mean()  # noqa: E731
    return 1000 * (k(x, x) + k(y, y) - 2 * k(x, y))


def u_statistic_loop(kernel, x: np.ndarray, y: np.ndarray, x_ids=None) -> float:
    """The unbiased MMD² written out pair by pair: within-set pairs of distinct samples only."""
    x_ids = list(range(len(x))) if x_ids is None else list(x_ids)
    within_x = [kernel(x[i], x[j]) for i in range(len(x)) for j in range(len(x)) if x_ids[i] != x_ids[j]]
    within_y = [kernel(y[i], y[j]) for i in range(len(y)) for j in range(len(y)) if i != j]
    across = [kernel(a, b) for a in x for b in y]
    return float(np.mean(within_x) + np.mean(within_y) - 2 * np.mean(across))


def rbf(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.exp(-np.sum((a - b) ** 2) / 200.0))


def poly(a: np.ndarray, b: np.ndarray) -> float:
    return float((a @ b / len(a) + 1) ** 3)


def test_kid_mmd2_is_torchmetrics_poly_mmd_on_the_same_features() -> None:
    from torchmetrics.image.kid import poly_mmd

    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(40, 6)), rng.normal(size=(40, 6)) + 0.3
    assert kid_mmd2(t(x), t(y)) == pytest.approx(float(poly_mmd(t(y), t(x))), rel=1e-12)
    # unequal sizes (torchmetrics' function assumes equal ones): the pairwise loop
    assert kid_mmd2(t(x[:25]), t(y)) == pytest.approx(u_statistic_loop(poly, x[:25], y), rel=1e-10)


def test_cmmd_biased_is_the_reference_implementation_and_unbiased_the_u_statistic() -> None:
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(20, 8)), rng.normal(size=(25, 8)) + 0.5
    assert cmmd_mmd2(t(x), t(y), unbiased=False) == pytest.approx(reference_cmmd(x, y), rel=1e-10)
    assert cmmd_mmd2(t(x), t(y)) == pytest.approx(1000 * u_statistic_loop(rbf, x, y), rel=1e-10)
    assert cmmd_mmd2(t(x), t(y)) != pytest.approx(cmmd_mmd2(t(x), t(y), unbiased=False), rel=1e-3)


def test_copies_in_a_resample_are_left_out_like_the_diagonal(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(10, 4)), rng.normal(size=(12, 4))
    ids = np.array([0, 0, 1, 2, 2, 2, 5, 6, 7, 9])
    expected = u_statistic_loop(rbf, x[ids], y, ids)
    assert cmmd_mmd2(t(x[ids]), t(y), x_ids=ids) == pytest.approx(1000 * expected, rel=1e-10)
    assert kid_mmd2(t(x[ids]), t(y), x_ids=ids) == pytest.approx(u_statistic_loop(poly, x[ids], y, ids), rel=1e-10)
    # computed in row blocks: the same numbers with a block smaller than a row
    monkeypatch.setattr(distribution, "KERNEL_BLOCK", 3)
    assert cmmd_mmd2(t(x[ids]), t(y), x_ids=ids) == pytest.approx(1000 * expected, rel=1e-10)
    assert kid_mmd2(t(x), t(y)) == pytest.approx(u_statistic_loop(poly, x, y), rel=1e-10)


def test_unbiased_estimators_are_zero_in_expectation_where_the_biased_one_is_not() -> None:
    """200 seeded pairs of samples of ONE distribution at N=16: the unbiased estimates average
    to 0 within 3 standard errors (single ones are negative about half the time); the
    V-statistic's average is its bias, far above 0."""
    rng = np.random.default_rng(3)
    draws = [(t(rng.normal(size=(16, 5)) * 4), t(rng.normal(size=(16, 5)) * 4)) for _ in range(200)]
    for estimate in (lambda a, b: cmmd_mmd2(a, b), kid_mmd2):
        values = np.array([estimate(a, b) for a, b in draws])
        se = values.std(ddof=1) / np.sqrt(len(values))
        assert abs(values.mean()) < 3 * se
        assert 0.2 < (values < 0).mean() < 0.8
    biased = np.array([cmmd_mmd2(a, b, unbiased=False) for a, b in draws])
    assert biased.min() > 0 and biased.mean() > 20 * biased.std(ddof=1) / np.sqrt(len(biased))


def test_the_estimators_refuse_fewer_than_two_rows_naming_the_minimum() -> None:
    one, many = torch.zeros(1, 3), torch.ones(5, 3)
    for estimate in (kid_mmd2, cmmd_mmd2):
        with pytest.raises(MetricInputError, match="at least 2 images on each side.*got 1 and 5"):
            estimate(one, many)
    with pytest.raises(MetricInputError, match=r"shapes \(5, 3\) and \(5, 4\)"):
        kid_mmd2(many, torch.ones(5, 4))


# ------------------------------------------------------------------------- KID, the metric


@pytest.fixture
def table() -> np.ndarray:
    rng = np.random.default_rng(4)
    return np.concatenate([rng.multivariate_normal(MU_A, COV_A, 160), rng.multivariate_normal(MU_B, COV_B, 160)])


def stratified(indices: range, prompts: int) -> ImageSet:
    images = coded(indices)
    return ImageSet(images=images.images, prompts=[f"p{i % prompts}" for i in range(len(indices))],
                    seeds=[i // prompts for i in range(len(indices))])


def test_kid_value_is_the_full_set_estimate_and_its_spread_a_stratified_resampling(table: np.ndarray) -> None:
    from torchmetrics.image.kid import poly_mmd

    features, reference = LookupFeatures(table), coded(range(100))
    images = stratified(range(100, 160), prompts=20)
    with pytest.warns(UserWarning, match="KID on 60 generated"):
        result = compute_metric("kid", images, reference=reference, features=features)
    fake, real = table[100:160], table[:100]
    assert result.value == pytest.approx(u_statistic_loop(poly, fake, real), rel=1e-9)
    assert result.details["estimator"] == "unbiased"
    # torchmetrics' KID is kept beside it (its subset mean estimates the same number)
    assert result.details["subset_size"] == 30 and result.details["subsets"] == 100
    # the spread: the estimate on two halves of each prompt's seeds (the package's seeded
    # splits), rms of their difference / 2: what re-drawing the seeds moves the value by
    generator = np.random.default_rng(distribution.SEED)
    differences = []
    for _ in range(distribution.SPLITS):
        a, b = split_halves(images.sample_keys, generator)
        differences.append(kid_mmd2(t(fake[a]), t(real)) - kid_mmd2(t(fake[b]), t(real)))
    assert result.details["spread"] == pytest.approx(np.sqrt(np.mean(np.square(differences))) / 2, rel=1e-9)
    assert result.details["spread"] < result.details["subset_std"]  # one subset's std is no spread
    equal = compute_metric("kid", coded(range(100, 200)), reference=reference, features=features, subsets=0)
    assert equal.value == pytest.approx(float(poly_mmd(t(table[:100]), t(table[100:200]))), rel=1e-9)
    assert "subset_mean" not in equal.details


def test_kid_states_its_true_minimum_and_warns_when_its_subsets_are_small(table: np.ndarray) -> None:
    """The full-set estimate needs 2 images a side: 1 is refused naming that minimum; 3 works
    (too few for subsets, which are skipped) with a warning that explains a value near 0 of
    either sign; 100 a side does not warn."""
    features, reference = LookupFeatures(table), coded(range(100))
    with pytest.raises(MetricInputError, match=r"KID needs at least 2 images on each side.*got N=1 generated") as info:
        compute_metric("kid", coded(range(100, 101)), reference=reference, features=features)
    assert "fix:" in str(info.value)
    with pytest.warns(UserWarning, match=r"KID on 3 generated and 100 reference images is mostly noise: .*about 0, of "
                                         r"either sign.*subsets hold 1 images \(fewer than 2: skipped\)"):
        result = compute_metric("kid", coded(range(100, 103)), reference=reference, features=features)
    assert "subset_mean" not in result.details and np.isfinite(result.value)
    assert "spread" not in result.details  # halves of fewer than 2 images: no seed spread
    with pytest.raises(MetricInputError, match="subset_size=80 must be between 2 and the smaller side"):
        compute_metric("kid", coded(range(100, 160)), reference=reference, features=features, subset_size=80)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*KID on", category=UserWarning)
        compute_metric("kid", coded(range(100, 200)), reference=reference, features=features, subsets=2)


# ------------------------------------------------------------------------- CMMD, the metric


def random_images(n: int, seed: int, shift: float = 0.0) -> ImageSet:
    rng = np.random.default_rng(seed)
    images = (rng.random((n, 32, 32, 3)) * 200 + shift).clip(0, 255).astype(np.uint8)
    return ImageSet(images=images, prompts=[f"prompt number {i % 4}" for i in range(n)], seeds=list(range(n)))


def test_cmmd_is_unbiased_by_default_and_the_estimator_is_part_of_its_key_and_signature(
        tiny_models: dict[str, Path]) -> None:
    from pytest_diffeval.metrics.result_cache import call_material

    clip = str(tiny_models["clip"])
    images, reference = random_images(32, 1), random_images(40, 2)
    unbiased = compute_metric("cmmd", images, reference=reference, clip_model=clip)
    biased = compute_metric("cmmd", images, reference=reference, clip_model=clip, estimator="biased")
    assert unbiased.details["estimator"] == "unbiased" and biased.details["estimator"] == "biased"
    assert biased.value > unbiased.value and unbiased.details["spread"] > 0
    # a set against ITSELF (not two samples): the V-statistic is 0, the U-statistic below 0
    # (its within-set means leave out the k = 1 diagonal that the cross term keeps)
    assert compute_metric("cmmd", reference, reference=reference, clip_model=clip,
                          estimator="biased").value == pytest.approx(0, abs=1e-9)
    assert compute_metric("cmmd", reference, reference=reference, clip_model=clip).value < 0
    metric = get_metric("cmmd")
    assert (call_material(metric, images, {"reference": reference, "clip_model": clip})
            != call_material(metric, images, {"reference": reference, "clip_model": clip, "estimator": "biased"}))
    differences = signature_differences(signature(biased, images, {}), signature(unbiased, images, {}))
    assert differences == ["estimator: baseline 'biased', this run 'unbiased'"]
    with pytest.raises(MetricInputError, match="CMMD estimator='v' is not one of 'unbiased', 'biased'; fix:"):
        compute_metric("cmmd", images, reference=reference, clip_model=clip, estimator="v")


def test_cmmd_warns_about_a_small_reference_side_too(tiny_models: dict[str, Path]) -> None:
    clip = str(tiny_models["clip"])
    with pytest.warns(UserWarning, match=r"CMMD on 8 reference images is noisy \(64 generated, 8 reference\); "
                                         r"prefer >= 64 on each side") as caught:
        compute_metric("cmmd", random_images(64, 3), reference=random_images(8, 4), clip_model=clip)
    assert not any("generated images is noisy" in str(w.message) for w in caught)
    with pytest.raises(MetricInputError, match="CMMD needs at least 2 images on each side, got N=64 generated and 1"):
        compute_metric("cmmd", random_images(64, 3), reference=random_images(1, 4), clip_model=clip)


def test_fid_warns_naming_the_reference_side_when_only_it_is_small(table: np.ndarray) -> None:
    """4-d features: 3 reference images cannot give a full-rank covariance, 100 generated can;
    the warning names the reference set (it used to count only the smaller side)."""
    features = LookupFeatures(table)
    with pytest.warns(UserWarning, match=r"FID on 100 generated and 3 reference images with 4-d features is biased "
                                         r"upward \(the reference set's covariance") as caught:
        compute_metric("fid", coded(range(100, 200)), reference=coded(range(3)), features=features)
    assert not any("the generated" in str(w.message) for w in caught)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*biased upward", category=UserWarning)
        compute_metric("fid", coded(range(100, 200)), reference=coded(range(100)), features=features)
