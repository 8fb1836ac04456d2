"""Drift (metrics/drift.py): the Fréchet distance to a baseline's own stored feature
statistics, checked against torchmetrics' FID and scipy's analytic formula on Gaussian
features, and its seed-noise tolerance against simulated independent sets."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from test_metrics_correctness import COV_A, COV_B, MU_A, MU_B, LookupFeatures, coded, frechet
from test_metrics_correctness import stats_cache  # noqa: F401  (autouse: a fresh statistics cache per test)

from pytest_diffeval.metrics import compute_metric
from pytest_diffeval.metrics.drift import _frechet, save_statistics, seed_noise
from pytest_diffeval.metrics.fid import ReferenceSetError


def record(images, features, path: Path) -> None:
    result = compute_metric("drift", images, features=features)
    assert result.value == 0.0 and result.state is not None  # a set against itself
    save_statistics(result.state, path)


def test_drift_is_the_frechet_distance_to_the_recorded_set(tmp_path: Path) -> None:
    n = 2000
    rng = np.random.default_rng(0)
    table = np.concatenate([rng.multivariate_normal(MU_A, COV_A, n), rng.multivariate_normal(MU_B, COV_B, n)])
    features = LookupFeatures(table)
    stats = tmp_path / "baseline.drift.safetensors"
    record(coded(range(n)), features, stats)

    drift = compute_metric("drift", coded(range(n, 2 * n)), baseline_stats=stats, features=features)
    old, new = table[:n], table[n:]
    analytic = frechet(old.mean(0), np.cov(old, rowvar=False), new.mean(0), np.cov(new, rowvar=False))
    assert drift.value == pytest.approx(analytic, rel=1e-9)  # scipy's sqrtm, the same samples
    fid = compute_metric("fid", coded(range(n, 2 * n)), reference=coded(range(n)), features=features)
    assert drift.value == pytest.approx(fid.value, rel=1e-12)  # torchmetrics' FID with the old set as reference
    assert drift.backbone == features.id and drift.details["statistics_sha256"]


def test_drift_is_zero_for_the_same_images_and_grows_with_a_shift(tmp_path: Path) -> None:
    n, shifts = 500, (0.0, 0.25, 0.5, 1.0, 2.0)
    rng = np.random.default_rng(1)
    base = rng.multivariate_normal(MU_A, COV_A, n)
    features = LookupFeatures(np.concatenate([base + s for s in shifts]))
    stats = tmp_path / "stats.safetensors"
    record(coded(range(n)), features, stats)
    values = [compute_metric("drift", coded(range(i * n, (i + 1) * n)), baseline_stats=stats, features=features).value
              for i in range(len(shifts))]
    assert values[0] == 0.0
    assert all(a < b for a, b in zip(values, values[1:])), values
    assert values[-1] == pytest.approx(len(MU_A) * 2.0**2, rel=1e-6)  # a pure shift by 2 in every dimension: ||shift||²


@pytest.mark.parametrize("dim, n", [(4, 200), (16, 128)])
def test_seed_noise_predicts_the_distance_between_independent_sets(dim: int, n: int) -> None:
    """The tolerance's derivation: half the 95th percentile of split-half distances is about
    the 95th percentile of the distance between two independent sets of the full size."""
    generator = torch.Generator().manual_seed(dim)
    mixing = torch.randn(dim, dim, generator=generator, dtype=torch.float64) * 0.5

    def draw() -> torch.Tensor:
        return torch.randn(n, dim, generator=generator, dtype=torch.float64) @ mixing + 1.0

    keys = [f"{i % 4}|p{i // 4}" for i in range(n)]  # n/4 prompts x 4 seeds, i.i.d. here
    independent = np.percentile([_frechet(draw(), draw()) for _ in range(60)], 95)
    estimates = [seed_noise(draw(), keys, seed=i) for i in range(8)]
    assert 0.5 * independent < np.mean(estimates) < 1.5 * independent, (estimates, independent)
    same = draw()
    assert seed_noise(same, keys) == seed_noise(same, keys)  # seeded splits: same features, same number


def test_seed_noise_splits_seeds_within_prompts_not_prompts() -> None:
    """Prompts x seeds is not i.i.d.: with a strong prompt effect, new seeds of the same prompts
    move the set far less than another mix of prompts.  The seed noise measures the former:
    each split keeps every prompt on both sides (issue 17: i.i.d. splits gave ~4x)."""
    generator = torch.Generator().manual_seed(5)
    prompts, seeds, dim = 32, 4, 8
    centres = torch.randn(prompts, dim, generator=generator, dtype=torch.float64) * 3.0
    features = centres.repeat_interleave(seeds, 0) + 0.3 * torch.randn(prompts * seeds, dim, generator=generator,
                                                                       dtype=torch.float64)
    keys = [f"{s}|p{p}" for p in range(prompts) for s in range(seeds)]
    other_seeds = np.percentile([_frechet(features, centres.repeat_interleave(seeds, 0) + 0.3 * torch.randn(
        prompts * seeds, dim, generator=generator, dtype=torch.float64)) for _ in range(40)], 95)
    stratified = seed_noise(features, keys)
    iid = seed_noise(features, [f"{i}|one prompt" for i in range(len(features))])
    assert stratified < 1.5 * other_seeds < iid, (stratified, other_seeds, iid)


def test_statistics_of_other_features_or_a_missing_file_are_refused(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    features = LookupFeatures(rng.normal(size=(100, 4)))
    other = LookupFeatures(rng.normal(size=(100, 4)))
    stats = tmp_path / "stats.safetensors"
    record(coded(range(100)), features, stats)
    with pytest.raises(ReferenceSetError, match=r"were computed with features 'gaussian-lookup@.*re-record"):
        compute_metric("drift", coded(range(100)), baseline_stats=stats, features=other)
    with pytest.raises(ReferenceSetError, match=r"drift statistics file .*missing\.safetensors does not exist; "
                                                r"fix: restore .*--snapshot-update"):
        compute_metric("drift", coded(range(100)), baseline_stats=tmp_path / "missing.safetensors", features=features)
    stats.write_bytes(b"not a safetensors file")
    with pytest.raises(ReferenceSetError, match=r"cannot read drift statistics .*stats\.safetensors"):
        compute_metric("drift", coded(range(100)), baseline_stats=stats, features=features)


def test_drift_statistics_of_the_wrong_shape_are_refused_with_the_fix(tmp_path: Path) -> None:
    """Read by the reference-statistics reader, so checked like them (it used to end in a
    bare torch shape error inside the Fréchet distance)."""
    rng = np.random.default_rng(4)
    stats, narrow, wider = tmp_path / "stats.safetensors", LookupFeatures(rng.normal(size=(100, 3))), \
        LookupFeatures(rng.normal(size=(100, 4)))
    record(coded(range(50)), narrow, stats)
    wider.id = narrow.id  # a file of the right features' id but 3 features where 4 are computed
    with pytest.raises(ReferenceSetError, match=r"drift statistics .*stats\.safetensors hold shapes \(3,\), "
                                                r"\(3, 3\), \(\) where \(4,\), \(4, 4\) and \(\) are needed; "
                                                r"fix: restore .*--snapshot-update"):
        compute_metric("drift", coded(range(50, 100)), baseline_stats=stats, features=wider)


def test_drift_statistics_are_one_format_with_reference_statistics_and_deterministic(tmp_path: Path) -> None:
    """The same state gives the same bytes (safetensors writes its metadata in a random key
    order; drift files are named by their sha256), and FID reads a drift file as its
    reference statistics: one format."""
    n = 200
    rng = np.random.default_rng(5)
    features = LookupFeatures(np.concatenate([rng.multivariate_normal(MU_A, COV_A, n),
                                              rng.multivariate_normal(MU_B, COV_B, n)]))
    state = compute_metric("drift", coded(range(n)), features=features).state
    shas = {save_statistics(state, tmp_path / f"{i}.safetensors") for i in range(12)}
    assert len(shas) == 1, shas
    drift = compute_metric("drift", coded(range(n, 2 * n)), baseline_stats=tmp_path / "0.safetensors",
                           features=features)
    fid = compute_metric("fid", coded(range(n, 2 * n)), reference=tmp_path / "0.safetensors", features=features)
    assert fid.details["reference"]["kind"] == "statistics" and drift.value > 0
    assert fid.value == pytest.approx(drift.value, rel=1e-9)
