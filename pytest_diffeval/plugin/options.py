"""The plugin's command-line options and ini values, and the settings a session builds from them."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, NoReturn

import pytest

from .. import settings
from ..scheduling import parse_splits
from ..session import is_worker


def add_options(parser: pytest.Parser) -> None:
    """Register the ``--diffeval-*`` options and their ini values."""
    group = parser.getgroup("diffeval", "diffusion model quality tests (pytest-diffeval)")

    def option(name: str, ini: str, help: str, default: Any = None, **kwargs: Any) -> None:
        group.addoption(f"--{name}", dest=ini, default=None, help=f"{help} (ini: {ini})", **kwargs)
        parser.addini(ini, help=help, default=default)

    option("diffeval-device", "diffeval_device", "device for pipelines and metrics: auto, cpu, cuda or cuda:N; "
           "auto spreads xdist workers over the visible GPUs", default="auto")
    option("diffeval-dtype", "diffeval_dtype", "pipeline dtype: auto (float16 on CUDA, float32 on CPU), "
           "float32, float16 or bfloat16", default="auto")
    option("diffeval-clip-model", "diffeval_clip_model", "CLIP backbone for CLIP-based metrics: hub id, local "
           "folder or embedded name", default=settings.DEFAULT_CLIP_MODEL)
    option("diffeval-fid-features", "diffeval_fid_features", "FID features: inception-v3-2048 (or 64/192/768) "
           "or clip:<clip model>", default=settings.DEFAULT_FID_FEATURES)
    option("diffeval-inception-weights", "diffeval_inception_weights", "local torch-fidelity Inception weights "
           "file (offline FID)")
    option("diffeval-results", "diffeval_results", "folder for images and metrics of failed checks",
           default="diffeval-results")
    option("diffeval-cache-dir", "diffeval_cache_dir", "cache folder (generated images, backbone features, "
           "metric results, reference statistics); default under pytest's cache dir")
    group.addoption("--diffeval-calibrate", type=int, default=0, metavar="N",
                    help="with --snapshot-update: re-run each baseline check N times under benign perturbations "
                         "(1 and 2 threads, batch size 1 and all-at-once) and store the observed noise, from which "
                         "tolerance=None derives the tolerance")
    group.addoption("--diffeval-no-cache", action="store_true", default=False,
                    help="generate every image and compute every backbone feature and metric again (bypass the "
                         "image, feature and metric-result caches)")
    group.addoption("--diffeval-shard", default=None, metavar="I/N",
                    help="the same as --diffeval-splits N --diffeval-group I (the older spelling)")
    group.addoption("--diffeval-splits", type=int, default=None, metavar="N",
                    help="split the selected tests into N shards balanced by time (--diffeval-durations), each "
                         "model's tests kept together; run one with --diffeval-group (pytest-split's --splits, "
                         "named apart so both plugins can be installed); then `python -m pytest_diffeval results merge`")
    group.addoption("--diffeval-group", type=int, default=None, metavar="I",
                    help="with --diffeval-splits N: run shard I (1-based) of N")
    option("diffeval-durations", "diffeval_durations", "durations file (each test's seconds and each model's load "
           "cost) that --diffeval-splits balances by, relative to the rootdir; absent: by test count",
           default=".diffeval-durations.json")
    group.addoption("--diffeval-store-durations", action="store_true", default=False,
                    help="record this run's test durations and model load costs into --diffeval-durations (updated, "
                         "written atomically); best from a cold run (--diffeval-no-cache)")
    option("diffeval-worker-threads", "diffeval_worker_threads", "CPU threads of each xdist worker: auto (the "
           "machine's cores divided among the workers, unless OMP_NUM_THREADS is set), keep, or a number",
           default="auto")
    option("diffeval-dist", "diffeval_dist", "under -n (--dist load): 'model' keeps each model's tests on as few "
           "workers as possible (one per model when there are as many models as workers); 'xdist' leaves "
           "xdist's own scheduling", default="model")
    option("diffeval-batch-size", "diffeval_batch_size", "default generation batch size", default="8")
    option("diffeval-model", "diffeval_model", "replace the model tests load: NAME (every model) or "
           "ORIGINAL=REPLACEMENT; also env DIFFEVAL_MODEL")
    group.addoption("--diffeval-results-always", action="store_true", default=False,
                    help="save images and metrics for passing checks too")
    option("diffeval-report", "diffeval_report", "self-contained HTML report of the metric checks, relative to "
           "the rootdir; default <results dir>/report.html")
    option("diffeval-baseline-images", "diffeval_baseline_images", "with --snapshot-update: also store thumbnails "
           "(<= 64 px) of the images beside each baseline, shown in the HTML report (true/false)", default="false",
           action="store_const", const="true")
    option("diffeval-max-pipelines", "diffeval_max_pipelines", "loaded pipelines each process keeps: a number "
           "(least recently used evicted beyond it) or auto (no count limit; on CUDA, least recently used pipelines "
           "are evicted when the GPU's free memory is short for the next one)", default="auto")
    option("diffeval-feature-dtype", "diffeval_feature_dtype", "precision of the FID/KID feature extractors: auto "
           "(float32 on CUDA, float64 on the CPU), float32 or float64; statistics stay float64", default="auto")
    option("diffeval-dist-timeout", "diffeval_dist_timeout", "under torchrun / accelerate launch: seconds a rank "
           "waits for the others at a collective before it stops the session naming the missing rank",
           default="1800")
    group.addoption("--diffeval-require-gpu", action="store_true", default=False,
                    help="fail (do not skip) when no CUDA GPU is available or a GPU test would be skipped")
    parser.addini("diffeval_baselines_dir", help="folder of stored baselines, relative to the rootdir",
                  default="baselines")


def skip_or_fail(config: pytest.Config, reason: str) -> NoReturn:
    """A GPU test cannot run here (no GPU, weights or data it needs): skip it with ``reason``,
    or fail it under ``--diffeval-require-gpu``, where a GPU runner that silently skips would
    be a false green.  For a model test's own fixtures too (``pytest_diffeval.skip_or_fail``)."""
    __tracebackhide__ = True
    if config.getoption("diffeval_require_gpu"):
        pytest.fail(f"{reason} (a failure, not a skip, under --diffeval-require-gpu)", pytrace=False)
    pytest.skip(reason)


