"""Devices: what hardware a run is on, and generating through CUDA out-of-memory.

* :func:`device_kind` - ``"cpu"`` or the GPU's name and compute capability (part of a
  baseline's hardware key and of cache keys).
* :func:`call_with_oom_backoff` - a batch that runs out of CUDA memory is halved and retried.

Nothing here imports torch at module level (the plugin imports this module in every run).
"""

from __future__ import annotations

import gc
import warnings
import weakref
from typing import TYPE_CHECKING, Any

import numpy as np

from .counters import COUNTERS
from .exceptions import add_note

if TYPE_CHECKING:
    import torch


def device_kind(device: torch.device | str) -> str:
    """``"cpu"`` or the GPU's name with its compute capability, e.g. ``"NVIDIA H100 (sm90)"``."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        major, minor = torch.cuda.get_device_capability(index)
        return f"{torch.cuda.get_device_name(index)} (sm{major}{minor})"
    return device.type


# --------------------------------------------------------------------------- OOM back-off

_BATCH_LIMITS: "weakref.WeakKeyDictionary[Any, int]" = weakref.WeakKeyDictionary()  # pipe -> batch that fit
# Pipeline arguments generate_images builds per sample (one entry per image of the batch).
PER_SAMPLE_ARGUMENTS = frozenset({"prompt", "negative_prompt", "prompt_2", "negative_prompt_2", "class_labels",
                                  "image", "mask_image", "example_image", "generator"})


class _Output:
    def __init__(self, images: Any) -> None:
        self.images = images


def _is_cuda_oom(exc: BaseException) -> bool:
    import torch

    return isinstance(exc, torch.cuda.OutOfMemoryError)


def _free_cuda_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def call_with_oom_backoff(pipe: Any, generators: list[Any], **kwargs: Any) -> Any:
    """``pipe(generator=generators, **kwargs)``; on CUDA out-of-memory the batch is split in
    halves and retried (down to one image), each generator rewound to its state before the
    failed try, so the images are those of an undisturbed run.  The size that worked is kept
    for this pipeline's later batches and named in a warning.  Returns the pipeline's output
    (or, after a split, an object whose ``images`` are the batch's images in order)."""
    n = len(generators)
    limit = min(n, _batch_limit(pipe) or n)
    failed_at: int | None = None
    parts: list[Any] = []
    output: Any = None
    start = 0
    while start < n:
        size = min(limit, n - start)
        gens = list(generators[start : start + size])
        states = [g.get_state() for g in gens]
        try:
            output = pipe(generator=gens, **_slice(kwargs, start, size, n))
        except Exception as exc:  # noqa: BLE001 - only CUDA out-of-memory is handled
            if not _is_cuda_oom(exc):
                raise
            if size == 1:
                add_note(exc, f"pytest-diffeval: CUDA out of memory even at batch size 1 on "
                             f"{getattr(pipe, 'device', '?')}; fix: a smaller image size, float16 "
                             "(--diffeval-dtype=float16) or a GPU with more free memory")
                raise
            del exc
            for generator, state in zip(gens, states):
                generator.set_state(state)
            _free_cuda_memory()
            failed_at = failed_at or size
            limit = max(1, size // 2)
            continue
        parts.append(_images_of(output))
        start += size
    if failed_at is not None:
        _set_batch_limit(pipe, limit)
        message = (f"pytest-diffeval: CUDA out of memory at batch size {failed_at}; batch size {limit} worked and "
                   f"is used for this pipeline's later batches (--diffeval-batch-size={limit} starts there)")
        COUNTERS.oom_backoffs.append(message)
        warnings.warn(message, UserWarning, stacklevel=3)
    return output if len(parts) == 1 else _Output(_concat(parts))


def _batch_limit(pipe: Any) -> int | None:
    try:
        return _BATCH_LIMITS.get(pipe)
    except TypeError:  # not weak-referenceable
        return None


def _set_batch_limit(pipe: Any, limit: int) -> None:
    try:
        _BATCH_LIMITS[pipe] = limit
    except TypeError:
        pass


def _slice(kwargs: dict[str, Any], start: int, size: int, n: int) -> dict[str, Any]:
    out = {}
    for name, value in kwargs.items():
        if name in PER_SAMPLE_ARGUMENTS and isinstance(value, (list, tuple)) and len(value) == n:
            out[name] = list(value[start : start + size])
        elif name == "batch_size" and value == n:  # unconditional pipelines take the batch size
            out[name] = size
        else:
            out[name] = value
    return out


def _images_of(output: Any) -> Any:
    return output.images if hasattr(output, "images") else output[0]


def _concat(parts: list[Any]) -> Any:
    if type(parts[0]).__name__ == "Tensor":
        import torch

        return torch.cat(list(parts))
    if isinstance(parts[0], list):
        return [image for part in parts for image in part]
    return np.concatenate([np.asarray(p) for p in parts])
