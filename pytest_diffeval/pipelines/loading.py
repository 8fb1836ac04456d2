"""Loading a pipeline: ``from_pretrained`` with safetensors, dtype and scheduler, then
eval mode, execution options and the provenance and identity recorded for it (in
:mod:`~pytest_diffeval.identity`'s side table, nothing set on the pipeline)."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .._hashing import digest_json
from ..exceptions import PipelineNotFoundError
from ..fingerprints import model_fingerprint
from ..identity import describe_option, module_identity, options_identity, remember_load
from .lora import apply_lora
from .options import _offload_option, apply_execution_options, apply_offload
from .sources import (
    _hub_snapshot,
    _missing_model_error,
    _not_diffusers_layout,
    _pipeline_class,
    _register_moved_pipeline_modules,
    check_model_index,
    resolve_source,
)

if TYPE_CHECKING:
    import torch

# torch is imported where a pipeline is loaded, not here: a warm rerun whose images are all
# cached resolves model sources through this module without loading any model.
DTYPES = ("float32", "float16", "bfloat16")


def make_scheduler(scheduler: Any, base_config: Any) -> Any:
    """A scheduler from a class name (``"DPMSolverMultistepScheduler"``), a class or an
    instance, configured from the pipeline's own scheduler config."""
    import diffusers

    if isinstance(scheduler, str):
        if not hasattr(diffusers, scheduler):
            raise ValueError(f"pytest-diffeval: unknown scheduler {scheduler!r}: not a class in diffusers")
        scheduler = getattr(diffusers, scheduler)
    if isinstance(scheduler, type):
        return scheduler.from_config(base_config)
    return scheduler


def _scheduler_key(scheduler: Any) -> str | None:
    if scheduler is None or isinstance(scheduler, str):
        return scheduler
    if isinstance(scheduler, type):
        return scheduler.__name__
    return f"{type(scheduler).__name__}:{json.dumps(dict(scheduler.config), sort_keys=True, default=str)}"


def resolve_dtype(dtype: str | torch.dtype | None, device: str) -> torch.dtype:
    """``None``/``"auto"`` means float32 on the CPU and float16 on CUDA."""
    import torch

    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return torch.float16 if device.startswith("cuda") else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"pytest-diffeval: unknown dtype {dtype!r}; use one of {sorted(DTYPES)} or 'auto'")
    return getattr(torch, dtype)


def load_pipeline(
    source: str | os.PathLike,
    *,
    pipeline_class: type | str | None = None,
    dtype: str | torch.dtype | None = None,
    device: str = "cpu",
    scheduler: Any = None,
    **from_pretrained_kwargs: Any,
) -> Any:
    """Load a pipeline with ``from_pretrained`` (safetensors by default), move it to
    ``device``/``dtype``, put every module in eval mode and record its provenance
    (:func:`~pytest_diffeval.identity.load_provenance` reads it).

    ``lora=`` (a ``.safetensors`` file, a folder holding one, or a hub id; optional
    ``lora_weight_name=``) loads LoRA weights with diffusers' ``load_lora_weights`` and fuses
    them at ``lora_scale=`` (default 1.0; needs ``peft``); provenance records its content hash."""
    requested = dict(from_pretrained_kwargs)  # every load option: all of them are part of the identity
    compile_option = from_pretrained_kwargs.pop("torch_compile", None)
    attention_backend = from_pretrained_kwargs.pop("attention_backend", None)
    lora = from_pretrained_kwargs.pop("lora", None)
    lora_scale = from_pretrained_kwargs.pop("lora_scale", None)
    lora_weight_name = from_pretrained_kwargs.pop("lora_weight_name", None)
    if lora is None and (lora_scale is not None or lora_weight_name is not None):
        raise ValueError("pytest-diffeval: lora_scale=/lora_weight_name= were given without lora=; pass the LoRA "
                         "too, e.g. diffusion_pipeline(MODEL, lora='path/to/lora.safetensors', lora_scale=0.8)")
    offload = _offload_option(from_pretrained_kwargs, device)
    _register_moved_pipeline_modules()
    kind, path = resolve_source(source)
    if kind != "hub" and not (path / "model_index.json").is_file():
        raise _not_diffusers_layout(path)
    if path is not None:
        check_model_index(path, pipeline_class=pipeline_class, custom="custom_pipeline" in from_pretrained_kwargs)
    torch_dtype = resolve_dtype(dtype, device)
    # A hub id whose snapshot is in the Hugging Face cache loads from that folder: nothing
    # asks the hub for anything (an unreachable hub would otherwise cost minutes of retries).
    folder = path if path is not None else _hub_snapshot(os.fspath(source), from_pretrained_kwargs.get("revision"))
    if folder is not None and not (folder / "model_index.json").is_file():
        folder = None  # a partial snapshot (not a pipeline): let diffusers say what is missing
    cls = _pipeline_class(folder, pipeline_class)
    kwargs = {"use_safetensors": True, **from_pretrained_kwargs}
    variant = default_variant(folder, torch_dtype, kwargs)
    if variant is not None:
        kwargs["variant"] = requested["variant"] = variant
    _quiet_progress_bars()
    location = str(folder) if folder is not None else os.fspath(source)
    try:
        pipe = cls.from_pretrained(location, **dtype_argument(torch_dtype), **kwargs)
    except (OSError, ValueError) as exc:  # huggingface_hub's id validation raises ValueError
        if kind == "hub":
            raise _missing_model_error(os.fspath(source), exc) from exc
        pickles = sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.suffix in {".bin", ".pt", ".ckpt", ".pth"})
        if kwargs["use_safetensors"] and pickles:
            raise PipelineNotFoundError(
                f"pytest-diffeval: {path} holds pickle weights ({', '.join(pickles[:3])}) where safetensors are expected: "
                f"{exc}\n  pickle files can execute code when loaded, so safetensors are the default. Fix: convert the "
                "model once in a trusted environment (`pipe.save_pretrained(DIR, safe_serialization=True)`), or pass "
                "use_safetensors=False to diffusion_pipeline() if you trust these files."
            ) from exc
        raise
    if scheduler is not None:
        pipe.scheduler = make_scheduler(scheduler, pipe.scheduler.config)
    device_mapped = kwargs.get("device_map") is not None
    if not device_mapped and offload is None:
        pipe = pipe.to(device)  # diffusers refuses .to() on a device-mapped pipeline; offload places modules itself
    lora_provenance = None
    if lora is not None:
        lora_provenance = apply_lora(pipe, lora, 1.0 if lora_scale is None else lora_scale,
                                     weight_name=lora_weight_name,
                                     use_safetensors=kwargs["use_safetensors"])
    import torch

    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            component.eval()
    if hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(disable=True)
    if offload is not None:
        apply_offload(pipe, offload, device)
    apply_execution_options(pipe, attention_backend=attention_backend, torch_compile=compile_option)
    revision = from_pretrained_kwargs.get("revision")
    if kind == "hub":
        path = _hub_snapshot(os.fspath(source), revision)
        revision = path.name if path is not None else revision  # the snapshot folder is the commit hash
    provenance: dict[str, Any] = {
        "model": os.fspath(source),
        "model_kind": kind,
        "model_path": str(path) if path is not None else None,
        "model_hash": model_fingerprint(path) if path is not None else "unknown",
        "revision": revision,
    }
    if lora_provenance is not None:
        provenance["lora"] = lora_provenance
    if offload is not None:
        provenance["offload"] = offload
    if device_mapped:
        provenance["device_map"] = repr(kwargs["device_map"])
    identity = _identity(provenance["model_hash"], pipeline_class, torch_dtype, {**requested, "scheduler": scheduler})
    provenance["load_options"] = describe_option(requested)
    provenance["pipeline_id"] = identity
    remember_load(pipe, provenance, identity)  # a side table: nothing is set on the pipeline
    return pipe


