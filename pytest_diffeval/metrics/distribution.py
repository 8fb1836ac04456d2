"""Sample-efficient distribution distances: KID (torchmetrics) and CMMD (ours: not in
torchmetrics).  Both compare generated images with a reference set (an ImageSet or a
folder of images)."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import numpy as np

from .. import settings
from . import Metric, MetricInputError, MetricResult
from .fid import _feature_extractor, _load_folder, _update_from_arrays

if TYPE_CHECKING:  # imported where used: a cached result needs neither torch nor torchmetrics
    import torch

SEED = 0  # KID's random subsets are drawn from this seed: same images, same number
# KID warns below this subset size (fewer than 100 images on the smaller side).  At the
# release suite's 64-image subsets one subset's estimate already varies ~20x the value.
KID_MIN_SUBSET = 50


def _reference_arrays(reference: Any) -> Iterator[np.ndarray]:
    if hasattr(reference, "images") and hasattr(reference, "sample_keys"):
        return iter(reference.images)

    folder = Path(reference)
    if not folder.is_dir():
        raise MetricInputError(f"pytest-diffeval: reference {folder} is not a folder of images (KID and CMMD need images, "
                         "not cached FID statistics)")
    return _load_folder(folder)


class KID(Metric):
    """Kernel Inception Distance (unbiased polynomial-kernel MMD, torchmetrics), with the
    subset size adapted to the sample (min(1000, N/2)) and seeded subsets.  Reported ×1000
    would be conventional in papers; the value here is torchmetrics' raw mean."""

    name = "kid"
    higher_is_better = False
    per_sample = False
    relative_tolerance = 0.05
    absolute_tolerance = 1e-4
    cacheable = True

    def compute(self, images: Any, *, reference: Any, features: Any = None, device: str | None = None,
                subsets: int = 100, batch_size: int = 64) -> MetricResult:
        import torch
        from torchmetrics.image.kid import KernelInceptionDistance

        device = device or settings.resolved_device()
        fid, feature_id, preprocessing = _feature_extractor(features or settings.current().fid_features, device)
        real = list(_reference_arrays(reference))
        # Half the smaller set (at most torchmetrics' 1000): subsets then differ, so their
        # spread (``std``) says how much the number would move with other images.
        subset_size = min(1000, min(len(images), len(real)) // 2)
        if subset_size < 2:  # an unbiased MMD needs 2 images per subset: 4 per side
            raise MetricInputError(
                f"pytest-diffeval: KID needs at least {2 * 2} images on each side (its subsets hold half the smaller "
                f"side, and an unbiased MMD needs 2 per subset), got N={len(images)} generated and {len(real)} "
                "reference images; fix: generate more prompts or seeds (or use CMMD or a per-sample metric)")
        if subset_size < KID_MIN_SUBSET:
            warnings.warn(f"pytest-diffeval: KID on {len(images)} generated and {len(real)} reference images draws "
                          f"subsets of only {subset_size} images (half the smaller side), so its value is mostly "
                          f"noise; use at least {2 * KID_MIN_SUBSET} images on each side", UserWarning, stacklevel=3)
        metric = KernelInceptionDistance(feature=fid.inception, subsets=subsets, subset_size=subset_size,
                                         reset_real_features=False, normalize=False).to(device)
        _update_from_arrays(metric, iter(real), True, device, batch_size)
        _update_from_arrays(metric, iter(images.images), False, device, batch_size)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(SEED)
            mean, std = metric.compute()
        return MetricResult(self.name, float(mean), feature_id, False,
                            details={"std": float(std), "spread": float(std), "subset_size": subset_size, "subsets": subsets,
                                     "n": len(images), "n_reference": len(real), "preprocessing": preprocessing})


def mmd_rbf(x: torch.Tensor, y: torch.Tensor, sigma: float = 10.0, scale: float = 1000.0) -> float:
    """MMD² with a Gaussian RBF kernel, as in the CMMD reference implementation
    (google-research/cmmd ``distance.py``: means of the full kernel matrices, σ=10, ×1000)."""
    import torch

    x, y = x.double(), y.double()
    gamma = 1.0 / (2 * sigma**2)
    xx, yy, xy = x @ x.T, y @ y.T, x @ y.T
    x_sq, y_sq = xx.diagonal(), yy.diagonal()
    k_xx = torch.exp(-gamma * (-2 * xx + x_sq[:, None] + x_sq[None, :])).mean()
    k_yy = torch.exp(-gamma * (-2 * yy + y_sq[:, None] + y_sq[None, :])).mean()
    k_xy = torch.exp(-gamma * (-2 * xy + x_sq[:, None] + y_sq[None, :])).mean()
    return float(scale * (k_xx + k_yy - 2 * k_xy))


class CMMD(Metric):
    """CMMD (Jayasumana et al. 2024): RBF-kernel MMD between L2-normalised CLIP image
    embeddings of the generated and reference sets, ×1000.  Works at small N."""

    name = "cmmd"
    higher_is_better = False
    per_sample = False
    relative_tolerance = 0.05
    absolute_tolerance = 1e-4
    cacheable = True

    def compute(self, images: Any, *, reference: Any, clip_model: str | None = None, device: str | None = None,
                batch_size: int = 64) -> MetricResult:
        import torch

        from .backbones import clip_features_module, load_clip

        backbone = load_clip(clip_model or settings.current().clip_model, device or settings.resolved_device())
        real = np.stack(list(_reference_arrays(reference)))
        if len(images) < 2 or len(real) < 2:
            raise MetricInputError("pytest-diffeval: CMMD needs at least 2 images on each side")
        embed = clip_features_module(backbone)
        x = torch.nn.functional.normalize(embed(images.as_tensor(backbone.device)), dim=-1)
        y = torch.nn.functional.normalize(embed(torch.from_numpy(real).permute(0, 3, 1, 2).to(backbone.device)), dim=-1)
        if len(images) < 30:
            warnings.warn(f"pytest-diffeval: CMMD on {len(images)} images is noisy; prefer >= 30", UserWarning, stacklevel=3)
        generator = torch.Generator().manual_seed(SEED)
        resampled = [mmd_rbf(x[torch.randint(len(x), (len(x),), generator=generator).to(x.device)], y) for _ in range(50)]
        return MetricResult(self.name, mmd_rbf(x, y), backbone.id, False,
                            details={"n": len(images), "n_reference": len(real), "sigma": 10.0, "scale": 1000.0,
                                     "spread": float(np.std(resampled, ddof=1))})
