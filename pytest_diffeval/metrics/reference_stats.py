"""Reference statistics files for FID: the real side's feature sums written once (from an
ImageSet or a folder of images) and passed to ``assert_fid_below`` or ``compute_metric("fid",
reference="stats.safetensors")`` in place of the images.  safetensors only (no pickle); the
file records the feature id it was computed with, and FID refuses it under other features."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .. import settings
from .fid import STAT_KEYS, ReferenceSetError, _atomic_save, _feature_extractor, reference_statistics

FORMAT = "pytest-diffeval reference statistics 1"


def save_reference_statistics(reference: Any, path: str | os.PathLike[str], *, features: Any = None,
                              device: str | None = None, batch_size: int = 64) -> Path:
    """Compute FID's reference statistics of ``reference`` (an ImageSet or a folder of images)
    with ``features`` (default: the session's FID features, ``--diffeval-fid-features``) and
    write them atomically to ``path`` (``.safetensors``), recording the feature id.  Returns
    the path.  FID against the file equals FID against ``reference`` with the same features."""
    import torch
    import torchmetrics

    path = Path(path)
    if path.suffix != ".safetensors":
        raise ReferenceSetError(f"pytest-diffeval: reference statistics go to a .safetensors file, not {path}; "
                                f"fix: save_reference_statistics(reference, {str(path.with_suffix('.safetensors'))!r})")
    device = device or settings.resolved_device()
    metric, feature_id, preprocessing = _feature_extractor(features or settings.current().fid_features, device)
    metric = metric.to(device).set_dtype(torch.float64)  # as FID computes: float64 sums
    source = reference_statistics(metric, feature_id, preprocessing, reference, device, batch_size)
    tensors = {name: getattr(metric, name).detach().cpu() for name in STAT_KEYS}
    _atomic_save(tensors, path, {"format": FORMAT, "feature_id": feature_id, "preprocessing": preprocessing,
                                 "torchmetrics": torchmetrics.__version__, "n": str(source["n"]),
                                 "source": str(source.get("path", source["kind"]))})
    return path


def read_reference_statistics(path: Path, feature_id: str) -> dict[str, Any]:
    """The tensors of a statistics file, if it was computed with ``feature_id``; a missing,
    unreadable or foreign file is a :class:`ReferenceSetError` that says how to make it."""
    from safetensors import safe_open

    remake = (f"pytest_diffeval.save_reference_statistics(<reference images>, {str(path)!r}, "
              f"features={_features_hint(feature_id)!r})")
    if not path.is_file():
        raise ReferenceSetError(f"pytest-diffeval: reference statistics file {path} does not exist; fix: write it "
                                f"with {remake}")
    try:
        with safe_open(str(path), "pt") as handle:
            stored = (handle.metadata() or {}).get("feature_id")
            tensors = {name: handle.get_tensor(name) for name in STAT_KEYS if name in handle.keys()}
    except Exception as exc:  # noqa: BLE001 - truncated or not safetensors at all
        raise ReferenceSetError(f"pytest-diffeval: cannot read reference statistics {path} ({type(exc).__name__}: "
                                f"{exc}); fix: write it again with {remake}") from exc
    if stored != feature_id:
        raise ReferenceSetError(
            f"pytest-diffeval: reference statistics {path} were computed with features {stored!r}, this check uses "
            f"{feature_id!r}: FIDs from other features are not comparable; fix: pass "
            f"features={_features_hint(stored)!r} if the file is right, or write it again with {remake}"
        )
    missing = [name for name in STAT_KEYS if name not in tensors]
    if missing:
        raise ReferenceSetError(f"pytest-diffeval: reference statistics {path} lack {missing}; fix: write it again "
                                f"with {remake}")
    return tensors


def _features_hint(feature_id: str | None) -> str | None:
    """The ``features=`` value that gives ``feature_id``: its name without the ``@<hash>``
    (a local CLIP folder: its folder name, to be given as the path)."""
    return feature_id.split("@", 1)[0] if feature_id else feature_id


__all__ = ["read_reference_statistics", "save_reference_statistics"]
