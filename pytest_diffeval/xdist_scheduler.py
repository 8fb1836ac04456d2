"""The xdist scheduler of model scheduling (``--diffeval-dist=model`` under ``pytest -n``):
it runs :func:`scheduling.partition`'s units, each group's on its share of the workers.

Workers report each test's group through a file the controller reads (xdist 3.8's ``--dist
loadgroup`` does not work with pytest 9.2: its group suffix on ``item._nodeid`` is not what
pytest reports); the controller sees only node ids.

The model scheduler applies only to sessions that contain diffeval tests (tests that use
the ``generate``/``diffusion_pipeline`` fixtures or a ``diffeval_model``/``diffeval_plan``
marker): the plugin loads in every project that has it installed, and a plugin must not
change how a project that does not use it is scheduled.  Until the workers' collections
are in, the controller cannot tell, so :func:`make_scheduler` returns a scheduler that
decides then and hands everything to either the model scheduler or xdist's own
(``LoadScheduling`` for ``--dist load``, ``LoadGroupScheduling`` for ``loadgroup``).

A crashed worker (``os._exit``, SIGKILL from the OOM killer) never hangs the run: the test
it was running is reported by xdist as failed ("worker 'gwN' crashed while running ...")
and is not run again on the replacement worker (it would most likely crash that one too);
the rest of the dead worker's units go back to the front of the queue.  The plugin also
notes which workers died (``pytest_testnodedown``): the dead worker's account of the
baselines its tests used is lost, so ``--snapshot-update`` deletes no baseline as unused in
that run.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from xdist.scheduler import LoadGroupScheduling, LoadScheduling, LoadScopeScheduling

from ._io import atomic_write_text
from .scheduling import Entry, Partition, bind_shares, partition, work_order

ENTRIES_FILE = "entries-{worker}.json"


def write_entries(directory: str | Path, worker: str, entries: Iterable[Entry]) -> None:
    """A worker's report of each collected test's group and plan (read by the controller)."""
    data = {"entries": [[e.nodeid, e.group, e.plan] for e in entries]}
    atomic_write_text(Path(directory) / ENTRIES_FILE.format(worker=worker), json.dumps(data))


def read_entries(directory: str | Path, collection: Sequence[str]) -> list[Entry] | None:
    """The entries some worker reported for exactly this collection, or None."""
    for path in sorted(Path(directory).glob(ENTRIES_FILE.format(worker="*"))):
        try:
            rows = json.loads(path.read_text(encoding="utf-8"))["entries"]
            entries = [Entry(str(n), g, p) for n, g, p in rows]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if [e.nodeid for e in entries] == list(collection):
            return entries
    return None


def has_diffeval_tests(entries: Iterable[Entry]) -> bool:
    """Whether any test is a diffeval test: its group comes from a diffeval marker
    (``model:``) or a diffeval fixture (``module:``), not from ``xdist_group`` alone."""
    return any(e.group is not None and e.group.startswith(("model:", "module:")) for e in entries)


def crashed_test(workload: dict[str, dict[str, bool]]) -> str | None:
    """The test a dead worker was running: the first unfinished test of the units it was
    given, in the order it was given them (a worker runs its tests in that order); None
    when it had finished all of them (it died after its tests, e.g. while helping)."""
    for tests in workload.values():
        for nodeid, done in tests.items():
            if not done:
                return nodeid
    return None


class DecidingScheduling:
    """The xdist scheduler the plugin installs: until the workers' collections are in it
    feeds both the model scheduler and xdist's own; at :meth:`schedule` it keeps the model
    scheduler when the session has diffeval tests, else xdist's (see the module docstring)."""

    def __init__(self, model: Any, plain: Any, directory: str | Path) -> None:
        self._model, self._plain, self._directory = model, plain, directory
        self._chosen: Any = None

    @property
    def chosen(self) -> Any:
        """The scheduler in charge (the model scheduler until the decision)."""
        return self._chosen if self._chosen is not None else self._model

    @property
    def nodes(self) -> list[Any]:
        return self.chosen.nodes

    @property
    def collection_is_completed(self) -> bool:
        return self.chosen.collection_is_completed

    @property
    def tests_finished(self) -> bool:
        return self.chosen.tests_finished

    @property
    def has_pending(self) -> bool:
        return self.chosen.has_pending

    def _both(self) -> list[Any]:
        return [self._chosen] if self._chosen is not None else [self._model, self._plain]

    def add_node(self, node: Any) -> None:
        for sched in self._both():
            sched.add_node(node)

    def add_node_collection(self, node: Any, collection: Sequence[str]) -> None:
        for sched in self._both():
            sched.add_node_collection(node, collection)

    def remove_node(self, node: Any) -> str | None:
        results, missing = [], 0
        for sched in self._both():
            try:
                results.append(sched.remove_node(node))
            except KeyError:  # never added to this one (xdist expects the KeyError)
                missing += 1
                results.append(None)
        if missing == len(results):
            raise KeyError(node)
        return results[0]

    def mark_test_complete(self, node: Any, item_index: int, duration: float = 0) -> None:
        self.chosen.mark_test_complete(node, item_index, duration)

    def mark_test_pending(self, item: str) -> None:
        self.chosen.mark_test_pending(item)

    def remove_pending_tests_from_node(self, node: Any, indices: Sequence[int]) -> None:
        self.chosen.remove_pending_tests_from_node(node, indices)

    def schedule(self) -> None:
        if self._chosen is None:
            collections = list(self._model.registered_collections.values())
            entries = read_entries(self._directory, collections[0]) if collections else None
            if entries is not None and has_diffeval_tests(entries):
                self._model.entries = entries
                self._chosen = self._model
            else:  # no diffeval tests, or no worker report (remote workers): xdist's own
                self._chosen = self._plain
        self._chosen.schedule()


