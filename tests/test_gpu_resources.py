"""GPU resources on the CPU, with fakes where CUDA is needed (issue 16, items 5-8, 10):
pipeline eviction (LRU, by count and by GPU memory), xdist workers bound to their own GPU
before CUDA starts, offload/device_map placement, the execution device in provenance, GPU
time and peak memory per generation, and the feature extractors' precision.
``benchmarks/gpu_check.py`` checks the same on a real GPU."""

from __future__ import annotations

import textwrap
import weakref
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch

from pytest_diffeval import process_cache, settings
from pytest_diffeval.pipelines import cache as pipeline_cache
from pytest_diffeval.plugin import options, summary
from pytest_diffeval.session import DiffevalSession
from pytest_diffeval.hardware import hardware_key
from pytest_diffeval.generation import GpuMeter, generate_images, pipeline_provenance
from pytest_diffeval.identity import load_provenance
from pytest_diffeval.pipelines import PipelineCache, load_pipeline, pipeline_bytes
from pytest_diffeval.planning import ProvenanceMemo


class FakePipe:
    """A loaded pipeline: one module of ``size`` float32 parameters."""

    def __init__(self, source: str, size: int = 1000) -> None:
        self.source = source
        self.components = {"unet": torch.nn.Linear(size, 1, bias=False)}
        self.hooks_removed = False

    def remove_all_hooks(self) -> None:
        self.hooks_removed = True


@pytest.fixture
def use_settings():
    """``use_settings(**fields)``: fresh settings with those fields, active until the test ends."""
    tokens: list[int] = []

    def use(**fields: Any) -> settings.Settings:
        tokens.append(settings.push(settings.Settings(**fields)))
        return settings.current()

    yield use
    if tokens:
        settings.pop(tokens[0])


@pytest.fixture
def fake_loads(monkeypatch: pytest.MonkeyPatch, use_settings: Any) -> list[str]:
    """``load_pipeline`` replaced by one that records the sources it loads."""
    loaded: list[str] = []

    def load(source: Any, **kwargs: Any) -> FakePipe:
        loaded.append(str(source))
        return FakePipe(str(source))

    monkeypatch.setattr(pipeline_cache, "load_pipeline", load)
    use_settings()
    return loaded


# --------------------------------------------------------------------------- 5: eviction


def test_max_pipelines_evicts_the_least_recently_used_and_frees_it(fake_loads: list[str]) -> None:
    cache = PipelineCache(max_pipelines=2)
    a = cache.get("org/a")
    cache.get("org/b")
    assert cache.get("org/a") is a  # a used again: b is now the least recently used
    gone = weakref.ref(cache._pipes[next(k for k in cache._pipes if k.source == "org/b")])
    cache.get("org/c")
    assert [k.source for k in cache._pipes] == ["org/a", "org/c"]
    assert cache.evictions == {"org/b": 1}
    assert gone() is None  # no reference left: its memory is free
    cache.get("org/b")  # needed again: loaded again, evicting a
    assert fake_loads == ["org/a", "org/b", "org/c", "org/b"]
    assert cache.loads == {"org/a": 1, "org/b": 2, "org/c": 1}
    assert cache.evictions == {"org/b": 1, "org/a": 1}


def test_the_limit_comes_from_the_option_and_auto_keeps_everything_on_the_cpu(fake_loads: list[str],
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda *a: pytest.fail("GPU memory asked on the CPU"))
    cache = PipelineCache()
    for name in "abcd":
        cache.get(f"org/{name}")
    assert cache.evictions == {}  # auto: no count limit, and no memory pressure on the CPU
    settings.configure(max_pipelines=1)
    hooked = cache._pipes[next(iter(cache._pipes))]
    cache.get("org/e")
    assert len(cache._pipes) == 1 and sum(cache.evictions.values()) == 4
    assert hooked.hooks_removed  # offload hooks (which hold the modules) are removed on eviction
    assert options.max_pipelines("auto") is None and options.max_pipelines("3") == 3
    with pytest.raises(pytest.UsageError, match=r"--diffeval-max-pipelines='0' .* fix: e.g. --diffeval-max-pipelines=1"):
        options.max_pipelines("0")


