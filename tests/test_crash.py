"""A crashed xdist worker (``os._exit``, SIGKILL from the OOM killer) never hangs a run,
in a project with diffeval tests or without: the test it was running fails once ("worker
'gwN' crashed while running ..."), is not run again on the replacement worker, the run
ends, the report is written, and ``--snapshot-update`` deletes no baseline as unused.
Every run here has a timeout, so a hang fails the test instead of stalling CI."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from pytest_diffeval.scheduling import Entry
from pytest_diffeval.xdist_scheduler import crashed_test, has_diffeval_tests, make_scheduler, write_entries

CRASH = {
    "exit": "os._exit(1)",
    "kill": "os.kill(os.getpid(), signal.SIGKILL)",
}

PLAIN = """
import os, signal

def test_a(): pass
def test_b(): pass
def test_crash():
    {crash}
def test_d(): pass
def test_e(): pass
"""

DIFFEVAL = """
import os, signal
import pytest
from conftest import PIPE
from pytest_diffeval.metrics import register_metric

@register_metric("brightness", higher_is_better=True, absolute_tolerance=1.0)
def brightness(images):
    return images.images.reshape(len(images), -1).mean(axis=1)

@pytest.mark.parametrize("case", range(4))
def test_alignment(generate, diffeval_baseline, case):
    images = generate(PIPE, ["a photo of a cat"], seeds=[case], num_inference_steps=2)
    diffeval_baseline.assert_no_regression(images, "brightness")

def test_crash(generate, diffeval_baseline):
    if os.environ.get("CRASH_NOW"):
        {crash}
    images = generate(PIPE, ["a photo of a dog"], seeds=[0], num_inference_steps=2)
    diffeval_baseline.assert_no_regression(images, "brightness")
