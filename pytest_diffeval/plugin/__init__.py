"""The pytest plugin (entry point ``diffeval``): it registers the options, builds the
session's :class:`~pytest_diffeval.session.DiffevalSession` in ``pytest_configure`` and
registers the session's hooks (:mod:`.hooks`); the fixtures live in :mod:`.fixtures`.

Nothing here imports torch, diffusers, transformers or torchmetrics: they are imported when
a test uses a fixture or a metric, so installing the plugin does not slow down every run.
"""

from __future__ import annotations

import pytest

from .. import session as sessions
from .. import settings
from ..session import DiffevalSession, is_worker
from .fixtures import diffeval_baseline, diffeval_device, diffusion_pipeline, generate
from .hooks import DistributedHooks, SessionHooks, XdistHooks, join_launch, torchrun_launch
from .options import add_options, limit_worker_threads, settings_from, sharding, value
from .summary import process_loads

__all__ = ["diffeval_baseline", "diffeval_device", "diffusion_pipeline", "generate",
           "pytest_addoption", "pytest_configure", "pytest_unconfigure"]

MARKERS = (
    "gpu: needs a CUDA GPU (and usually hub weights); skipped on the CPU with a reason, a failure under "
    "--diffeval-require-gpu",
    "diffeval_plan(model, prompts, seeds=(0,), batch_size=None, **call_kwargs): the generations of these tests, "
    "made in full batches by the first of them to call generate(); each test then reads its own images",
    "diffeval_model(model): the model this test uses; under -n and --diffeval-splits tests of one model are kept "
    "together",
    "diffeval_split: under --diffeval-splits N this test runs on every shard, each generate() call makes 1/N of its "
    "(prompt, seed) samples, and FID/KID/CMMD/drift checks store their part's features; `python -m pytest_diffeval "
    "results merge` gives the whole set's value and verdict",
)


def pytest_addoption(parser: pytest.Parser) -> None:
    add_options(parser)


def pytest_configure(config: pytest.Config) -> None:
    for line in MARKERS:
        config.addinivalue_line("markers", line)
    sharding(config)  # a bad --diffeval-splits/--diffeval-group/--diffeval-shard is a usage error now
    if is_worker(config):
        limit_worker_threads(config)  # before anything imports torch
        if str(value(config, "diffeval_device") or "auto").strip() in ("auto", "cuda"):
            # Before any test (and so before the plugin initialises CUDA): see bind_worker_gpu.
            settings.bind_worker_gpu(str(config.workerinput.get("workerid", "")))  # type: ignore[attr-defined]
    launch = torchrun_launch(config)  # before any test: refuses -n inside a torchrun launch
    if launch is not None and str(value(config, "diffeval_device") or "auto").strip() in ("auto", "cuda"):
        settings.bind_worker_gpu(f"gw{launch.local_rank}")  # each rank its LOCAL_RANK GPU, before CUDA starts
    session = DiffevalSession(settings_from(config), no_cache=bool(config.getoption("diffeval_no_cache")),
                              loads_at_start=process_loads())
    sessions.install(config, session)
    if launch is not None:
        join_launch(config, session, launch)
        config.pluginmanager.register(DistributedHooks(config, session), "diffeval-distributed")
    config.pluginmanager.register(SessionHooks(config, session), "diffeval-session")
    if config.pluginmanager.hasplugin("xdist"):
        config.pluginmanager.register(XdistHooks(config, session), "diffeval-xdist")


def pytest_unconfigure(config: pytest.Config) -> None:
    sessions.uninstall(config)