def test_on_cuda_pipelines_are_evicted_while_free_memory_is_short(fake_loads: list[str],
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """A fake GPU of 2.5 pipelines' memory: the third load evicts the least recently used
    one, memory is given back with empty_cache, and the loaded bytes never exceed the GPU."""
    cache = PipelineCache()
    one = pipeline_bytes(FakePipe("x"))
    total = int(2.5 * one)
    emptied: list[int] = []
    used_at_load: list[int] = []

    def used() -> int:
        return sum(pipeline_bytes(p) for p in cache._pipes.values())

    def mem_get_info(index: int = 0) -> tuple[int, int]:
        return total - used(), total

    def load(source: Any, **kwargs: Any) -> FakePipe:
        used_at_load.append(used())
        return FakePipe(str(source))

    monkeypatch.setattr(pipeline_cache, "load_pipeline", load)

    monkeypatch.setattr(torch.cuda, "mem_get_info", mem_get_info)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: emptied.append(1))
    cache.get("org/a", device="cuda:0")
    cache.get("org/b", device="cuda:0")
    assert cache.evictions == {}  # 1.5 pipelines free: room for one more
    cache.get("org/a", device="cuda:0")  # a used again
    cache.get("org/c", device="cuda:0")
    assert cache.evictions == {"org/b": 1}  # the least recently used, and only it
    assert [k.source for k in cache._pipes] == ["org/a", "org/c"]
    assert emptied  # freed blocks returned to the driver
    assert used_at_load == [0, one, one] and max(used_at_load) + one <= total  # each load found room for itself


def test_evictions_are_in_the_verbose_summary(fake_loads: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    cache = PipelineCache(max_pipelines=1)
    cache.get("org/a")
    cache.get("org/b")
    monkeypatch.setitem(process_cache._MODELS, ("pipelines",), cache)
    lines = summary.counter_lines("gw1", summary.process_counters(DiffevalSession(settings.Settings())))
    assert any(line.startswith("diffeval evictions in gw1: org/a: 1") for line in lines), lines


def test_max_pipelines_option_evicts_in_a_real_run(user_project: pytest.Pytester) -> None:
    """End to end: the ini value reaches the cache, a third test reloads the model evicted
    for the second, and ``-v`` says so."""
    user_project.makepyfile(test_two_models=textwrap.dedent("""
        from conftest import PIPE

        def test_a(diffusion_pipeline):
            diffusion_pipeline(PIPE)

        def test_b(diffusion_pipeline):
            diffusion_pipeline("diffeval/tiny-t2i")

        def test_c(diffusion_pipeline):
            diffusion_pipeline(PIPE)
    """))
    user_project.makeini(textwrap.dedent("""
        [pytest]
        diffeval_max_pipelines = 1
        filterwarnings = ignore::FutureWarning
    """))
    result = user_project.runpytest("-v", "-p", "no:randomly")
    result.assert_outcomes(passed=3)
    result.stdout.re_match_lines([r"diffeval loads in this process: pipelines .*tiny-sd: 2, .*tiny-t2i.*: 1",
                                  r"diffeval evictions in this process: .*tiny-sd: 1, .*tiny-t2i.*: 1 \(pipelines dropped"],
                                 consecutive=False)


# --------------------------------------------------------------------------- 6: binding


@pytest.mark.parametrize("worker, expected", [("gw0", "0"), ("gw1", "1"), ("gw2", "0"), ("gw3", "1")])
def test_each_worker_narrows_cuda_visible_devices_to_its_gpu(worker: str, expected: str) -> None:
    environ = {"CUDA_VISIBLE_DEVICES": "0,1"}
    assert settings.bind_worker_gpu(worker, environ) == expected
    assert environ["CUDA_VISIBLE_DEVICES"] == expected


def test_binding_counts_device_nodes_without_starting_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    import glob

    monkeypatch.setattr(glob, "glob", lambda pattern: ["/dev/nvidia0", "/dev/nvidia1", "/dev/nvidia2",
                                                       "/dev/nvidiactl", "/dev/nvidia-uvm"])
    monkeypatch.setattr(torch.cuda, "device_count", lambda: pytest.fail("CUDA started to count the GPUs"))
    environ: dict[str, str] = {}
    assert settings.bind_worker_gpu("gw4", environ) == "1"  # 4 mod 3 GPUs
    assert environ["CUDA_VISIBLE_DEVICES"] == "1"


def test_no_binding_with_one_gpu_or_once_cuda_is_initialised(monkeypatch: pytest.MonkeyPatch) -> None:
    one = {"CUDA_VISIBLE_DEVICES": "3"}
    assert settings.bind_worker_gpu("gw1", one) is None and one == {"CUDA_VISIBLE_DEVICES": "3"}
    assert settings.bind_worker_gpu("master", {"CUDA_VISIBLE_DEVICES": "0,1"}) is None
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)  # too late: set_device does it instead
    late = {"CUDA_VISIBLE_DEVICES": "0,1"}
    assert settings.bind_worker_gpu("gw1", late) is None and late["CUDA_VISIBLE_DEVICES"] == "0,1"


