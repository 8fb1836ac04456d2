"""Content hashes of model folders, weight files and arrays, and where a backbone name
points, without importing torch: the caches key by them on every run, also on a warm
rerun that must not pay for importing torch, transformers or diffusers.

**What a fingerprint guarantees.**  A file's fingerprint is the sha256 of its bytes; a
folder's is the sha256 of its (non-hidden) files' relative names and bytes, a file that is
a symlink into the Hugging Face cache counting by its blob name (already the sha256 of its
bytes).  Two files or folders with different content get different fingerprints (up to
sha256 collisions in the 64 bits kept).  A file is read only when it may have changed: its
hash is remembered in this process and on disk, under ``cache_dir/fingerprints`` (one JSON
file per file or folder, replaced atomically), keyed by the resolved path and, for every
file, its name, size, mtime (ns), inode, device and ctime (ns), and a symlink's target.
Replacing a file's bytes, even with one of the same size and an old mtime restored by
``touch -r`` or ``os.utime``, sets its ctime to the current time (the kernel does this on
every write, rename or ``utime``, and ctime cannot be set back by a user), so the key no
longer matches and the file is hashed again.  As in git, a file changed in the last
``RACY_NS`` (2 s) is hashed every time and never remembered (within one clock tick a
rewrite may keep its stat), and a file that changes while being hashed is not remembered.
Not guaranteed: a file changed by writing the block device directly, by someone who can
set the clock back, or on a filesystem that does not keep ctime.  On Windows, where
``st_ctime`` is the creation time, nothing is remembered: every call hashes.  Anyone who can write the
cache folder can also write a false memo (so a cache is shared only among trusted runs, as
every other cache here).  ``--diffeval-no-cache`` (or no cache dir) skips the on-disk memo.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable

from . import settings
from ._hashing import digest_json, digest_stream
from ._io import atomic_write_text
from .embedded import resolve_embedded

FORMAT = 1
_MEMO: dict[tuple[str, str, str], str] = {}  # (kind, path, stat listing) -> hash, this process
HASHED_BYTES = [0]  # bytes read to hash files in this process (for tests and benchmarks)


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


def _stat_key(file: Path) -> tuple[Any, ...]:
    """``(size, mtime_ns, inode, device, ctime_ns, symlink target)``: what must be unchanged
    for a remembered hash to hold (ctime moves on every write and every ``utime``)."""
    stat = file.stat()
    link = os.readlink(file) if file.is_symlink() else None
    return stat.st_size, stat.st_mtime_ns, stat.st_ino, stat.st_dev, stat.st_ctime_ns, link


def _settled(stats: list[tuple[Any, ...]]) -> bool:
    """Whether no file changed in the last ``RACY_NS`` (by mtime or ctime), so a remembered
    hash may be used; never on Windows, whose ``st_ctime`` is not the change time."""
    if os.name == "nt":
        return False
    newest = max((max(s[1], s[4]) for s in stats), default=0)
    return time.time_ns() - newest > RACY_NS


class FingerprintCache:
    """Remembered hashes on disk, one JSON file per file or folder that carries its full
    key (the stat listing); an entry whose key differs, or that cannot be read, is a miss."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)

    def _path(self, key: list[Any]) -> Path:
        name = digest_json(key, 32)
        return self.directory / name[:2] / f"{name}.json"

    def get(self, key: list[Any]) -> str | None:
        try:
            data = json.loads(self._path(key).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        if not isinstance(data, dict) or data.get("format") != FORMAT or data.get("key") != key:
            return None
        value = data.get("hash")
        if not (isinstance(value, str) and len(value) == 16 and all(c in "0123456789abcdef" for c in value)):
            return None
        return value

    def put(self, key: list[Any], value: str) -> None:
        try:
            atomic_write_text(self._path(key), json.dumps({"format": FORMAT, "key": key, "hash": value}))
        except OSError:
            pass  # a read-only or full cache costs a re-hash next time, nothing else


def fingerprint_cache() -> FingerprintCache | None:
    """The on-disk memo under ``settings.current().cache_dir`` (None without a cache dir or
    with ``--diffeval-no-cache``)."""
    current = settings.current()
    if current.cache_dir is None or not current.result_cache:
        return None
    return FingerprintCache(Path(current.cache_dir) / "fingerprints")


def _file_chunks(file: Path) -> Iterator[bytes]:
    """A file's bytes in 1 MiB chunks, counted in ``HASHED_BYTES``."""
    with open(file, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            HASHED_BYTES[0] += len(chunk)
            yield chunk


def _remembered(kind: str, path: Path, stats: Any, compute: Callable[[], str], restat: Callable[[], Any]) -> str:
    """``compute()``, or the hash remembered for ``(kind, path, stats)`` in this process or
    on disk; a fresh hash is remembered only when nothing changed recently or meanwhile."""
    memo = (kind, str(path), json.dumps(stats))
    if memo in _MEMO:
        return _MEMO[memo]
    settled = _settled([row[1:] for row in stats] if kind == "dir" else [stats])
    disk = fingerprint_cache() if settled else None
    key = [kind, str(path), json.loads(json.dumps(stats))]
    found = disk.get(key) if disk is not None else None
    if found is not None:
        _MEMO[memo] = found
        return found
    value = compute()
    if settled and restat() == stats:  # unchanged while it was read
        _MEMO[memo] = value
        if disk is not None:
            disk.put(key, value)
    return value


def model_fingerprint(path: Path) -> str:
    """A content hash of a model directory (file names and bytes), so a changed weight
    file changes the identity even when the name does not.  Files that are symlinks into
    the Hugging Face cache are identified by their blob name, which is already a hash.
    Remembered per process and on disk (see the module doc for the exact guarantee)."""
    path = Path(path)
    files = _listing(path)

    def listing() -> list[tuple[Any, ...]]:
        return [(rel, *_stat_key(file)) for file, rel in files]

    def parts() -> Iterator[bytes]:
        for file, rel in files:
            yield rel.encode()
            blob = _blob_name(file)
            if blob is not None:
                yield blob.encode()
            else:
                yield from _file_chunks(file)

    def compute() -> str:
        return digest_stream(parts(), 16)

    return _remembered("dir", path.resolve(), listing(), compute, listing)


def file_fingerprint(path: Path) -> str:
    """A content hash of one file (16 hex digits), remembered like a folder's."""
    path = Path(path)

    def compute() -> str:
        return digest_stream(_file_chunks(path), 16)

    return _remembered("file", path.resolve(), list(_stat_key(path)), compute, lambda: list(_stat_key(path)))


def path_fingerprint(path: str | os.PathLike[str]) -> str:
    """``file:<hash>``, ``dir:<hash>`` or ``missing`` for a path."""
    path = Path(path).expanduser()
    if path.is_file():
        return f"file:{file_fingerprint(path)}"
    if path.is_dir():
        return f"dir:{model_fingerprint(path)}"
    return "missing"


def resolve_model_dir(name: str) -> tuple[str, Path | None]:
    """``(backbone id, local path or None)`` for an embedded name, a local folder or a hub id.
    Local and embedded backbones carry a content hash in their id (``name@<hash>``), a hub
    id the commit of its snapshot in the local Hugging Face cache (``org/name@<commit>``),
    so a new revision of the same name is another backbone; a hub id the cache does not
    hold (yet) stays bare."""
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


__all__ = ["FingerprintCache", "file_fingerprint", "fingerprint_cache", "hub_snapshot",
           "model_fingerprint", "path_fingerprint",
           "resolve_model_dir"]
