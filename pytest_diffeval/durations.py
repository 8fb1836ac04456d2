"""The durations file: each test's seconds and each model group's load cost, recorded by a run
with ``--diffeval-store-durations`` and committed, so that CI shards (``--diffeval-splits N
--diffeval-group i``) are balanced by time, and the GitHub Actions matrix is sized to a target
wall time (``python -m pytest_diffeval shards plan --target 20m``).

pytest-split keeps ``{test: seconds}``; a diffusion suite also pays each model's load once per
runner that runs any of its tests (a 3-minute SDXL load is not in any test's own time), so
this file records, as JSON::

    {"format": "pytest-diffeval durations 1",
     "tests": {"<node id>": {"seconds": 1.5, "group": "model:<name>"}, ...},
     "loads": {"model:<name>": 180.0, ...}}

A test's seconds are its setup, call and teardown minus the pipeline loads inside them; a
group's load is the pipeline-load seconds its tests paid in one process (the largest over
processes).  Written atomically; a file that is not this format is a :class:`DurationsError`
naming the file, the entry and the fix."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ._io import atomic_write_text
from .exceptions import DurationsError
from .scheduling import Balance, Entry, balance

FORMAT = "pytest-diffeval durations 1"
DEFAULT_FILE = ".diffeval-durations.json"
SPLIT_GROUP = "split"  # the group recorded for a diffeval_split test: it runs on every shard, 1/N of it each
MAX_RUNNERS = 256  # GitHub Actions' limit of jobs per matrix
FIX = ("fix: write it again with `pytest --diffeval-store-durations` (a cold run: --diffeval-no-cache) and commit "
       "it, or point --diffeval-durations at the right file")


@dataclass
class Durations:
    """What a durations file holds (see the module docstring)."""

    tests: dict[str, float] = field(default_factory=dict)
    groups: dict[str, str | None] = field(default_factory=dict)  # test -> its group when recorded
    loads: dict[str, float] = field(default_factory=dict)

    def seconds(self, nodeid: str) -> float:
        """A test's recorded seconds; a test not recorded counts the mean of those that are
        (1 s when none is), as pytest-split does."""
        if nodeid in self.tests:
            return self.tests[nodeid]
        return sum(self.tests.values()) / len(self.tests) if self.tests else 1.0

    def balance(self, entries: list[Entry], shards: int) -> Balance:
        """:func:`scheduling.balance` with these times and loads."""
        return balance(entries, shards, self.seconds, self.loads)

    def entries(self) -> list[Entry]:
        """The recorded tests as scheduling entries (in the file's order), split tests left out."""
        return [Entry(nodeid, self.groups.get(nodeid)) for nodeid in self.tests
                if self.groups.get(nodeid) != SPLIT_GROUP]

    def split_seconds(self) -> float:
        """The seconds of the ``diffeval_split`` tests (shared by all shards)."""
        return sum(s for nodeid, s in self.tests.items() if self.groups.get(nodeid) == SPLIT_GROUP)


def _seconds(value: Any, path: Path, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise DurationsError(f"pytest-diffeval: durations file {path}: {where} is {value!r}, not a number of seconds "
                             f">= 0; {FIX}")
    return float(value)


def read_durations(path: str | Path) -> Durations:
    """The durations file at ``path`` (a :class:`DurationsError` naming it when it is missing,
    not JSON, not this format or holds a bad value)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DurationsError(f"pytest-diffeval: durations file {path} does not exist; fix: write it with "
                             "`pytest --diffeval-store-durations` (a cold run: --diffeval-no-cache) and commit it, "
                             "or leave --diffeval-durations out to balance by test count") from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise DurationsError(f"pytest-diffeval: durations file {path} cannot be read as JSON ({exc}); {FIX}") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        found = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise DurationsError(f"pytest-diffeval: durations file {path} is not a pytest-diffeval durations file "
                             f"(format {found!r}, expected {FORMAT!r}; pytest-split's .test_durations is another "
                             f"format); {FIX}")
    tests, loads = data.get("tests", {}), data.get("loads", {})
    if not isinstance(tests, dict) or not isinstance(loads, dict):
        raise DurationsError(f"pytest-diffeval: durations file {path}: 'tests' and 'loads' must be objects; {FIX}")
    out = Durations()
    for nodeid, entry in tests.items():
        if not isinstance(entry, dict):
            raise DurationsError(f"pytest-diffeval: durations file {path}: tests[{nodeid!r}] is {entry!r}, not "
                                 f"{{\"seconds\": ..., \"group\": ...}}; {FIX}")
        out.tests[nodeid] = _seconds(entry.get("seconds"), path, f"tests[{nodeid!r}] 'seconds'")
        group = entry.get("group")
        if group is not None and not isinstance(group, str):
            raise DurationsError(f"pytest-diffeval: durations file {path}: tests[{nodeid!r}] 'group' is {group!r}, "
                                 f"not a string or null; {FIX}")
        out.groups[nodeid] = group
    for group, seconds in loads.items():
        out.loads[group] = _seconds(seconds, path, f"loads[{group!r}]")
    return out


def write_durations(path: str | Path, durations: Durations) -> None:
    """Write ``durations`` atomically, sorted (a re-recording changes only the numbers)."""
    data = {"format": FORMAT,
            "tests": {n: {"seconds": round(durations.tests[n], 3), "group": durations.groups.get(n)}
                      for n in sorted(durations.tests)},
            "loads": {g: round(s, 3) for g, s in sorted(durations.loads.items())}}
    atomic_write_text(path, json.dumps(data, indent=1) + "\n")


@dataclass
class Recorder:
    """Collects each finished test's timing (from its reports, on the controller under ``-n``)."""

    tests: dict[str, float] = field(default_factory=dict)
    groups: dict[str, str | None] = field(default_factory=dict)
    _loads: dict[tuple[str, str], float] = field(default_factory=dict)  # (group, process) -> load seconds

    def add(self, nodeid: str, duration: float, timing: dict[str, Any]) -> None:
        """One phase report: its ``duration`` and the plugin's ``timing`` of it (group, load
        seconds inside it, the process that ran it)."""
        load = float(timing.get("load_s") or 0.0)
        group = timing.get("group")
        self.tests[nodeid] = self.tests.get(nodeid, 0.0) + max(0.0, float(duration) - load)
        self.groups[nodeid] = group
        if load > 0:
            key = (group or f"test:{nodeid}", str(timing.get("process")))
            self._loads[key] = self._loads.get(key, 0.0) + load

    def loads(self) -> dict[str, float]:
        """Each group's load seconds in one process (the largest over the processes)."""
        out: dict[str, float] = {}
        for (group, _), seconds in self._loads.items():
            out[group] = max(out.get(group, 0.0), seconds)
        return out

    def merged_into(self, old: Durations | None) -> Durations:
        """``old`` updated with this run: the tests it ran get their new seconds and group, the
        groups it loaded their new load cost; everything else is kept."""
        out = Durations(dict(old.tests), dict(old.groups), dict(old.loads)) if old else Durations()
        out.tests.update(self.tests)
        out.groups.update(self.groups)
        out.loads.update(self.loads())
        return out


_UNITS = {"s": 1, "m": 60, "h": 3600}


def parse_wall_time(text: str) -> float:
    """``"20m"``, ``"1h30m"``, ``"90s"`` or plain seconds (``"1200"``) as seconds."""
    value = str(text).strip().lower()
    if re.fullmatch(r"\d+(\.\d+)?", value):
        return float(value)
    parts = re.findall(r"(\d+(?:\.\d+)?)([hms])", value)
    if not parts or "".join(n + u for n, u in parts) != value:
        raise DurationsError(f"pytest-diffeval: target wall time {text!r} is not a duration; fix: e.g. 20m, 1h30m, "
                             "90s or 1200 (seconds)")
    return sum(float(n) * _UNITS[u] for n, u in parts)


def format_seconds(seconds: float) -> str:
    """``1h02m03s`` / ``2m03s`` / ``4.5s``."""
    if seconds < 60:
        return f"{seconds:.3g}s"
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"


@dataclass
class MatrixPlan:
    """The fewest runners whose longest estimated time meets the target (``met``), or the
    count with the shortest longest runner when none does."""

    runners: int
    met: bool
    balance: Balance


def plan_matrix(durations: Durations, target_s: float, overhead_s: float = 0.0,
                entries: Iterable[Entry] | None = None, max_runners: int = MAX_RUNNERS) -> MatrixPlan:
    """The GitHub Actions matrix size for ``target_s`` wall time per runner: the smallest N
    whose time-balanced shards (each also paying ``overhead_s``: checkout, install, imports,
    and 1/N of the ``diffeval_split`` tests) all fit, tried up to ``max_runners`` (GitHub's 256)
    or one runner per test."""
    listed = list(entries) if entries is not None else durations.entries()
    shared = durations.split_seconds()
    if not listed and not shared:
        raise DurationsError("pytest-diffeval: the durations file records no test; fix: write it with "
                             "`pytest --diffeval-store-durations`")
    best: MatrixPlan | None = None
    for runners in range(1, max_runners + 1 if shared else min(max_runners, len(listed)) + 1):
        result = durations.balance(listed, runners)
        result.seconds = [s + shared / runners + durations.loads.get(SPLIT_GROUP, 0.0) if shared else s
                          for s in result.seconds]
        longest = max(result.seconds) + overhead_s
        if longest <= target_s:
            return MatrixPlan(runners, True, result)
        if best is None or longest < max(best.balance.seconds) + overhead_s:
            best = MatrixPlan(runners, False, result)
    assert best is not None
    return best


def matrix_text(plan: MatrixPlan, target_s: float, overhead_s: float, path: str | Path) -> str:
    """What ``shards plan`` prints: the verdict, each runner's estimate and the workflow lines."""
    seconds = [s + overhead_s for s in plan.balance.seconds]
    lines = []
    if plan.met:
        lines.append(f"{plan.runners} runner(s) meet the target of {format_seconds(target_s)} per runner "
                     f"(longest ~{format_seconds(max(seconds))}, from {path})")
    else:
        lines.append(f"no matrix of up to {MAX_RUNNERS} runners meets {format_seconds(target_s)}: the closest is "
                     f"{plan.runners} runner(s) with the longest ~{format_seconds(max(seconds))} (a model's load plus "
                     "its tests on one runner sets the floor); raise the target or split that model's tests")
    lines.append("estimated per runner: " + ", ".join(f"{i}: {format_seconds(s)}" for i, s in enumerate(seconds, 1)))
    lines += ["GitHub Actions:", "  strategy:", "    matrix:",
              f"      group: [{', '.join(str(i) for i in range(1, plan.runners + 1))}]",
              f"  run: pytest --diffeval-splits {plan.runners} --diffeval-group ${{{{ matrix.group }}}} "
              f"--diffeval-durations {path}"]
    return "\n".join(lines)