def test_xdist_workers_see_only_their_own_gpu(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    """End to end: under ``-n 2`` with two visible GPUs each worker's tests run with
    CUDA_VISIBLE_DEVICES narrowed to its GPU, set before any test (and before torch)."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    out = pytester.path / "seen"
    out.mkdir()
    pytester.makepyfile(test_bound=textwrap.dedent(f"""
        import os, sys
        import pytest

        @pytest.mark.parametrize("i", range(6))
        def test_record(i):
            worker = os.environ["PYTEST_XDIST_WORKER"]
            torch = sys.modules.get("torch")
            started = bool(torch is not None and torch.cuda.is_initialized())
            with open(os.path.join({str(out)!r}, f"{{worker}}-{{i}}"), "w") as f:
                f.write(os.environ["CUDA_VISIBLE_DEVICES"] + " " + str(started))
    """))
    result = pytester.runpytest("-n", "2", "-p", "no:randomly", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=6)
    seen = {p.name: p.read_text() for p in out.iterdir()}
    workers = {name.split("-")[0] for name in seen}
    assert workers == {"gw0", "gw1"}, seen
    for name, text in seen.items():
        assert text == f"{int(name.split('-')[0][2:]) % 2} False", (name, text)


# --------------------------------------------------------------------------- 7, 8: placement


class PlacedPipe(FakePipe):
    """A pipeline class that records how it was placed, refusing ``.to()`` when
    device-mapped, as diffusers does."""

    calls: list[tuple[str, Any]] = []

    @classmethod
    def from_pretrained(cls, location: str, **kwargs: Any) -> "PlacedPipe":
        PlacedPipe.calls.append(("from_pretrained", dict(kwargs)))
        pipe = cls(location)
        pipe.hf_device_map = kwargs.get("device_map")
        return pipe

    def to(self, device: Any) -> "PlacedPipe":
        if self.hf_device_map is not None:
            raise ValueError("It seems like you have activated a device mapping strategy on the pipeline "
                             "so calling `to()` is not allowed")
        PlacedPipe.calls.append(("to", str(device)))
        return self

    def enable_model_cpu_offload(self, gpu_id: Any = None, device: Any = None) -> None:
        PlacedPipe.calls.append(("enable_model_cpu_offload", str(device)))

    def enable_sequential_cpu_offload(self, gpu_id: Any = None, device: Any = None) -> None:
        PlacedPipe.calls.append(("enable_sequential_cpu_offload", str(device)))


@pytest.fixture
def placed(tiny_models: dict[str, Path]) -> list[tuple[str, Any]]:
    PlacedPipe.calls = []
    return PlacedPipe.calls


def test_device_map_pipelines_are_not_moved(tiny_models: dict[str, Path], placed: list[tuple[str, Any]]) -> None:
    pipe = load_pipeline(tiny_models["pipe"], pipeline_class=PlacedPipe, device="cuda:0", device_map="balanced")
    assert placed[0][0] == "from_pretrained" and placed[0][1]["device_map"] == "balanced"
    assert not [c for c in placed if c[0] == "to"]
    assert load_provenance(pipe)["device_map"] == "'balanced'"


def test_model_offload_is_applied_after_loading_on_this_workers_gpu(tiny_models: dict[str, Path],
                                                                    placed: list[tuple[str, Any]]) -> None:
    pipe = load_pipeline(tiny_models["pipe"], pipeline_class=PlacedPipe, device="cuda:1",
                         enable_model_cpu_offload=True)
    assert "enable_model_cpu_offload" not in placed[0][1]  # a load option of the plugin, not of from_pretrained
    assert placed[1:] == [("enable_model_cpu_offload", "cuda:1")]  # not moved; offloaded to the worker's GPU
    assert load_provenance(pipe)["offload"] == "model"
    placed.clear()
    load_pipeline(tiny_models["pipe"], pipeline_class=PlacedPipe, device="cuda:1", enable_sequential_cpu_offload=True)
    assert placed[1:] == [("enable_sequential_cpu_offload", "cuda:1")]


def test_offload_options_that_cannot_work_say_so(tiny_models: dict[str, Path], placed: list[tuple[str, Any]]) -> None:
    with pytest.raises(ValueError, match=r"enable_model_cpu_offload=True keeps modules on the CPU .* device is 'cpu'; "
                                         r"fix: run on CUDA"):
        load_pipeline(tiny_models["pipe"], pipeline_class=PlacedPipe, device="cpu", enable_model_cpu_offload=True)
    with pytest.raises(ValueError, match=r"and device_map='balanced' were both given"):
        load_pipeline(tiny_models["pipe"], pipeline_class=PlacedPipe, device="cuda:0", enable_model_cpu_offload=True,
                      device_map="balanced")
    assert placed == []  # refused before loading


@pytest.fixture
def fake_gpu(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """torch.cuda's device-name and memory/timing functions, answering for a fake GPU."""
    state: dict[str, Any] = {"synced": 0, "reset": 0}
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=None: "Fake GPU")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: (8, 9))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: state.__setitem__("synced", state["synced"] + 1))
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats",
                        lambda device=None: state.__setitem__("reset", state["reset"] + 1))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: 3 * 2**30)
    return state


