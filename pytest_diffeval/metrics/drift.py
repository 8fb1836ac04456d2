"""Drift: the Fréchet distance between this run's images and the baseline's own images.

FID needs reference data; drift needs none.  When a baseline is recorded, the feature
statistics of the generated set (torchmetrics' FID state: feature sum, covariance sum,
count) are stored in a safetensors file beside the baseline JSON.  A later run is
compared with them by torchmetrics' Fréchet distance, so the model is compared with its
past self: same prompts, same seeds, same features.  The file has the format of FID's
reference statistics (the same keys, dtypes and ``feature_id``; ``written_by`` tells it
apart) and is read and written by ``statistics_files``.

What counts as drift.  With the same seeds a benign re-run gives a distance of ~0.  The
default tolerance is the distance that re-drawing the seeds alone would cause
(``seed_noise``): half the 95th percentile of the distance between two halves of the
recorded set that split each prompt's seeds (:func:`~pytest_diffeval.resampling.split_halves`:
the same prompts, other seeds; a split of i.i.d. images would also mix prompts, several times
the seed noise) over ``SPLITS`` seeded splits.  The halving is because the expected Fréchet
distance between two independent sets of one distribution falls as 1/n (mean and
covariance estimation error), so two halves (n/2 each) sit about twice as far apart as
two full sets of n.  A model whose images moved less than new seeds would move them has
not drifted.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .. import distributed, settings
from .._hashing import digest_file
from ..resampling import split_halves
from . import Metric, MetricResult
from .fid import _feature_extractor, one_process_sums, set_feature_precision, update_capturing_features
from .statistics_files import DRIFT_WRITER, STAT_KEYS, features_state, read_statistics, write_statistics

if TYPE_CHECKING:  # imported where used: a cached result needs no torch
    import torch


def _compute_fid(mu1: torch.Tensor, sigma1: torch.Tensor, mu2: torch.Tensor, sigma2: torch.Tensor) -> torch.Tensor:
    from torchmetrics.image.fid import _compute_fid as compute  # torchmetrics' own Fréchet distance

    return compute(mu1, sigma1, mu2, sigma2)

SPLITS = 20


def _features(images: Any, features: Any, device: str, batch_size: int) -> tuple[Any, str, str, torch.Tensor]:
    """``(fid metric with these images as its real state, feature id, preprocessing, per-image features)``."""
    metric, feature_id, preprocessing = _feature_extractor(features, device)
    metric, preprocessing = set_feature_precision(metric.to(device), device, preprocessing)
    return metric, feature_id, preprocessing, update_capturing_features(metric, images, True, device, batch_size)


def _frechet(a: torch.Tensor, b: torch.Tensor) -> float:
    import torch

    return float(_compute_fid(a.mean(0), torch.cov(a.T), b.mean(0), torch.cov(b.T)))


def seed_noise(features: torch.Tensor, keys: list[str], splits: int = SPLITS, seed: int = 0) -> float:
    """The Fréchet distance that other seeds alone would cause at this set size: each split
    divides every prompt's seeds in two (``keys``: the sample keys of ``features``' rows; see
    the module doc)."""
    import torch

    if len(features) < 4:
        return 0.0
    generator = np.random.default_rng(seed)
    values = []
    for _ in range(splits):
        a, b = (torch.as_tensor(half) for half in split_halves(keys, generator))
        if min(len(a), len(b)) < 2:
            return 0.0
        values.append(_frechet(features[a], features[b]))
    return float(np.percentile(values, 95)) / 2.0


def file_sha256(path: Path) -> str:
    """A statistics file's content id as baselines record it (16 hex digits of its sha256)."""
    return digest_file(path, 16)


class Drift(Metric):
    """Fréchet distance of this run's features to stored feature statistics (lower is
    better; 0 for the same images).  ``diffeval_baseline`` keeps the statistics beside the
    baseline file and passes them as ``baseline_stats``; without them the set is measured
    against itself (0), which is what recording a baseline does.  The result's ``state``
    holds this run's statistics, to be stored when the baseline is (re)written."""

    name = "drift"
    higher_is_better = False
    per_sample = False
    reads_blocks = True
    state_on_root = True
    keeps_state = True
    cacheable = True

    def compute(self, images: Any, *, baseline_stats: str | os.PathLike[str] | None = None, features: Any = None,
                device: str | None = None, batch_size: int = 64) -> MetricResult:
        import torch

        device = device or settings.resolved_device()
        metric, feature_id, preprocessing, own = _features(images, features or settings.current().fid_features,
                                                           device, batch_size)
        sharded = hasattr(images, "gather_rows")  # torchrun: sums all-reduced, the features on rank 0 only
        dims = int(metric.real_features_sum.shape[0])
        details: dict[str, Any] = {"n": len(images), "num_features": dims, "preprocessing": preprocessing}
        if own is not None:
            details["seed_noise"] = seed_noise(own, images.sample_keys)
        value = 0.0
        if baseline_stats is not None:
            mean, cov = load_statistics(Path(baseline_stats), feature_id, dims)
            if sharded:  # the mean and covariance of the all-reduced sums
                own_mean, own_cov = (torch.from_numpy(m) for m in distributed.moments({
                    "sum": metric.real_features_sum.double().cpu().numpy(),
                    "outer": metric.real_features_cov_sum.double().cpu().numpy(),
                    "n": np.array([float(metric.real_features_num_samples)])}))
            else:
                own_mean, own_cov = own.mean(0), torch.cov(own.T)
            value = float(_compute_fid(mean, cov, own_mean, own_cov))
            if -1e-3 < value < 0:  # float error on (near-)identical sets
                value = 0.0
            details["statistics_sha256"] = file_sha256(Path(baseline_stats))
        state = None
        if own is not None:  # the statistics file: summed as one process sums (the same bytes under torchrun)
            tensors = (one_process_sums(own, batch_size, metric.real_features_num_samples.dtype) if sharded
                       else {k: getattr(metric, k).detach().cpu() for k in STAT_KEYS})
            state = features_state(own, images.sample_keys, feature_id, tensors=tensors,
                                   metadata={"preprocessing": preprocessing}, writer=DRIFT_WRITER)
        if sharded:  # rank 0's value and details on every rank, to the last bit
            value, details = images.group.broadcast_json([value, details], "broadcast rank 0's drift")
        return MetricResult(self.name, value, feature_id, False, details=details, state=state)


def load_statistics(path: Path, feature_id: str, dims: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and covariance (float64) from a statistics file written by :func:`save_statistics`
    (computed with ``feature_id``, of ``dims`` features); else a :class:`ReferenceSetError`."""
    import torch

    stored = read_statistics(path, feature_id, dims, what="drift statistics",
                             fix="restore the file from version control, or re-record the baseline with "
                                 "pytest --snapshot-update",
                             fix_foreign=lambda _: "re-record the baseline with pytest --snapshot-update")
    n = stored["real_features_num_samples"].double()
    mean = stored["real_features_sum"].double() / n
    cov = (stored["real_features_cov_sum"].double() - n * torch.outer(mean, mean)) / (n - 1)
    return mean, cov


def save_statistics(state: dict[str, Any], path: Path) -> str:
    """Write a :class:`Drift` result's ``state`` (or another set-level result's: its metadata
    names its writer) atomically; return the file's sha256 (16 hex).
    Its tensors may be torch tensors (computed) or numpy arrays (a result from the result
    cache): both are written with ``safetensors.numpy``, so no torch is needed."""
    write_statistics(state["tensors"], path, {"written_by": DRIFT_WRITER, **state["metadata"]})
    return file_sha256(path)
