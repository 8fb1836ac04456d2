"""Diffusers pipelines: where a model comes from (:mod:`.sources`), how it is loaded
(:mod:`.loading`), the load options applied to it (:mod:`.options`), LoRA weights
(:mod:`.lora`), and the deliberate per-process pipeline cache (:mod:`.cache`)."""

from __future__ import annotations

from ..exceptions import InputError, PipelineNotFoundError, WeightsNotAvailableError
from ..fingerprints import model_fingerprint
from .cache import PipelineCache, PipelineKey, free_memory, loaded_pipelines, pipeline_bytes, process_pipelines
from .loading import (
    DTYPES,
    default_variant,
    dtype_argument,
    load_identity,
    load_pipeline,
    make_scheduler,
    resolve_dtype,
)
from .lora import apply_lora
from .options import (
    EXECUTION_OPTIONS,
    LOAD_OPTIONS,
    OFFLOAD_OPTIONS,
    apply_execution_options,
    apply_offload,
    split_load_options,
)
from .sources import MODEL_INDEX_FIX, check_model_index, resolve_source

__all__ = [
    "DTYPES", "EXECUTION_OPTIONS", "LOAD_OPTIONS", "MODEL_INDEX_FIX", "OFFLOAD_OPTIONS", "InputError", "PipelineCache",
    "PipelineKey", "PipelineNotFoundError", "WeightsNotAvailableError", "apply_execution_options", "apply_lora",
    "apply_offload", "check_model_index", "default_variant", "dtype_argument", "free_memory", "load_identity",
    "load_pipeline", "loaded_pipelines", "make_scheduler", "model_fingerprint", "pipeline_bytes", "process_pipelines",
    "resolve_dtype", "resolve_source", "split_load_options",
]
