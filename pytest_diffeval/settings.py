"""Session-wide settings shared by fixtures, metrics and assertions.

The plugin fills them from command-line options and ini values at configure time;
outside pytest (a notebook, a script) the defaults below apply and can be changed
with :func:`configure`.  Assertion helpers are plain functions, so this is how they
learn the metric backbones, the device and where to save the images of a failure.
"""

from __future__ import annotations

import dataclasses
import glob
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_CLIP_MODEL = "openai/clip-vit-large-patch14"
DEFAULT_FID_FEATURES = "inception-v3-2048"


@dataclass
class Settings:
    """What every check needs to know about the session it runs in: built once per pytest
    session from its options (``plugin/options.py``).  Two collections fill during the
    session: ``records`` (a row per metric check, taken by the hooks after each test) and
    ``failed_tests`` (whose baselines ``--snapshot-update`` keeps rather than deletes)."""

    clip_model: str = DEFAULT_CLIP_MODEL
    fid_features: str = DEFAULT_FID_FEATURES
    inception_weights: str | None = None  # local torch-fidelity Inception weights file
    device_request: str = "auto"  # --diffeval-device; see resolved_device()
    results_dir: Path = field(default_factory=lambda: Path("diffeval-results"))
    results_always: bool = False
    cache_dir: Path | None = None  # reference-statistics cache
    baselines_dir: Path = field(default_factory=lambda: Path("baselines"))
    update_baselines: bool = False
    model_override: str | None = None  # --diffeval-model: replaces the model every test loads
    calibrate: int = 0  # --diffeval-calibrate=N: benign re-runs per baseline check when recording
    result_cache: bool = True  # metric results under cache_dir/results (--diffeval-no-cache: off)
    records: list[dict[str, Any]] = field(default_factory=list)  # one per metric check
    max_pipelines: int | None = None  # --diffeval-max-pipelines: loaded pipelines kept per process (None: by memory)
    feature_dtype: str = "auto"  # --diffeval-feature-dtype: FID/KID feature extractor precision (see feature_dtype())
    rootdir: Path = field(default_factory=Path.cwd)  # pytest's rootdir: baselines mirror test paths under it
    failed_tests: set[str] = field(default_factory=set)  # node ids of failed tests
    # The test whose call phase runs now and the messages of its failed checks (set by the hooks):
    # there a failed check is kept and the test fails once at its end; anywhere else it fails at once.
    deferred_checks: tuple[str, list[str]] | None = None


# The settings in force: the innermost active pytest session's (a pytester run inside a test
# run pushes its own and pops them at its end), or the defaults outside pytest.
_stack: list[Settings] = [Settings()]


def current() -> Settings:
    """The settings in force now."""
    return _stack[-1]


def push(settings: Settings) -> int:
    """Make ``settings`` active until :func:`pop` with the returned token (a pytest session's
    configure/unconfigure; sessions end in the reverse order they start)."""
    _stack.append(settings)
    _resolved.clear()  # resolved for the settings before; these may ask for another device
    return len(_stack) - 1


def pop(token: int) -> None:
    """End what :func:`push` returned ``token`` for (and anything pushed after it); what was
    active before is active again."""
    del _stack[max(1, token):]
    _resolved.clear()


_resolved: dict[str, str] = {}


def resolved_device() -> str:
    """The device pipelines and metric backbones use, resolved on first use (importing
    torch only then, and not at all for ``cpu``, or for ``auto`` on a machine without a GPU
    device node): ``auto`` is CUDA if there is one, xdist worker i taking GPU i mod G,
    else the CPU.  Asking for CUDA where there is none is an error that says so."""
    request = (current().device_request or "auto").strip()
    if request == "cpu" or (request == "auto" and _no_gpu_driver()):
        return "cpu"  # without importing torch (seconds), which a fully cached rerun never needs
    if request not in _resolved:
        import torch

        if request.startswith("cuda") and not torch.cuda.is_available():
            raise RuntimeError(f"pytest-diffeval: --diffeval-device={request} but torch {torch.__version__} sees no "
                               "CUDA GPU; fix: use --diffeval-device=cpu or auto, or install a CUDA build of torch")
        if request != "auto":
            _resolved[request] = request
        elif not torch.cuda.is_available():
            _resolved[request] = "cpu"
        else:
            # an xdist worker gwI, or a torchrun rank with LOCAL_RANK=I (when CUDA_VISIBLE_DEVICES
            # could not be narrowed to its GPU before CUDA started)
            worker = os.environ.get("PYTEST_XDIST_WORKER") or f"gw{os.environ.get('LOCAL_RANK', '0')}"
            index = int(worker[2:]) if worker[2:].isdigit() else 0
            _resolved[request] = f"cuda:{index % torch.cuda.device_count()}"
        if _resolved[request].startswith("cuda"):
            # The current device too: whatever uses "the" GPU (enable_model_cpu_offload() without
            # a device, torch.cuda.* calls without an index) then uses this worker's GPU, also when
            # CUDA was initialised before bind_worker_gpu() could set CUDA_VISIBLE_DEVICES.
            torch.cuda.set_device(torch.device(_resolved[request]).index or 0)
    return _resolved[request]


