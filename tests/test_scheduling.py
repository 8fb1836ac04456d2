"""Under ``pytest -n K``: each model's tests stay on as few workers as possible (one per
model when there are at least as many models as workers), and a model's tests spread
over the workers when there are fewer models than workers.  xdist 3.8's own
``--dist loadgroup`` does nothing on pytest 9.2, hence pytest-diffeval's scheduler."""

from __future__ import annotations

import re
import shutil
import textwrap
from pathlib import Path
from typing import Any

import pytest
from test_speed import calls, counting_project

from pytest_diffeval.scheduling import Entry, entries_of, partition


def entries(spec: list[tuple[str, str | None, str | None]]) -> list[Entry]:
    return [Entry(nodeid, group, plan) for nodeid, group, plan in spec]


def test_as_many_models_as_workers_one_unit_per_model() -> None:
    part = partition(entries([("a::1", "model:A", None), ("b::1", "model:B", None), ("a::2", "model:A", None),
                              ("c::1", None, None), ("c::2", None, None)]), 2)
    assert part.units == {"model:A": ["a::1", "a::2"], "model:B": ["b::1"], "test:c::1": ["c::1"],
                          "test:c::2": ["c::2"]}
    assert not part.bound


def test_fewer_models_than_workers_spreads_them_in_proportion_keeping_plan_chunks() -> None:
    spec = [(f"p::{i}", "model:A", "plan1") for i in range(6)] + [("a::x", "model:A", None), ("a::y", "model:A", None)]
    spec += [("b::1", "model:B", None), ("b::2", "model:B", None)]
    part = partition(entries(spec), 4)
    assert part.bound and part.slots == {"model:A": 3, "model:B": 1}  # 8 tests get 3 workers, 2 tests get 1
    chunks = [u for u in part.units if "plan:" in u]
    assert [part.units[u] for u in chunks] == [["p::0", "p::1"], ["p::2", "p::3"], ["p::4", "p::5"]]
    assert part.units["model:A|a::x"] == ["a::x"] and part.unit_group["model:B|b::1"] == "model:B"


class Item:
    """What scheduling reads from a pytest item."""

    def __init__(self, nodeid: str, marks: dict[str, Any] | None = None, fixtures: tuple[str, ...] = ()) -> None:
        self.nodeid, self.marks, self.fixturenames = nodeid, marks or {}, fixtures

    def get_closest_marker(self, name: str) -> Any:
        return self.marks.get(name)


class Mark:
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args, self.kwargs = args, kwargs


def test_groups_come_from_markers_the_module_or_nothing() -> None:
    items = [
        Item("t1.py::a", {"diffeval_model": Mark("M1")}),
        Item("t1.py::b", fixtures=("generate",)),  # its module names one model: joins it
        Item("t1.py::c", {"diffeval_plan": Mark("M1", ["x"])}),
        Item("t2.py::a", fixtures=("diffusion_pipeline",)),  # no model declared in t2: its module
        Item("t2.py::b", {"xdist_group": Mark("slow")}),
        Item("t3.py::a"),  # no model, no fixture: free
        Item("t3.py::gpu", {"gpu": Mark()}, fixtures=("generate",)),
    ]
    got = entries_of(items, skipped=lambda item: item.get_closest_marker("gpu") is not None)
    assert [e.group for e in got] == ["model:M1", "model:M1", "model:M1", "module:t2.py", "group:slow", None, None]
    assert got[2].plan is not None and got[0].plan is None


TWO_MODELS = """
    import os
    import pytest
    from conftest import A, B

    CASES = [pytest.param(m, i, marks=pytest.mark.diffeval_model(m), id=f"{os.path.basename(m)}-{i}")
             for i in range(4) for m in (A, B)]  # interleaved: plain load scheduling mixes them

    @pytest.mark.parametrize("model, i", CASES)
    def test_model(diffusion_pipeline, model, i):
        diffusion_pipeline(model)
        import torch  # the workers share the cores (--diffeval-worker-threads=auto)
        assert torch.get_num_threads() == max(1, len(os.sched_getaffinity(0)) // 2)
"""