def sharding(config: pytest.Config) -> tuple[int, int] | None:
    """``(group, splits)`` of ``--diffeval-splits/--diffeval-group`` (or ``--diffeval-shard``),
    1-based; None when the run is not sharded; a bad combination is a UsageError."""
    try:
        return parse_splits(config.getoption("diffeval_splits"), config.getoption("diffeval_group"),
                            config.getoption("diffeval_shard"))
    except ValueError as exc:
        raise pytest.UsageError(str(exc)) from None


def durations_path(config: pytest.Config) -> tuple[Path, bool]:
    """The durations file (relative to the rootdir) and whether it was named explicitly."""
    given = config.getoption("diffeval_durations")
    return (Path(config.rootpath) / (given or config.getini("diffeval_durations"))).resolve(), given is not None


def value(config: pytest.Config, name: str) -> Any:
    """An option's value: the command line's, else the ini file's (else its default)."""
    given = config.getoption(name)
    return given if given is not None else config.getini(name)


def settings_from(config: pytest.Config) -> settings.Settings:
    """The session's settings, built once from the options (a bad value is a UsageError)."""
    rootdir = Path(config.rootpath)
    cache_dir = value(config, "diffeval_cache_dir")
    built = settings.Settings(
        clip_model=value(config, "diffeval_clip_model"),
        fid_features=value(config, "diffeval_fid_features"),
        inception_weights=value(config, "diffeval_inception_weights"),
        results_dir=(rootdir / value(config, "diffeval_results")).resolve(),
        results_always=bool(config.getoption("diffeval_results_always")),
        cache_dir=Path(cache_dir) if cache_dir else pytest_cache_dir(config),
        baselines_dir=(rootdir / config.getini("diffeval_baselines_dir")).resolve(),
        update_baselines=bool(getattr(config.option, "update_snapshots", False)),
        model_override=value(config, "diffeval_model") or os.environ.get("DIFFEVAL_MODEL") or None,
        calibrate=int(config.getoption("diffeval_calibrate") or 0),
        result_cache=not config.getoption("diffeval_no_cache"),
        device_request=value(config, "diffeval_device") or "auto",
        max_pipelines=max_pipelines(value(config, "diffeval_max_pipelines")),
        feature_dtype=str(value(config, "diffeval_feature_dtype") or "auto"),
        rootdir=rootdir,
    )
    try:
        settings.feature_dtype("cpu", built)  # a bad --diffeval-feature-dtype is a usage error now, not at the first FID
    except ValueError as exc:
        raise pytest.UsageError(str(exc)) from None
    return built


