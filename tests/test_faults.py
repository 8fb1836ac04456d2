"""Untrusted input and interrupted runs: nothing executed, nothing lost."""

from __future__ import annotations

import ast
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import pytest_diffeval
from pytest_diffeval.baselines import read_baseline_file

PACKAGE = Path(pytest_diffeval.__file__).parent

CHEAP_TESTS = """
import os
import time
import numpy as np
import pytest
from pytest_diffeval import ImageSet
from pytest_diffeval.metrics import register_metric

OFFSET = float(os.environ.get("OFFSET", "0"))

@register_metric("level", absolute_tolerance=0.5)
def level(images):
    time.sleep(float(os.environ.get("SLOW", "0")))  # stretches the write phase for the kill test
    return images.images.reshape(len(images), -1).mean(axis=1) + OFFSET

@register_metric("spread", absolute_tolerance=0.5)
def spread(images):
    return images.images.reshape(len(images), -1).std(axis=1) + OFFSET

@pytest.mark.parametrize("case", {ids})
def test_case(diffeval_baseline, case):
    rng = np.random.default_rng(sum(map(ord, case)))
    images = ImageSet(images=rng.integers(0, 255, (4, 8, 8, 3), dtype=np.uint8), prompts=["a", "b", "c", "d"],
                      seeds=[0] * 4, nonfinite=[False] * 4)
    diffeval_baseline.assert_no_regression(images, ["level", "spread"])
"""


def cheap_project(pytester: pytest.Pytester, ids: list[str]) -> Path:
    pytester.makepyfile(test_cheap=CHEAP_TESTS.format(ids=repr(ids)))
    return pytester.path


def run(path: Path, *args: str, offset: float = 0.0) -> subprocess.CompletedProcess:
    env = {**os.environ, "OFFSET": str(offset)}
    env.pop("PYTEST_XDIST_WORKER", None)
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args], cwd=path, env=env,
                          capture_output=True, text=True, timeout=300)


def stored_values(path: Path) -> dict[tuple[str, str], float]:
    values = {}
    for file in (path / "baselines").rglob("*.json"):
        data = read_baseline_file(file)  # raises if any file is half-written
        for metric, check in data["checks"].items():
            [entry] = check["hardware"].values()
            values[(file.name, metric)] = entry["value"]
    return values


UNPICKLING_MODULES = {"pickle", "_pickle", "cPickle", "dill", "joblib", "cloudpickle", "shelve", "marshal"}
# Calls that unpickle unless told weights_only=True (torch.jit.load runs TorchScript: never allowed).
NEEDS_WEIGHTS_ONLY = {"torch.load", "torch.serialization.load"}
NEVER = {"torch.jit.load", "torch.jit._serialization.load", "pandas.read_pickle"}


def _aliases(tree: ast.AST) -> dict[str, str]:
    """Local name -> the dotted name it stands for, from the module's imports."""
    aliases: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                aliases[alias.asname or alias.name.split(".")[0]] = alias.name if alias.asname else alias.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            for alias in node.names:
                aliases[alias.asname or alias.name] = f"{node.module}.{alias.name}"
    return aliases


def _dotted(node: ast.AST, aliases: dict[str, str]) -> str | None:
    """``torch.jit.load`` / ``L`` (from torch import load as L) -> the full dotted name."""
    if isinstance(node, ast.Name):
        return aliases.get(node.id, node.id)
    if isinstance(node, ast.Attribute):
        base = _dotted(node.value, aliases)
        return f"{base}.{node.attr}" if base else None
    if isinstance(node, ast.Call) and _dotted(node.func, aliases) == "getattr" and len(node.args) >= 2 \
            and isinstance(node.args[1], ast.Constant) and isinstance(node.args[1].value, str):
        base = _dotted(node.args[0], aliases)  # getattr(torch, "load")
        return f"{base}.{node.args[1].value}" if base else None
    return None


def _dynamic_import_target(node: ast.Call) -> str | None:
    """The module an import_module()/__import__() call names, "?" when it cannot be known."""
    if not node.args:
        return "?"
    name = node.args[0]
    if isinstance(name, ast.Constant) and isinstance(name.value, str):
        return name.value
    if isinstance(name, ast.JoinedStr) and name.values:
        first = name.values[0]
        if isinstance(first, ast.Constant) and "." in first.value:
            return first.value  # f"diffusers.pipelines.{x}": the top-level package is fixed
        if isinstance(first, ast.FormattedValue) and isinstance(first.value, ast.Name) \
                and first.value.id in {"__name__", "__package__"}:
            return "pytest_diffeval"  # a submodule of this package
    return "?"