def loads_per_worker(result: pytest.RunResult) -> dict[str, dict[str, int]]:
    """``{worker: {model folder: loads}}`` from the controller's -v summary."""
    out: dict[str, dict[str, int]] = {}
    for worker, loads in re.findall(r"diffeval loads in (gw\d+): pipelines ([^;\n]*)", result.stdout.str()):
        out[worker] = {Path(k).name: int(v) for k, v in (p.rsplit(": ", 1) for p in loads.split(", "))}
    return out


def test_two_models_on_two_workers_each_model_is_loaded_by_one_worker(
        user_project: pytest.Pytester, tiny_models: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    for name in ("model-a", "model-b"):
        shutil.copytree(tiny_models["pipe"], user_project.path / name)
    user_project.makeconftest(f"A = {str(user_project.path / 'model-a')!r}\nB = {str(user_project.path / 'model-b')!r}\n")
    user_project.makepyfile(test_models=textwrap.dedent(TWO_MODELS))
    result = user_project.runpytest("-v", "-n", "2")
    result.assert_outcomes(passed=8)
    loads = loads_per_worker(result)
    assert sorted(loads) == ["gw0", "gw1"], result.stdout.str()
    assert sorted(m for worker in loads.values() for m in worker) == ["model-a", "model-b"]  # each model: one worker
    assert all(len(models) == 1 and set(models.values()) == {1} for models in loads.values())


ONE_MODEL = """
    import pytest
    from conftest import PIPE
    from pytest_diffeval import compute_metric

    PROMPTS = [f"prompt number {i}" for i in range(8)]

    @pytest.mark.diffeval_plan(PIPE, PROMPTS, seeds=[0], num_inference_steps=2)
    @pytest.mark.parametrize("prompt", PROMPTS)
    def test_prompt(generate, prompt):
        generate(PIPE, [prompt], seeds=[0], num_inference_steps=2)

    @pytest.mark.parametrize("i", range(2))
    def test_set(generate, i):
        generate(PIPE, [f"set {i} {j}" for j in range(4)], seeds=[0], num_inference_steps=2)
"""


def test_one_model_on_two_workers_spreads_and_each_worker_generates_only_its_plan_chunk(
        user_project: pytest.Pytester, tiny_models: dict[str, Path]) -> None:
    project = counting_project(user_project, tiny_models)
    project.makepyfile(test_one=textwrap.dedent(ONE_MODEL))
    result = project.runpytest("-v", "-n", "2", "--diffeval-no-cache", "--diffeval-batch-size=8")
    result.assert_outcomes(passed=10)
    loads = loads_per_worker(result)
    assert loads == {"gw0": {"tiny-sd": 1}, "gw1": {"tiny-sd": 1}}, result.stdout.str()  # spread: one load each
    per_worker = {w: c for w, c in calls(project).items() if w != "main"}
    # Each worker generated its own half of the plan in one batch of 4 (then test_set's
    # batches of 4, wherever they ran): 16 samples in all, none generated twice.
    assert sorted(per_worker) == ["gw0", "gw1"] and all(c[0] == 4 for c in per_worker.values()), per_worker
    assert sum(sum(c) for c in per_worker.values()) == 8 + 2 * 4, per_worker
    assert sorted(re.findall(r"diffeval plans in gw\d: (\d) planned tests", result.stdout.str())) == ["4", "4"]


def test_an_unknown_dist_mode_is_a_usage_error(pytester: pytest.Pytester) -> None:
    result = pytester.runpytest("-n", "2", "--diffeval-dist=nonsense")
    assert result.ret != 0 and "--diffeval-dist='nonsense': use 'model' or 'xdist'" in result.stderr.str()
