"""The pytest plugin: options, thin fixtures and the hooks that collect every metric
check into the terminal summary (also from xdist workers)."""

from __future__ import annotations

import os
import sys
import shutil
import tempfile
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import pytest

from ._version import __version__
from . import settings
from .baselines import DiffevalBaseline, DiffevalBaselineExtension, remove_leftovers
from .exceptions import InputError
from .identity import torch_flags
from .pipelines import split_load_options
from .planning import COUNTERS, Planner, ProvenanceMemo
from .report import Outputs, summary_lines

if TYPE_CHECKING:
    from .generation import ImageSet

# Heavy libraries (torch, diffusers, torchmetrics) are imported only when a test uses a
# fixture, so installing the plugin does not slow down every pytest run.
_PIPELINES: Any = None
_IMAGES: Any = None


def image_cache(config: pytest.Config) -> Any:
    """The on-disk image cache, or None with ``--diffeval-no-cache`` or without a cache dir."""
    global _IMAGES
    directory = settings.current().cache_dir
    if config.getoption("diffeval_no_cache") or directory is None:
        return None
    if _IMAGES is None or _IMAGES.directory != Path(directory) / "images":
        from .generation import ImageCache

        _IMAGES = ImageCache(Path(directory) / "images")
    return _IMAGES


_PLANNER = Planner()  # the session's diffeval_plan markers
_MEMO: ProvenanceMemo | None = None


def provenance_memo() -> ProvenanceMemo | None:
    """Provenance of pipelines loaded before (lets a fully cached ``generate`` skip the load)."""
    global _MEMO
    directory = settings.current().cache_dir
    if directory is None:
        return None
    if _MEMO is None or _MEMO.directory != Path(directory) / "pipelines":
        _MEMO = ProvenanceMemo(Path(directory) / "pipelines")
    return _MEMO


def pipeline_cache() -> Any:
    """The process's pipeline cache (one load per model per worker)."""
    global _PIPELINES
    if _PIPELINES is None:
        from .pipelines import PipelineCache

        _PIPELINES = PipelineCache()
    return _PIPELINES


_ROWS: list[dict[str, Any]] = []  # every metric check of the session, on the controller too


def pytest_addoption(parser: pytest.Parser) -> None:
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
                    help="run only shard I of N (1-based) of the selected tests, each model's tests kept together: "
                         "one CI runner per shard, then `python -m pytest_diffeval results merge`")
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
    group.addoption("--diffeval-require-gpu", action="store_true", default=False,
                    help="fail (do not skip) when no CUDA GPU is available or a GPU test would be skipped")
    parser.addini("diffeval_baselines_dir", help="folder of stored baselines, relative to the rootdir",
                  default="baselines")


