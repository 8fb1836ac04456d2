"""Feature-statistics files (Σf, Σfᵀf and n of torchmetrics' FID state, as safetensors):
reading, validating, writing and the reference-statistics cache.

One format, three kinds of file, told apart by their metadata only:

* reference statistics (``save_reference_statistics``; ``format`` = :data:`REFERENCE_FORMAT`):
  the real side of FID, passed in place of the reference images;
* FID's reference-statistics cache entries (``cache_dir()``; ``format`` = :data:`CACHE_FORMAT`,
  ``key`` = the entry's full key): read back only under that key, anything else is a miss;
* drift statistics beside a baseline JSON (``written_by`` = :data:`DRIFT_WRITER`): the
  recorded images' own state, read by ``metrics.drift``.

A set-level baseline's file beside its JSON (drift's, and FID's, KID's and CMMD's with
``written_by`` = :data:`FEATURES_WRITER`) also holds the recorded images' per-image
``features`` (their sample keys in the ``sample_keys`` metadata) and the reference side
(``reference_*``), for the paired set-level verdict (``set_verdicts``):
:func:`features_state` builds it, :func:`read_features` reads it.

All hold exactly :data:`STAT_KEYS` as float64 tensors and record the ``feature_id`` they were
computed with; a reader refuses another feature id, missing keys and shapes FID cannot use.
Written atomically with ``safetensors.numpy`` (torch tensors and numpy arrays alike, so a
result from the result cache is written without torch), the metadata in sorted key order so
that the same content is always the same bytes (drift files are named by their sha256).
safetensors only: a user's file is never unpickled."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .. import settings
from .._io import atomic_write_bytes
from ..exceptions import ReferenceSetError

STAT_KEYS = ("real_features_sum", "real_features_cov_sum", "real_features_num_samples")
REFERENCE_FORMAT = "pytest-diffeval reference statistics 1"  # save_reference_statistics' files
CACHE_FORMAT = "pytest-diffeval reference statistics cache 1"  # of the reference statistics cache entries
DRIFT_WRITER = "pytest-diffeval drift"  # drift statistics beside a baseline ("written_by")
FEATURES_WRITER = "pytest-diffeval features"  # a set-level baseline's per-image features ("written_by")
FEATURES_KEY = "features"  # per-image features (N, D), rows in the order of the "sample_keys" metadata


def cache_dir() -> Path:
    """The folder of FID's reference-statistics cache entries."""
    configured = settings.current().cache_dir
    if configured is not None:
        return Path(configured) / "reference-stats"
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "pytest-diffeval" / "reference-stats"


def write_statistics(tensors: dict[str, Any], path: Path, metadata: dict[str, str]) -> None:
    """Write a statistics file atomically: ``tensors`` (torch tensors or numpy arrays) with
    ``metadata``, the same content always as the same bytes (see :func:`_canonical`)."""
    from safetensors.numpy import save

    arrays = {name: np.asarray(value.detach().cpu().numpy() if hasattr(value, "detach") else value, order="C")
              for name, value in tensors.items()}
    atomic_write_bytes(path, _canonical(save(arrays, metadata=metadata)))


def _canonical(data: bytes) -> bytes:
    """``data`` (a safetensors file) with its metadata in sorted key order.  safetensors keeps
    the metadata in a Rust HashMap, so it writes the keys in a random order (it differs from
    one write to the next even in one process); drift files are named by and recorded with
    their sha256, which must not change when the same images are recorded again."""
    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + size])
    if "__metadata__" in header:
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % 8)  # the tensor data stays 8-byte aligned, as safetensors pads it
    return len(text).to_bytes(8, "little") + text + data[8 + size :]


