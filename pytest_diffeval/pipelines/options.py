"""Load options: which ``generate(MODEL, ...)`` arguments go to the loader, and the
options applied to a loaded pipeline (attention backend, ``torch.compile``, CPU offload)."""

from __future__ import annotations

import sys
from typing import Any

from ..exceptions import InputError

# Load options this package handles itself (the others go to ``from_pretrained``).
EXECUTION_OPTIONS = ("torch_compile", "attention_backend")
# What generate(MODEL, ..., **kwargs) hands to the loader rather than to the pipeline call:
# these names, and any value that is a torch module (a component such as vae=).
LOAD_OPTIONS = frozenset({
    "pipeline_class", "dtype", "device", "scheduler", "variant", "revision", "use_safetensors", "safety_checker",
    "feature_extractor", "requires_safety_checker", "device_map", "enable_model_cpu_offload",
    "enable_sequential_cpu_offload", "torch_compile", "attention_backend", "lora", "lora_scale", "lora_weight_name",
    "vae", "unet", "transformer", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "image_encoder",
    "controlnet", "low_cpu_mem_usage",
})


def split_load_options(kwargs: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(load options, call arguments)`` of a ``generate(MODEL, ...)`` call (see ``LOAD_OPTIONS``)."""
    torch = sys.modules.get("torch")

    def is_load(name: str, value: Any) -> bool:
        return name in LOAD_OPTIONS or (torch is not None and isinstance(value, torch.nn.Module))

    return ({k: v for k, v in kwargs.items() if is_load(k, v)},
            {k: v for k, v in kwargs.items() if not is_load(k, v)})


def apply_execution_options(pipe: Any, *, attention_backend: str | None = None, torch_compile: Any = None) -> None:
    """Apply the load options that change how a loaded pipeline runs: ``attention_backend=``
    (a diffusers attention backend name such as ``"native"`` or ``"flash"``, set on every
    module that has ``set_attention_backend``) and ``torch_compile=`` (True, or a dict of
    ``torch.compile`` arguments: compiles the denoiser, ``unet`` or ``transformer``, in place
    with ``Module.compile`` so its weights keep their names).  Both are in the identity and,
    as observed on the modules, in the provenance's ``execution``."""
    import torch

    if attention_backend is not None:
        if not isinstance(attention_backend, str):
            raise InputError(f"pytest-diffeval: attention_backend={attention_backend!r} is not a backend name; "
                             "fix: pass a diffusers attention backend name, e.g. attention_backend='native' or 'flash'")
        targets = [c for c in pipe.components.values() if hasattr(c, "set_attention_backend")]
        if not targets:
            raise InputError(f"pytest-diffeval: attention_backend={attention_backend!r}: no module of "
                             f"{type(pipe).__name__} has set_attention_backend (diffusers >= 0.35 models); "
                             "fix: drop attention_backend= or upgrade diffusers")
        for module in targets:
            module.set_attention_backend(attention_backend)
    if torch_compile:
        options = torch_compile if isinstance(torch_compile, dict) else {}
        denoisers = [c for name, c in pipe.components.items()
                     if name in ("unet", "transformer") and isinstance(c, torch.nn.Module)]
        if not denoisers:
            raise InputError(f"pytest-diffeval: torch_compile=: {type(pipe).__name__} has no unet or transformer to "
                             "compile; fix: drop torch_compile=")
        for module in denoisers:
            module.compile(**options)


OFFLOAD_OPTIONS = {"enable_model_cpu_offload": "model", "enable_sequential_cpu_offload": "sequential"}


def _offload_option(kwargs: dict[str, Any], device: str) -> str | None:
    """Pop the offload load options (``enable_model_cpu_offload=True`` or
    ``enable_sequential_cpu_offload=True``) from ``kwargs``: ``"model"``, ``"sequential"`` or None."""
    chosen = [mode for name, mode in OFFLOAD_OPTIONS.items() if kwargs.pop(name, None)]
    if len(chosen) > 1:
        raise ValueError("pytest-diffeval: enable_model_cpu_offload=True and enable_sequential_cpu_offload=True were "
                         "both given; fix: pass one of them")
    if chosen and kwargs.get("device_map") is not None:
        raise ValueError(f"pytest-diffeval: enable_{chosen[0]}_cpu_offload=True and device_map="
                         f"{kwargs['device_map']!r} were both given; diffusers places a pipeline one way only; fix: "
                         "pass one of them")
    if chosen and not str(device).startswith("cuda"):
        raise ValueError(f"pytest-diffeval: enable_{chosen[0]}_cpu_offload=True keeps modules on the CPU and runs "
                         f"them on a GPU, but the device is {device!r}; fix: run on CUDA (--diffeval-device=cuda) or "
                         "drop the option")
    return chosen[0] if chosen else None


def apply_offload(pipe: Any, mode: str, device: str) -> None:
    """Enable diffusers' model (or sequential) CPU offload onto ``device``, this worker's
    GPU (diffusers would otherwise pick GPU 0); applied last, after every module was loaded."""
    enable = pipe.enable_model_cpu_offload if mode == "model" else pipe.enable_sequential_cpu_offload
    enable(device=device)
