"""Reference statistics files for FID: the real side's feature sums written once (from an
ImageSet or a folder of images) and passed to ``assert_fid_below`` or ``compute_metric("fid",
reference="stats.safetensors")`` in place of the images.  The file format (shared with FID's
cache entries and drift's statistics) and its reader live in ``statistics_files``; the file
records the feature id it was computed with, and FID refuses it under other features.

Also re-exports the reader and writer of FID's own reference-statistics cache entries
(``cache_dir/reference-stats``): each carries its full key (features, feature size,
preprocessing, torchmetrics version, the reference's content) in its metadata and is read
back only under that key and with the shapes FID needs; anything else (a swapped, stale,
truncated or misshapen file) is a miss, recomputed and rewritten.  A forged entry written
under its right key with plausible tensors cannot be told apart: share the cache only among
trusted runs."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .. import settings
from ..exceptions import ReferenceSetError
from .fid import _feature_extractor, reference_statistics, set_feature_precision
from .statistics_files import (  # noqa: F401 - the cache entries' reader and writer are re-exported
    REFERENCE_FORMAT,
    STAT_KEYS,
    read_cached_statistics,
    read_reference_statistics,
    write_cached_statistics,
    write_statistics,
)

FORMAT = REFERENCE_FORMAT


def save_reference_statistics(reference: Any, path: str | os.PathLike[str], *, features: Any = None,
                              device: str | None = None, batch_size: int = 64) -> Path:
    """Compute FID's reference statistics of ``reference`` (an ImageSet or a folder of images)
    with ``features`` (default: the session's FID features, ``--diffeval-fid-features``) and
    write them atomically to ``path`` (``.safetensors``), recording the feature id.  Returns
    the path.  FID against the file equals FID against ``reference`` with the same features."""
    import torchmetrics

    path = Path(path)
    if path.suffix != ".safetensors":
        raise ReferenceSetError(f"pytest-diffeval: reference statistics go to a .safetensors file, not {path}; "
                                f"fix: save_reference_statistics(reference, {str(path.with_suffix('.safetensors'))!r})")
    device = device or settings.resolved_device()
    metric, feature_id, preprocessing = _feature_extractor(features or settings.current().fid_features, device)
    metric, preprocessing = set_feature_precision(metric.to(device), device, preprocessing)  # as FID computes
    source = reference_statistics(metric, feature_id, preprocessing, reference, device, batch_size)
    tensors = {name: getattr(metric, name).detach().cpu() for name in STAT_KEYS}
    write_statistics(tensors, path, {"format": FORMAT, "feature_id": feature_id, "preprocessing": preprocessing,
                                     "torchmetrics": torchmetrics.__version__, "n": str(source["n"]),
                                     "source": str(source.get("path", source["kind"]))})
    return path


__all__ = ["read_cached_statistics", "read_reference_statistics", "save_reference_statistics",
           "write_cached_statistics"]