def _value(config: pytest.Config, name: str) -> Any:
    value = config.getoption(name)
    return value if value is not None else config.getini(name)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (and usually hub weights); skipped on the CPU "
                                       "with a reason, a failure under --diffeval-require-gpu")
    config.addinivalue_line("markers", "diffeval_plan(model, prompts, seeds=(0,), batch_size=None, **call_kwargs): "
                                       "the generations of these tests, made in full batches by the first of them "
                                       "to call generate(); each test then reads its own images")
    config.addinivalue_line("markers", "diffeval_model(model): the model this test uses; under -n and "
                                       "--diffeval-shard tests of one model are kept together")
    COUNTERS.reset(feature_cache=not config.getoption("diffeval_no_cache"))
    _PLANNER.collect(())
    _WORKER_COUNTERS.clear()
    _CRASHED_WORKERS.clear()
    _TESTS_RUN[0] = 0
    shard = config.getoption("diffeval_shard")
    if shard:
        from .scheduling import parse_shard

        try:
            parse_shard(shard)
        except ValueError as exc:
            raise pytest.UsageError(str(exc)) from None
    if _model_dist(config):
        config.stash[_ENTRIES_DIR] = tempfile.mkdtemp(prefix="diffeval-sched-")
    if _is_worker(config):
        _limit_worker_threads(config)
        if str(_value(config, "diffeval_device") or "auto").strip() in ("auto", "cuda"):
            # Before any test (and so before the plugin initialises CUDA): see bind_worker_gpu.
            settings.bind_worker_gpu(str(config.workerinput.get("workerid", "")))  # type: ignore[attr-defined]
    rootdir = Path(config.rootpath)
    cache_dir = _value(config, "diffeval_cache_dir")
    settings.configure(
        clip_model=_value(config, "diffeval_clip_model"),
        fid_features=_value(config, "diffeval_fid_features"),
        inception_weights=_value(config, "diffeval_inception_weights"),
        results_dir=(rootdir / _value(config, "diffeval_results")).resolve(),
        results_always=bool(config.getoption("diffeval_results_always")),
        cache_dir=Path(cache_dir) if cache_dir else _pytest_cache_dir(config),
        baselines_dir=(rootdir / config.getini("diffeval_baselines_dir")).resolve(),
        update_baselines=bool(getattr(config.option, "update_snapshots", False)),
        model_override=_value(config, "diffeval_model") or os.environ.get("DIFFEVAL_MODEL") or None,
        calibrate=int(config.getoption("diffeval_calibrate") or 0),
        result_cache=not config.getoption("diffeval_no_cache"),
        device_request=_value(config, "diffeval_device"),
        max_pipelines=_max_pipelines(_value(config, "diffeval_max_pipelines")),
        feature_dtype=str(_value(config, "diffeval_feature_dtype") or "auto"),
        records=[],
    )
    try:
        settings.feature_dtype("cpu")  # a bad --diffeval-feature-dtype is a usage error now, not at the first FID
    except ValueError as exc:
        raise pytest.UsageError(str(exc)) from None
    DiffevalBaselineExtension.root = settings.current().baselines_dir
    DiffevalBaselineExtension.failed_tests = set()
    DiffevalBaselineExtension.rootdir = rootdir
    _ROWS.clear()


def _max_pipelines(value: Any) -> int | None:
    """``--diffeval-max-pipelines``: None for auto, else a positive count."""
    text = str(value if value is not None else "auto").strip()
    if text == "auto":
        return None
    if not text.isdigit() or int(text) < 1:
        raise pytest.UsageError(f"pytest-diffeval: --diffeval-max-pipelines={text!r} (ini diffeval_max_pipelines) is "
                                "not a positive number nor auto; fix: e.g. --diffeval-max-pipelines=1 to keep one "
                                "loaded pipeline per process, or auto")
    return int(text)


def pytest_unconfigure(config: pytest.Config) -> None:
    directory = config.stash.get(_ENTRIES_DIR, None)
    if directory:
        shutil.rmtree(directory, ignore_errors=True)


_ENTRIES_DIR = pytest.StashKey[str]()
_WORKER_COUNTERS: dict[str, dict[str, Any]] = {}  # on the xdist controller: each worker's counters


