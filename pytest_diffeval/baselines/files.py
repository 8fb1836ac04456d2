"""Baseline JSON files on disk: reading and validating one, the folder lock, which folders
may be used, killed runs' temp files, and the files whose test module is gone.

``baselines/<test file path>/<test name>.json`` holds one entry per metric the test checks.
Each test owns its file (a test name that must be cleaned to be a file name gets a hash of
the original, and the file stores its test id, checked on read), and every write replaces
the file atomically under the folder's lock, so parallel workers (``-n``) never lose entries
and a killed run leaves the old or the new file, never half.  Malformed, non-finite or
newer-format data is a :class:`BaselineError`, never a verdict.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import filelock

from .. import settings
from .._hashing import digest_text
from .._io import pid_alive
from ..exceptions import BaselineError, BaselineFormatError

# 1: drift statistics beside the JSON as ``<test>.<metric>.<hw>.safetensors`` (still read).
# 2: statistics content-addressed (``<test>.<metric>.<hw>.<sha16>.safetensors``) and named in the
#    entry's ``details.statistics_file``; the file records ``test_file`` (the test module,
#    relative to the baselines folder) so baselines of a deleted test file are found.
FORMAT_VERSION = 2
STALE_TMP_SECONDS = 3600  # a temp file this old (or whose writer is dead) was left by a killed run
# A baseline is a handful of nested objects (checks > metric > hardware > entry > details):
# deeper data is not one, and reading it must not hit Python's recursion limit later.
MAX_DEPTH = 32
# No number a baseline stores needs more digits than a float holds (about 1.8e308).
MAX_INT_DIGITS = 309
LOCK_TIMEOUT_SECONDS = 300  # a baseline folder's lock is held for milliseconds per write


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


@contextmanager
def folder_lock(folder: Path) -> Iterator[None]:
    """Hold the lock of one baselines folder (a test module's) across processes: every
    read-modify-write of a baseline JSON, its statistics files and their clean-up runs under
    it, so two concurrent ``--snapshot-update`` runs never leave a JSON naming a statistics
    file the other deleted.  One lock per folder rather than per file, because the clean-up
    of leftovers must see the folder's JSONs and statistics files together (a statistics file
    is written before the JSON that names it).  The lock file lives in the temp folder, keyed
    by the folder's real path, so nothing is added to the committed baselines (``flock``: a
    killed holder releases it)."""
    locks = Path(tempfile.gettempdir()) / f"pytest-diffeval-locks-{getattr(os, 'getuid', lambda: 'user')()}"
    locks.mkdir(mode=0o700, exist_ok=True)
    key = digest_text(str(folder.resolve()), 32)
    lock = filelock.FileLock(locks / f"{key}.lock", timeout=LOCK_TIMEOUT_SECONDS)
    try:
        lock.acquire()
    except filelock.Timeout:
        raise BaselineError(f"pytest-diffeval: another run held the lock of {folder} for {LOCK_TIMEOUT_SECONDS} s "
                            f"({lock.lock_file}); fix: let it finish, or end the stuck pytest process") from None
    try:
        yield
    finally:
        lock.release()


def _bounded_int(text: str) -> int:
    """``json``'s integer parser, refusing integers longer than any baseline number: past a
    float's range they cannot be compared (``OverflowError``), and past Python's digit limit
    ``int()`` itself refuses them."""
    digits = len(text.lstrip("-"))
    if digits > MAX_INT_DIGITS:
        raise BaselineFormatError(f"it holds a {digits}-digit integer ({text[:10]}...), longer than any number a "
                                  f"baseline stores (at most {MAX_INT_DIGITS} digits)")
    return int(text)


def _nesting_depth(data: Any) -> int:
    """How deeply lists and objects nest in parsed JSON (iterative: no recursion limit)."""
    deepest, stack = 0, [(data, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, (dict, list)):
            deepest = max(deepest, depth)
            if depth <= MAX_DEPTH:  # deeper is refused anyway: stop counting there
                stack.extend((v, depth + 1) for v in (value.values() if isinstance(value, dict) else value))
    return deepest


def read_baseline_file(path: Path) -> dict[str, Any]:
    """Parse and validate one baseline file; raise :class:`BaselineFormatError` (a
    ``ValueError``) saying what is wrong."""
    too_deep = f"its lists and objects nest more than {MAX_DEPTH} levels deep, deeper than any baseline"
    try:
        data = json.loads(path.read_text(encoding="utf-8"), parse_int=_bounded_int)
    except json.JSONDecodeError as exc:
        raise BaselineFormatError(f"not valid JSON ({exc})") from None
    except UnicodeDecodeError as exc:
        raise BaselineFormatError(f"not UTF-8 text ({exc})") from None
    except RecursionError:  # nested deeper than the parser's stack allows
        raise BaselineFormatError(too_deep) from None
    if _nesting_depth(data) > MAX_DEPTH:  # parsed, but deep enough to hit the limit in later code
        raise BaselineFormatError(too_deep)
    if not isinstance(data, dict) or not isinstance(data.get("checks"), dict):
        raise BaselineFormatError("not a pytest-diffeval baseline (no 'checks' object)")
    if "format_version" not in data:
        raise BaselineFormatError(f"it has no 'format_version' (this pytest-diffeval writes {FORMAT_VERSION})")
    version = data["format_version"]
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise BaselineFormatError(f"format_version {_short(version)} is not a version pytest-diffeval writes "
                                  f"(a positive integer; this version writes {FORMAT_VERSION})")
    if version > FORMAT_VERSION:
        raise BaselineFormatError(
            f"format_version {version!r} is newer than this pytest-diffeval understands ({FORMAT_VERSION}); "
            "upgrade pytest-diffeval", newer=True)
    return data


def _test_name(test_id: str) -> str:
    """The part of a node id after the file (``test_x[a/b]``, ``TestC::test_y``)."""
    return test_id.split("::", 1)[-1]


def remove_stale_tmp(baseline_file: Path) -> list[Path]:
    """Delete this baseline's temp files left by killed runs: those whose writer (the pid in
    the name) is gone, or older than :data:`STALE_TMP_SECONDS`."""
    removed = []
    prefix = baseline_file.stem + "."
    for tmp in baseline_file.parent.glob(".*.tmp"):
        if not tmp.name.lstrip(".").startswith(prefix):
            continue
        if _stale_tmp(tmp):
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed


def _stale_tmp(tmp: Path) -> bool:
    """A temp file left by a killed run: its writer (the pid in its name) is gone, or it is
    older than :data:`STALE_TMP_SECONDS`."""
    match = re.search(r"\.(\d+)(?:\.\d+)?\.tmp$", tmp.name)
    try:
        old = time.time() - tmp.stat().st_mtime > STALE_TMP_SECONDS
    except OSError:
        return False
    return old or bool(match and not pid_alive(int(match.group(1))))


_DISCOVERY_CACHE: dict[tuple[str, int, int], tuple[str | None, list[str]] | None] = {}


def _discovery_info(path: Path) -> tuple[str | None, list[str]] | None:
    """``(test_file, metrics)`` of a baseline file, parsed once per version of the file."""
    try:
        stat = path.stat()
    except OSError:
        return None
    cache_key = (str(path), stat.st_mtime_ns, stat.st_size)
    if cache_key not in _DISCOVERY_CACHE:
        try:
            data = read_baseline_file(path)
            test_file = data.get("test_file")
            _DISCOVERY_CACHE[cache_key] = (test_file if isinstance(test_file, str) else None, list(data["checks"]))
        except (ValueError, OSError):
            _DISCOVERY_CACHE[cache_key] = None
    return _DISCOVERY_CACHE[cache_key]


def orphaned_baselines(root: Path) -> list[Path]:
    """Baseline files under ``root`` whose test module no longer exists (deleted or renamed).
    Only files that record their ``test_file`` qualify: a format-1 file cannot say which
    module owns it, and a baselines folder shared by two suites must not lose the other's."""
    orphans = []
    if not root.is_dir():
        return orphans
    for path in sorted(root.rglob("*.json")):
        if path.name.startswith("."):
            continue
        info = _discovery_info(path)
        if info and info[0] and info[1] and not (root / info[0]).exists():
            orphans.append(path)
    return orphans


def folder_refusal(folder: Path) -> str | None:
    """Why baselines must not be read or written in ``folder``, a folder inside the baselines
    folder that leads out of it through a symbolic link (a write would land elsewhere), or
    None.  A folder outside the baselines folder altogether (direct API use) is not judged."""
    root = settings.current().baselines_dir.resolve()
    if not Path(os.path.abspath(folder)).is_relative_to(root) or folder.resolve().is_relative_to(root):
        return None
    inside = [p for p in (*reversed(folder.parents), folder) if p != root and p.is_relative_to(root)]
    link = next((p for p in inside if p.is_symlink()), folder)
    return (f"pytest-diffeval: baseline folder {link} is a symbolic link to {link.resolve()}, outside the baselines "
            f"folder {root}; baselines are read and written only inside it.\n  fix: replace the link with a real "
            f"folder holding the baselines, or point diffeval_baselines_dir (ini) at the folder the link leads to")


def refuse_newer_message(path: Path, exc: Exception) -> str:
    return (f"pytest-diffeval: {path}: {exc}.\n  --snapshot-update will not overwrite it: this version would drop "
            "the entries it cannot read.\n  fix: upgrade pytest-diffeval (or, to discard it, delete the file and "
            "re-record)")
