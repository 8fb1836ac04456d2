"""Content hashes of model folders, weight files and arrays, and where a backbone name
points, without importing torch: the caches key by them on every run, also on a warm
rerun that must not pay for importing torch, transformers or diffusers.

A file's hash is memoised per process under its ``(path, size, mtime)``, a folder's under
the listing of its files' names, sizes and mtimes (like git's index): changing a file
changes the hash, and an unchanged folder is read once per process.  As in git, a file
modified in the last seconds is hashed again each time: within one clock tick a rewrite
may keep both its size and its mtime.
"""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path
from typing import Any

_FILES: dict[tuple[str, int, int], str] = {}
_FOLDERS: dict[tuple[str, tuple[tuple[str, int, int], ...]], str] = {}


def _listing(path: Path) -> list[tuple[Path, str]]:
    """The files of a folder that count (hidden ones do not), sorted, with their relative names."""
    out = []
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        rel = file.relative_to(path).as_posix()
        if not (rel.startswith(".") or "/." in rel):
            out.append((file, rel))
    return out


def _blob_name(file: Path) -> str | None:
    """The blob a Hugging Face cache symlink points to (its name is already a content hash)."""
    if file.is_symlink() and "blobs" in Path(os.readlink(file)).parts:
        return Path(os.readlink(file)).name
    return None


RACY_NS = 2_000_000_000  # a file modified this recently is not memoised


def _stat_key(file: Path) -> tuple[int, int]:
    stat = file.stat()
    return stat.st_size, stat.st_mtime_ns


def _settled(*mtimes_ns: int) -> bool:
    return time.time_ns() - max(mtimes_ns, default=0) > RACY_NS


def model_fingerprint(path: Path) -> str:
    """A content hash of a model directory (file names and bytes), so a changed weight
    file changes the identity even when the name does not.  Files that are symlinks into
    the Hugging Face cache are identified by their blob name, which is already a hash."""
    path = Path(path)
    files = _listing(path)
    memo = (str(path.resolve()), tuple((rel, *_stat_key(file)) for file, rel in files))
    if memo not in _FOLDERS or not _settled(*(entry[2] for entry in memo[1])):
        digest = hashlib.sha256()
        for file, rel in files:
            digest.update(rel.encode())
            blob = _blob_name(file)
            if blob is not None:
                digest.update(blob.encode())
                continue
            with open(file, "rb") as handle:
                for chunk in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(chunk)
        _FOLDERS[memo] = digest.hexdigest()[:16]
    return _FOLDERS[memo]


def file_fingerprint(path: Path) -> str:
    """A content hash of one file (16 hex digits)."""
    path = Path(path)
    memo = (str(path.resolve()), *_stat_key(path))
    if memo not in _FILES or not _settled(memo[2]):
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
        _FILES[memo] = digest.hexdigest()[:16]
    return _FILES[memo]


def path_fingerprint(path: str | os.PathLike[str]) -> str:
    """``file:<hash>``, ``dir:<hash>`` or ``missing`` for a path."""
    path = Path(path).expanduser()
    if path.is_file():
        return f"file:{file_fingerprint(path)}"
    if path.is_dir():
        return f"dir:{model_fingerprint(path)}"
    return "missing"


def array_digest(array: Any) -> str:
    """``dtype:shape:hash`` of an array's contents, hashed in place (no copy of a contiguous
    array); an array that repeats one entry along its first axis (stride 0, as ``generate``
    carries one input image for all samples) is hashed as that entry once."""
    import numpy as np

    array = np.asarray(array)
    described = f"{array.dtype}:{tuple(array.shape)}"
    digest = hashlib.sha256()
    if array.ndim and array.shape[0] > 1 and array.strides[0] == 0:
        digest.update(b"broadcast")
        array = array[0]
    digest.update(np.ascontiguousarray(array).data)
    return f"{described}:{digest.hexdigest()[:24]}"


def resolve_model_dir(name: str) -> tuple[str, Path | None]:
    """``(backbone id, local path or None)`` for an embedded name, a local folder or a hub id.
    Local and embedded backbones carry a content hash in their id (``name@<hash>``), a hub
    id the commit of its snapshot in the local Hugging Face cache (``org/name@<commit>``),
    so a new revision of the same name is another backbone; a hub id the cache does not
    hold (yet) stays bare."""
    from .embedded import resolve_embedded

    embedded = resolve_embedded(name)
    if embedded is not None:
        return f"{name}@{model_fingerprint(embedded)}", embedded
    path = Path(name).expanduser()
    if path.is_dir():
        return f"{path.resolve().name}@{model_fingerprint(path)}", path.resolve()
    snapshot = hub_snapshot(name) if _looks_like_hub_id(name) else None
    return (f"{name}@{snapshot.name}" if snapshot is not None else name), None


def _looks_like_hub_id(name: str) -> bool:
    """``org/name`` with no ``@`` (the hub ids metric backbones use); other names, such as a
    user metric's ``"custom"``, are not looked up."""
    parts = str(name).split("/")
    return len(parts) == 2 and all(parts) and "@" not in name and not str(name).startswith((".", "~"))


def hub_snapshot(repo_id: str, revision: str | None = None) -> Path | None:
    """The local snapshot folder of a hub model (its name is the commit), or None when the
    Hugging Face cache does not hold it."""
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, revision=revision, local_files_only=True))
    except Exception:  # noqa: BLE001 - not cached, not a hub id, or no huggingface_hub
        return None


__all__ = ["array_digest", "file_fingerprint", "hub_snapshot", "model_fingerprint", "path_fingerprint",
           "resolve_model_dir"]