def _limit_worker_threads(config: pytest.Config) -> None:
    """Share the CPU cores among xdist workers: K workers that each start one thread per
    core oversubscribe the CPU (on a 2-core machine, ``-n 2`` ran the release suite ~8x
    slower than with one thread each; a tiny model's batch took 3.2 s with 2 threads per
    worker vs 0.02 s with 1).  ``auto``: the CPUs this process may use (its affinity mask)
    divided by the workers, unless the user set ``OMP_NUM_THREADS``; ``keep``: torch's own
    choice; a number: that many.  The one place threads are set: ``OMP_NUM_THREADS`` before
    torch is imported (the plugin imports it lazily), ``torch.set_num_threads`` if a conftest
    imported it already."""
    value = str(_value(config, "diffeval_worker_threads") or "auto").strip()
    if value == "keep" or (value == "auto" and "OMP_NUM_THREADS" in os.environ):
        return
    if value == "auto":
        workers = int(getattr(config, "workerinput", {}).get("workercount", 1) or 1)
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        threads = max(1, cores // workers)
    elif value.isdigit() and int(value) > 0:
        threads = int(value)
    else:
        raise pytest.UsageError(f"pytest-diffeval: --diffeval-worker-threads={value!r}: use auto, keep or a number")
    os.environ["OMP_NUM_THREADS"] = str(threads)  # read when torch is imported
    if "torch" in sys.modules:  # a conftest imported it already
        sys.modules["torch"].set_num_threads(threads)


def _model_dist(config: pytest.Config) -> bool:
    """Whether this xdist controller schedules by model (``-n`` with --dist load, the default)."""
    if _is_worker(config) or not config.pluginmanager.hasplugin("xdist"):
        return False
    if not getattr(config.option, "numprocesses", None) or getattr(config.option, "collectonly", False):
        return False
    if getattr(config.option, "dist", "no") not in ("load", "loadgroup"):
        return False
    mode = str(_value(config, "diffeval_dist") or "model").strip()
    if mode not in ("model", "xdist"):
        raise pytest.UsageError(f"pytest-diffeval: --diffeval-dist={mode!r}: use 'model' or 'xdist'")
    return mode == "model"


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """Under ``-n``: keep each model's tests on as few workers as possible (see scheduling.py)."""
    directory = config.stash.get(_ENTRIES_DIR, None)
    if directory is None:
        return None
    from .scheduling import make_scheduler

    return make_scheduler(config, log, directory)


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node: Any) -> None:
    directory = node.config.stash.get(_ENTRIES_DIR, None)
    if directory is not None:
        node.workerinput["diffeval_entries_dir"] = directory


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node: Any, error: Any) -> None:
    counters = getattr(node, "workeroutput", {}).get("diffeval_counters")
    if counters:
        _WORKER_COUNTERS[str(node.gateway.id)] = counters
    if error is not None and error != "keyboard-interrupt":  # the worker crashed
        if not _CRASHED_WORKERS:
            node.config.pluginmanager.register(_KeepBaselinesAfterCrash(), "diffeval-keep-baselines-after-crash")
        _CRASHED_WORKERS.append(str(node.gateway.id))


_CRASHED_WORKERS: list[str] = []  # on the xdist controller: workers that died


class _KeepBaselinesAfterCrash:
    """After a worker crash, syrupy's unused-baseline accounting is wrong: the dead worker
    never sent its record of the baselines its tests used (its replacement sends one, so
    syrupy's own missing-report check passes), and ``--snapshot-update`` deleted them as
    unused.  So unused detection is off for that run (as syrupy does when reports are
    missing) and the terminal says why."""

    @pytest.hookimpl(tryfirst=True)
    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        if hasattr(session.config.option, "disable_unused_snapshots"):
            session.config.option.disable_unused_snapshots = True

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        workers = ", ".join(repr(w) for w in _CRASHED_WORKERS)
        terminalreporter.write_line(
            f"pytest-diffeval: worker {workers} crashed: unused-baseline detection skipped, no baseline deleted "
            "(the dead worker's record of the baselines its tests used is lost); fix: fix the crash, then run "
            "again to report or delete unused baselines", yellow=True)


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list[pytest.Item]) -> None:
    """``--diffeval-shard=i/N``: keep this shard's tests (each model's tests together)."""
    shard = config.getoption("diffeval_shard")
    if not shard or not items:
        return
    from .scheduling import assign_shards, entries_of, parse_shard

    index, total = parse_shard(shard)
    try:
        assigned = assign_shards(entries_of(items), total)  # machine-independent: every runner agrees
    except ValueError as exc:  # a malformed diffeval_plan marker
        raise pytest.UsageError(str(exc)) from None
    keep = [item for item in items if assigned[item.nodeid] == index - 1]
    dropped = [item for item in items if assigned[item.nodeid] != index - 1]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = keep