def test_offloaded_pipelines_are_recorded_on_their_execution_device(tiny_models: dict[str, Path],
                                                                     fake_gpu: dict[str, Any]) -> None:
    """diffusers' own ``_execution_device`` of a real pipeline whose modules carry offload
    hooks: the modules sit on the CPU (``pipe.device``), the baseline key is the GPU's."""
    pipe = PipelineCache().get(tiny_models["pipe"])
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            component._hf_hook = SimpleNamespace(execution_device=torch.device("cuda", 1))
    assert str(pipe.device) == "cpu"
    provenance = pipeline_provenance(pipe)
    assert provenance["device"] == "cuda:1"
    assert hardware_key(provenance).startswith("cuda/Fake GPU (sm89)/")


# --------------------------------------------------------------------------- GPU time and memory


class RecordingT2I:
    """A text-to-image pipeline on a (fake) GPU: black images, one per generator."""

    _execution_device = torch.device("cuda", 0)
    dtype = torch.float16

    def __call__(self, prompt: list[str], generator: list[Any], output_type: str = "np") -> Any:
        return SimpleNamespace(images=np.zeros((len(prompt), 8, 8, 3), dtype=np.float32))


def test_gpu_time_and_peak_memory_are_in_the_provenance_and_the_report(fake_gpu: dict[str, Any],
                                                                       tiny_models: dict[str, Path]) -> None:
    from pytest_diffeval.report.html import _provenance

    images = generate_images(RecordingT2I(), ["a", "b", "c"], seeds=[0, 1], batch_size=4)
    assert images.provenance["gpu_peak_memory_mb"] == 3 * 1024.0
    assert images.provenance["gpu_s_per_image"] is not None and images.provenance["gpu_s_per_image"] >= 0
    assert fake_gpu["reset"] == 1 and fake_gpu["synced"] == 4  # two batches, synchronised before and after
    html = _provenance([{"provenance": images.provenance}], {})
    assert "gpu_peak_memory_mb" in html and "3072.0" in html and "gpu_s_per_image" in html
    cpu = generate_images(PipelineCache().get(tiny_models["pipe"]), ["a"], num_inference_steps=1)
    assert cpu.provenance["gpu_peak_memory_mb"] is None and cpu.provenance["gpu_s_per_image"] is None
    assert "gpu_peak_memory_mb" not in _provenance([{"provenance": cpu.provenance}], {})


