"""Session-wide settings shared by fixtures, metrics and assertions.

The plugin fills them from command-line options and ini values at configure time;
outside pytest (a notebook, a script) the defaults below apply and can be changed
with :func:`configure`.  Assertion helpers are plain functions, so this is how they
learn the metric backbones, the device and where to save the images of a failure.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_CLIP_MODEL = "openai/clip-vit-large-patch14"
DEFAULT_FID_FEATURES = "inception-v3-2048"


@dataclass
class Settings:
    """What every check needs to know about the session it runs in."""

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


_current = Settings()


def current() -> Settings:
    """The settings in force now."""
    return _current


_resolved: dict[str, str] = {}


def resolved_device() -> str:
    """The device pipelines and metric backbones use, resolved on first use (importing
    torch only then, and not at all for ``cpu``, or for ``auto`` on a machine without a GPU
    device node): ``auto`` is CUDA if there is one, xdist worker i taking GPU i mod G,
    else the CPU.  Asking for CUDA where there is none is an error that says so."""
    request = (_current.device_request or "auto").strip()
    if request == "cpu" or (request == "auto" and _no_gpu_driver()):
        return "cpu"  # without importing torch (seconds), which a fully cached rerun never needs
    if request not in _resolved:
        import os

        import torch

        if request.startswith("cuda") and not torch.cuda.is_available():
            raise RuntimeError(f"pytest-diffeval: --diffeval-device={request} but torch {torch.__version__} sees no "
                               "CUDA GPU; fix: use --diffeval-device=cpu or auto, or install a CUDA build of torch")
        if request != "auto":
            _resolved[request] = request
        elif not torch.cuda.is_available():
            _resolved[request] = "cpu"
        else:
            worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
            index = int(worker[2:]) if worker[2:].isdigit() else 0
            _resolved[request] = f"cuda:{index % torch.cuda.device_count()}"
    return _resolved[request]


def _no_gpu_driver() -> bool:
    """Whether this Linux or macOS machine has no GPU device node (NVIDIA, ROCm, WSL), so
    torch cannot see a CUDA GPU here and ``auto`` means the CPU without asking torch."""
    import os
    import sys

    if os.environ.get("CUDA_VISIBLE_DEVICES", "unset").strip() in ("", "-1"):
        return True
    if not (sys.platform.startswith("linux") or sys.platform == "darwin"):
        return False
    nodes = ("/dev/nvidiactl", "/dev/nvidia0", "/proc/driver/nvidia", "/dev/kfd", "/dev/dxg")
    return not any(os.path.exists(node) for node in nodes)


def configure(**changes: Any) -> Settings:
    """Replace some settings (unknown names are an error) and return the new ones."""
    global _current
    names = {f.name for f in dataclasses.fields(Settings)}
    unknown = set(changes) - names
    if unknown:
        raise TypeError(f"unknown pytest-diffeval setting(s) {sorted(unknown)}; known: {sorted(names)}")
    _current = dataclasses.replace(_current, **changes)
    return _current
