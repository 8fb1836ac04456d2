"""File-system safety: the one atomic write of the package, and path checks for names read from files.

Every file the plugin writes (baselines, caches, reports) goes through :func:`atomic_path`,
so a reader or a killed run sees the old file or the new one, never half of one; and every
file name read from a results or baseline folder goes through :func:`inside`.  No library
does both for safetensors writers and arbitrary serialisers (syrupy's own atomic replace
writes text only), so this module keeps them.  Standard library only.
"""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any, Iterator

from ._hashing import digest_text
from .exceptions import UnsafePath


@contextlib.contextmanager
def atomic_path(path: Path | str) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; when the block ends without an error, the file
    written there is fsynced and moved onto ``path`` with ``os.replace`` (atomic on POSIX and
    Windows).  On an error the temporary file is removed and ``path`` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{time.monotonic_ns()}.tmp")
    try:
        yield tmp
        if tmp.is_file():
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()


def atomic_write_bytes(path: Path | str, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_path`)."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: Path | str, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically (see :func:`atomic_path`)."""
    atomic_write_bytes(path, text.encode("utf-8"))


def distinct_name(cleaned: str, original: str, limit: int = 200) -> str:
    """``cleaned`` (a file-name-safe form of ``original``) as a file or folder name: when
    cleaning changed the name (``a/b`` and ``ab`` both clean to ``ab``) or it is longer than
    ``limit``, a short hash of ``original`` is appended, so two names never share a file."""
    if cleaned != original or len(cleaned) > limit:
        return f"{cleaned[:limit - 10]}~{digest_text(original, 8)}"
    return cleaned


def inside(folder: Path, name: Any, *, source: Path | str, what: str, fix: str) -> Path:
    """``folder / name``, where ``name`` comes from the file ``source`` and must be a relative
    path that stays inside ``folder``: no absolute path, no ``..``, and no symbolic link out of
    it.  Anything else is :class:`UnsafePath` naming ``source``, the value and ``fix``: results
    and baselines come from CI artifacts and pull requests, and a name like ``../../etc``
    must never make the report read, or a merge copy or delete, anything outside."""
    if not isinstance(name, str) or not name.strip() or "\x00" in name:
        raise UnsafePath(f"{source}: {what} {name!r} is not a file name. Fix: {fix}")
    posix, windows = PurePosixPath(name), PureWindowsPath(name)
    if posix.is_absolute() or windows.is_absolute() or windows.drive or windows.root:
        raise UnsafePath(f"{source}: {what} {name!r} is an absolute path; only names inside {folder} are read. "
                         f"Fix: {fix}")
    if ".." in posix.parts or ".." in windows.parts:
        raise UnsafePath(f"{source}: {what} {name!r} contains '..'; only names inside {folder} are read. Fix: {fix}")
    path = folder / name
    resolved, root = path.resolve(), folder.resolve()
    if resolved == root or not resolved.is_relative_to(root):
        raise UnsafePath(f"{source}: {what} {name!r} resolves to {resolved}, outside {folder} (a symbolic link?). "
                         f"Fix: {fix}")
    return path


def pid_alive(pid: int) -> bool:
    """Whether a process with this id runs on this host (signal 0 probes without sending); a
    pid that cannot be probed (another user's, out of range) counts as alive, so nothing a
    live writer may still own is removed."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True
    return True