"""

TIMEOUT = 300  # generous: a loaded CI machine is slow, a hang is forever


def crash_lines(result: pytest.RunResult, nodeid: str) -> list[str]:
    return [line for line in result.outlines if line.startswith("FAILED") and nodeid in line and "crashed" in line]


# --------------------------------------------------------------------------- scheduler, unit


class FakeNode:
    """What a scheduler sees of an xdist worker."""

    def __init__(self, name: str) -> None:
        self.gateway = SimpleNamespace(id=name)
        self.shutting_down = False
        self.sent: list[int] = []
        self.sends = 0

    def send_runtest_some(self, indices: list[int]) -> None:
        self.sends += 1
        assert indices, "a worker was sent an empty unit: it would wait forever"
        self.sent.extend(indices)

    def shutdown(self) -> None:
        self.shutting_down = True


def scheduler(pytester: pytest.Pytester, entries: list[Entry], workers: int = 2) -> tuple[Any, list[FakeNode]]:
    config = pytester.parseconfig("--tx", f"{workers}*popen", "--dist", "load")
    directory = Path(tempfile.mkdtemp(dir=pytester.path))
    write_entries(directory, "gw0", entries)
    sched = make_scheduler(config, None, directory)
    nodes = [FakeNode(f"gw{i}") for i in range(workers)]
    collection = [e.nodeid for e in entries]
    for node in nodes:
        sched.add_node(node)
        sched.add_node_collection(node, collection)
    sched.schedule()
    return sched, nodes


def test_the_crashed_test_is_the_first_unfinished_one_of_the_dead_workers_units() -> None:
    workload = {"u1": {"a": True, "b": True}, "u2": {"c": False, "d": False}}
    assert crashed_test(workload) == "c"
    assert crashed_test({"u1": {"a": True}}) is None


def test_only_diffeval_groups_make_a_diffeval_session() -> None:
    assert not has_diffeval_tests([Entry("t::a", None), Entry("t::b", "group:g")])
    assert has_diffeval_tests([Entry("t::a", None), Entry("t::b", "module:t")])
    assert has_diffeval_tests([Entry("t::a", "model:m")])


def test_a_session_without_diffeval_tests_gets_xdists_own_scheduler(pytester: pytest.Pytester) -> None:
    sched, _ = scheduler(pytester, [Entry(f"t.py::{n}", None) for n in "abcde"])
    assert type(sched.chosen).__name__ == "LoadScheduling"
    sched, _ = scheduler(pytester, [Entry(f"t.py::{n}", "model:m") for n in "abcde"])
    assert type(sched.chosen).__name__ == "ModelScheduling"


def test_a_dead_workers_test_is_not_rerun_and_the_rest_of_its_unit_goes_to_a_replacement(
        pytester: pytest.Pytester) -> None:
    entries = [Entry(f"m.py::{n}", "model:m") for n in "abcd"] + [Entry(f"o.py::{n}", "model:o") for n in "xy"]
    sched, (gw0, gw1) = scheduler(pytester, entries)
    collection = [e.nodeid for e in entries]
    owner = gw0 if gw0.sent and collection[gw0.sent[0]].startswith("m.py") else gw1
    other = gw1 if owner is gw0 else gw0
    assert [collection[i] for i in owner.sent] == [f"m.py::{n}" for n in "abcd"]
    sched.mark_test_complete(owner, owner.sent[0])  # m.py::a passed, then b crashed the worker
    assert sched.remove_node(owner) == "m.py::b"
    for index in list(other.sent):
        sched.mark_test_complete(other, index)
    replacement = FakeNode("gw2")
    sched.add_node(replacement)
    sched.add_node_collection(replacement, collection)
    sched.schedule()
    assert [collection[i] for i in replacement.sent] == ["m.py::c", "m.py::d"]  # not a, not b again
    for index in replacement.sent:
        sched.mark_test_complete(replacement, index)
    assert sched.tests_finished


# --------------------------------------------------------------------------- end to end


@pytest.mark.parametrize("kind", ["exit", "kill"])
def test_a_crash_in_a_project_without_diffeval_tests_fails_that_test_once(pytester: pytest.Pytester, kind: str) -> None:
    pytester.makepyfile(test_plain=PLAIN.format(crash=CRASH[kind]))
    result = pytester.runpytest_subprocess("-n", "2", "-p", "no:randomly", timeout=TIMEOUT)
    result.assert_outcomes(failed=1, passed=4)
    assert len(crash_lines(result, "test_plain.py::test_crash")) == 1, result.stdout.str()


@pytest.fixture
def diffeval_project(user_project: pytest.Pytester, tiny_models: dict[str, Path]) -> pytest.Pytester:
    model = user_project.path / "model"
    shutil.copytree(tiny_models["pipe"], model)
    user_project.makeconftest(f"PIPE = {str(model)!r}\n")
    return user_project


def baselines(project: pytest.Pytester) -> dict[str, dict[str, Any]]:
    return {p.name: json.loads(p.read_text())["checks"] for p in sorted((project.path / "baselines").rglob("*.json"))}


# os._exit and SIGKILL reach the controller alike (tested on a plain project above): the
# README's command runs the SIGKILL case, the separate step (.ci/run) the os._exit one too.
@pytest.mark.parametrize("kind", [pytest.param("exit", marks=pytest.mark.slow), "kill"])
def test_a_crash_in_a_diffeval_project_keeps_every_baseline_and_writes_the_report(
        diffeval_project: pytest.Pytester, kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    project = diffeval_project
    project.makepyfile(test_user=DIFFEVAL.format(crash=CRASH[kind]))
    project.runpytest_subprocess("--snapshot-update", "-p", "no:randomly", timeout=TIMEOUT).assert_outcomes(passed=5)
    recorded = baselines(project)
    assert len(recorded) == 5
    monkeypatch.setenv("CRASH_NOW", "1")
    for update in (["--snapshot-update"], []):
        metrics = project.path / "diffeval-results" / "metrics.json"
        metrics.unlink(missing_ok=True)
        result = project.runpytest_subprocess("-n", "2", "-p", "no:randomly", "--diffeval-results-always", *update,
                                              timeout=TIMEOUT)
        result.assert_outcomes(failed=1, passed=4)
        out = result.stdout.str()
        assert len(crash_lines(result, "test_user.py::test_crash")) == 1, out
        assert "unused snapshot" not in out and "no baseline deleted" in out, out
        assert baselines(project) == recorded  # the crashed test's baseline too
        assert metrics.is_file() and (project.path / "diffeval-results" / "report.html").is_file(), out
        rows = json.loads(metrics.read_text())
        assert "test_user.py::test_alignment[3]" in json.dumps(rows)
