"""Claims on image-cache entries (claims.py): one owner per sample, dead owners taken over,
waiters get the owner's result or are told to generate it themselves."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from pytest_diffeval import claims


def test_one_live_owner_per_claim(tmp_path: Path) -> None:
    claim = tmp_path / "ab" / "key.claim"
    assert claims.try_claim(claim)
    assert claim.read_text() == f"{claims.HOST} {claims.os.getpid()}"
    assert not claims.try_claim(claim)  # held by a live process (this one)
    claims.release([claim])
    assert not claim.exists() and claims.try_claim(claim)


def test_a_dead_owners_claim_is_taken_over(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    claim = tmp_path / "key.claim"
    claim.write_text(f"{claims.HOST} {int(done.stdout)}")  # that process has exited
    with pytest.warns(UserWarning, match=f"took over the claim .*key.claim .owner {claims.HOST} {int(done.stdout)}"):
        assert claims.try_claim(claim)
    claims.release([claim])


@pytest.mark.parametrize("content", ["some-other-runner 1", "", "\x00\xff garbage"])
def test_foreign_empty_and_unreadable_claims_are_taken_over_at_once_with_a_note(tmp_path: Path, content: str) -> None:
    """A claim restored with a cache from another host, an empty one (a full disk), one of
    garbage: nobody holds them, so they are taken (the old code waited up to 30 minutes)."""
    claim = tmp_path / "ab" / "key.claim"
    claim.parent.mkdir()
    claim.write_text(content)
    claims._NOTED.clear()
    started = time.monotonic()
    found = claims.wait_for({0: claim}, lambda index: None, timeout=60)  # a waiter sees it is free...
    assert found == {0: None} and time.monotonic() - started < 10
    with pytest.warns(UserWarning, match="took over the claim"):
        taken = claims.try_claim(claim)  # ...and the sample is made here
    assert taken
    assert claim.read_text() == f"{claims.HOST} {claims.os.getpid()}"
    claims.release([claim])
    assert not claim.exists()


HOLDER = """
import sys, time
from filelock import FileLock
lock = FileLock(sys.argv[1]); lock.acquire()
print("held", flush=True); time.sleep(120)
"""


def test_a_live_owner_keeps_its_claim_until_it_is_killed(tmp_path: Path) -> None:
    claim = tmp_path / "key.claim"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(claim)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        assert not claims.try_claim(claim)  # held by a live process: waited for, not taken
        killer = threading.Timer(0.5, holder.kill)  # SIGKILL: no cleanup, the kernel drops the lock
        killer.start()
        started = time.monotonic()
        assert claims.wait_for({3: claim}, lambda index: None, timeout=60) == {3: None}
        assert time.monotonic() - started < 10
        killer.join()
    finally:
        holder.kill()
        holder.wait()
    claims._NOTED.clear()
    with pytest.warns(UserWarning, match="took over the claim .*key.claim"):  # the killed owner left its file
        assert claims.try_claim(claim)
    claims.release([claim])


def test_an_unwritable_cache_folder_generates_unclaimed_with_a_warning(tmp_path: Path) -> None:
    (tmp_path / "cache").write_text("a file where the cache folder should be")  # mkdir fails like a read-only disk
    claim = tmp_path / "cache" / "ab" / "key.claim"
    claims._NOTED.clear()
    with pytest.warns(UserWarning, match=r"cannot claim samples in the image cache .*cache: .*fix: .*--diffeval-cache-dir"):
        assert claims.try_claim(claim)  # made here, unclaimed
    claims.release([claim])  # nothing held: a no-op, no error


def test_waiters_get_the_owners_result_or_generate_themselves(tmp_path: Path) -> None:
    results: dict[int, str] = {}
    mine, abandoned = tmp_path / "0.claim", tmp_path / "1.claim"
    for claim in (mine, abandoned):
        assert claims.try_claim(claim)

    def owner() -> None:
        time.sleep(0.2)
        results[0] = "image 0"
        claims.release([mine])  # finished: result stored, claim released
        claims.release([abandoned])  # gave up without a result (e.g. the test failed)

    thread = threading.Thread(target=owner)
    thread.start()
    found = claims.wait_for({0: mine, 1: abandoned}, results.get, timeout=30)
    thread.join()
    assert found == {0: "image 0", 1: None}


def test_waiting_ends_at_the_timeout(tmp_path: Path) -> None:
    claim = tmp_path / "stuck.claim"
    assert claims.try_claim(claim)  # held by this (live) process and never released
    started = time.monotonic()
    with pytest.warns(UserWarning, match="1 samples another process claimed were not made within 0.3 s"):
        assert claims.wait_for({7: claim}, lambda index: None, timeout=0.3) == {7: None}
    assert time.monotonic() - started < 5


def test_an_unwritable_image_cache_warns_once_and_keeps_running(tmp_path: Path) -> None:
    import numpy as np

    from pytest_diffeval.generation import ImageCache

    (tmp_path / "cache").write_text("a file where the cache folder should be")
    cache = ImageCache(tmp_path / "cache" / "images")
    image = np.zeros((4, 4, 3), dtype=np.uint8)
    with pytest.warns(UserWarning, match=r"cannot write to the image cache .*images: .*running without caching images"):
        cache.put("ab" * 16, image, False)  # no OSError: the test goes on with the image it made
    cache.put("cd" * 16, image, False)  # warned once per cache, not per image
    assert cache.unwritable and cache.get("ab" * 16) is None


def test_a_claim_held_longer_than_the_bound_is_not_waited_for_again(tmp_path: Path) -> None:
    """A live but hung owner: a waiter that arrives after the bound generates at once,
    instead of waiting the whole bound again (per image)."""
    claim = tmp_path / "hung.claim"
    assert claims.try_claim(claim)  # held by a live process (this one), never released
    old = time.time() - 3600
    claims.os.utime(claim, (old, old))  # taken an hour ago
    started = time.monotonic()
    with pytest.warns(UserWarning, match="not made within 1800 s"):
        found = claims.wait_for({0: claim}, lambda index: None, timeout=1800)
    assert found == {0: None} and time.monotonic() - started < 10
    claims.release([claim])