@pytest.hookimpl(tryfirst=True)
def pytest_collection_finish(session: pytest.Session) -> None:
    """Read the plans of the selected tests; under ``-n`` with model scheduling, report each
    test's group to the controller and learn which tests share this worker's units."""
    try:
        _PLANNER.collect(session.items)
    except ValueError as exc:
        raise pytest.UsageError(str(exc)) from None
    workerinput = getattr(session.config, "workerinput", None)
    directory = (workerinput or {}).get("diffeval_entries_dir")
    if directory:
        from .scheduling import entries_of, partition, write_entries

        entries = entries_of(session.items, _will_skip)
        write_entries(directory, str(workerinput.get("workerid", "gw")), entries)
        if _PLANNER.plans:
            _PLANNER.unit_of = partition(entries, int(workerinput.get("workercount", 1))).unit_of


def _will_skip(item: pytest.Item) -> bool:
    """Whether a GPU test will be skipped here (for scheduling: it holds no model)."""
    return (item.get_closest_marker("gpu") is not None and not item.config.getoption("diffeval_require_gpu")
            and not _device().startswith("cuda"))


@pytest.hookimpl(wrapper=True)
def pytest_runtestloop(session: pytest.Session) -> Any:
    """An xdist worker whose tests are done helps the others before it exits (see
    :func:`_help_with_plans`)."""
    result = yield
    if _is_worker(session.config) and not (session.shouldfail or session.shouldstop):
        _help_with_plans(session.config)
    return result


def _help_with_plans(config: pytest.Config) -> None:
    """Generate, into the shared image cache, the samples that planned tests still need and
    nobody has made or claimed yet, with pipelines this worker already loaded.

    The scheduler shuts a worker down once nothing is left that it may run, while another
    may still be working through a big planned test (128 samples is one test).  Claims
    (claims.py) let this worker take batches of that test's samples that its owner has not
    reached yet; the owner then reads them from the cache.  Never loads a model, never fails
    the run: a helping error is a warning."""
    cache = image_cache(config)
    if cache is None or not _PLANNER.plans or _PIPELINES is None:
        return
    from .generation import prefetch_images

    dtype = _value(config, "diffeval_dtype")
    size = int(_value(config, "diffeval_batch_size"))
    for plan_id, plan in _PLANNER.plans.items():
        pipe = _PIPELINES.loaded(_override(plan.model), dtype=dtype, device=_device())
        if pipe is None:
            continue
        wanted: set[str] = set()
        for test, test_plan in _PLANNER.test_plan.items():
            if test_plan == plan_id:
                wanted.update(_PLANNER.test_prompts.get(test) or plan.prompts)
        prompts = [p for p in plan.prompts if p in wanted]
        try:
            COUNTERS.help_samples += prefetch_images(pipe, prompts, seeds=plan.seeds, batch_size=plan.batch_size or size,
                                                     cache=cache, **plan.call_kwargs)
        except Exception as exc:  # noqa: BLE001 - helping is optional; the owner generates what is left
            warnings.warn(f"pytest-diffeval: an idle worker could not help with the plan of {plan.model!r}: "
                          f"{type(exc).__name__}: {exc}", UserWarning, stacklevel=1)
            return


_TESTS_RUN = [0]


def pytest_runtest_logfinish(nodeid: str, location: Any) -> None:
    _PLANNER.finished(nodeid)
    _TESTS_RUN[0] += 1


def _counters() -> dict[str, Any]:
    """This process's loads and cache counts (sent from xdist workers to the controller)."""
    import sys

    backbones = sys.modules.get("pytest_diffeval.metrics.backbones")
    return {
        "tests": _TESTS_RUN[0],
        "cpu_s": round(time.process_time(), 1),
        "pipelines": dict(_PIPELINES.loads) if _PIPELINES is not None else {},
        "evictions": dict(getattr(_PIPELINES, "evictions", {})) if _PIPELINES is not None else {},
        "backbones": dict(getattr(backbones, "LOADS", {}) or {}),
        "images": [_IMAGES.misses, _IMAGES.hits, str(_IMAGES.directory)] if _IMAGES is not None else None,
        **{k: v for k, v in COUNTERS.as_dict().items() if k != "oom_backoffs"},
    }