def _gpu_ids(environ: dict[str, str]) -> list[str]:
    """The GPUs this process may use, as CUDA_VISIBLE_DEVICES entries, found without
    initialising CUDA: the entries of CUDA_VISIBLE_DEVICES if set, else one per NVIDIA
    device node (/dev/nvidia0, /dev/nvidia1, ...)."""
    visible = environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [v.strip() for v in visible.split(",") if v.strip() and v.strip() != "-1"]
    nodes = [n for n in glob.glob("/dev/nvidia*") if n[len("/dev/nvidia"):].isdigit()]
    return [str(i) for i in range(len(nodes))]


def bind_worker_gpu(worker: str, environ: dict[str, str] | None = None) -> str | None:
    """Give xdist worker ``gwI`` its own GPU, before CUDA is initialised, by narrowing
    ``CUDA_VISIBLE_DEVICES`` to GPU I mod G (G = the GPUs visible to this process).

    Why the environment and not only ``torch.cuda.set_device``: once set, the worker's CUDA
    sees exactly one GPU, so *everything* lands there (``enable_model_cpu_offload()`` and
    other code that defaults to GPU 0, ``device_map="auto"``/``"balanced"``, third-party
    kernels, the CUDA context itself) and no worker allocates a context on another worker's
    GPU.  It only works before CUDA is initialised in this process; if it already is (a
    conftest that touched CUDA), nothing is changed and ``resolved_device()`` falls back to
    ``torch.cuda.set_device`` on ``cuda:I mod G``.  Returns the chosen entry, or None when
    nothing was bound (one or no GPU, or CUDA already initialised)."""
    environ = os.environ if environ is None else environ
    if not (worker.startswith("gw") and worker[2:].isdigit()):
        return None
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        return None
    ids = _gpu_ids(environ)
    if len(ids) < 2:
        return None
    chosen = ids[int(worker[2:]) % len(ids)]
    environ["CUDA_VISIBLE_DEVICES"] = chosen
    environ["DIFFEVAL_BOUND_GPU"] = chosen  # provenance / diagnostics: which physical GPU this worker has
    return chosen


def feature_dtype(device: str, of: Settings | None = None) -> str:
    """Precision of the FID/KID feature extractors (Inception, CLIP) on ``device``: the
    configured ``float32``/``float64``, or for ``auto`` float32 on CUDA (float64 Inception is
    many times slower on consumer and inference GPUs: L4, A10, RTX) and float64 on the CPU
    (the numbers baselines were recorded with).  Statistics are accumulated in float64 either way.
    ``of``: these settings instead of the current ones."""
    request = ((of or current()).feature_dtype or "auto").strip()
    if request not in ("auto", "float32", "float64"):
        raise ValueError(f"pytest-diffeval: --diffeval-feature-dtype={request!r} is not auto, float32 or float64; "
                         "fix: pass one of those")
    if request == "auto":
        return "float32" if str(device).startswith("cuda") else "float64"
    return request


def _no_gpu_driver() -> bool:
    """Whether this Linux or macOS machine has no GPU device node (NVIDIA, ROCm, WSL), so
    torch cannot see a CUDA GPU here and ``auto`` means the CPU without asking torch."""
    if os.environ.get("CUDA_VISIBLE_DEVICES", "unset").strip() in ("", "-1"):
        return True
    if not (sys.platform.startswith("linux") or sys.platform == "darwin"):
        return False
    nodes = ("/dev/nvidiactl", "/dev/nvidia0", "/proc/driver/nvidia", "/dev/kfd", "/dev/dxg")
    return not any(os.path.exists(node) for node in nodes)


def configure(**changes: Any) -> Settings:
    """Replace some settings (unknown names are an error) and return the new ones."""
    names = {f.name for f in dataclasses.fields(Settings)}
    unknown = set(changes) - names
    if unknown:
        raise TypeError(f"unknown pytest-diffeval setting(s) {sorted(unknown)}; known: {sorted(names)}")
    _stack[-1] = dataclasses.replace(_stack[-1], **changes)
    return _stack[-1]