def read_statistics(path: Path, feature_id: str, dims: int | None = None, *, what: str, fix: str,
                    fix_missing: str | None = None,
                    fix_foreign: Callable[[str | None], str] | None = None) -> dict[str, Any]:
    """The :data:`STAT_KEYS` tensors of the statistics file ``path`` if it was computed with
    ``feature_id`` (and holds the state of ``dims`` features); a missing, unreadable, foreign or
    misshapen file is a :class:`ReferenceSetError` naming ``what`` it is and the ``fix``
    (``fix_missing`` for an absent file, ``fix_foreign(stored feature id)`` for other features,
    else ``fix``)."""
    from safetensors import safe_open

    if not path.is_file():
        raise ReferenceSetError(f"pytest-diffeval: {what} file {path} does not exist; fix: {fix_missing or fix}")
    try:
        with safe_open(str(path), "pt") as handle:
            stored = (handle.metadata() or {}).get("feature_id")
            tensors = {name: handle.get_tensor(name) for name in STAT_KEYS if name in handle.keys()}
    except Exception as exc:  # noqa: BLE001 - truncated or not safetensors at all
        raise ReferenceSetError(f"pytest-diffeval: cannot read {what} {path} ({type(exc).__name__}: {exc}); "
                                f"fix: {fix}") from exc
    if stored != feature_id:
        raise ReferenceSetError(
            f"pytest-diffeval: {what} {path} were computed with features {stored!r}, this check uses "
            f"{feature_id!r}: Fréchet distances from other features are not comparable; "
            f"fix: {fix_foreign(stored) if fix_foreign else fix}"
        )
    missing = [name for name in STAT_KEYS if name not in tensors]
    if missing:
        raise ReferenceSetError(f"pytest-diffeval: {what} {path} lack {missing}; fix: {fix}")
    problem = _shape_problem(tensors, dims)
    if problem:
        raise ReferenceSetError(f"pytest-diffeval: {what} {path} hold {problem}; fix: {fix}")
    return tensors


def read_reference_statistics(path: Path, feature_id: str, dims: int | None = None) -> dict[str, Any]:
    """The tensors of a reference statistics file, if it was computed with ``feature_id`` (and
    holds the state of ``dims`` features); a missing, unreadable, foreign or misshapen file is
    a :class:`ReferenceSetError` that says how to make it."""
    remake = (f"pytest_diffeval.save_reference_statistics(<reference images>, {str(path)!r}, "
              f"features={_features_hint(feature_id)!r})")
    return read_statistics(path, feature_id, dims, what="reference statistics", fix=f"write it again with {remake}",
                           fix_missing=f"write it with {remake}",
                           fix_foreign=lambda stored: (f"pass features={_features_hint(stored)!r} if the file is "
                                                       f"right, or write it again with {remake}"))


def _shape_problem(tensors: dict[str, Any], dims: int | None) -> str | None:
    """Why ``tensors`` cannot be FID's real-feature state of ``dims`` features (None: they can):
    float sums of shape ``(d,)`` and ``(d, d)`` and a sample count of at least 2."""
    total, cov, count = (tensors[name] for name in STAT_KEYS)
    d = total.shape[0] if dims is None and total.dim() == 1 else dims
    if tuple(total.shape) != (d,) or tuple(cov.shape) != (d, d) or count.numel() != 1:
        return (f"shapes {tuple(total.shape)}, {tuple(cov.shape)}, {tuple(count.shape)} where "
                f"({d},), ({d}, {d}) and () are needed")
    if not (total.is_floating_point() and cov.is_floating_point()):
        return f"dtypes {total.dtype}, {cov.dtype} where floating point is needed"
    if not float(count.reshape(())) >= 2:
        return f"a sample count of {float(count.reshape(()))} (at least 2 are needed)"
    return None


