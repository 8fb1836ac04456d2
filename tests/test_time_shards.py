"""CI shards balanced by time (``--diffeval-splits N --diffeval-group i``): each model's tests
together, each model's load counted once per shard that loads it, the durations file that
records both, and the matrix size for a target wall time (``shards plan``)."""

from __future__ import annotations

import json
import random
import textwrap
from pathlib import Path

import pytest

from pytest_diffeval.__main__ import main
from pytest_diffeval.durations import (
    FORMAT,
    Durations,
    Recorder,
    parse_wall_time,
    plan_matrix,
    read_durations,
    write_durations,
)
from pytest_diffeval.exceptions import DurationsError
from pytest_diffeval.scheduling import Entry, balance, parse_splits


def _suite(rng: random.Random, models: int, free: int) -> tuple[list[Entry], dict[str, float], dict[str, float]]:
    entries, seconds = [], {}
    for m in range(models):
        for i in range(rng.randint(1, 12)):
            entries.append(Entry(f"t{m}.py::test[{i}]", f"model:M{m}"))
            seconds[entries[-1].nodeid] = rng.uniform(0.1, 30)
    for i in range(free):
        entries.append(Entry(f"free.py::test[{i}]", None))
        seconds[entries[-1].nodeid] = rng.uniform(0.1, 5)
    rng.shuffle(entries)
    return entries, seconds, {f"model:M{m}": rng.choice([0.0, 5.0, 180.0]) for m in range(models)}


@pytest.mark.parametrize("seed", range(6))
def test_every_test_lands_in_exactly_one_group_models_kept_together_deterministically(seed: int) -> None:
    rng = random.Random(seed)
    entries, seconds, loads = _suite(rng, models=rng.randint(1, 7), free=rng.randint(0, 6))
    for shards in (1, 2, 3, 5, 8):
        result = balance(entries, shards, seconds.__getitem__, loads)
        assert set(result.shard_of) == {e.nodeid for e in entries}  # every test, once (a dict: one shard each)
        assert set(result.shard_of.values()) <= set(range(shards))
        assert balance(list(entries), shards, seconds.__getitem__, dict(loads)) == result  # deterministic
        groups = {e.group for e in entries if e.group}
        on = {g: {result.shard_of[e.nodeid] for e in entries if e.group == g} for g in groups}
        if len(groups) >= shards:
            assert all(len(s) == 1 for s in on.values())  # a model's tests never span two runners
        else:  # spread over a share of their own: no two models on one runner
            assert all(not on[a] & on[b] for a in groups for b in groups if a != b)
        # each shard's estimate is its tests' seconds plus each model's load once per shard that loads it
        for shard in range(shards):
            mine = [e for e in entries if result.shard_of[e.nodeid] == shard]
            expected = sum(seconds[e.nodeid] for e in mine) + sum(loads[g] for g in {e.group for e in mine if e.group})
            assert result.seconds[shard] == pytest.approx(expected)


def test_a_slow_model_load_counts_so_its_runner_gets_fewer_tests() -> None:
    """SDXL: 2 quick tests after a 3-minute load; two other models with 100 and 80 one-second
    tests.  By count, SDXL's 2 tests join the 80 (a 262 s runner against 100 s); by time,
    SDXL runs alone and the other two share a runner."""
    entries = ([Entry(f"sdxl.py::t{i}", "model:sdxl") for i in range(2)]
               + [Entry(f"b.py::t{i}", "model:b") for i in range(100)]
               + [Entry(f"c.py::t{i}", "model:c") for i in range(80)])
    loads = {"model:sdxl": 180.0}
    by_count = balance(entries, 2)
    by_time = balance(entries, 2, lambda nodeid: 1.0, loads)
    shard = by_time.shard_of
    assert shard["sdxl.py::t0"] != shard["b.py::t0"] and shard["sdxl.py::t0"] != shard["c.py::t0"]
    assert by_count.shard_of["sdxl.py::t0"] == by_count.shard_of["c.py::t0"]

    def longest(assigned: dict[str, int]) -> float:
        per = [0.0, 0.0]
        for shard_index in (0, 1):
            mine = [n for n, s in assigned.items() if s == shard_index]
            per[shard_index] = len(mine) + (180.0 if any(n.startswith("sdxl") for n in mine) else 0.0)
        return max(per)

    assert longest(by_time.shard_of) < longest(by_count.shard_of)
    assert max(by_time.seconds) == longest(by_time.shard_of)