def _identity(source_id: str | None, pipeline_class: Any, dtype: Any, options: dict[str, Any]) -> str | None:
    """The pipeline identity: the source's content id, the class asked for, the dtype and
    every load option by content (see identity.py); None when something is not identifiable."""
    if not source_id or source_id == "unknown":
        return None
    opts = options_identity(options)
    if opts is None:
        return None
    asked = module_identity(pipeline_class) if pipeline_class is not None else None
    return digest_json([source_id, asked, str(dtype), opts], 24)


def load_identity(source: str | os.PathLike, *, pipeline_class: type | str | None = None,
                  dtype: str | torch.dtype | None = None, device: str = "cpu", scheduler: Any = None,
                  **options: Any) -> str:
    """The identity of what ``load_pipeline(source, ...)`` with these arguments returns,
    known before loading it (the pipeline cache's key).  A hub id not in the cache is named
    by id and revision (its content is known only once downloaded)."""
    _, path = resolve_source(source)
    folder = path if path is not None else _hub_snapshot(os.fspath(source), options.get("revision"))
    torch_dtype = resolve_dtype(dtype, device)
    options = dict(options)
    variant = default_variant(folder, torch_dtype, options)
    if variant is not None:
        options["variant"] = variant
    source_id = model_fingerprint(folder) if folder is not None else f"hub:{os.fspath(source)}@{options.get('revision')}"
    identity = _identity(source_id, pipeline_class, torch_dtype, {**options, "scheduler": scheduler})
    if identity is None:  # an option we cannot identify by content: never shared with another call
        identity = f"unidentified:{os.urandom(8).hex()}"
    return identity


_VARIANT_FILE = re.compile(r"\.(?P<variant>[A-Za-z0-9_]+)(-\d+-of-\d+)?\.safetensors$")


def default_variant(folder: Path | None, dtype: Any, kwargs: dict[str, Any]) -> str | None:
    """``"fp16"`` when loading in float16 without ``variant=``, from a folder whose every
    weighted component has ``*.fp16.safetensors`` files (as hub repos ship them): those are
    read instead of the float32 files cast down (half the bytes; the same values up to the
    rounding the cast does).  None otherwise (then diffusers' own choice stands)."""
    import torch

    if "variant" in kwargs or dtype != torch.float16 or folder is None or not Path(folder).is_dir():
        return None
    components = {}
    for file in Path(folder).glob("*/*.safetensors"):
        match = _VARIANT_FILE.search(file.name)
        components.setdefault(file.parent.name, set()).add(match.group("variant") if match else None)
    if components and all("fp16" in variants for variants in components.values()):
        return "fp16"
    return None


def dtype_argument(dtype: Any) -> dict[str, Any]:
    """``{"dtype": dtype}`` for diffusers versions that take it (0.42 deprecates
    ``torch_dtype=`` and warns on every load), ``{"torch_dtype": dtype}`` for older ones."""
    try:
        from diffusers.utils import deprecation_utils
    except ImportError:
        return {"torch_dtype": dtype}
    return {"dtype": dtype} if hasattr(deprecation_utils, "_resolve_dtype") else {"torch_dtype": dtype}


def _quiet_progress_bars() -> None:
    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
