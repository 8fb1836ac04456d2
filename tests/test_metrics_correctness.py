"""FID and KID against independent references, on features whose distribution is known,
and FID against a reference statistics file.

The "images" are index codes (pixel (0, 0) holds the sample's number in base 256) and the
feature extractor looks the sample's feature vector up in a table drawn from chosen
Gaussians, so the plugin's whole FID/KID path (reference statistics and their cache,
torchmetrics, the float64 set-up) runs on features we know exactly."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import linalg

from pytest_diffeval import settings
from pytest_diffeval.generation import ImageSet
from pytest_diffeval.metrics import compute_metric

DIM = 4
MU_A, COV_A = np.zeros(DIM), np.diag([1.0, 2.0, 0.5, 1.0])
MU_B = np.array([1.0, -0.5, 0.0, 0.25])
COV_B = np.array([[2.0, 0.3, 0.0, 0.0], [0.3, 1.0, 0.2, 0.0], [0.0, 0.2, 0.5, 0.0], [0.0, 0.0, 0.0, 3.0]])


class LookupFeatures(torch.nn.Module):
    """Maps index-coded uint8 images to rows of a fixed feature table (float64)."""

    def __init__(self, table: np.ndarray) -> None:
        super().__init__()
        self.register_buffer("table", torch.from_numpy(table).double())
        self.num_features = table.shape[1]
        self.id = f"gaussian-lookup@{hashlib.sha256(table.tobytes()).hexdigest()[:12]}"  # the stats cache key

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        pixel = images[:, :, 0, 0].long()
        return self.table[pixel[:, 0] + 256 * pixel[:, 1] + 65536 * pixel[:, 2]]


def coded(indices: range) -> ImageSet:
    codes = np.array([[i % 256, (i // 256) % 256, i // 65536] for i in indices], dtype=np.uint8)
    images = np.broadcast_to(codes[:, None, None, :], (len(codes), 2, 2, 3)).copy()
    return ImageSet(images=images, prompts=["features"] * len(codes), seeds=list(indices))


def frechet(mu1: np.ndarray, s1: np.ndarray, mu2: np.ndarray, s2: np.ndarray) -> float:
    """||mu1 - mu2||² + tr(S1 + S2 - 2 (S1 S2)^½), with scipy's sqrtm."""
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * linalg.sqrtm(s1 @ s2).real))


@pytest.fixture(autouse=True)
def stats_cache(tmp_path: Path):
    previous = settings.current().cache_dir
    settings.configure(cache_dir=tmp_path / "cache")
    yield
    settings.configure(cache_dir=previous)


def test_fid_of_gaussian_features_is_the_analytic_frechet_distance() -> None:
    n = 4000
    rng = np.random.default_rng(0)
    table = np.concatenate([rng.multivariate_normal(MU_A, COV_A, n), rng.multivariate_normal(MU_B, COV_B, n)])
    features = LookupFeatures(table)
    result = compute_metric("fid", coded(range(n, 2 * n)), reference=coded(range(n)), features=features, batch_size=1000)
    real, fake = table[:n], table[n:]
    on_samples = frechet(real.mean(0), np.cov(real, rowvar=False), fake.mean(0), np.cov(fake, rowvar=False))
    assert result.value == pytest.approx(on_samples, rel=1e-9)  # the same formula on the same features
    population = frechet(MU_A, COV_A, MU_B, COV_B)  # what the sample estimate converges to
    assert result.value == pytest.approx(population, rel=0.05)
    assert result.backbone == features.id and result.details["n_reference"] == n


def test_fid_of_a_set_with_itself_is_exactly_zero() -> None:
    rng = np.random.default_rng(1)
    features = LookupFeatures(rng.multivariate_normal(MU_B, COV_B, 300))
    same = compute_metric("fid", coded(range(300)), reference=coded(range(300)), features=features)
    assert same.value == 0.0