def _counter_lines(where: str, counters: dict[str, Any]) -> list[str]:
    """The ``-v`` summary lines of one process."""
    lines = []
    if where.startswith("gw"):
        lines.append(f"diffeval work in {where}: {counters.get('tests', 0)} tests, {counters.get('cpu_s', 0)} s CPU")
    pipelines, backbones = counters.get("pipelines") or {}, counters.get("backbones") or {}
    if pipelines or backbones or counters.get("images"):
        loads = f"diffeval loads in {where}: pipelines " + (", ".join(f"{k}: {v}" for k, v in pipelines.items())
                                                            or "none")
        if backbones:
            loads += "; backbones " + ", ".join(f"{k}: {v}" for k, v in backbones.items())
        lines.append(loads)
    if counters.get("evictions"):
        lines.append(f"diffeval evictions in {where}: " + ", ".join(f"{k}: {v}" for k, v in counters["evictions"].items())
                     + " (pipelines dropped to make room: --diffeval-max-pipelines, or GPU memory short)")
    if counters.get("images"):
        misses, hits, directory = counters["images"]
        line = f"diffeval images in {where}: {misses} generated, {hits} from the cache {directory}"
        if counters.get("lazy_hits"):
            line += f" ({counters['lazy_hits']} generate() calls read only from the cache)"
        lines.append(line)
    if counters.get("feature_hits") or counters.get("feature_misses"):
        lines.append(f"diffeval features in {where}: {counters['feature_misses']} computed, "
                     f"{counters['feature_hits']} from the cache {counters.get('feature_dir')}")
    if counters.get("result_hits") or counters.get("result_misses"):
        cached = (f", {counters['result_hits']} from the cache {counters['result_dir']}" if counters.get("result_dir")
                  else " (no result cache)")
        lines.append(f"diffeval metrics in {where}: {counters['result_misses']} computed{cached}")
    if counters.get("plan_tests"):
        lines.append(f"diffeval plans in {where}: {counters['plan_tests']} planned tests; {counters['plan_samples']} "
                     f"samples generated for them in {counters['plan_batches']} batches")
    if counters.get("help_samples"):
        lines.append(f"diffeval help in {where}: {counters['help_samples']} samples generated, once idle, for "
                     "planned tests of other workers")
    return lines


def _pytest_cache_dir(config: pytest.Config) -> Path | None:
    cache = getattr(config, "cache", None)  # None under -p no:cacheprovider
    return Path(cache.mkdir("diffeval")) if cache is not None else None


def _device() -> str:
    try:
        return settings.resolved_device()
    except RuntimeError as exc:
        raise pytest.UsageError(str(exc)) from None


def pytest_sessionstart(session: pytest.Session) -> None:
    if session.config.getoption("diffeval_require_gpu") and not _device().startswith("cuda"):
        raise pytest.UsageError("pytest-diffeval: --diffeval-require-gpu was given but no CUDA GPU is available "
                                "here; a GPU runner that silently runs on the CPU is a false green. fix: check "
                                "`nvidia-smi`, CUDA_VISIBLE_DEVICES and that `python -c \"import torch; "
                                "print(torch.cuda.is_available())\"` prints True (a CUDA build of torch), or run "
                                "without --diffeval-require-gpu to test on the CPU")
    if settings.current().update_baselines and not _is_worker(session.config):
        remove_leftovers(DiffevalBaselineExtension.root)  # what killed updates left, in every test's folder


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item: pytest.Item) -> Any:
    if item.get_closest_marker("gpu") and not _device().startswith("cuda"):
        reason = ("needs a CUDA GPU; run on a GPU machine with `pytest --diffeval-require-gpu` "
                  f"(device here: {_device()})")
        if item.config.getoption("diffeval_require_gpu"):
            pytest.fail(reason)
        pytest.skip(reason)
    try:
        return (yield)
    except FileNotFoundError as exc:  # a fixture may load the hub model
        _skip_missing_weights(item, exc)
        raise


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Any:
    try:
        return (yield)
    except FileNotFoundError as exc:
        _skip_missing_weights(item, exc)
        raise


