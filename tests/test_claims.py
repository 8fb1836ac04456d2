"""Claims on image-cache entries (claims.py): one owner per sample, dead owners taken over,
waiters get the owner's result or are told to generate it themselves."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

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
    assert claims.try_claim(claim)
    other_host = tmp_path / "other.claim"
    other_host.write_text("some-other-runner 1")  # cannot be checked: assumed alive
    assert not claims.try_claim(other_host)


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
    assert claims.wait_for({7: claim}, lambda index: None, timeout=0.3) == {7: None}
    assert time.monotonic() - started < 5