def polynomial_mmd_unbiased(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD² with KID's kernel (x·y/d + 1)³ over the full sets."""
    d = x.shape[1]
    k = lambda a, b: (a @ b.T / d + 1) ** 3  # noqa: E731
    kxx, kyy = k(x, x), k(y, y)
    m, n = len(x), len(y)
    return float((kxx.sum() - np.trace(kxx)) / (m * (m - 1)) + (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
                 - 2 * k(x, y).mean())


def test_kid_is_near_zero_within_a_distribution_and_matches_the_full_set_estimate() -> None:
    n = 200
    rng = np.random.default_rng(2)
    table = np.concatenate([rng.multivariate_normal(MU_A, COV_A, n), rng.multivariate_normal(MU_A, COV_A, n),
                            rng.multivariate_normal(MU_B, COV_B, n)])
    features = LookupFeatures(table)
    reference = coded(range(n))
    same = compute_metric("kid", coded(range(n, 2 * n)), reference=reference, features=features)
    assert abs(same.value) < 3 * same.details["spread"]
    other = compute_metric("kid", coded(range(2 * n, 3 * n)), reference=reference, features=features)
    assert other.value > same.value + 3 * other.details["spread"]
    # the value is the full-set unbiased estimate; torchmetrics' KID (kept as subset_mean)
    # averages it over random subsets, so the two agree within a few standard errors of that mean
    for result, fake in [(same, table[n : 2 * n]), (other, table[2 * n :])]:
        full = polynomial_mmd_unbiased(table[:n], fake)
        assert result.value == pytest.approx(full, rel=1e-9)
        sem = result.details["subset_std"] / np.sqrt(result.details["subsets"])
        assert abs(result.details["subset_mean"] - full) < 4 * sem + 1e-9


def test_reference_statistics_file_gives_the_same_fid_and_is_refused_under_other_features(tmp_path: Path) -> None:
    from pytest_diffeval import assert_fid_below, save_reference_statistics
    from pytest_diffeval.metrics.fid import ReferenceSetError

    n = 300
    rng = np.random.default_rng(3)
    table = np.concatenate([rng.multivariate_normal(MU_A, COV_A, n), rng.multivariate_normal(MU_B, COV_B, n)])
    features, reference, images = LookupFeatures(table), coded(range(n)), coded(range(n, 2 * n))
    path = save_reference_statistics(reference, tmp_path / "stats.safetensors", features=features)
    assert path == tmp_path / "stats.safetensors"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "cache") == ["stats.safetensors"]  # no temp file left
    from_file = compute_metric("fid", images, reference=path, features=features)
    from_set = compute_metric("fid", images, reference=reference, features=features)
    # the same float64 sums, stored and read back exactly: equal up to float error
    assert from_file.value == pytest.approx(from_set.value, rel=1e-9) and from_file.value > 0
    assert from_file.details["reference"]["kind"] == "statistics" and from_file.details["n_reference"] == n
    checked = assert_fid_below(images, str(path), from_set.value * 1.01, features=features, tripwires=False)
    assert checked.value == from_file.value

    other = LookupFeatures(table * 2)
    with pytest.raises(ReferenceSetError, match=rf"(?s)computed with features '{features.id}', this check uses "
                                                rf"'{other.id}'.*fix: pass features='gaussian-lookup'.*"
                                                r"save_reference_statistics"):
        compute_metric("fid", images, reference=path, features=other)
    with pytest.raises(ReferenceSetError, match=r"does not exist; fix: write it with "
                                                r"pytest_diffeval.save_reference_statistics"):
        compute_metric("fid", images, reference=tmp_path / "missing.safetensors", features=features)
    (tmp_path / "truncated.safetensors").write_bytes(path.read_bytes()[:100])
    with pytest.raises(ReferenceSetError, match="cannot read reference statistics .*truncated.safetensors"):
        compute_metric("fid", images, reference=tmp_path / "truncated.safetensors", features=features)
    with pytest.raises(ReferenceSetError, match=r"go to a .safetensors file, not .*stats.npz"):
        save_reference_statistics(reference, tmp_path / "stats.npz", features=features)


def _rewrite(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Replace a safetensors file's tensors, keeping its metadata (its key, its feature id)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), "pt") as handle:
        metadata = handle.metadata()
    save_file(tensors, str(path), metadata=metadata)


def test_a_reference_statistics_cache_entry_swapped_or_misshapen_is_recomputed(tmp_path: Path) -> None:
    n = 50
    rng = np.random.default_rng(5)
    table = np.concatenate([rng.multivariate_normal(MU_A, COV_A, 2 * n), rng.multivariate_normal(MU_B, COV_B, n)])
    features, images = LookupFeatures(table), coded(range(2 * n, 3 * n))
    entries = tmp_path / "cache" / "reference-stats"
    fid_a = compute_metric("fid", images, reference=coded(range(n)), features=features)
    [entry_a] = entries.glob("*.safetensors")
    fid_b = compute_metric("fid", images, reference=coded(range(n, 2 * n)), features=features)
    [entry_b] = set(entries.glob("*.safetensors")) - {entry_a}
    assert fid_a.value != fid_b.value

    entry_a.write_bytes(entry_b.read_bytes())  # b's statistics in a's place
    again = compute_metric("fid", images, reference=coded(range(n)), features=features)
    assert again.value == pytest.approx(fid_a.value, rel=1e-9) and again.details["reference"]["cached"] is False
    assert compute_metric("fid", images, reference=coded(range(n)), features=features).details["reference"]["cached"]

    _rewrite(entry_a, {"real_features_sum": torch.zeros(3, dtype=torch.float64),  # under a's key, 3 features of 4
                       "real_features_cov_sum": torch.zeros(3, 3, dtype=torch.float64),
                       "real_features_num_samples": torch.tensor(n)})
    again = compute_metric("fid", images, reference=coded(range(n)), features=features)
    assert again.value == pytest.approx(fid_a.value, rel=1e-9) and again.details["reference"]["cached"] is False


def test_a_reference_statistics_file_of_the_wrong_shape_is_refused_with_the_fix(tmp_path: Path) -> None:
    from pytest_diffeval import save_reference_statistics
    from pytest_diffeval.metrics.fid import ReferenceSetError

    rng = np.random.default_rng(6)
    table = rng.multivariate_normal(MU_A, COV_A, 60)
    features = LookupFeatures(table)
    path = save_reference_statistics(coded(range(30)), tmp_path / "stats.safetensors", features=features)
    _rewrite(path, {"real_features_sum": torch.zeros(3, dtype=torch.float64),
                    "real_features_cov_sum": torch.zeros(3, 3, dtype=torch.float64),
                    "real_features_num_samples": torch.tensor(30)})
    with pytest.raises(ReferenceSetError, match=r"reference statistics .*stats.safetensors hold shapes \(3,\), "
                                                r"\(3, 3\), \(\) where \(4,\), \(4, 4\) and \(\) are needed; fix: "
                                                r"write it again with pytest_diffeval.save_reference_statistics"):
        compute_metric("fid", coded(range(30, 60)), reference=path, features=features)


def test_an_unwritable_reference_statistics_cache_warns_and_the_fid_is_still_given(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A read-only or full cache disk costs a recomputation next time, never the check (it
    used to fail the metric with "fix the metric")."""
    from pytest_diffeval.metrics import statistics_files

    n = 40
    rng = np.random.default_rng(7)
    table = np.concatenate([rng.multivariate_normal(MU_A, COV_A, n), rng.multivariate_normal(MU_B, COV_B, n)])
    features, images, reference = LookupFeatures(table), coded(range(n, 2 * n)), coded(range(n))
    expected = compute_metric("fid", images, reference=reference, features=features).value
    for entry in (tmp_path / "cache" / "reference-stats").glob("*.safetensors"):
        entry.unlink()

    def full_disk(*args: object, **kwargs: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(statistics_files, "write_statistics", full_disk)
    with pytest.warns(UserWarning, match=r"cannot write the reference-statistics cache entry .*No space left on "
                                         r"device.*fix: make the cache folder writable"):
        result = compute_metric("fid", images, reference=reference, features=features)
    assert result.value == pytest.approx(expected, rel=1e-9)
