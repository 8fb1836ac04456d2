"""Content ids and library versions: the one home of the hashes that caches, memos and
baselines key on (sha256, hex, truncated to a stated length), so two callers that mean the
same content always compute the same id."""

from __future__ import annotations

import functools
import hashlib
import json
import platform
from collections.abc import Iterable
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from ._version import __version__

# The libraries whose versions a cached result, a memo or a provenance record depends on.
LIBRARIES = ("torch", "diffusers", "transformers", "torchmetrics", "torch-fidelity", "numpy", "safetensors",
             "pillow")

_CHUNK = 1 << 20


def digest_bytes(data: bytes, length: int = 64) -> str:
    """sha256 of ``data``, hex, first ``length`` characters."""
    return hashlib.sha256(data).hexdigest()[:length]


def digest_text(text: str, length: int = 64) -> str:
    """sha256 of ``text`` encoded as UTF-8."""
    return digest_bytes(text.encode(), length)


def digest_json(material: Any, length: int = 32, *, default: Any = repr) -> str:
    """sha256 of ``material`` as canonical JSON (sorted keys); values JSON cannot encode go
    through ``default`` (``repr`` unless told otherwise)."""
    return digest_text(json.dumps(material, sort_keys=True, default=default), length)


def digest_file(path: Path, length: int = 64) -> str:
    """sha256 of a file's bytes, read in chunks (model weights are gigabytes)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()[:length]


def digest_files(paths: Iterable[Path], length: int = 16) -> str:
    """One id for several files, each by name and content (a missing file counts as ``-``):
    used for code digests, where editing any of the files must change the id."""
    digest = hashlib.sha256()
    for path in paths:
        path = Path(path)
        digest.update(path.name.encode())
        digest.update(path.read_bytes() if path.is_file() else b"-")
    return digest.hexdigest()[:length]


def digest_stream(parts: Iterable[Any], length: int = 64) -> str:
    """sha256 of the concatenation of ``parts`` (bytes-like: bytes, memoryview, contiguous
    numpy arrays), hashed as they come: for content too large to hold twice (model weights,
    a folder of files), the same id as :func:`digest_bytes` of the joined bytes."""
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part)
    return digest.hexdigest()[:length]


def _array_parts(array: Any) -> Iterable[Any]:
    """A numpy array's C-order bytes without copying a contiguous one; a first axis that
    repeats one entry (stride 0, a broadcast input image) yields that entry's bytes per row,
    so it hashes like the materialised array without being materialised."""
    if array.ndim and array.shape[0] > 1 and array.strides[0] == 0:
        row = np.ascontiguousarray(array[0]).reshape(-1).view(np.uint8)
        for _ in range(array.shape[0]):
            yield row.data
        return
    yield np.ascontiguousarray(array).reshape(-1).view(np.uint8).data


def digest_array(array: Any, length: int = 16) -> str:
    """A numpy array (or anything with ``dtype``, ``shape`` and ``tobytes``) by dtype, shape
    and bytes: the same pixels in another shape or dtype are another id.  A numpy array is
    hashed in place (see :func:`_array_parts`); the id equals that of ``array.tobytes()``."""
    described = f"array:{array.dtype}:{tuple(array.shape)}"
    if type(array).__module__ == "numpy" and hasattr(array, "strides"):
        return f"{described}:{digest_stream(_array_parts(array), length)}"
    return f"{described}:{digest_bytes(array.tobytes(), length)}"


@functools.cache
def library_versions() -> dict[str, str]:
    """pytest-diffeval's, Python's and :data:`LIBRARIES`' versions from package metadata
    (imports none of them; ``-`` for one not installed). One process sees one set, so the
    answer is computed once."""
    return {"pytest_diffeval": __version__, "python": platform.python_version(), **package_versions(*LIBRARIES)}


def package_versions(*names: str) -> dict[str, str]:
    """Installed versions of ``names`` from package metadata (``-`` when absent), for cache
    keys; imports none of them."""
    found = {}
    for name in names:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "-"
    return found
