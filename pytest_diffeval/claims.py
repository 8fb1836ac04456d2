"""Claims on cache entries, so processes that share an image cache never generate the same
sample twice.

Under ``pytest -n K`` every worker runs its own tests, and tests of one model often need
the same samples (one test's 64 images are a subset of another's 128).  Before
generating, a process claims each missing sample by creating ``<entry>.claim`` with
``O_EXCL``; samples another live process has claimed are left to it and waited for.
So the workers split the union of their samples instead of racing for it.  A claim
whose owner died (its pid is gone on this host) or that stays unfulfilled past the
timeout is taken over: the sample is then generated here, never lost.
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path
from typing import Callable, Iterable, TypeVar

T = TypeVar("T")

POLL_SECONDS = 0.05
HOST = socket.gethostname()


def _owner_alive(claim: Path) -> bool:
    """Whether the process that wrote ``claim`` still runs (unknown owners count as alive)."""
    try:
        host, pid = claim.read_text().split()
    except (OSError, ValueError):
        return True  # being written right now, or unreadable: give it the benefit of the doubt
    if host != HOST:
        return True
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, ValueError):
        return True
    return True


def try_claim(claim: Path) -> bool:
    """Create ``claim`` for this process; False when another live process holds it."""
    claim.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(2):
        try:
            fd = os.open(claim, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            if _owner_alive(claim):
                return False
            claim.unlink(missing_ok=True)  # a dead owner's claim: take it over
            continue
        with os.fdopen(fd, "w") as handle:
            handle.write(f"{HOST} {os.getpid()}")
        return True
    return False


def release(claims: Iterable[Path]) -> None:
    for claim in claims:
        claim.unlink(missing_ok=True)


def wait_for(pending: dict[int, Path], fetch: Callable[[int], T | None], timeout: float) -> dict[int, T | None]:
    """Wait until each pending entry can be fetched or its claim is gone (owner finished or
    died); returns what could be fetched (None: generate it here).  ``pending`` maps an
    index to its claim file; ``fetch(index)`` reads the entry or returns None."""
    found: dict[int, T | None] = {}
    deadline = time.monotonic() + timeout
    while pending:
        for index, claim in list(pending.items()):
            value = fetch(index)
            if value is not None:
                found[index] = value
                del pending[index]
            elif not claim.exists() or not _owner_alive(claim):
                found[index] = fetch(index)  # finished between the two checks, or never will be
                del pending[index]
        if pending:
            if time.monotonic() > deadline:
                found.update({index: None for index in pending})
                break
            time.sleep(POLL_SECONDS)
    return found
