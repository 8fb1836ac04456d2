"""What a loaded pipeline *is*, computed from what determines its outputs.

A pipeline's identity (``pipeline_id``) is a hash of the content id of the folder or hub
snapshot it was loaded from, its class, dtype and scheduler, and every load option, where a
module argument (``vae=``, ``unet=``, ``text_encoder=``, a scheduler object...) counts by
its own content: the sha256 of its class, config and state-dict bytes, never its ``repr``.
The in-process pipeline cache, the on-disk image cache and the provenance all use it.

A pipeline changed after loading (a swapped module, ``load_state_dict``, a fused LoRA, new
attention processors) is noticed by comparing a cheap *signature* taken at load time with
the current one: per module, each tensor's name, identity, version counter (bumped by every
in-place write such as ``load_state_dict``), dtype and shape, a digest of its first
elements (catches writes through ``.data``, as LoRA fusing does), and the attention
processors.  A changed pipeline is identified again from the content of the modules that
changed (hashed once per object and signature, memoised through a weak reference).

Also here: the execution settings that change outputs without changing the weights (the
attention processors, ``torch.compile``, TF32/cuDNN/determinism flags, SDXL's invisible
watermark), which go into the provenance and the image-cache key.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import weakref
from typing import Any

from .fingerprints import path_fingerprint

SAMPLE = 16  # leading elements of each tensor that go into a signature
_CONTENT: "weakref.WeakKeyDictionary[Any, tuple[Any, str | None]]" = weakref.WeakKeyDictionary()
HASHED_TENSOR_BYTES = [0]  # bytes of module weights hashed in this process (for tests and benchmarks)


class PipelineChangedWarning(UserWarning):
    """A pipeline was changed after loading in a way that cannot be identified by content:
    its images are not cached."""


def _sha(material: Any) -> str:
    return hashlib.sha256(json.dumps(material, sort_keys=True, default=str).encode()).hexdigest()[:24]


def _config(obj: Any) -> Any:
    """A module's or scheduler's config without the keys that name where it came from."""
    config = getattr(obj, "config", None)
    if config is None:
        return None
    data = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    return {k: v for k, v in data.items() if not str(k).startswith("_") and k != "transformers_version"}


def _attention(module: Any) -> list[str]:
    """The attention processors of a module (class and attention backend), sorted and unique."""
    processors = getattr(module, "attn_processors", None)
    if not isinstance(processors, dict):
        return []
    out = set()
    for processor in processors.values():
        backend = getattr(processor, "_attention_backend", None)
        out.add(type(processor).__name__ + (f"[{getattr(backend, 'value', backend)}]" if backend else ""))
    return sorted(out)


def _tensors(module: Any) -> list[tuple[str, Any]]:
    return list(module.state_dict(keep_vars=True).items())


def module_signature(module: Any) -> str:
    """A cheap digest of a ``torch.nn.Module``'s state that changes when its weights do
    (see the module docstring): no weight is read beyond its first ``SAMPLE`` elements."""
    import torch

    entries: list[Any] = [type(module).__qualname__, _attention(module),
                          getattr(module, "_compiled_call_impl", None) is not None]
    samples: dict[Any, list[Any]] = {}
    with torch.no_grad():
        for name, tensor in _tensors(module):
            entries.append((name, id(tensor), getattr(tensor, "_version", 0), str(tensor.dtype), tuple(tensor.shape)))
            if tensor.numel() and tensor.device.type != "meta":
                samples.setdefault(tensor.device, []).append(tensor.detach().reshape(-1)[:SAMPLE].to(torch.float64))
        digest = hashlib.sha256(json.dumps(entries, default=str).encode())
        for device in sorted(samples, key=str):
            digest.update(torch.cat(samples[device]).cpu().numpy().tobytes())
    return digest.hexdigest()[:24]


def _tensor_bytes(tensor: Any) -> Any:
    import torch

    flat = tensor.detach().reshape(-1).contiguous().cpu()
    return flat.view(torch.uint8).numpy() if flat.numel() else b""


def module_identity(obj: Any) -> str | None:
    """The content id of a pipeline component or load-option value: a module by its class,
    config and the bytes of its state dict (memoised per object while its signature holds),
    a scheduler by class and config, a tokenizer by class and vocabulary, plain values by
    value.  None for something that cannot be identified by content (then nothing keyed by
    it is cached)."""
    if obj is None or isinstance(obj, (str, int, float, bool)):
        return json.dumps(obj)
    if isinstance(obj, (list, tuple)):
        parts = [module_identity(item) for item in obj]
        return None if None in parts else _sha(parts)
    if isinstance(obj, dict):
        parts = {str(k): module_identity(v) for k, v in obj.items()}
        return None if None in parts.values() else _sha(parts)
    if isinstance(obj, type):
        return f"class:{obj.__module__}.{obj.__qualname__}"
    if isinstance(obj, os.PathLike):  # a file or folder (e.g. lora=Path(...)): by content
        return f"path:{path_fingerprint(obj)}"
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(obj, torch.dtype):
        return str(obj)
    if torch is not None and isinstance(obj, torch.nn.Module):
        signature = module_signature(obj)
        try:
            memo = _CONTENT.get(obj)
        except TypeError:  # not weak-referenceable
            memo = None
        if memo is not None and memo[0] == signature:
            return memo[1]
        value = _module_content(obj)
        try:
            _CONTENT[obj] = (signature, value)
        except TypeError:
            pass
        return value
    cls = f"{type(obj).__module__}.{type(obj).__qualname__}"
    if hasattr(obj, "get_vocab"):  # a tokenizer
        try:
            vocab = obj.get_vocab()
        except Exception:  # noqa: BLE001 - a tokenizer without a readable vocabulary
            return None
        return _sha([cls, sorted(vocab.items()), getattr(obj, "model_max_length", None),
                     sorted(map(str, getattr(obj, "all_special_tokens", [])))])
    if hasattr(obj, "to_dict") and not hasattr(obj, "config"):  # an image processor / feature extractor
        return _sha([cls, obj.to_dict()])
    if getattr(obj, "config", None) is not None and hasattr(obj, "set_timesteps"):  # a scheduler
        return _sha([cls, _config(obj)])
    return None


def _module_content(module: Any) -> str | None:
    import torch

    digest = hashlib.sha256(json.dumps([type(module).__qualname__, _config(module), _attention(module)],
                                       sort_keys=True, default=str).encode())
    with torch.no_grad():
        for name, tensor in _tensors(module):
            if tensor.device.type == "meta":
                return None  # weights not in this process (sequential offload): not identifiable
            digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
            data = _tensor_bytes(tensor)
            HASHED_TENSOR_BYTES[0] += len(data) if isinstance(data, bytes) else data.nbytes
            digest.update(data)
    return digest.hexdigest()[:24]


def describe_option(value: Any) -> Any:
    """A load option as the provenance shows it: plain values as they are, a module or
    scheduler as ``{"class": ..., "content": <content id>}``."""
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    if isinstance(value, (list, tuple)):
        return [describe_option(v) for v in value]
    if isinstance(value, dict):
        return {str(k): describe_option(v) for k, v in value.items()}
    if isinstance(value, type):
        return value.__qualname__
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(value, torch.dtype):
        return str(value)
    return {"class": type(value).__qualname__, "content": module_identity(value)}


def options_identity(options: dict[str, Any]) -> str | None:
    """One content id for a set of load options (None when one of them is not identifiable)."""
    parts = {name: module_identity(value) for name, value in sorted(options.items())}
    return None if None in parts.values() else _sha(parts)


def pipeline_signature(pipe: Any) -> dict[str, Any]:
    """Per component: a module's :func:`module_signature`, a scheduler's config, another
    object's ``id`` (a swapped tokenizer counts as changed)."""
    torch = sys.modules.get("torch")
    out: dict[str, Any] = {}
    for name, component in sorted((getattr(pipe, "components", None) or {}).items()):
        if component is None:
            out[name] = None
        elif torch is not None and isinstance(component, torch.nn.Module):
            out[name] = [id(component), module_signature(component)]
        elif getattr(component, "config", None) is not None and hasattr(component, "set_timesteps"):
            out[name] = [type(component).__qualname__, _sha(_config(component))]
        else:
            out[name] = id(component)
    return out


