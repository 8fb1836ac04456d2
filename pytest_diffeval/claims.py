"""Claims on cache entries, so processes that share an image cache never generate the same
sample twice.

Under ``pytest -n K`` every worker runs its own tests, and tests of one model often need
the same samples (one test's 64 images are a subset of another's 128).  Before
generating, a process claims each missing sample by taking an OS file lock (``flock``,
through :mod:`filelock`) on ``<entry>.claim``; samples another process holds are left to
it and waited for.  So the workers split the union of their samples instead of racing
for it.

A claim is the *lock*, not the file.  The kernel releases a lock when its owner exits, in
any way (crash, SIGKILL), so there is no pid bookkeeping and nothing to go stale: a claim
file left behind by a dead process, restored with a cache from another host, empty (a
full disk) or of the old ``host pid`` format is not locked, and is taken over at once
(with a warning naming the file and its former owner, once per owner).  A claim held by a
live process is waited for until it is as old as the caller's bound (a hung owner), then
the sample is made here, with a warning.

When claim files cannot be created (a read-only or full cache disk, a file system
without locks) the sample is generated without a claim, with a warning naming the folder
and the fix: workers sharing the cache may then make a sample twice, never a wrong one.
"""

from __future__ import annotations

import os
import socket
import time
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TypeVar

from filelock import FileLock, Timeout

T = TypeVar("T")

POLL_SECONDS = 0.05
HOST = socket.gethostname()

_HELD: dict[Path, FileLock] = {}  # this process's claims
_NOTED: set[str] = set()  # former owners and folders already warned about


def _warn_once(topic: str, message: str) -> None:
    if topic not in _NOTED:
        _NOTED.add(topic)
        warnings.warn(message, UserWarning, stacklevel=3)


def _lock(claim: Path) -> FileLock | None:
    """The claim's lock, taken now, or None when another process holds it.  Raises OSError
    when the lock file cannot be created or opened."""
    claim.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(claim, fallback_to_soft=False)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        return None
    return lock


def try_claim(claim: Path) -> bool:
    """Claim ``claim`` for this process; False when another live process holds it.  True
    also when no claim can be made here (read-only or full cache disk): the caller then
    generates the sample unclaimed (see the module docstring)."""
    claim = Path(claim)
    if claim in _HELD:
        return False  # held by this process already (another call is generating it)
    try:
        left = claim.read_text(encoding="utf-8", errors="replace").strip() if claim.exists() else None
        lock = _lock(claim)
    except OSError as exc:
        folder = claim.parent.parent
        _warn_once(f"unwritable:{folder}", f"pytest-diffeval: cannot claim samples in the image cache {folder}: "
                   f"{type(exc).__name__}: {exc}; generating without claims (workers sharing this cache may "
                   f"make a sample twice); fix: free space or make {folder} writable, or point "
                   "--diffeval-cache-dir at a writable folder")
        return True
    if lock is None:
        return False
    _HELD[claim] = lock
    if left is not None:  # a claim file nobody holds: its owner is gone (exited, another host, restored cache)
        owner = left or "unknown: empty claim file"
        _warn_once(f"owner:{owner}", f"pytest-diffeval: took over the claim {claim} (owner {owner}): nobody holds "
                   "it any more (its process exited, or the cache was restored from another machine); "
                   "generating the sample here")
    try:
        claim.write_text(f"{HOST} {os.getpid()}", encoding="utf-8")  # for people: the lock is the claim
    except OSError:
        pass  # a full disk: the lock still holds
    return True


def release(claims: Iterable[Path]) -> None:
    """Release this process's claims: the file is removed while still locked, then unlocked
    (a process that opened the old file sees it unlinked and tries again)."""
    for claim in claims:
        lock = _HELD.pop(Path(claim), None)
        if lock is None:
            continue
        try:
            Path(claim).unlink(missing_ok=True)
        except OSError:
            pass
        lock.release()


def _owner_gone(claim: Path) -> bool:
    """Whether nobody holds ``claim`` (released, or its owner exited): its lock can be taken."""
    if claim in _HELD:
        return False
    try:
        lock = _lock(claim)
    except OSError:
        return True  # cannot even be opened: nobody can be holding it through this folder
    if lock is None:
        return False
    lock.release()
    return True


def _age(claim: Path) -> float:
    """Seconds since ``claim`` was taken (its file is written when the lock is taken)."""
    try:
        return time.time() - claim.stat().st_mtime
    except OSError:
        return 0.0


def wait_for(pending: dict[int, Path], fetch: Callable[[int], T | None], timeout: float) -> dict[int, T | None]:
    """Wait until each pending entry can be fetched or its claim is free (owner finished or
    exited); returns what could be fetched (None: generate it here).  ``pending`` maps an
    index to its claim file; ``fetch(index)`` reads the entry or returns None.  A claim
    held longer than ``timeout`` seconds (counted from when it was taken, so a waiter that
    arrives late does not wait the whole bound again), or waited for that long, is given
    up on with a warning: the sample is made here."""
    found: dict[int, T | None] = {}
    given_up: list[Path] = []
    deadline = time.monotonic() + timeout
    while pending:
        for index, claim in list(pending.items()):
            value = fetch(index)
            if value is not None:
                found[index] = value
                del pending[index]
            elif not claim.exists() or _owner_gone(claim):
                found[index] = fetch(index)  # finished between the two checks, or never will be
                del pending[index]
            elif _age(claim) > timeout:
                found[index] = None
                given_up.append(claim)
                del pending[index]
        if pending and time.monotonic() > deadline:
            found.update({index: None for index in pending})
            given_up.extend(pending.values())
            pending = {}
        if pending:
            time.sleep(POLL_SECONDS)
    if given_up:
        warnings.warn(f"pytest-diffeval: {len(given_up)} samples another process claimed were not made within "
                      f"{timeout:g} s (e.g. {given_up[0]}); generating them here", UserWarning, stacklevel=2)
    return found