def test_one_model_over_more_runners_pays_its_load_on_each() -> None:
    entries = [Entry(f"m.py::t{i}", "model:m") for i in range(9)]
    result = balance(entries, 3, lambda nodeid: 10.0, {"model:m": 60.0})
    assert result.split_groups == {"model:m": 3}
    assert sorted(result.seconds) == [60.0 + 30.0] * 3  # 3 tests and one load each


def test_splits_options_are_checked() -> None:
    assert parse_splits(4, 2) == (2, 4) and parse_splits(None, None, "3/4") == (3, 4)
    assert parse_splits(None, None) is None
    for args, message in [((4, None), "go together"), ((4, 5), "between 1 and 4"), ((0, 1), "between 1 and"),
                          ((2, 1, "1/2"), "both given")]:
        with pytest.raises(ValueError, match=message):
            parse_splits(*args)


# --------------------------------------------------------------------------- the durations file


def test_durations_file_round_trip_and_recorder(tmp_path: Path) -> None:
    recorder = Recorder()
    for phase_s, load_s, process in [(0.5, 0.0, 1), (190.0, 180.0, 1), (0.25, 0.0, 1)]:  # setup, call, teardown
        recorder.add("m.py::t0", phase_s, {"group": "model:m", "load_s": load_s, "process": process})
    recorder.add("m.py::t1", 181.0, {"group": "model:m", "load_s": 175.0, "process": 2})  # another worker loaded too
    old = Durations({"gone.py::t": 3.0}, {"gone.py::t": None}, {"model:old": 9.0})
    merged = recorder.merged_into(old)
    path = tmp_path / "durations.json"
    write_durations(path, merged)
    back = read_durations(path)
    assert back.tests == {"gone.py::t": 3.0, "m.py::t0": 10.75, "m.py::t1": 6.0}
    assert back.loads == {"model:old": 9.0, "model:m": 180.0}  # the largest one process paid
    assert back.groups["m.py::t0"] == "model:m" and back.seconds("unknown") == pytest.approx((3 + 10.75 + 6) / 3)