def pipeline_identity(pipe: Any) -> str | None:
    """The pipeline's identity now: the one it was loaded with while nothing changed since,
    otherwise that one combined with the content of every component that changed.  None for
    a pipeline this package did not load, or one changed in a way that cannot be identified."""
    loaded = getattr(pipe, "_diffeval_identity", None)
    if not loaded:
        return None
    current = pipeline_signature(pipe)
    if current == loaded["signature"]:
        return loaded["id"]
    memo = getattr(pipe, "_diffeval_reidentified", None)
    if memo is not None and memo[0] == current:
        return memo[1]
    components = getattr(pipe, "components", {})
    changed = {name: module_identity(components.get(name)) for name in sorted(set(current) | set(loaded["signature"]))
               if current.get(name) != loaded["signature"].get(name)}
    value = None if None in changed.values() else _sha([loaded["id"], changed])
    try:
        pipe._diffeval_reidentified = (current, value)
    except AttributeError:
        pass
    return value


def remember_identity(pipe: Any, identity: str | None) -> None:
    """Record ``identity`` as what ``pipe`` is as loaded, with its signature now."""
    pipe._diffeval_identity = {"id": identity, "signature": pipeline_signature(pipe)} if identity else None


def changed_since_load(pipe: Any) -> bool:
    """Whether a pipeline this package loaded was changed since (see :func:`pipeline_signature`)."""
    loaded = getattr(pipe, "_diffeval_identity", None)
    return bool(loaded) and pipeline_signature(pipe) != loaded["signature"]