class ModelScheduling(LoadScopeScheduling):  # type: ignore[misc]
    """LoadScope scheduling whose scopes are :func:`partition`'s units; a group's units go
    only to the workers of its share (unless all of those are gone)."""

    def __init__(self, config: Any, log: Any, directory: str | Path) -> None:
        super().__init__(config, log)
        self.directory = directory  # where the workers report their entries
        self.part: Partition | None = None
        self.bound: dict[str, list[str]] = {}
        self.entries: list[Entry] | None = None  # set by DecidingScheduling before schedule()

    def remove_node(self, node: Any) -> str | None:
        """A worker is gone.  After a crash, the test it was running counts as done (xdist
        reports it failed: "crashed while running"; run again it would likely crash the
        replacement too), and its unfinished units go back to the front of the queue.
        (LoadScope re-queues the crashed test, and every finished unit as an empty one
        that no worker ever completes: the run hung.)"""
        workload = self.assigned_work.pop(node)
        crashitem = crashed_test(workload)
        if crashitem is None:
            return None
        for tests in workload.values():
            if crashitem in tests:
                tests[crashitem] = True
        leftover = [(unit, tests) for unit, tests in workload.items() if not all(tests.values())]
        for unit, tests in reversed(leftover):
            self.workqueue[unit] = tests
            self.workqueue.move_to_end(unit, last=False)
        for other in self.nodes:
            self._reschedule(other)
        return crashitem

    def _split_scope(self, nodeid: str) -> str:
        if self.part is not None and nodeid in self.part.unit_of:
            return self.part.unit_of[nodeid]
        return nodeid.rsplit("::", 1)[0]

    def _eligible(self, node: Any, unit: str) -> bool:
        group = self.part.unit_group.get(unit) if self.part is not None else None
        share = self.bound.get(group) if group is not None else None
        if not share or node.gateway.id in share:
            return True
        live = {n.gateway.id for n in self.assigned_work if not n.shutting_down}
        return not live & set(share)

    def _assign_work_unit(self, node: Any) -> bool:  # type: ignore[override]
        for done in [u for u, tests in self.workqueue.items() if all(tests.values())]:
            del self.workqueue[done]  # nothing left to run in it: sending it would stall a worker
        unit = next((u for u in self.workqueue if self._eligible(node, u)), None)
        if unit is None:
            return False
        work_unit = self.workqueue.pop(unit)
        self.assigned_work.setdefault(node, {})[unit] = work_unit
        collection = self.registered_collections[node]
        node.send_runtest_some([collection.index(n) for n, done in work_unit.items() if not done])
        return True

    def _reschedule(self, node: Any) -> None:
        # Model tests are long and unequal: queue at most one test beyond the running
        # one (LoadScope queues two), so an idle worker is not left watching another's
        # queue.  A worker with nothing left that it may run is shut down (it then runs
        # what it holds: a worker waits for its next test or shutdown before the last).
        if node.shutting_down or self._pending_of(self.assigned_work[node]) > 1:
            return
        if not self._assign_work_unit(node):
            node.shutdown()

    def schedule(self) -> None:
        assert self.collection_is_completed
        if self.collection is not None:
            for node in self.nodes:
                self._reschedule(node)
            return
        if not self._check_nodes_have_same_collection():
            self.log("**Different tests collected, aborting run**")
            return
        self.collection = list(next(iter(self.registered_collections.values())))
        if not self.collection:
            return
        entries = self.entries if self.entries is not None else read_entries(self.directory, self.collection)
        if entries is None:  # no worker report (remote workers?): group by module
            entries = [Entry(n, f"module:{n.split('::', 1)[0]}") for n in self.collection]
        self.part = partition(entries, self.numnodes)
        if self.part.bound:
            self.bound = bind_shares(self.part, sorted(n.gateway.id for n in self.nodes))
        for unit in work_order(self.part, self.collection):
            self.workqueue[unit] = {nodeid: False for nodeid in self.part.units[unit]}
        for node in self.nodes:
            if not self._assign_work_unit(node):
                node.shutdown()
        for node in self.nodes:
            self._reschedule(node)
        if not self.workqueue:
            for node in self.nodes:
                node.shutdown()


def make_scheduler(config: Any, log: Any, directory: str | Path) -> DecidingScheduling:
    """An xdist scheduler that runs each group's units on its share of the workers in
    sessions with diffeval tests, and schedules other sessions as xdist would."""
    plain = LoadGroupScheduling(config, log) if getattr(config.option, "dist", "load") == "loadgroup" \
        else LoadScheduling(config, log)
    return DecidingScheduling(ModelScheduling(config, log, directory), plain, directory)
