"""The per-process pipeline cache: a deliberate process-wide model cache (not per pytest
session), so that the many tests using one model load it once per worker, and a pytest run
inside a test run (pytester, in-process) shares the models this process already loaded.
Least recently used pipelines are evicted by count and, on CUDA, by free memory."""

from __future__ import annotations

import gc
import json
import os
import sys
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import process_cache, settings
from ..fingerprints import hub_snapshot
from ..identity import changed_since_load
from .loading import _scheduler_key, load_identity, load_pipeline, resolve_dtype
from .sources import resolve_source

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class PipelineKey:
    """Everything that changes a loaded pipeline: two equal keys share one load.  ``identity``
    is :func:`load_identity` (source content and every load option by content); the other
    fields say what was asked, for counters and :meth:`PipelineCache.loaded`."""

    source: str
    pipeline_class: str | None
    dtype: str
    device: str
    scheduler: str | None
    kwargs: str
    identity: str = ""


class PipelineCache:
    """Loaded pipelines of this process, keyed by :class:`PipelineKey`, with load and
    eviction counters.  Least recently used pipelines are evicted before another one is
    loaded (see :meth:`make_room`): beyond ``max_pipelines`` (``--diffeval-max-pipelines``;
    ``settings.max_pipelines`` when not given) and, on CUDA, while the GPU's free memory
    is short of what the next pipeline needs."""

    def __init__(self, max_pipelines: int | None = None) -> None:
        self._pipes: OrderedDict[PipelineKey, Any] = OrderedDict()  # least recently used first
        self.loads: dict[str, int] = {}
        self.evictions: dict[str, int] = {}
        self.reloads_after_change = 0
        self.max_pipelines = max_pipelines
        self.load_seconds = 0.0  # wall time of every load so far (durations files count a model's load apart)

    def get(
        self,
        source: str | os.PathLike,
        *,
        pipeline_class: type | str | None = None,
        dtype: str | torch.dtype | None = None,
        device: str = "cpu",
        scheduler: Any = None,
        **from_pretrained_kwargs: Any,
    ) -> Any:
        kind, path = resolve_source(source)
        key = PipelineKey(
            source=str(path) if path is not None else os.fspath(source),
            pipeline_class=pipeline_class if isinstance(pipeline_class, (str, type(None))) else pipeline_class.__qualname__,
            dtype=str(resolve_dtype(dtype, device)),
            device=device,
            scheduler=_scheduler_key(scheduler),
            kwargs=json.dumps(sorted(from_pretrained_kwargs)),
            identity=load_identity(source, pipeline_class=pipeline_class, dtype=dtype, device=device,
                                   scheduler=scheduler, **from_pretrained_kwargs),
        )
        if key in self._pipes and changed_since_load(self._pipes[key]):
            # a test changed the shared pipeline (swapped a module, loaded other weights):
            # the next test that asks for this model gets the model, loaded again
            self._pipes.pop(key)
            self.reloads_after_change += 1
        if key not in self._pipes:
            self.make_room(key.device, path, source=key.source)
            started = time.perf_counter()
            self._pipes[key] = load_pipeline(
                source, pipeline_class=pipeline_class, dtype=dtype, device=device,
                scheduler=scheduler, **from_pretrained_kwargs,
            )
            self.load_seconds += time.perf_counter() - started
            self.loads[key.source] = self.loads.get(key.source, 0) + 1
        self._pipes.move_to_end(key)
        return self._pipes[key]

    def loaded(self, source: str | os.PathLike, *, dtype: str | None, device: str) -> Any:
        """The pipeline ``get(source, dtype=dtype, device=device)`` would return, if this
        process has already loaded it (with no other options); None otherwise (never loads)."""
        _, path = resolve_source(source)
        wanted = str(path) if path is not None else os.fspath(source)
        identity = load_identity(source, dtype=dtype, device=device)
        for key, pipe in self._pipes.items():
            if (key.source == wanted and key.device == device and key.identity == identity
                    and not changed_since_load(pipe)):
                self._pipes.move_to_end(key)
                return pipe
        return None

    def make_room(self, device: str, path: Path | None = None, *, source: str | None = None) -> int:
        """Evict least recently used pipelines before a load on ``device``: down to
        ``max_pipelines - 1``, then (CUDA only) while that GPU's free memory is below what the
        new pipeline needs: its weight files' size (of ``path``, or of hub id ``source``'s
        cached snapshot; the largest loaded pipeline's when unknown) plus a quarter for the
        activations of generation.  An estimate on the safe side: a float32 checkpoint loaded in
        float16 counts double, so the worst case is a reload, not an out-of-memory error.
        Returns how many were evicted."""
        limit = self.max_pipelines if self.max_pipelines is not None else settings.current().max_pipelines
        evicted = 0
        while self._pipes and limit is not None and len(self._pipes) >= limit:
            self.evict()
            evicted += 1
        if self._pipes and str(device).startswith("cuda"):
            if path is None and source is not None:
                path = hub_snapshot(source)
            needed = _weights_bytes(path) or max(pipeline_bytes(p) for p in self._pipes.values())
            needed += needed // 4
            while self._pipes and _cuda_free_bytes(device) < needed:
                self.evict()
                evicted += 1
        return evicted

    def evict(self, key: PipelineKey | None = None) -> None:
        """Drop one pipeline (the least recently used by default) and free its memory:
        offload hooks removed, references dropped, ``gc.collect()``, and on CUDA
        ``torch.cuda.empty_cache()`` so the freed blocks return to the driver."""
        key = next(iter(self._pipes)) if key is None else key
        pipe = self._pipes.pop(key)
        remove_hooks = getattr(pipe, "remove_all_hooks", None)
        if callable(remove_hooks):
            try:
                remove_hooks()  # accelerate's offload hooks hold the modules
            except Exception:  # noqa: BLE001 - freeing memory must not fail a test
                pass
        del pipe
        self.evictions[key.source] = self.evictions.get(key.source, 0) + 1
        free_memory()

    def clear(self) -> None:
        while self._pipes:
            self.evict()


def free_memory() -> None:
    """Return memory of dropped objects: ``gc.collect()`` (pipelines hold reference
    cycles), then ``torch.cuda.empty_cache()`` when CUDA is in use."""
    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def pipeline_bytes(pipe: Any) -> int:
    """Bytes of the parameters and buffers of a pipeline's modules (what it holds in memory)."""
    import torch

    total = 0
    for component in getattr(pipe, "components", {}).values():
        if isinstance(component, torch.nn.Module):
            for tensor in [*component.parameters(), *component.buffers()]:
                total += tensor.numel() * tensor.element_size()
    return total


def _weights_bytes(path: Path | None) -> int:
    """Size of a model folder's weight files (a pipeline's memory before casting), 0 when unknown."""
    if path is None or not path.is_dir():
        return 0
    return sum(p.stat().st_size for p in path.rglob("*.safetensors") if p.is_file())


def _cuda_free_bytes(device: str) -> int:
    """Free memory of ``device`` after releasing this process's cached blocks."""
    import torch

    free_memory()
    index = torch.device(device).index
    free, _ = torch.cuda.mem_get_info(torch.cuda.current_device() if index is None else index)
    return int(free)


_KEY = ("pipelines",)


def process_pipelines() -> PipelineCache:
    """This process's pipeline cache (one load per model identity per process), kept in
    :mod:`pytest_diffeval.process_cache` with the other per-process model caches."""
    return process_cache.get_or_load(_KEY, PipelineCache)


def loaded_pipelines() -> PipelineCache | None:
    """The process's pipeline cache if anything created it (None: no pipeline was loaded)."""
    return process_cache.get(_KEY)