def unpickling_problems(source: str, filename: str = "<source>") -> list[str]:
    """Everything in ``source`` that can unpickle (run code from) a file: imports of
    pickle-based modules (also through importlib), torch.load without a literal
    ``weights_only=True`` (under any alias), torch.jit.load, and ``allow_pickle=True``."""
    tree = ast.parse(source, filename)
    aliases = _aliases(tree)
    problems: list[str] = []
    safe_funcs: set[int] = set()

    def flag(node: ast.AST, what: str) -> None:
        problems.append(f"{filename}:{node.lineno}: {what}")

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in UNPICKLING_MODULES:
                    flag(node, f"imports {alias.name}")
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in UNPICKLING_MODULES:
            flag(node, f"imports from {node.module}")
        elif isinstance(node, ast.Call):
            target = _dotted(node.func, aliases)
            if target in {"importlib.import_module", "__import__"}:
                module = _dynamic_import_target(node)
                if module == "?" or module.split(".")[0] in UNPICKLING_MODULES:
                    flag(node, f"imports {module!r} dynamically")
            if any(k.arg == "allow_pickle" and not (isinstance(k.value, ast.Constant) and k.value.value is False)
                   for k in node.keywords):
                flag(node, "passes allow_pickle")
            weights_only = any(k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
                               for k in node.keywords)
            if target in NEEDS_WEIGHTS_ONLY and weights_only:
                safe_funcs.add(id(node.func))
    for node in ast.walk(tree):
        if isinstance(node, (ast.Name, ast.Attribute, ast.Call)) and id(node) not in safe_funcs:
            target = _dotted(node, aliases) if not isinstance(node, ast.Name) or isinstance(node.ctx, ast.Load) else None
            if target in NEEDS_WEIGHTS_ONLY:
                flag(node, f"{target} without weights_only=True")
            elif target in NEVER or (target or "").split(".")[0] in UNPICKLING_MODULES:
                flag(node, f"uses {target}")
    return sorted(set(problems))


@pytest.mark.parametrize("source", [
    "import pickle",
    "import pickle as p",
    "from pickle import loads",
    "import dill",
    "import joblib\njoblib.load(p)",
    "from cloudpickle import loads",
    "import shelve",
    "import marshal",
    "import importlib\nimportlib.import_module('pickle').loads(b)",
    "from importlib import import_module\nimport_module('dill')",
    "__import__('joblib')",
    "import importlib\nimportlib.import_module(name)",
    "import torch\ntorch.load(p)",
    "import torch\ntorch.load(p, weights_only=False)",
    "import torch\ntorch.load(p, **kwargs)",
    "import torch as T\nT.load(p)",
    "from torch import load\nload(p)",
    "from torch import load as L\nL(p)",
    "from torch import load as L\nloader = L",
    "import torch\nloader = torch.load\nloader(p, weights_only=True)",
    "import torch\ngetattr(torch, 'load')(p)",
    "import torch\ntorch.jit.load(p)",
    "from torch import jit\njit.load(p)",
    "from torch.jit import load\nload(p)",
    "import torch.serialization\ntorch.serialization.load(p)",
    "import numpy as np\nnp.load(p, allow_pickle=True)",
    "import pandas as pd\npd.read_pickle(p)",
])
def test_unpickling_checker_catches(source: str) -> None:
    assert unpickling_problems(source), source


@pytest.mark.parametrize("source", [
    "import torch\ntorch.load(p, map_location='cpu', weights_only=True)",
    "from torch import load as L\nL(p, weights_only=True)",
    "import numpy as np\nnp.load(p)",
    "from safetensors.torch import load_file\nload_file(p)",
    "import json\njson.load(f)",
    "import importlib\nimportlib.import_module(f'diffusers.pipelines.{name}')",
    "import importlib\nimportlib.import_module(f'{__name__}.{module}')",
    "x = 'pickle files can run code'",
])
def test_unpickling_checker_allows(source: str) -> None:
    assert unpickling_problems(source) == []


def test_package_never_unpickles() -> None:
    """No pickle-based module, no torch.load without weights_only=True, no torch.jit.load,
    no allow_pickle anywhere in the package, found by parsing each file (not grepping lines)."""
    files = sorted(PACKAGE.rglob("*.py"))
    assert len(files) > 20
    offenders = [problem for file in files
                 for problem in unpickling_problems(file.read_text(), str(file.relative_to(PACKAGE)))]
    # The one dynamic import allowed: the child interpreter of metrics/external.py imports the
    # scorer module the user declared (register_external_metric(module=...)): code the user
    # chose to run, in its own environment, not a file read as data.
    allowed = [p for p in offenders if p.startswith("external_child.py:") and p.endswith("imports '?' dynamically")]
    assert len(allowed) <= 1
    assert [p for p in offenders if p not in allowed] == []


