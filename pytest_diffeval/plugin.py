"""The pytest plugin: options, thin fixtures and the hooks that collect every metric
check into the terminal summary (also from xdist workers)."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import pytest

from . import settings
from .baselines import DiffevalBaseline, DiffevalBaselineExtension
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
    option("diffeval-cache-dir", "diffeval_cache_dir", "cache folder (generated images, reference statistics); "
           "default under pytest's cache dir")
    group.addoption("--diffeval-calibrate", type=int, default=0, metavar="N",
                    help="with --snapshot-update: re-run each baseline check N times under benign perturbations "
                         "(1 and 2 threads, batch size 1 and all-at-once) and store the observed noise, from which "
                         "tolerance=None derives the tolerance")
    group.addoption("--diffeval-no-cache", action="store_true", default=False,
                    help="generate every image again (bypass the image cache)")
    option("diffeval-batch-size", "diffeval_batch_size", "default generation batch size", default="8")
    option("diffeval-model", "diffeval_model", "replace the model tests load: NAME (every model) or "
           "ORIGINAL=REPLACEMENT; also env DIFFEVAL_MODEL")
    group.addoption("--diffeval-results-always", action="store_true", default=False,
                    help="save images and metrics for passing checks too")
    option("diffeval-report", "diffeval_report", "self-contained HTML report of the metric checks, relative to "
           "the rootdir; default <results dir>/report.html")
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
        device_request=_value(config, "diffeval_device"),
        records=[],
    )
    DiffevalBaselineExtension.root = settings.current().baselines_dir
    DiffevalBaselineExtension.rootdir = rootdir
    _ROWS.clear()


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
                                "here; a GPU runner that silently runs on the CPU is a false green")


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("gpu") and not _device().startswith("cuda"):
        reason = ("needs a CUDA GPU; run on a GPU machine with `pytest --diffeval-require-gpu` "
                  f"(device here: {_device()})")
        if item.config.getoption("diffeval_require_gpu"):
            pytest.fail(reason)
        pytest.skip(reason)


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
    if _is_worker(config) or not _ROWS:
        return
    from . import __version__
    from .report import write_outputs

    meta = {
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "pytest_diffeval": __version__,
        "exitstatus": int(exitstatus),
        "rootdir": str(config.rootpath),
        "args": [str(a) for a in config.invocation_params.args],
        "workers": getattr(config.option, "numprocesses", None) or 0,
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
    if config.getoption("verbose") > 0 and _PIPELINES is not None and _PIPELINES.loads:
        from .metrics.backbones import LOADS

        terminalreporter.write_line("diffeval loads in this process: pipelines " +
                                    ", ".join(f"{k}: {v}" for k, v in _PIPELINES.loads.items()) +
                                    ("; backbones " + ", ".join(f"{k}: {v}" for k, v in LOADS.items()) if LOADS else ""))
    if config.getoption("verbose") > 0 and _IMAGES is not None:
        terminalreporter.write_line(f"diffeval images in this process: {_IMAGES.misses} generated, "
                                    f"{_IMAGES.hits} from the cache {_IMAGES.directory}")


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
    scheduler=None, **from_pretrained_kwargs)`` loads (once per worker) and returns a pipeline."""

    def load(source: Any, *, pipeline_class: Any = None, dtype: Any = None, device: str | None = None,
             scheduler: Any = None, **from_pretrained_kwargs: Any) -> Any:
        return pipeline_cache().get(
            _override(source), pipeline_class=pipeline_class,
            dtype=dtype or _value(request.config, "diffeval_dtype"), device=device or diffeval_device,
            scheduler=scheduler, **from_pretrained_kwargs,
        )

    return load


@pytest.fixture
def generate(request: pytest.FixtureRequest, diffusion_pipeline: Callable[..., Any]) -> Callable[..., ImageSet]:
    """Factory: ``generate(source_or_pipeline, prompts, *, seeds=(0,), batch_size=None,
    **call_kwargs)`` returns an :class:`ImageSet`, one image per (prompt, seed)."""

    def run(source_or_pipeline: Any, prompts: Any, *, seeds: Any = (0,), batch_size: int | None = None,
            **call_kwargs: Any) -> ImageSet:
        from .generation import generate_images

        pipe = source_or_pipeline
        if isinstance(source_or_pipeline, (str, os.PathLike)):
            pipe = diffusion_pipeline(source_or_pipeline)
        size = batch_size or int(_value(request.config, "diffeval_batch_size"))
        images = generate_images(pipe, prompts, seeds=seeds, batch_size=size, test_id=request.node.nodeid,
                                 cache=image_cache(request.config), **call_kwargs)

        def regenerate(*, batch_size: int = size) -> ImageSet:
            """The same generation again, uncached (for --diffeval-calibrate)."""
            return generate_images(pipe, prompts, seeds=seeds, batch_size=batch_size, test_id=request.node.nodeid,
                                   **call_kwargs)

        images.regenerate = regenerate
        return images

    return run


@pytest.fixture
def diffeval_baseline(request: pytest.FixtureRequest, snapshot: Any) -> DiffevalBaseline:
    """The test's stored baseline: ``diffeval_baseline.assert_no_regression(images, "clip_score")``."""
    return DiffevalBaseline(snapshot, request.node.nodeid)