def pytest_cache_dir(config: pytest.Config) -> Path | None:
    """The plugin's folder in pytest's cache (None under ``-p no:cacheprovider``)."""
    cache = getattr(config, "cache", None)
    return Path(cache.mkdir("diffeval")) if cache is not None else None


def max_pipelines(value: Any) -> int | None:
    """``--diffeval-max-pipelines``: None for auto, else a positive count."""
    text = str(value if value is not None else "auto").strip()
    if text == "auto":
        return None
    if not text.isdigit() or int(text) < 1:
        raise pytest.UsageError(f"pytest-diffeval: --diffeval-max-pipelines={text!r} (ini diffeval_max_pipelines) is "
                                "not a positive number nor auto; fix: e.g. --diffeval-max-pipelines=1 to keep one "
                                "loaded pipeline per process, or auto")
    return int(text)


def limit_worker_threads(config: pytest.Config) -> None:
    """Share the CPU cores among xdist workers: K workers that each start one thread per
    core oversubscribe the CPU (on a 2-core machine, ``-n 2`` ran the release suite ~8x
    slower than with one thread each; a tiny model's batch took 3.2 s with 2 threads per
    worker vs 0.02 s with 1).  ``auto``: the CPUs this process may use (its affinity mask)
    divided by the workers, unless the user set ``OMP_NUM_THREADS``; ``keep``: torch's own
    choice; a number: that many.  The one place threads are set: ``OMP_NUM_THREADS`` before
    torch is imported (the plugin imports it lazily), ``torch.set_num_threads`` if a conftest
    imported it already."""
    choice = str(value(config, "diffeval_worker_threads") or "auto").strip()
    if choice == "keep" or (choice == "auto" and "OMP_NUM_THREADS" in os.environ):
        return
    if choice == "auto":
        workers = int(getattr(config, "workerinput", {}).get("workercount", 1) or 1)
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        threads = max(1, cores // workers)
    elif choice.isdigit() and int(choice) > 0:
        threads = int(choice)
    else:
        raise pytest.UsageError(f"pytest-diffeval: --diffeval-worker-threads={choice!r}: use auto, keep or a number")
    os.environ["OMP_NUM_THREADS"] = str(threads)  # read when torch is imported
    if "torch" in sys.modules:  # a conftest imported it already
        sys.modules["torch"].set_num_threads(threads)


def model_dist(config: pytest.Config) -> bool:
    """Whether this xdist controller schedules by model (``-n`` with --dist load, the default)."""
    if is_worker(config) or not config.pluginmanager.hasplugin("xdist"):
        return False
    if not getattr(config.option, "numprocesses", None) or getattr(config.option, "collectonly", False):
        return False
    if getattr(config.option, "dist", "no") not in ("load", "loadgroup"):
        return False
    mode = str(value(config, "diffeval_dist") or "model").strip()
    if mode not in ("model", "xdist"):
        raise pytest.UsageError(f"pytest-diffeval: --diffeval-dist={mode!r}: use 'model' or 'xdist'")
    return mode == "model"
