"""Shared fixtures: tiny models built offline once per session, a fake Hugging Face hub
cache (so hub ids resolve offline through the real hub code) and pytester helpers."""

from __future__ import annotations

import os
import shutil
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest_plugins = ["pytester"]

# pytester's in-process runs drop the modules first imported during the inner run when it ends;
# torch and friends cannot be imported twice in one process, so import them here, once.
import diffusers  # noqa: E402,F401
import torch  # noqa: E402,F401
import torchmetrics  # noqa: E402,F401
import transformers  # noqa: E402,F401

import pytest_diffeval  # noqa: E402


def _own_modules() -> list:
    """Every module of the package, imported now: pytester also drops the package's modules
    first imported inside an inner run, and a second copy of a module means second copies of
    its classes (an ``except DiffevalError`` that no longer matches)."""
    import importlib
    import pkgutil

    for info in pkgutil.walk_packages(pytest_diffeval.__path__, "pytest_diffeval."):
        if not info.name.endswith("__main__"):
            importlib.import_module(info.name)
    return [m for name, m in sorted(sys.modules.items()) if name.split(".")[0] == "pytest_diffeval"]


_MODULES = _own_modules()

# Nothing in this suite may reach the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

FAKE_COMMIT = "0123456789abcdef0123456789abcdef01234567"


# Tests in the separate CI step (.ci/run runs it after the README's command): ``slow`` (full
# ``pytest model_tests/`` runs, stress loops of tens of runs) and ``browser`` (the HTML report
# in headless Chromium, which the README's command does not install).
SEPARATE_STEP = ("slow", "browser")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Without ``-m``, leave out the separate step's tests (named in the summary); ``-m slow``,
    ``-m browser`` or ``-m "slow or browser"`` runs them."""
    if config.option.markexpr:
        return
    separate = [item for item in items if any(item.get_closest_marker(name) for name in SEPARATE_STEP)]
    if separate:
        config.hook.pytest_deselected(items=separate)
        items[:] = [item for item in items if item not in separate]
        config.stash[_SEPARATE] = len(separate)


_SEPARATE = pytest.StashKey[int]()


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, config: pytest.Config) -> None:
    count = config.stash.get(_SEPARATE, 0)
    if count:
        terminalreporter.write_line(f"{count} slow/browser tests deselected: run them with "
                                    "pytest tests/ -n 2 -m 'slow or browser' (.ci/run does, after installing Chromium)")


@pytest.fixture(autouse=True)
def _module_state_restored() -> Iterator[None]:
    """The package's module state after a test is what it was before: in-process pytester
    runs (and the conftests of their projects, which may patch the package's functions) share
    this process with the suite.  Bindings of module attributes are restored, and so are the
    contents of module-level lists, dicts and sets (the per-process caches, the metric
    registry, the settings and counter stacks)."""
    saved = []
    for module in _MODULES:
        names = {k: v for k, v in vars(module).items() if not k.startswith("__")}
        contents = {k: (v.copy()) for k, v in names.items() if type(v) in (dict, list, set)}
        saved.append((module, names, contents))
    threads = torch.get_num_threads()
    environ = dict(os.environ)
    yield
    for module, names, contents in saved:
        current = vars(module)
        for name in [n for n in current if n not in names and not n.startswith("__")
                     and not isinstance(current[n], type(sys))]:
            del current[name]
        for name, value in names.items():
            if current.get(name, _MISSING) is not value:
                current[name] = value
        for name, copy in contents.items():
            value = names[name]
            value.clear()
            value.update(copy) if not isinstance(value, list) else value.extend(copy)
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    if dict(os.environ) != environ:
        os.environ.clear()
        os.environ.update(environ)


_MISSING = object()


@pytest.fixture(autouse=True)
def _not_an_xdist_worker_inside(monkeypatch: pytest.MonkeyPatch) -> None:
    """When this suite runs under ``-n``, the pytest runs its tests start (pytester
    subprocesses) must not inherit the worker's identity: syrupy reads
    ``PYTEST_XDIST_WORKER`` and would treat a plain inner run as an xdist worker (no
    unused-baseline report, worker-style result publishing)."""
    for name in ("PYTEST_XDIST_WORKER", "PYTEST_XDIST_WORKER_COUNT", "PYTEST_XDIST_TESTRUNUID"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny random text-to-image pipeline and a tiny random CLIP, in hub layout."""
    from pytest_diffeval import tiny

    root = tmp_path_factory.mktemp("tiny")
    return {
        "pipe": tiny.build_tiny_text2img(root / "tiny-sd"),
        "clip": tiny.build_tiny_clip(root / "tiny-clip"),
    }


@pytest.fixture(scope="session")
def fake_hub(tmp_path_factory: pytest.TempPathFactory, tiny_models: dict[str, Path]) -> Path:
    """A Hugging Face hub cache holding the tiny models as ``diffeval-test/tiny-sd`` and
    ``openai/tiny-clip-test``: with ``HF_HUB_CACHE`` pointing here and ``HF_HUB_OFFLINE=1``,
    ``from_pretrained("<hub id>")`` takes the real hub code path and finds them."""
    cache = tmp_path_factory.mktemp("hub")
    for repo_id, source in [("diffeval-test/tiny-sd", tiny_models["pipe"]), ("openai/tiny-clip-test", tiny_models["clip"])]:
        repo = cache / f"models--{repo_id.replace('/', '--')}"
        shutil.copytree(source, repo / "snapshots" / FAKE_COMMIT)
        (repo / "refs").mkdir(parents=True)
        (repo / "refs" / "main").write_text(FAKE_COMMIT)
    return cache


@pytest.fixture
def hub_cache(fake_hub: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point the hub code at the fake cache for one test."""
    import huggingface_hub.constants as hub_constants

    monkeypatch.setenv("HF_HUB_CACHE", str(fake_hub))
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(fake_hub))
    return fake_hub


@pytest.fixture
def user_project(pytester: pytest.Pytester, tiny_models: dict[str, Path]) -> pytest.Pytester:
    """A pytester project whose tests see the tiny models through ``conftest.py`` constants."""
    pytester.makeconftest(textwrap.dedent(f"""
        PIPE = {str(tiny_models['pipe'])!r}
        CLIP = {str(tiny_models['clip'])!r}
    """))
    pytester.makeini(textwrap.dedent(f"""
        [pytest]
        diffeval_clip_model = {tiny_models['clip']}
        filterwarnings = ignore::FutureWarning
    """))
    return pytester


@pytest.fixture
def project(user_project: pytest.Pytester, tiny_models: dict[str, Path]) -> pytest.Pytester:
    """A user project with its own copy of the tiny model (so tests may perturb it)."""
    model = user_project.path / "model"
    shutil.copytree(tiny_models["pipe"], model)
    user_project.makeconftest(textwrap.dedent(f"""
        PIPE = {str(model)!r}
        CLIP = {str(tiny_models["clip"])!r}
    """))
    return user_project
