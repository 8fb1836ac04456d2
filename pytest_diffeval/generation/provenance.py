"""Provenance of a generation: what identifies the model, its configuration and where it
ran (recorded in every result and baseline), and the GPU time and memory a run took."""

from __future__ import annotations

import time
import warnings
from typing import Any

from .._hashing import library_versions
from ..devices import device_kind
from ..identity import PipelineChangedWarning, execution_settings, load_provenance, pipeline_identity
from .imageset import jsonable


def loaded_provenance(pipe: Any) -> dict[str, Any]:
    """What the loader recorded about ``pipe`` (model, content hash, revision, load options;
    see pipelines/loading.py), as a copy; empty for a pipeline built by hand.  The record is
    kept in identity.py's side table, not on the pipeline."""
    return load_provenance(pipe)


def execution_device(pipe: Any) -> Any:
    """Where the pipeline computes: diffusers' ``_execution_device`` (the GPU of a pipeline
    with CPU offload or a device map, whose ``pipe.device`` says ``cpu``), else ``pipe.device``.
    Baselines are stored under this device's hardware key."""
    try:
        device = getattr(pipe, "_execution_device", None)
    except Exception:  # noqa: BLE001 - a property of a custom pipeline that cannot tell
        device = None
    return device if device is not None else getattr(pipe, "device", "cpu")


class GpuMeter:
    """GPU seconds and peak GPU memory of the batches a generation ran (None on the CPU):
    the clock is read after ``torch.cuda.synchronize`` so queued kernels are counted."""

    def __init__(self, device: Any) -> None:
        import torch

        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.seconds = 0.0
        self.images = 0
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)

    def __enter__(self) -> "GpuMeter":
        import torch

        if self.cuda:
            torch.cuda.synchronize(self.device)
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc: Any) -> None:
        import torch

        if self.cuda:
            torch.cuda.synchronize(self.device)
            self.seconds += time.perf_counter() - self._start

    def fields(self) -> dict[str, Any]:
        """``gpu_peak_memory_mb`` and ``gpu_s_per_image`` (None on the CPU or when nothing was generated)."""
        import torch

        if not self.cuda or not self.images:
            return {"gpu_peak_memory_mb": None, "gpu_s_per_image": None}
        peak = torch.cuda.max_memory_allocated(self.device) / 2**20
        return {"gpu_peak_memory_mb": round(peak, 1), "gpu_s_per_image": round(self.seconds / self.images, 4)}


# Provenance fields of one run (how long, how much memory), not of the model: never part of a
# cache key nor of the provenance memo.
RUN_FIELDS = ("gpu_peak_memory_mb", "gpu_s_per_image")


def pipeline_provenance(pipe: Any) -> dict[str, Any]:
    """What identifies the model and its configuration, for results and baselines."""
    base = loaded_provenance(pipe)
    if not base:
        name = getattr(getattr(pipe, "config", None), "_name_or_path", None)
        base = {"model": name, "model_kind": "object", "model_path": None, "model_hash": None, "revision": None}
    if base.get("model_hash") not in (None, "unknown"):
        base["pipeline_id"] = pipeline_identity(pipe)  # re-identified when changed after loading
        if base["pipeline_id"] is None:
            warnings.warn(PipelineChangedWarning(
                f"pytest-diffeval: the pipeline loaded from {base.get('model')!r} cannot be identified by content: a "
                "load option or a change made after loading is neither a plain value, a path, a torch module with "
                "its weights in this process, a scheduler nor a tokenizer; its images are not cached. fix: pass "
                "modules as load options, e.g. diffusion_pipeline(MODEL, vae=my_vae), and plain values"),
                stacklevel=3)
    scheduler = getattr(pipe, "scheduler", None)
    device = execution_device(pipe)
    return {
        **base,
        "execution": execution_settings(pipe),
        "pipeline_class": type(pipe).__name__,
        "scheduler": type(scheduler).__name__ if scheduler is not None else None,
        "scheduler_config": jsonable(dict(scheduler.config)) if scheduler is not None else None,
        "dtype": str(getattr(pipe, "dtype", None)),
        "device": str(device),
        "device_kind": device_kind(device),
        "versions": dict(library_versions()),  # a copy: the memoised dict stays unchanged
    }