@pytest.mark.parametrize("content, message", [
    ("{not json", "cannot be read as JSON"),
    (json.dumps({"tests/test_a.py::test_x": 1.5}), "is not a pytest-diffeval durations file (format None"),
    (json.dumps({"format": FORMAT, "tests": {"t": {"seconds": -1}}}), "tests['t'] 'seconds' is -1, not a number"),
    (json.dumps({"format": FORMAT, "tests": {"t": {"seconds": 1, "group": 3}}}), "tests['t'] 'group' is 3"),
    (json.dumps({"format": FORMAT, "loads": {"model:m": "3m"}}), "loads['model:m'] is '3m', not a number"),
    (json.dumps({"format": FORMAT, "tests": {"t": 1.5}}), "tests['t'] is 1.5"),
], ids=["not-json", "pytest-split-format", "negative", "group-type", "load-string", "bare-number"])
def test_a_bad_durations_file_is_an_error_naming_it(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / ".diffeval-durations.json"
    path.write_text(content)
    with pytest.raises(DurationsError, match="durations file") as info:
        read_durations(path)
    assert str(path) in str(info.value) and message in str(info.value)
    assert "fix: write it again with `pytest --diffeval-store-durations`" in str(info.value)
    with pytest.raises(DurationsError, match="does not exist"):
        read_durations(tmp_path / "absent.json")


# --------------------------------------------------------------------------- the matrix size


def test_shards_plan_prints_the_fewest_runners_that_meet_the_target(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rng = random.Random(7)
    entries, seconds, loads = _suite(rng, models=6, free=5)
    durations = Durations({e.nodeid: seconds[e.nodeid] for e in entries}, {e.nodeid: e.group for e in entries}, loads)
    path = tmp_path / "durations.json"
    write_durations(path, durations)
    target = parse_wall_time("4m")
    assert target == 240.0 and parse_wall_time("1h30m") == 5400.0 and parse_wall_time("90") == 90.0
    stored = read_durations(path)
    planned = plan_matrix(stored, target)
    assert planned.met and max(planned.balance.seconds) <= target
    if planned.runners > 1:
        assert max(stored.balance(stored.entries(), planned.runners - 1).seconds) > target  # the fewest
    assert main(["shards", "plan", "--target", "4m", "--durations", str(path)]) == 0
    out = capsys.readouterr().out
    assert f"{planned.runners} runner(s) meet the target of 4m00s" in out
    assert f"group: [{', '.join(str(i) for i in range(1, planned.runners + 1))}]" in out
    assert f"--diffeval-splits {planned.runners} --diffeval-group ${{{{ matrix.group }}}}" in out
    floor = max(loads[g] + sum(seconds[e.nodeid] for e in entries if e.group == g) for g in loads) / 12
    assert main(["shards", "plan", "--target", f"{floor:.0f}s", "--durations", str(path)]) == 1  # unreachable
    assert "no matrix of up to 256 runners meets" in capsys.readouterr().out
    assert main(["shards", "plan", "--target", "soon", "--durations", str(path)]) == 2
    assert "target wall time 'soon' is not a duration" in capsys.readouterr().err


def test_a_split_test_counts_one_nth_on_every_runner() -> None:
    """A ``diffeval_split`` test runs on every shard, each making 1/N of its samples."""
    durations = Durations({"t.py::split": 600.0, "t.py::quick": 1.0}, {"t.py::split": "split", "t.py::quick": None},
                          {"split": 20.0})
    planned = plan_matrix(durations, 240.0)
    assert planned.met and 600.0 / planned.runners + 20.0 <= max(planned.balance.seconds) <= 240.0
    assert 600.0 / (planned.runners - 1) + 20.0 > 240.0  # the fewest
    assert [e.nodeid for e in durations.entries()] == ["t.py::quick"]  # not balanced as one test


SHARDED = """
    import pytest

    @pytest.mark.diffeval_model("model-a")
    @pytest.mark.parametrize("i", range(3))
    def test_a(i):
        pass

    @pytest.mark.diffeval_model("model-b")
    @pytest.mark.parametrize("i", range(3))
    def test_b(i):
        pass

    @pytest.mark.diffeval_model("model-c")
    def test_c():
        pass
"""


def test_splits_and_group_select_by_the_durations_file(pytester: pytest.Pytester) -> None:
    """model-c's one test loads for 100 s: it gets a runner to itself, a and b share the other."""
    pytester.makepyfile(test_sharded=textwrap.dedent(SHARDED))
    tests = {f"test_sharded.py::test_{m}[{i}]": ("model:model-" + m) for m in "ab" for i in range(3)}
    tests["test_sharded.py::test_c"] = "model:model-c"
    write_durations(pytester.path / ".diffeval-durations.json",
                    Durations({n: 1.0 for n in tests}, tests, {"model:model-c": 100.0}))
    selected = []
    for group in (1, 2):
        result = pytester.runpytest("--co", "-q", "--diffeval-splits", "2", "--diffeval-group", str(group))
        selected.append({line for line in result.outlines if "::" in line})
    assert not selected[0] & selected[1] and selected[0] | selected[1] == set(tests)
    assert {"test_sharded.py::test_c"} in selected
    bad = pytester.runpytest("--diffeval-splits", "2", "--diffeval-group", "3")
    assert bad.ret != 0
    bad.stderr.fnmatch_lines(["*--diffeval-group=3 with --diffeval-splits=2: the group must be between 1 and 2*"])
    (pytester.path / "other.json").write_text("[]")
    bad = pytester.runpytest("--diffeval-splits", "2", "--diffeval-group", "1", "--diffeval-durations", "other.json")
    assert bad.ret != 0
    bad.stderr.fnmatch_lines([f"*durations file {pytester.path / 'other.json'} is not a pytest-diffeval durations*"])


LOADING = """
    import time
    import uuid

    import pytest
    from conftest import PIPE

    def slow_load(*args, **kwargs):
        time.sleep(0.4)
        return object()

    @pytest.mark.diffeval_model("slow-model")
    def test_loads(diffusion_pipeline, monkeypatch):
        monkeypatch.setattr("pytest_diffeval.pipelines.cache.load_pipeline", slow_load)
        diffusion_pipeline(PIPE, cache_buster=str(uuid.uuid4()))  # a load of its own: another identity

    @pytest.mark.diffeval_model("slow-model")
    def test_reuses():
        pass
"""


def test_store_durations_times_model_loads_apart_from_tests(user_project: pytest.Pytester) -> None:
    """The load is timed where pipelines load: it goes to the model's load cost, not the test's."""
    user_project.makepyfile(test_loading=textwrap.dedent(LOADING))
    result = user_project.runpytest("--diffeval-store-durations", "-p", "no:randomly")
    result.assert_outcomes(passed=2)
    stored = read_durations(user_project.path / ".diffeval-durations.json")
    assert stored.loads["model:slow-model"] >= 0.4
    assert stored.tests["test_loading.py::test_loads"] < 0.4  # its own time, without the load
    assert stored.groups == dict.fromkeys(["test_loading.py::test_loads", "test_loading.py::test_reuses"],
                                          "model:slow-model")
