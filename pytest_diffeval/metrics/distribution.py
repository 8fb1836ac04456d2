"""Kernel distribution distances, KID and CMMD: unbiased MMD² estimates between generated
images and a reference set (an ImageSet or a folder of images).  KID uses torchmetrics'
polynomial kernel on the full sets (:func:`kid_mmd2`); CMMD (not in torchmetrics: ours, after
google-research/cmmd) an RBF kernel on CLIP embeddings, unbiased or the reference
implementation's biased estimator (:func:`cmmd_mmd2`).  Both are about 0, of either sign,
for indistinguishable sets."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import numpy as np

from .. import settings
from ..resampling import split_halves
from . import Metric, MetricInputError, MetricResult
from .fid import _feature_extractor, _load_folder, _update_from_arrays, block_features
from .statistics_files import features_state

if TYPE_CHECKING:  # imported where used: a cached result needs neither torch nor torchmetrics
    import torch

SEED = 0  # KID's subsets and both spreads' seed splits are drawn from this seed: same images, same numbers
# KID warns below this subset size (fewer than 100 images on the smaller side).  At the
# release suite's 64-image subsets one subset's estimate already varies ~20x the value.
KID_MIN_SUBSET = 50
CMMD_SIGMA, CMMD_SCALE = 10.0, 1000.0  # the reference implementation's bandwidth and scale
CMMD_ESTIMATORS = ("unbiased", "biased")
# CMMD warns below this many images on either side.  Two sets of the embedded model's real
# held-out images (tiny-CLIP, 20 draws) differ by sd 0.25 at N=32, 0.13 at 64, 0.061 at 128:
# at 32 the noise exceeds the shipped model's whole distance to real images (0.18 biased).
CMMD_MIN_N = 64
SPLITS = 50  # seeded splits of each prompt's seeds behind KID's and CMMD's spread (seed_spread)
RESAMPLE_MAX = 2048  # above this many generated images the spread (an N x N kernel matrix) is not computed


def _reference_arrays(reference: Any) -> Iterator[np.ndarray]:
    if hasattr(reference, "images") and hasattr(reference, "sample_keys"):
        return iter(reference.images)

    folder = Path(reference)
    if not folder.is_dir():
        raise MetricInputError(f"pytest-diffeval: reference {folder} is not a folder of images (KID and CMMD need images, "
                         "not cached FID statistics)")
    return _load_folder(folder)


class KID(Metric):
    """Kernel Inception Distance: the unbiased polynomial-kernel MMD² (:func:`kid_mmd2`) of
    the full generated and reference feature sets, with a seed-redraw spread.

    torchmetrics' KID is the mean of this estimate over random subsets, and its ``std`` is
    the std of ONE subset's estimate (at the release suite's 128 images: 0.06 against a value
    of 0.003), so neither is used as the value or the spread here; they are kept in
    ``details`` (``subset_mean``, ``subset_std``; ``subsets=0`` skips them) for comparison
    with papers.  ``details["spread"]`` is how much the value moves when the seeds are
    re-drawn (:func:`seed_spread`: seeded splits of each prompt's seeds), computed up to
    ``RESAMPLE_MAX`` generated images."""

    name = "kid"
    higher_is_better = False
    per_sample = False
    reads_blocks = True
    relative_tolerance = 0.05
    absolute_tolerance = 1e-4
    cacheable = True

    def compute(self, images: Any, *, reference: Any, features: Any = None, device: str | None = None,
                subsets: int = 100, subset_size: int | None = None, batch_size: int = 64) -> MetricResult:
        import torch
        from torchmetrics.image.kid import KernelInceptionDistance
        from torchmetrics.utilities import dim_zero_cat

        device = device or settings.resolved_device()
        fid, feature_id, preprocessing = _feature_extractor(features or settings.current().fid_features, device)
        real = list(_reference_arrays(reference))
        n, n_real = len(images), len(real)
        if min(n, n_real) < 2:  # the U-statistic averages over pairs of distinct images
            raise MetricInputError(
                f"pytest-diffeval: KID needs at least 2 images on each side (its unbiased MMD² averages over pairs of "
                f"distinct images), got N={n} generated and {n_real} reference images; fix: generate more prompts "
                "or seeds (KID is stable only with hundreds of images; for a few, use a per-sample metric)")
        # torchmetrics' subsets: half the smaller side (at most its 1000), so subsets differ
        size = min(1000, min(n, n_real) // 2) if subset_size is None else int(subset_size)
        if subset_size is not None and not 2 <= size <= min(n, n_real):
            raise MetricInputError(f"pytest-diffeval: KID subset_size={subset_size} must be between 2 and the smaller "
                                   f"side ({min(n, n_real)} images); fix: pass a subset_size in that range, or none "
                                   "(half the smaller side)")
        if min(n, n_real) < 2 * KID_MIN_SUBSET:
            warnings.warn(
                f"pytest-diffeval: KID on {n} generated and {n_real} reference images is mostly noise: its value "
                "(the full-set unbiased MMD²) is about 0, of either sign, for indistinguishable sets at this N, and "
                f"its subsets hold {size} images" + (" (fewer than 2: skipped)" if size < 2 else "") +
                f"; use at least {2 * KID_MIN_SUBSET} images on each side", UserWarning, stacklevel=3)
        metric = KernelInceptionDistance(feature=fid.inception, subsets=max(1, subsets), subset_size=max(1, size),
                                         reset_real_features=False, normalize=False).to(device)
        _update_from_arrays(metric, iter(real), True, device, batch_size)
        if hasattr(images, "gather_rows"):  # under torchrun: each rank's block, the features gathered
            metric.fake_features.append(block_features(metric.inception, images, device, batch_size,
                                                       "gather the KID features").to(device))
        else:
            _update_from_arrays(metric, iter(images.images), False, device, batch_size)
        y = dim_zero_cat(metric.real_features).double()
        x = dim_zero_cat(metric.fake_features).double()
        details: dict[str, Any] = {"estimator": "unbiased", "n": n, "n_reference": n_real,
                                   "preprocessing": preprocessing}
        if subsets > 0 and size >= 2:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(SEED)
                mean, std = metric.compute()
            details.update(subset_mean=float(mean), subset_std=float(std), subset_size=size, subsets=subsets)
        spread = seed_spread(_poly, x, y, images.sample_keys, unbiased=True)
        if spread is not None:
            details["spread"] = spread
        state = features_state(x.cpu(), images.sample_keys, feature_id, {"features": y.cpu()})  # paired verdicts
        return MetricResult(self.name, kid_mmd2(x, y), feature_id, False, details=details, state=state)


KERNEL_BLOCK = 2**22  # kernel entries computed at once (32 MiB in float64): memory stays bounded at any N


def _rbf(a: torch.Tensor, b: torch.Tensor, sigma: float) -> torch.Tensor:
    """The Gaussian RBF kernel matrix ``exp(-|a - b|² / 2σ²)``."""
    import torch

    squared = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2 * a @ b.T
    return torch.exp(-squared.clamp_min(0) / (2 * sigma**2))


def _poly(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """torchmetrics' KID kernel (``poly_kernel`` defaults): ``(a·b/d + 1)³``."""
    return (a @ b.T / a.shape[1] + 1.0) ** 3


def _kernel_mean(kernel: Any, a: torch.Tensor, b: torch.Tensor, ids: Any = None) -> float:
    """The mean of ``kernel(a, b)`` over its entries, in row blocks (never the whole matrix).
    ``ids`` (``b is a`` only): each row's original sample, and pairs of rows with the same id
    are left out, the U-statistic's diagonal, which also drops the pairs of copies a
    bootstrap resample draws.  Without ``ids`` only the diagonal is left out."""
    import torch

    within = ids is not None
    if within:
        ids = torch.as_tensor(np.asarray(ids), device=a.device)
    rows = max(1, KERNEL_BLOCK // max(1, len(b)))
    total, count = torch.zeros((), dtype=torch.float64, device=a.device), 0
    for start in range(0, len(a), rows):
        block = kernel(a[start:start + rows], b)
        if within:
            keep = ids[start:start + rows, None] != ids[None, :]
            total += block[keep].sum()
            count += int(keep.sum())
        else:
            total += block.sum()
            count += block.numel()
    return float(total / count) if count else float("nan")


def _features_pair(name: str, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1]:
        raise MetricInputError(f"pytest-diffeval: {name} needs two (N, D) feature matrices of one D, got shapes "
                               f"{tuple(x.shape)} and {tuple(y.shape)}")
    if len(x) < 2 or len(y) < 2:
        raise MetricInputError(f"pytest-diffeval: {name} needs at least 2 images on each side (its unbiased estimate "
                               f"averages over pairs of distinct images), got {len(x)} and {len(y)}; fix: generate "
                               "more prompts or seeds (or use a per-sample metric)")
    return x.double(), y.double().to(x.device)


def _mmd2(kernel: Any, x: torch.Tensor, y: torch.Tensor, unbiased: bool, x_ids: Any, y_ids: Any) -> float:
    if not unbiased:  # V-statistic: every entry, diagonal included
        return _kernel_mean(kernel, x, x) + _kernel_mean(kernel, y, y) - 2 * _kernel_mean(kernel, x, y)
    x_ids = np.arange(len(x)) if x_ids is None else x_ids
    y_ids = np.arange(len(y)) if y_ids is None else y_ids
    return (_kernel_mean(kernel, x, x, x_ids) + _kernel_mean(kernel, y, y, y_ids)
            - 2 * _kernel_mean(kernel, x, y))


def kid_mmd2(x: torch.Tensor, y: torch.Tensor, *, x_ids: Any = None, y_ids: Any = None) -> float:
    """KID on the full sets: the unbiased MMD² (U-statistic) of feature rows ``x`` and ``y``
    with torchmetrics' polynomial kernel ``(x·y/d + 1)³`` (degree 3, gamma 1/d, coef 1), in
    float64.  For equal-sized sets it is torchmetrics' ``poly_mmd``; torchmetrics' KID is the
    mean of this over random subsets, so both estimate the same number, this one without
    the subsets' noise.  It is ≈ 0 (either sign) for two samples of one distribution.
    ``x_ids``/``y_ids``: each row's original sample when rows repeat (a bootstrap resample):
    pairs of copies are left out like the diagonal."""
    x, y = _features_pair("KID", x, y)
    return _mmd2(_poly, x, y, True, x_ids, y_ids)


def cmmd_mmd2(x: torch.Tensor, y: torch.Tensor, unbiased: bool = True, *, x_ids: Any = None,
              y_ids: Any = None) -> float:
    """CMMD's value: MMD² between embedding rows ``x`` and ``y`` with a Gaussian RBF kernel
    (σ=10), ×1000, in float64.  ``unbiased=True``: the U-statistic (within-set means without
    the diagonal; ``x_ids``/``y_ids`` as in :func:`kid_mmd2`), ≈ 0 for two samples of one
    distribution.  ``unbiased=False``: the V-statistic of the reference implementation
    (google-research/cmmd ``distance.py``, means of the full kernel matrices), > 0 even
    then by its finite-sample bias, about ``1000·(1 - mean k)·(1/m + 1/n)``."""
    x, y = _features_pair("CMMD", x, y)
    return CMMD_SCALE * _mmd2(_cmmd_kernel, x, y, unbiased, x_ids, y_ids)


def _cmmd_kernel(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return _rbf(a, b, CMMD_SIGMA)


def seed_spread(kernel: Any, x: torch.Tensor, y: torch.Tensor, keys: Sequence[str], *, unbiased: bool,
                splits: int = SPLITS) -> float | None:
    """How much the MMD² (``kernel``, unscaled; the reference ``y`` fixed) of the generated rows
    ``x`` moves when the seeds are re-drawn: each prompt's seeds are split in two halves
    (:func:`~pytest_diffeval.resampling.split_halves` on the sample ``keys``, seeded), and the
    spread is ``rms(m(half a) - m(half b)) / 2``, the std of the full set's value if its
    variance falls as 1/N (conservative by up to √2 near 0, where it falls as 1/N²).

    Not a bootstrap: a resample with replacement repeats prompts and images, which for these
    U-statistics measured 20-40x the seed noise on the release suite (CMMD 0.21 against a
    seed-redraw change of 0.005).  A prompt with one seed lands wholly in one half, so a set of
    single-seed prompts gives a spread over prompts.  None above ``RESAMPLE_MAX`` generated
    images or when a half would hold fewer than 2."""
    import torch

    if len(x) > RESAMPLE_MAX or splits < 1:
        return None
    x, y = x.double(), y.double().to(x.device)
    k_xx = kernel(x, x)
    rows = max(1, KERNEL_BLOCK // max(1, len(x)))
    k_xy_rows = torch.cat([kernel(y[i:i + rows], x).sum(0) for i in range(0, len(y), rows)]) / len(y)

    def within_x(index: np.ndarray) -> float:
        block = k_xx[torch.as_tensor(index, device=x.device)][:, torch.as_tensor(index, device=x.device)]
        if not unbiased:
            return float(block.mean())
        return float((block.sum() - block.diagonal().sum()) / (len(index) * (len(index) - 1)))

    generator = np.random.default_rng(SEED)
    differences = []
    for _ in range(splits):
        a, b = split_halves(keys, generator)
        if min(len(a), len(b)) < 2:
            return None
        # the reference's within-set mean is common to both halves and cancels
        differences.append(within_x(a) - within_x(b) - 2 * float(k_xy_rows[a].mean() - k_xy_rows[b].mean()))
    return float(np.sqrt(np.mean(np.square(differences))) / 2)


class CMMD(Metric):
    """CMMD (Jayasumana et al. 2024): RBF-kernel MMD² (σ=10, ×1000) between L2-normalised
    CLIP image embeddings of the generated and reference sets (:func:`cmmd_mmd2`).

    ``estimator="unbiased"`` (default): the U-statistic, ≈ 0 for indistinguishable sets.
    ``estimator="biased"``: the reference implementation's V-statistic (google-research/cmmd),
    whose value at small N is mostly its own finite-sample bias (release suite, 128 vs 128
    images: 0.177, of which the unbiased estimate is 0.0225).  The two are different numbers:
    the estimator is in ``details`` and in a baseline's signature, so they never compare.
    ``details["spread"]``: how much the value moves when the seeds are re-drawn (:func:`seed_spread`)."""

    name = "cmmd"
    higher_is_better = False
    per_sample = False
    reads_blocks = True
    relative_tolerance = 0.05
    absolute_tolerance = 1e-4
    cacheable = True

    def compute(self, images: Any, *, reference: Any, clip_model: str | None = None, device: str | None = None,
                estimator: str = "unbiased", batch_size: int = 64) -> MetricResult:
        import torch

        from .backbones import clip_features_module, load_clip

        if estimator not in CMMD_ESTIMATORS:
            raise MetricInputError(f"pytest-diffeval: CMMD estimator={estimator!r} is not one of "
                                   f"{', '.join(map(repr, CMMD_ESTIMATORS))}; fix: pass estimator='unbiased' (default) "
                                   "or 'biased' (the reference implementation's number)")
        backbone = load_clip(clip_model or settings.current().clip_model, device or settings.resolved_device())
        real = np.stack(list(_reference_arrays(reference)))
        n, n_real = len(images), len(real)
        if n < 2 or n_real < 2:
            raise MetricInputError(f"pytest-diffeval: CMMD needs at least 2 images on each side, got N={n} generated "
                                   f"and {n_real} reference images; fix: generate more prompts or seeds")
        for side, count in (("generated", n), ("reference", n_real)):
            if count < CMMD_MIN_N:
                warnings.warn(f"pytest-diffeval: CMMD on {count} {side} images is noisy ({n} generated, {n_real} "
                              f"reference); prefer >= {CMMD_MIN_N} on each side", UserWarning, stacklevel=3)
        embed = clip_features_module(backbone)
        if hasattr(images, "gather_rows"):  # under torchrun: each rank embeds its block, the rows gathered
            raw = block_features(embed, images, backbone.device, max(1, len(images)), "gather the CMMD embeddings")
        else:
            raw = embed(images.as_tensor(backbone.device))
        x = torch.nn.functional.normalize(raw.to(backbone.device), dim=-1).double()
        y = torch.nn.functional.normalize(embed(torch.from_numpy(real).permute(0, 3, 1, 2).to(backbone.device)),
                                          dim=-1).double()
        unbiased = estimator == "unbiased"
        details: dict[str, Any] = {"estimator": estimator, "n": n, "n_reference": n_real, "sigma": CMMD_SIGMA,
                                   "scale": CMMD_SCALE}
        spread = seed_spread(_cmmd_kernel, x, y, images.sample_keys, unbiased=unbiased)
        if spread is not None:
            details["spread"] = CMMD_SCALE * spread
        state = features_state(x.cpu(), images.sample_keys, backbone.id, {"features": y.cpu()})  # paired verdicts
        return MetricResult(self.name, cmmd_mmd2(x, y, unbiased), backbone.id, False, details=details, state=state)
