"""Keeping each model's tests together: under ``pytest -n K`` (xdist) and across CI shards
(``--diffeval-shard=i/N``), so every model is loaded by as few processes as possible.

A test's *group* is the model it uses: ``@pytest.mark.diffeval_model(name)``, the model of
its ``diffeval_plan``, an ``xdist_group`` name, or else (for tests that use the
``generate``/``diffusion_pipeline`` fixtures) the one model other tests of its module
declare, or its module.  Tests without any of these, and tests that will be skipped (GPU
tests without a GPU), are *free* and are balanced one by one.

:func:`partition` turns groups into *units* (what one worker runs in one go):

* at least as many groups as workers: one unit per group, so each model is loaded by
  exactly one worker;
* fewer groups than workers: each group gets a share of the workers in proportion to its
  tests (D'Hondt), at least one, and its tests become single-test units that only those
  workers run (dynamically balanced among them); a ``diffeval_plan``'s tests are cut into
  one contiguous chunk per worker of the share, so each worker generates only its chunk.

The function is pure: the xdist controller (which sees only node ids) and each worker
(which has the items) compute the same units; workers report each test's group through a
file the controller reads (xdist 3.8's ``--dist loadgroup`` does not work with pytest 9.2:
its group suffix on ``item._nodeid`` is not what pytest reports).

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
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from xdist.scheduler import LoadGroupScheduling, LoadScheduling, LoadScopeScheduling

from ._io import atomic_write_text
from .planning import Plan

DIFFEVAL_FIXTURES = frozenset({"generate", "diffusion_pipeline"})


@dataclass(frozen=True)
class Entry:
    """One collected test as scheduling sees it."""

    nodeid: str
    group: str | None  # "model:<name>", "group:<xdist_group>", "module:<path>"; None: free
    plan: str | None = None  # its diffeval_plan's id


def _first_arg(mark: Any, keyword: str) -> Any:
    return mark.args[0] if mark.args else mark.kwargs.get(keyword)


def entries_of(items: Sequence[Any], skipped: Callable[[Any], bool] | None = None) -> list[Entry]:
    """The scheduling entries of the collected items.  A module whose tests declare exactly
    one model puts its other diffeval tests in that model's group (they most likely use it
    too); tests that will be skipped (``skipped(item)``, e.g. GPU tests without a GPU) are
    free, so they do not hold a worker's share."""
    entries = [entry_of(item) if not (skipped and skipped(item)) else Entry(item.nodeid, None) for item in items]
    declared: dict[str, set[str]] = {}
    for entry in entries:
        if entry.group is not None and entry.group.startswith("model:"):
            declared.setdefault(_module(entry.nodeid), set()).add(entry.group)
    out = []
    for entry in entries:
        models = declared.get(_module(entry.nodeid), set())
        if entry.group is not None and entry.group.startswith("module:") and len(models) == 1:
            entry = Entry(entry.nodeid, next(iter(models)), entry.plan)
        out.append(entry)
    return out


def _module(nodeid: str) -> str:
    return nodeid.split("::", 1)[0]


def entry_of(item: Any) -> Entry:
    """The scheduling entry of a pytest item (its markers and fixtures decide its group)."""
    plan_mark = item.get_closest_marker("diffeval_plan")
    plan = Plan.from_marker(plan_mark, item.nodeid) if plan_mark is not None else None
    model_mark = item.get_closest_marker("diffeval_model")
    group_mark = item.get_closest_marker("xdist_group")
    if model_mark is not None and _first_arg(model_mark, "model") is not None:
        group: str | None = f"model:{os.fspath(_first_arg(model_mark, 'model'))}"
    elif plan is not None:
        group = f"model:{plan.model}"
    elif group_mark is not None:
        group = f"group:{_first_arg(group_mark, 'name') or 'default'}"
    elif DIFFEVAL_FIXTURES & set(getattr(item, "fixturenames", ())):
        group = f"module:{item.nodeid.split('::', 1)[0]}"
    else:
        group = None
    return Entry(item.nodeid, group, plan.id if plan is not None else None)


@dataclass
class Partition:
    """Units of work and the share of workers (or shards) each group may use."""

    unit_of: dict[str, str] = field(default_factory=dict)  # nodeid -> unit
    units: dict[str, list[str]] = field(default_factory=dict)  # unit -> nodeids, in collection order
    unit_group: dict[str, str | None] = field(default_factory=dict)
    slots: dict[str, int] = field(default_factory=dict)  # group -> workers it may use
    bound: bool = False  # True when groups are confined to their share of workers

    def add(self, unit: str, group: str | None, nodeid: str) -> None:
        self.unit_of[nodeid] = unit
        self.units.setdefault(unit, []).append(nodeid)
        self.unit_group[unit] = group


def _dhondt(sizes: dict[str, int], seats: int, caps: dict[str, int]) -> dict[str, int]:
    """``seats`` shared among groups in proportion to ``sizes``, at least one each, at most
    ``caps`` each (ties go to the group named first)."""
    slots = {g: 1 for g in sizes}
    for _ in range(seats - len(sizes)):
        open_groups = [g for g in sizes if slots[g] < caps[g]]
        if not open_groups:
            break
        best = max(open_groups, key=lambda g: (sizes[g] / (slots[g] + 1), -list(sizes).index(g)))
        slots[best] += 1
    return slots


def _chunks(items: list[str], parts: int) -> list[list[str]]:
    """``items`` cut into ``parts`` contiguous chunks of nearly equal size."""
    parts = max(1, min(parts, len(items)))
    size, extra = divmod(len(items), parts)
    out, start = [], 0
    for index in range(parts):
        end = start + size + (1 if index < extra else 0)
        out.append(items[start:end])
        start = end
    return out


