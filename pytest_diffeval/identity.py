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

What the loader records about a pipeline (its provenance, identity and signature at load)
is kept in a side table keyed weakly by the pipeline (:func:`remember_load`,
:func:`load_provenance`), never set as attributes on it.

Also here: the execution settings that change outputs without changing the weights (the
attention processors, ``torch.compile``, TF32/cuDNN/determinism flags, SDXL's invisible
watermark), which go into the provenance and the image-cache key.
"""

from __future__ import annotations

import json
import os
import sys
import weakref
from dataclasses import dataclass
from typing import Any

from ._hashing import digest_json, digest_stream
from .fingerprints import path_fingerprint

SAMPLE = 16  # leading elements of each tensor that go into a signature
_CONTENT: "weakref.WeakKeyDictionary[Any, tuple[Any, str | None]]" = weakref.WeakKeyDictionary()
HASHED_TENSOR_BYTES = [0]  # bytes of module weights hashed in this process (for tests and benchmarks)


class PipelineChangedWarning(UserWarning):
    """A pipeline was changed after loading in a way that cannot be identified by content:
    its images are not cached."""


def _sha(material: Any) -> str:
    return digest_json(material, 24, default=str)


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
        parts = [json.dumps(entries, default=str).encode(),
                 *(torch.cat(samples[device]).cpu().numpy() for device in sorted(samples, key=str))]
    return digest_stream(parts, 24)


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
    """A module's content id: class, config, attention processors, then each tensor's name,
    dtype, shape and bytes, streamed (never a second copy of the weights)."""
    import torch

    tensors = _tensors(module)
    if any(tensor.device.type == "meta" for _, tensor in tensors):
        return None  # weights not in this process (sequential offload): not identifiable

    def parts() -> Any:
        yield json.dumps([type(module).__qualname__, _config(module), _attention(module)],
                         sort_keys=True, default=str).encode()
        for name, tensor in tensors:
            yield f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode()
            data = _tensor_bytes(tensor)
            HASHED_TENSOR_BYTES[0] += len(data) if isinstance(data, bytes) else data.nbytes
            yield data

    with torch.no_grad():
        return digest_stream(parts(), 24)


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


@dataclass
class LoadRecord:
    """What this package knows about a pipeline it loaded: its provenance (source, content
    hash, load options...), its identity as loaded and the signature then, and the last
    re-identification of a changed pipeline (signature, id), kept to hash a change once."""

    provenance: dict[str, Any]
    identity: str | None = None
    signature: dict[str, Any] | None = None
    reidentified: tuple[dict[str, Any], str | None] | None = None


# Pipelines this package loaded -> their LoadRecord: a side table, so nothing is set on a
# pipeline object (a user's pipeline stays as diffusers made it); an entry goes with its pipeline.
_LOADED: "weakref.WeakKeyDictionary[Any, LoadRecord]" = weakref.WeakKeyDictionary()


def _record(pipe: Any) -> LoadRecord | None:
    try:
        return _LOADED.get(pipe)
    except TypeError:  # not weak-referenceable or not hashable: not one this package loaded
        return None


def remember_load(pipe: Any, provenance: dict[str, Any], identity: str | None) -> None:
    """Record ``pipe`` as loaded by this package, with its ``provenance`` and ``identity``
    (and its signature now, to notice later changes)."""
    _LOADED[pipe] = LoadRecord(dict(provenance), identity, pipeline_signature(pipe) if identity else None)


def share_load(wrapper: Any, pipe: Any) -> None:
    """Let ``wrapper``, an object that stands for the loaded ``pipe`` (same components, e.g.
    a test double that delegates to it), be identified as ``pipe`` is."""
    record = _record(pipe)
    if record is not None:
        _LOADED[wrapper] = record


def load_provenance(pipe: Any) -> dict[str, Any]:
    """A copy of the provenance recorded when this package loaded ``pipe`` (``{}`` for a
    pipeline it did not load)."""
    record = _record(pipe)
    return dict(record.provenance) if record is not None else {}


def pipeline_identity(pipe: Any) -> str | None:
    """The pipeline's identity now: the one it was loaded with while nothing changed since,
    otherwise that one combined with the content of every component that changed.  None for
    a pipeline this package did not load, or one changed in a way that cannot be identified."""
    loaded = _record(pipe)
    if loaded is None or not loaded.identity or loaded.signature is None:
        return None
    current = pipeline_signature(pipe)
    if current == loaded.signature:
        return loaded.identity
    memo = loaded.reidentified
    if memo is not None and memo[0] == current:
        return memo[1]
    components = getattr(pipe, "components", {})
    changed = {name: module_identity(components.get(name)) for name in sorted(set(current) | set(loaded.signature))
               if current.get(name) != loaded.signature.get(name)}
    value = None if None in changed.values() else _sha([loaded.identity, changed])
    loaded.reidentified = (current, value)
    return value


def changed_since_load(pipe: Any) -> bool:
    """Whether a pipeline this package loaded was changed since (see :func:`pipeline_signature`)."""
    loaded = _record(pipe)
    return loaded is not None and loaded.signature is not None and pipeline_signature(pipe) != loaded.signature


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


__all__ = ["LoadRecord", "PipelineChangedWarning", "changed_since_load", "describe_option", "execution_settings",
           "load_provenance", "module_identity", "module_signature", "options_identity", "pipeline_identity",
           "pipeline_signature", "remember_load", "share_load", "torch_flags"]