def _skip_missing_weights(item: pytest.Item, exc: FileNotFoundError) -> None:
    """In a ``gpu`` test, hub weights that are not here (not cached, not downloadable) skip
    the test with a reason naming the model and how to get it; under
    ``--diffeval-require-gpu`` they fail it (a GPU runner that silently skips is a false
    green).  Elsewhere a missing model stays the error it is (this returns)."""
    reason = _missing_weights_reason(exc) if item.get_closest_marker("gpu") else None
    if reason is None:
        return
    if item.config.getoption("diffeval_require_gpu"):
        pytest.fail(f"{reason} (a failure, not a skip, under --diffeval-require-gpu)", pytrace=False)
    pytest.skip(reason)


def _missing_weights_reason(exc: FileNotFoundError) -> str | None:
    from .pipelines import WeightsNotAvailableError

    if isinstance(exc, WeightsNotAvailableError):
        return (f"needs the weights of {exc.model_id!r}, which are neither in the Hugging Face cache nor "
                f"downloadable here; {exc.how_to_get()}")
    if type(exc).__name__ == "BackboneNotFoundError":  # a metric's CLIP/feature weights (metrics/backbones.py)
        return f"needs a metric backbone's weights that are not here: {str(exc).splitlines()[0]}"
    return None


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Any:
    outcome = yield
    report = outcome.get_result()
    if call.when == "call":
        records = settings.current().records
        mine = [r for r in records if r["test"] == item.nodeid]
        records[:] = [r for r in records if r["test"] != item.nodeid]
        # An attribute of the report travels from xdist workers to the controller.
        report.diffeval = mine
        for row in mine:
            item.user_properties.append((f"diffeval.{row['metric']}", f"{row['value']:.6g}"))
            item.user_properties.append((f"diffeval.{row['metric']}.verdict", row["verdict"]))


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    _ROWS.extend(getattr(report, "diffeval", None) or [])
    if report.failed:  # its baseline went unused because it failed (a tripwire, say): keep it
        DiffevalBaselineExtension.failed_tests.add(report.nodeid)


_OUTPUTS = pytest.StashKey[Outputs]()


def _is_worker(config: pytest.Config) -> bool:
    """An xdist worker (its config has ``workerinput``).  Not the environment variable: a
    pytest started from inside a worker (pytester) inherits it but is a controller."""
    return hasattr(config, "workerinput")


def _report_path(config: pytest.Config) -> Path:
    value = _value(config, "diffeval_report")
    if value:
        return (Path(config.rootpath) / value).resolve()
    return Path(settings.current().results_dir) / "report.html"


def _outcomes(config: pytest.Config) -> dict[str, str]:
    """pytest's outcome of each test (from the terminal reporter's statistics)."""
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    outcomes: dict[str, str] = {}
    for key in ("passed", "failed", "error", "skipped", "xfailed", "xpassed"):
        for report in getattr(reporter, "stats", {}).get(key, []):
            nodeid = getattr(report, "nodeid", None)
            if nodeid and (key in {"failed", "error"} or nodeid not in outcomes):
                outcomes[nodeid] = key
    return outcomes


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """On the controller (all workers' rows are in by now): write ``metrics.json``, the HTML
    report and, on GitHub Actions, the step summary."""
    config = session.config
    if _is_worker(config):
        config.workeroutput["diffeval_counters"] = _counters()  # type: ignore[attr-defined]
        return
    if not _ROWS:
        return
    from .report import write_outputs

    meta = {
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "pytest_diffeval": __version__,
        "exitstatus": int(exitstatus),
        "rootdir": str(config.rootpath),
        "args": [str(a) for a in config.invocation_params.args],
        "workers": getattr(config.option, "numprocesses", None) or 0,
        "shard": config.getoption("diffeval_shard") or None,
        "results_always": settings.current().results_always,
    }
    config.stash[_OUTPUTS] = write_outputs(
        list(_ROWS), results_dir=Path(settings.current().results_dir), report=_report_path(config), meta=meta,
        outcomes=_outcomes(config), step_summary_file=os.environ.get("GITHUB_STEP_SUMMARY") or None,
    )


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    if _is_worker(config):
        return
    if _ROWS:
        terminalreporter.write_sep("=", "diffeval: metric checks")
        for line, bad in summary_lines(_ROWS):
            terminalreporter.write_line(line, red=bad, bold=bad)
        outputs = config.stash.get(_OUTPUTS, None)
        if outputs is not None:
            if outputs.report:
                terminalreporter.write_line(f"diffeval HTML report: {outputs.report}")
            if outputs.metrics:
                terminalreporter.write_line(f"diffeval metrics: {outputs.metrics}")
            if outputs.step_summary:
                terminalreporter.write_line(f"diffeval step summary appended to {outputs.step_summary}")
            for error in outputs.errors:
                terminalreporter.write_line(f"diffeval: {error}", yellow=True)
    if config.getoption("verbose") > 0:
        for line in _counter_lines("this process", _counters()):
            terminalreporter.write_line(line)
        for worker in sorted(_WORKER_COUNTERS, key=lambda w: (len(w), w)):
            for line in _counter_lines(worker, _WORKER_COUNTERS[worker]):
                terminalreporter.write_line(line)


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def diffeval_device() -> str:
    """The device pipelines and metric backbones run on (``--diffeval-device``)."""
    return _device()