def partition(entries: Sequence[Entry], workers: int) -> Partition:
    """Units of work for ``workers`` workers (see the module docstring)."""
    result = Partition()
    groups: dict[str, list[Entry]] = {}
    for entry in entries:
        if entry.group is not None:
            groups.setdefault(entry.group, []).append(entry)
    if len(groups) >= workers or workers <= 1:
        for entry in entries:
            result.add(entry.group if entry.group is not None else f"test:{entry.nodeid}", entry.group, entry.nodeid)
        result.slots = {g: 1 for g in groups}
        return result
    # Fewer groups than workers: spread each group over its share.
    sizes = {g: len(m) for g, m in groups.items()}
    result.slots = _dhondt(sizes, workers, sizes)
    result.bound = True
    chunk_of: dict[str, str] = {}
    for group, members in groups.items():
        by_plan: dict[str, list[str]] = {}
        for entry in members:
            if entry.plan is not None:
                by_plan.setdefault(entry.plan, []).append(entry.nodeid)
        for plan, nodeids in by_plan.items():
            for index, chunk in enumerate(_chunks(nodeids, result.slots[group])):
                for nodeid in chunk:
                    chunk_of[nodeid] = f"{group}|plan:{plan}:{index}"
    for entry in entries:
        if entry.group is None:
            result.add(f"test:{entry.nodeid}", None, entry.nodeid)
        else:
            result.add(chunk_of.get(entry.nodeid, f"{entry.group}|{entry.nodeid}"), entry.group, entry.nodeid)
    return result


def _work_order(part: Partition, collection: Sequence[str]) -> list[str]:
    """Units, largest first (ties: collection order): a greedy order that balances."""
    position = {nodeid: index for index, nodeid in enumerate(collection)}
    return sorted(part.units, key=lambda u: (-len(part.units[u]), position.get(part.units[u][0], 0)))


def _bind(part: Partition, names: Sequence[Any]) -> dict[str, list[Any]]:
    """The workers (or shards) of each group's share: consecutive, largest group first."""
    sizes = {}
    for unit, group in part.unit_group.items():
        if group is not None:
            sizes[group] = sizes.get(group, 0) + len(part.units[unit])
    bound: dict[str, list[Any]] = {}
    start = 0
    for group in sorted(sizes, key=lambda g: -sizes[g]):
        count = part.slots.get(group, 1)
        bound[group] = [names[(start + i) % len(names)] for i in range(count)]
        start += count
    return bound


def assign_shards(entries: Sequence[Entry], shards: int) -> dict[str, int]:
    """Each test's shard (0-based) out of ``shards``: groups kept whole where there are at
    least as many groups as shards, else spread over a share; balanced by test count;
    deterministic for the same collection."""
    if shards < 1:
        raise ValueError("pytest-diffeval: the number of shards must be >= 1")
    part = partition(entries, shards)
    collection = [e.nodeid for e in entries]
    load = [0] * shards
    bound = _bind(part, list(range(shards))) if part.bound else {}
    out: dict[str, int] = {}
    for unit in _work_order(part, collection):
        group = part.unit_group[unit]
        allowed = bound.get(group) if group is not None else None
        shard = min(allowed or range(shards), key=lambda s: (load[s], s))
        load[shard] += len(part.units[unit])
        for nodeid in part.units[unit]:
            out[nodeid] = shard
    return out


def parse_shard(value: str) -> tuple[int, int]:
    """``"i/N"`` (1-based) as ``(i, N)``; a clear error otherwise."""
    try:
        index, total = (int(v) for v in str(value).split("/"))
    except ValueError:
        raise ValueError(f"pytest-diffeval: --diffeval-shard={value!r} is not i/N (e.g. 2/4)") from None
    if not 1 <= index <= total:
        raise ValueError(f"pytest-diffeval: --diffeval-shard={value}: i must be between 1 and N")
    return index, total


# --------------------------------------------------------------------------- xdist

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


def make_scheduler(config: Any, log: Any, directory: str | Path) -> DecidingScheduling:
    """An xdist scheduler that runs each group's units on its share of the workers in
    sessions with diffeval tests, and schedules other sessions as xdist would."""
    class ModelScheduling(LoadScopeScheduling):  # type: ignore[misc, valid-type]
        """LoadScope scheduling whose scopes are :func:`partition`'s units; a group's units go
        only to the workers of its share (unless all of those are gone)."""

        def __init__(self) -> None:
            super().__init__(config, log)
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
            entries = self.entries if self.entries is not None else read_entries(directory, self.collection)
            if entries is None:  # no worker report (remote workers?): group by module
                entries = [Entry(n, f"module:{n.split('::', 1)[0]}") for n in self.collection]
            self.part = partition(entries, self.numnodes)
            if self.part.bound:
                self.bound = _bind(self.part, sorted(n.gateway.id for n in self.nodes))
            for unit in _work_order(self.part, self.collection):
                self.workqueue[unit] = {nodeid: False for nodeid in self.part.units[unit]}
            for node in self.nodes:
                if not self._assign_work_unit(node):
                    node.shutdown()
            for node in self.nodes:
                self._reschedule(node)
            if not self.workqueue:
                for node in self.nodes:
                    node.shutdown()

    plain = LoadGroupScheduling(config, log) if getattr(config.option, "dist", "load") == "loadgroup" \
        else LoadScheduling(config, log)
    return DecidingScheduling(ModelScheduling(), plain, directory)
