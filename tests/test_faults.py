"""Untrusted input and interrupted runs: nothing executed, nothing lost."""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import textwrap
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


def test_package_never_unpickles() -> None:
    """No pickle, and no torch.load without weights_only=True, anywhere in the package."""
    offenders = []
    for file in PACKAGE.rglob("*.py"):
        for number, line in enumerate(file.read_text().splitlines(), 1):
            if re.search(r"\bpickle\.|\bimport pickle|allow_pickle=True", line) or \
               ("torch.load(" in line and "weights_only=True" not in line):
                offenders.append(f"{file.relative_to(PACKAGE)}:{number}: {line.strip()}")
    assert offenders == []


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