def torch_flags() -> dict[str, Any] | None:
    """The process-wide torch settings that change numerics (None when torch was never
    imported here: then nothing could have changed them from torch's defaults)."""
    torch = sys.modules.get("torch")
    if torch is None:
        return None
    return {
        "matmul_allow_tf32": bool(torch.backends.cuda.matmul.allow_tf32),
        "cudnn_allow_tf32": bool(torch.backends.cudnn.allow_tf32),
        "cudnn_benchmark": bool(torch.backends.cudnn.benchmark),
        "cudnn_deterministic": bool(torch.backends.cudnn.deterministic),
        "deterministic_algorithms": bool(torch.are_deterministic_algorithms_enabled()),
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
    }


def execution_settings(pipe: Any) -> dict[str, Any]:
    """What changes a pipeline's outputs besides its weights: attention processors per
    module, which modules are compiled (``torch.compile``), the torch flags, and whether an
    invisible watermark is applied (SDXL's ``pipe.watermark``)."""
    torch = sys.modules.get("torch")
    attention: dict[str, list[str]] = {}
    compiled: list[str] = []
    for name, component in sorted((getattr(pipe, "components", None) or {}).items()):
        if torch is None or not isinstance(component, torch.nn.Module):
            continue
        processors = _attention(component)
        if processors:
            attention[name] = processors
        if getattr(component, "_compiled_call_impl", None) is not None or hasattr(component, "_orig_mod"):
            compiled.append(name)
    return {"attention": attention, "compiled": compiled, "flags": torch_flags(),
            "watermark": getattr(pipe, "watermark", None) is not None}


__all__ = ["PipelineChangedWarning", "changed_since_load", "describe_option", "execution_settings",
           "module_identity", "module_signature", "options_identity", "pipeline_identity", "pipeline_signature",
           "remember_identity", "torch_flags"]
