"""Keeping each model's tests together: under ``pytest -n K`` (xdist) and across CI shards
(``--diffeval-splits N --diffeval-group i``), so every model is loaded by as few processes as
possible; CI shards are also balanced by time (:func:`balance`: each test's seconds, each
model's load once per shard that loads it, from the durations file of ``durations``).

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

The functions are pure: the xdist scheduler (``xdist_scheduler``, which sees only node
ids) and each worker (which has the items) compute the same units.  This module does not
import xdist.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

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


def work_order(part: Partition, collection: Sequence[str]) -> list[str]:
    """Units, largest first (ties: collection order): a greedy order that balances."""
    position = {nodeid: index for index, nodeid in enumerate(collection)}
    return sorted(part.units, key=lambda u: (-len(part.units[u]), position.get(part.units[u][0], 0)))


def bind_shares(part: Partition, names: Sequence[Any]) -> dict[str, list[Any]]:
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


@dataclass
class Balance:
    """Shards of a suite: each test's shard (0-based) and each shard's estimated seconds."""

    shard_of: dict[str, int]
    seconds: list[float]
    split_groups: dict[str, int] = field(default_factory=dict)  # group -> shards it was spread over


def _time_chunks(nodeids: list[str], parts: int, cost: Callable[[str], float]) -> list[list[str]]:
    """``nodeids`` cut into ``parts`` contiguous, non-empty chunks of nearly equal total ``cost``."""
    parts = max(1, min(parts, len(nodeids)))
    costs = [cost(n) for n in nodeids]
    total = sum(costs)
    chunks: list[list[str]] = []
    current: list[str] = []
    done = 0.0
    for index, (nodeid, seconds) in enumerate(zip(nodeids, costs)):
        still_to_open = parts - len(chunks) - 1  # chunks after the current one
        if current and still_to_open > 0 and (len(nodeids) - index <= still_to_open
                                              or done + seconds / 2 > total * (len(chunks) + 1) / parts):
            chunks.append(current)
            current = []
        current.append(nodeid)
        done += seconds
    chunks.append(current)
    return chunks


def balance(entries: Sequence[Entry], shards: int, seconds: Callable[[str], float] | None = None,
            loads: dict[str, float] | None = None) -> Balance:
    """Shards balanced by time: a test costs ``seconds(nodeid)`` (1 each without it) and a
    group costs its ``loads[group]`` (a model's load) once on every shard that runs any of its
    tests.  At least as many groups as shards: each group stays whole on one shard; fewer: each
    group is spread over a share of the shards in proportion to its time (D'Hondt), in
    contiguous chunks that each pay the load, and no two groups share a shard while one is free.
    Units are placed longest first on the least loaded shard (ties: the lowest shard), so
    the result depends only on the collection, the times and ``shards``."""
    if shards < 1:
        raise ValueError("pytest-diffeval: the number of shards must be >= 1")
    cost = seconds or (lambda nodeid: 1.0)
    loads = loads or {}
    position = {e.nodeid: i for i, e in enumerate(entries)}
    groups: dict[str, list[str]] = {}
    for entry in entries:
        if entry.group is not None:
            groups.setdefault(entry.group, []).append(entry.nodeid)
    units: list[tuple[bool, float, list[str], str | None]] = []  # (spread, seconds, tests, group)
    spread: dict[str, int] = {}
    if len(groups) >= shards or shards == 1:
        units += [(False, loads.get(g, 0.0) + sum(map(cost, m)), m, g) for g, m in groups.items()]
    else:
        shares = _dhondt({g: sum(map(cost, m)) for g, m in groups.items()}, shards, {g: len(m) for g, m in groups.items()})
        for group, members in groups.items():
            chunks = _time_chunks(members, shares[group], cost)
            spread[group] = len(chunks)
            units += [(True, loads.get(group, 0.0) + sum(map(cost, c)), c, group) for c in chunks]
    units += [(False, cost(e.nodeid), [e.nodeid], None) for e in entries if e.group is None]
    units.sort(key=lambda u: (not u[0], -u[1], position[u[2][0]]))  # spread chunks first: onto shards of their own
    load = [0.0] * shards
    holds: list[set[str]] = [set() for _ in range(shards)]
    out: dict[str, int] = {}
    for is_spread, unit_seconds, nodeids, group in units:
        candidates = list(range(shards))
        if is_spread:
            candidates = ([s for s in candidates if not holds[s]] or [s for s in candidates if group not in holds[s]]
                          or candidates)
        shard = min(candidates, key=lambda s: (load[s], s))
        load[shard] += unit_seconds
        if group is not None:
            holds[shard].add(group)
        for nodeid in nodeids:
            out[nodeid] = shard
    return Balance(out, load, spread)


def assign_shards(entries: Sequence[Entry], shards: int, seconds: Callable[[str], float] | None = None,
                  loads: dict[str, float] | None = None) -> dict[str, int]:
    """Each test's shard (0-based) out of ``shards`` (see :func:`balance`); without times,
    balanced by test count; deterministic for the same collection."""
    return balance(entries, shards, seconds, loads).shard_of


def parse_shard(value: str) -> tuple[int, int]:
    """``"i/N"`` (1-based) as ``(i, N)``; a clear error otherwise."""
    try:
        index, total = (int(v) for v in str(value).split("/"))
    except ValueError:
        raise ValueError(f"pytest-diffeval: --diffeval-shard={value!r} is not i/N (e.g. 2/4)") from None
    if not 1 <= index <= total:
        raise ValueError(f"pytest-diffeval: --diffeval-shard={value}: i must be between 1 and N")
    return index, total


def parse_splits(splits: Any, group: Any, shard: Any = None) -> tuple[int, int] | None:
    """``(group, splits)`` (1-based group) from ``--diffeval-splits N --diffeval-group i``, or
    from ``--diffeval-shard=i/N`` (the same, older spelling); None when not sharded.  A clear
    error for half a pair, both spellings at once, or a group outside 1..N."""
    if shard:
        if splits is not None or group is not None:
            raise ValueError(f"pytest-diffeval: --diffeval-shard={shard} and --diffeval-splits/--diffeval-group "
                             "were both given; fix: use --diffeval-splits N --diffeval-group i alone "
                             "(--diffeval-shard=i/N means the same)")
        return parse_shard(shard)
    if splits is None and group is None:
        return None
    if splits is None or group is None:
        raise ValueError("pytest-diffeval: --diffeval-splits and --diffeval-group go together; fix: pass both, "
                         "e.g. --diffeval-splits 4 --diffeval-group 2 (1-based, as pytest-split)")
    try:
        total, index = int(splits), int(group)
    except ValueError:
        raise ValueError(f"pytest-diffeval: --diffeval-splits={splits!r} --diffeval-group={group!r} are not numbers; "
                         "fix: e.g. --diffeval-splits 4 --diffeval-group 2") from None
    if total < 1 or not 1 <= index <= total:
        raise ValueError(f"pytest-diffeval: --diffeval-group={index} with --diffeval-splits={total}: the group must "
                         f"be between 1 and {max(total, 1)} (1-based, as pytest-split); fix: pass a group in that range")
    return index, total