def read_cached_statistics(path: Path, key: str, dims: int) -> dict[str, Any] | None:
    """The reference-statistics cache entry at ``path`` if it was written under ``key`` and
    holds FID's state for ``dims`` features; else None (a miss, never a result)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as handle:
            meta = handle.metadata() or {}
            if (meta.get("format"), meta.get("key")) != (CACHE_FORMAT, key) or set(handle.keys()) != set(STAT_KEYS):
                return None
            tensors = {name: handle.get_tensor(name) for name in STAT_KEYS}
    except Exception:  # noqa: BLE001 - absent, truncated or not safetensors at all: recomputed
        return None
    return None if _shape_problem(tensors, dims) else tensors


def write_cached_statistics(path: Path, key: str, tensors: dict[str, Any], metadata: dict[str, str]) -> None:
    """Write a reference-statistics cache entry that carries its key (atomically); a read-only
    or full cache costs a recomputation next time (with a warning), never the check."""
    try:
        write_statistics(tensors, path, {**metadata, "format": CACHE_FORMAT, "key": key})
    except OSError as exc:
        warnings.warn(f"pytest-diffeval: cannot write the reference-statistics cache entry {path} ({exc}); the "
                      "statistics are used uncached and computed again next time. fix: make the cache folder "
                      "writable (--diffeval-cache-dir) or free space on its disk", UserWarning, stacklevel=2)


def _features_hint(feature_id: str | None) -> str | None:
    """The ``features=`` value that gives ``feature_id``: its name without the ``@<hash>``
    (a local CLIP folder: its folder name, to be given as the path)."""
    return feature_id.split("@", 1)[0] if feature_id else feature_id


def features_state(features: Any, keys: list[str], feature_id: str, reference: dict[str, Any] | None = None,
                   *, tensors: dict[str, Any] | None = None, metadata: dict[str, str] | None = None,
                   writer: str = FEATURES_WRITER) -> dict[str, Any]:
    """A set-level result's ``state``, what a baseline stores beside its JSON for paired
    set-level verdicts (``set_verdicts``): this run's per-image ``features`` (rows in the order
    of ``keys``, the sample keys ``"<seed>|<prompt>"``), the ``reference`` side's tensors
    (stored as ``reference_<name>``: FID's ``mean``/``cov``, KID's and CMMD's ``features``) and
    any other ``tensors`` (drift's statistics).  Arrays or torch tensors, stored as float64."""
    stored = dict(tensors or {})
    stored[FEATURES_KEY] = features
    for name, value in (reference or {}).items():
        stored[f"reference_{name}"] = value
    arrays = {name: np.asarray(value.detach().cpu().double().numpy() if hasattr(value, "detach") else value,
                               dtype=np.float64) if name != "real_features_num_samples" else value
              for name, value in stored.items()}
    return {"tensors": arrays, "metadata": {**(metadata or {}), "feature_id": feature_id,
                                            "sample_keys": json.dumps(list(keys)), "written_by": writer}}


def read_features(path: Path) -> tuple[np.ndarray, list[str], dict[str, np.ndarray], dict[str, str]]:
    """``(per-image features, their sample keys, reference tensors by name, metadata)`` of a
    file holding a :func:`features_state`; a :class:`ReferenceSetError` naming the file and the
    fix when it is missing, unreadable or holds no features with one key per row."""
    from safetensors import safe_open

    fix = "restore it from version control, or re-record the baseline with pytest --snapshot-update"
    if not path.is_file():
        raise ReferenceSetError(f"pytest-diffeval: per-image features file {path} does not exist; fix: {fix}")
    try:
        with safe_open(str(path), "np") as handle:
            metadata = dict(handle.metadata() or {})
            names = list(handle.keys())
            features = handle.get_tensor(FEATURES_KEY) if FEATURES_KEY in names else None
            reference = {name[len("reference_"):]: handle.get_tensor(name) for name in names
                         if name.startswith("reference_")}
        keys = json.loads(metadata.get("sample_keys", "null"))
    except Exception as exc:  # noqa: BLE001 - truncated, not safetensors, bad metadata
        raise ReferenceSetError(f"pytest-diffeval: cannot read per-image features {path} ({type(exc).__name__}: "
                                f"{exc}); fix: {fix}") from exc
    if features is None or features.ndim != 2 or not isinstance(keys, list) or len(keys) != len(features) \
            or not all(isinstance(k, str) for k in keys):
        raise ReferenceSetError(f"pytest-diffeval: {path} holds no per-image features with one sample key per row; "
                                f"fix: {fix}")
    return features.astype(np.float64), keys, {k: v.astype(np.float64) for k, v in reference.items()}, metadata