def _override(source: Any) -> Any:
    override = settings.current().model_override
    if not override or not isinstance(source, (str, os.PathLike)):
        return source
    if "=" in override:
        original, replacement = override.split("=", 1)
        return replacement if os.fspath(source) == original else source
    return override


@pytest.fixture
def diffusion_pipeline(request: pytest.FixtureRequest, diffeval_device: str) -> Callable[..., Any]:
    """Factory: ``diffusion_pipeline(source, *, pipeline_class=None, dtype=None, device=None,
    scheduler=None, **load_options)`` loads (once per worker and identity) and returns a
    pipeline.  Load options: ``variant=``, ``revision=``, module arguments (``vae=``,
    ``unet=``, ``safety_checker=None``...), ``device_map=``, ``enable_model_cpu_offload=True``,
    ``torch_compile=``, ``attention_backend=``, ``lora=`` and any other ``from_pretrained``
    argument; each is part of the pipeline's identity (modules by their content)."""

    def load(source: Any, *, pipeline_class: Any = None, dtype: Any = None, device: str | None = None,
             scheduler: Any = None, **from_pretrained_kwargs: Any) -> Any:
        return pipeline_cache().get(
            _override(source), pipeline_class=pipeline_class,
            dtype=dtype or _value(request.config, "diffeval_dtype"), device=device or diffeval_device,
            scheduler=scheduler, **from_pretrained_kwargs,
        )

    return load