def test_run_figures_are_not_memoised_as_the_models_provenance(tmp_path: Path) -> None:
    memo = ProvenanceMemo(tmp_path)
    memo.put("k", {"model_hash": "abc", "gpu_peak_memory_mb": 12.0, "gpu_s_per_image": 0.5})
    assert memo.get("k") == {"model_hash": "abc"}  # a later cached read did no GPU work


def test_the_gpu_meter_on_the_cpu_never_touches_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: pytest.fail("synchronised on the CPU"))
    meter = GpuMeter("cpu")
    with meter:
        meter.images += 2
    assert meter.fields() == {"gpu_peak_memory_mb": None, "gpu_s_per_image": None}


# --------------------------------------------------------------------------- 10: feature precision


def test_feature_precision_is_float32_on_cuda_and_float64_on_the_cpu(use_settings: Any) -> None:
    use_settings()
    assert settings.feature_dtype("cuda:0") == "float32" and settings.feature_dtype("cpu") == "float64"
    settings.configure(feature_dtype="float64")
    assert settings.feature_dtype("cuda:1") == "float64"
    settings.configure(feature_dtype="half")
    with pytest.raises(ValueError, match=r"--diffeval-feature-dtype='half' is not auto, float32 or float64; fix"):
        settings.feature_dtype("cuda")


class ConvFeatures(torch.nn.Module):
    """A small random convolutional feature extractor (uint8 images in, 16 features out),
    standing in for Inception, which needs torchvision (tests/test_inception.py runs the
    same check on the real network in CI's Inception environment)."""

    num_features = 16

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 16, 5, stride=2)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.to(self.conv.weight.dtype) / 255.0
        return torch.nn.functional.gelu(self.conv(x)).mean(dim=(2, 3)) * 10


def test_float32_features_keep_float64_statistics_and_move_fid_little(tmp_path: Path, use_settings: Any,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """The same FID with the feature network in float64 (CPU default) and float32 (CUDA
    default): the network runs in the chosen precision, torchmetrics' sums stay float64 and
    the value moves by far less than FID's 10% default tolerance."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    from pytest_diffeval.generation import ImageSet
    from pytest_diffeval.metrics.fid import FID

    rng = np.random.default_rng(0)
    images = ImageSet(images=(rng.integers(0, 200, (24, 32, 32, 3)) + 40).clip(0, 255).astype(np.uint8),
                      prompts=["p"] * 24, seeds=list(range(24)))
    reference = ImageSet(images=rng.integers(0, 200, (24, 32, 32, 3)).astype(np.uint8), prompts=["r"] * 24,
                         seeds=list(range(24)))
    state_dtypes: set[torch.dtype] = set()
    compute = FrechetInceptionDistance.compute
    monkeypatch.setattr(FrechetInceptionDistance, "compute", lambda self: state_dtypes.update(
        {self.real_features_cov_sum.dtype, self.fake_features_cov_sum.dtype}) or compute(self))
    values = {}
    for precision in ("float64", "float32"):
        use_settings(feature_dtype=precision, result_cache=False, cache_dir=tmp_path / precision)
        features = ConvFeatures()
        result = FID().compute(images, reference=reference, features=features, device="cpu", batch_size=8)
        assert features.conv.weight.dtype == getattr(torch, precision)
        assert state_dtypes == {torch.float64}
        assert ("float32 features" in result.details["preprocessing"]) == (precision == "float32")
        values[precision] = result.value
    change = abs(values["float32"] - values["float64"]) / values["float64"]
    assert values["float64"] > 0.1 and change < 1e-4, values