def test_loading_never_asks_for_remote_code(tiny_models: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    import diffusers

    from pytest_diffeval.pipelines import load_pipeline

    seen = {}
    original = diffusers.StableDiffusionPipeline.from_pretrained.__func__

    def spy(cls, *args, **kwargs):
        seen.update(kwargs)
        return original(cls, *args, **kwargs)

    monkeypatch.setattr(diffusers.StableDiffusionPipeline, "from_pretrained", classmethod(spy))
    load_pipeline(tiny_models["pipe"])
    assert seen["use_safetensors"] is True and "trust_remote_code" not in seen and "custom_pipeline" not in seen
    seen.clear()
    load_pipeline(tiny_models["pipe"], dtype="float32", scheduler="EulerDiscreteScheduler")
    assert seen and "trust_remote_code" not in seen and "custom_pipeline" not in seen


def test_an_explicit_trust_remote_code_request_is_passed_through(user_project: pytest.Pytester) -> None:
    """Only the user may ask for remote code, through the fixture, and then they get it."""
    user_project.makepyfile(test_remote="""
        import diffusers
        from conftest import PIPE

        def test_request(diffusion_pipeline, monkeypatch):
            calls = []
            original = diffusers.StableDiffusionPipeline.from_pretrained.__func__

            def spy(cls, *args, **kwargs):
                calls.append(kwargs)
                return original(cls, *args, **kwargs)

            monkeypatch.setattr(diffusers.StableDiffusionPipeline, "from_pretrained", classmethod(spy))
            plain = diffusion_pipeline(PIPE)
            trusted = diffusion_pipeline(PIPE, trust_remote_code=True)
            assert len(calls) == 2 and trusted is not plain  # a separate cache entry
            assert "trust_remote_code" not in calls[0]
            assert calls[1]["trust_remote_code"] is True and calls[1]["use_safetensors"] is True
    """)
    user_project.runpytest().assert_outcomes(passed=1)


def test_pickle_weights_are_refused_with_the_fix(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    import shutil

    import torch
    from safetensors.torch import load_file

    from pytest_diffeval.pipelines import PipelineNotFoundError, load_pipeline

    model = Path(shutil.copytree(tiny_models["pipe"], tmp_path / "model"))
    weights = model / "unet" / "diffusion_pytorch_model.safetensors"
    torch.save(load_file(str(weights)), model / "unet" / "diffusion_pytorch_model.bin")
    weights.unlink()
    with pytest.raises(PipelineNotFoundError, match=r"(?s)holds pickle weights \(unet/diffusion_pytorch_model.bin\).*use_safetensors=False"):
        load_pipeline(model)


def test_test_ids_cannot_escape_the_baselines_folder(pytester: pytest.Pytester) -> None:
    path = cheap_project(pytester, ["../../../escape", "..", "/etc/passwd", "a\\\\b"])
    done = run(path, "--snapshot-update")
    assert done.returncode == 0, done.stdout[-3000:]
    written = sorted(p for p in path.rglob("*.json") if "diffeval-results" not in p.parts)
    assert len(written) == 4
    baselines = (path / "baselines").resolve()
    assert all(p.resolve().is_relative_to(baselines) for p in written), written
    assert run(path).returncode == 0


@pytest.mark.slow
def test_sigkill_during_update_leaves_every_baseline_old_or_new(pytester: pytest.Pytester) -> None:
    path = cheap_project(pytester, [f"c{i}" for i in range(30)])
    env = {**os.environ, "SLOW": "0.05"}
    env.pop("PYTEST_XDIST_WORKER", None)
    started = time.monotonic()
    assert subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--snapshot-update"],
                          cwd=path, env=env, capture_output=True).returncode == 0
    duration = time.monotonic() - started  # kills land anywhere in a run of this length
    old = stored_values(path)
    assert len(old) == 60
    rng = random.Random(0)
    env["OFFSET"] = "100"
    kinds = set()
    for attempt in range(20):
        process = subprocess.Popen([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--snapshot-update"],
                                   cwd=path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0.4, 1.0) * duration)
        process.send_signal(signal.SIGKILL)
        process.wait()
        now = stored_values(path)  # every file parses
        assert set(now) == set(old), f"attempt {attempt}: entries lost"
        for key, value in now.items():
            kind = "old" if abs(value - old[key]) < 1e-6 else "new" if abs(value - old[key] - 100) < 1e-6 else None
            assert kind, f"attempt {attempt}: {key} is neither old nor new: {value}"
            kinds.add(kind)
        env["OFFSET"] = "100" if attempt % 2 else "0"
    assert kinds == {"old", "new"}  # kills landed both before and after writes


@pytest.mark.slow
def test_fifty_update_runs_under_xdist_lose_no_entry(pytester: pytest.Pytester) -> None:
    cases = [f"c{i}" for i in range(12)]
    path = cheap_project(pytester, cases)
    base: dict = {}
    for run_number in range(50):
        offset = float(run_number % 2) * 10  # every run changes every value beyond tolerance
        done = run(path, "--snapshot-update", "-n", "2", offset=offset)
        assert done.returncode == 0, done.stdout[-3000:]
        values = stored_values(path)
        base = base or values
        assert len(values) == 2 * len(cases), f"run {run_number}: {len(values)} entries"
        stale = [k for k, v in values.items() if abs(v - base[k] - offset) > 1e-6]
        assert not stale, f"run {run_number}: entries not updated: {stale}"