@pytest.fixture
def generate(request: pytest.FixtureRequest, diffusion_pipeline: Callable[..., Any],
             diffeval_device: str) -> Callable[..., ImageSet]:
    """Factory: ``generate(source_or_pipeline, prompts, *, seeds=(0,), batch_size=None,
    **call_kwargs)`` returns an :class:`ImageSet`, one image per (prompt, seed).  With a
    model name, the load options of ``diffusion_pipeline`` (``variant=``, ``vae=``,
    ``safety_checker=None``, ``torch_compile=``...) may be given here too.

    Samples in the image cache are read, not generated; when all of a call's samples are
    cached the pipeline is not even loaded.  In a test with a ``diffeval_plan`` whose plan
    covers the call, the plan's samples are generated first, in full batches."""

    def run(source_or_pipeline: Any, prompts: Any = None, *, seeds: Any = (0,), batch_size: int | None = None,
            **call_kwargs: Any) -> ImageSet:
        from .generation import check_seeds, generate_images
        from .planning import ensure_plan, images_from_cache, memory_image_cache, plain_text_to_image

        nodeid = request.node.nodeid
        size = batch_size if batch_size is not None else int(_value(request.config, "diffeval_batch_size"))
        if size < 1:  # checked here: a fully cached call never reaches generate_images
            raise ValueError(f"pytest-diffeval: batch_size must be >= 1, got {size}; fix: pass a positive "
                             "batch_size= or --diffeval-batch-size, or leave it out for the default")
        disk = image_cache(request.config)
        cache = disk
        by_name = isinstance(source_or_pipeline, (str, os.PathLike))
        load_options, call_kwargs = split_load_options(call_kwargs)
        if load_options and not by_name:
            raise InputError(f"pytest-diffeval: generate() got load options ({', '.join(sorted(load_options))}) with "
                             "a pipeline that is already loaded; fix: pass them to diffusion_pipeline(MODEL, ...) or "
                             "give generate() the model's name")
        loaded: list[Any] = []

        def pipe() -> Any:
            if not loaded:
                loaded.append(diffusion_pipeline(source_or_pipeline, **load_options) if by_name
                              else source_or_pipeline)
            return loaded[0]

        # the memo knows the provenance of a load without options only
        memo = provenance_memo() if by_name and disk is not None and not load_options else None
        memo_key = None
        if memo is not None:
            dtype = str(_value(request.config, "diffeval_dtype") or "auto")
            memo_key = memo.key(os.fspath(_override(source_or_pipeline)), dtype, diffeval_device)
        plain = plain_text_to_image(prompts, call_kwargs)
        seed_list = check_seeds(seeds)

        unit = _PLANNER.unit(nodeid)
        if unit is not None:
            plan = unit.plan
            if plain is None:
                why: str | None = "the call is not a plain text-to-image call (input images, class labels)"
            elif load_options:
                why = f"it passes load options ({', '.join(sorted(load_options))}) the plan does not"
            elif by_name:
                why = plan.mismatch(os.fspath(source_or_pipeline), plain, seed_list, call_kwargs)
            else:
                model = (getattr(source_or_pipeline, "_diffeval_provenance", None) or {}).get("model")
                why = plan.mismatch(plan.model if model == os.fspath(_override(plan.model)) else str(model),
                                    plain, seed_list, call_kwargs)
            if why is None:
                if cache is None:
                    unit.memory = unit.memory or memory_image_cache()
                    cache = unit.memory
                ensure_plan(unit, load=pipe, cache=cache, batch_size=size, memo=memo, memo_key=memo_key,
                            test_id=nodeid)
                COUNTERS.plan_tests += 1
            else:
                _PLANNER.warn_once(nodeid, f"pytest-diffeval: {nodeid} has a diffeval_plan but its generate() call is "
                                           f"not covered by it ({why}); it is generated on its own")

        images = None
        if memo is not None and plain is not None and disk is not None:
            provenance = memo.get(memo_key)
            flags = torch_flags()  # None: torch not imported here, so nothing changed its defaults
            if provenance is not None and flags is not None and (provenance.get("execution") or {}).get("flags") != flags:
                provenance = None  # TF32/cuDNN/determinism flags differ from the memo's run: other images
            if provenance is not None:
                images = images_from_cache(disk, provenance, plain, seed_list, call_kwargs, nodeid)
        if images is None:
            images = generate_images(pipe(), prompts, seeds=seed_list, batch_size=size, test_id=nodeid, cache=cache,
                                     **call_kwargs)
            if memo is not None:
                memo.put(memo_key, _jsonable_provenance(images.provenance))

        def regenerate(*, batch_size: int = size) -> ImageSet:
            """The same generation again, uncached (for --diffeval-calibrate)."""
            return generate_images(pipe(), prompts, seeds=seed_list, batch_size=batch_size, test_id=nodeid,
                                   **call_kwargs)

        images.regenerate = regenerate
        return images

    return run


def _jsonable_provenance(provenance: dict[str, Any]) -> dict[str, Any]:
    """Provenance as the memo stores it; ``repr`` for odd values, as the image-cache key does."""
    import json

    return json.loads(json.dumps(provenance, default=repr))


@pytest.fixture
def diffeval_baseline(request: pytest.FixtureRequest, snapshot: Any) -> DiffevalBaseline:
    """The test's stored baseline: ``diffeval_baseline.assert_no_regression(images, "clip_score")``."""
    return DiffevalBaseline(snapshot, request.node.nodeid)
