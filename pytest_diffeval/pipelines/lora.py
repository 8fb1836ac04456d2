"""LoRA weights: loaded into a pipeline, fused at a scale, and identified by content
(the hash that provenance records)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .._hashing import digest_file
from ..exceptions import PipelineNotFoundError, WeightsNotAvailableError
from ..fingerprints import model_fingerprint
from .sources import _hub_snapshot


def _file_hash(path: Path) -> str:
    """A LoRA file's content hash (16 hex digits of its sha256), as provenance records it."""
    return digest_file(path, 16)


def _lora_file_name(folder: Path) -> str | None:
    """The LoRA file diffusers would pick in ``folder``: its default name, else the only
    ``.safetensors`` file; None when ambiguous (then ``lora_weight_name=`` must say)."""
    files = sorted(p.name for p in folder.glob("*.safetensors"))
    if "pytorch_lora_weights.safetensors" in files:
        return "pytorch_lora_weights.safetensors"
    return files[0] if len(files) == 1 else None


def _weights_hash(folder: Path, weight_name: str | None) -> str:
    """The content hash of the LoRA file (the same whether named by file or by folder);
    of the whole folder when the file is unknown.  Hub symlinks are named by their blob."""
    file = folder / weight_name if weight_name else None
    if file is None or not file.is_file():
        return model_fingerprint(folder)
    if file.is_symlink() and "blobs" in Path(os.readlink(file)).parts:
        return Path(os.readlink(file)).name[:16]
    return _file_hash(file)


def apply_lora(pipe: Any, lora: str | os.PathLike, scale: float, *, weight_name: str | None = None,
               use_safetensors: bool = True) -> dict[str, Any]:
    """Load LoRA weights into ``pipe`` (``load_lora_weights``), fuse them into the base
    weights at ``scale`` (``fuse_lora``) and drop the adapter layers, so sampling runs at
    the base model's speed.  Return what provenance records: source, content hash, scale."""
    try:
        scale = float(scale)
    except (TypeError, ValueError):
        raise ValueError(f"pytest-diffeval: lora_scale must be a number, got {scale!r}") from None
    if not hasattr(pipe, "load_lora_weights"):
        raise ValueError(f"pytest-diffeval: {type(pipe).__name__} cannot load LoRA weights (it has no "
                         "load_lora_weights); drop lora= or use a pipeline class that supports LoRA")
    try:
        import peft  # noqa: F401 - diffusers' LoRA loading needs it
    except ImportError as exc:
        raise ImportError("pytest-diffeval: lora= needs the 'peft' package: pip install peft") from exc
    text = os.fspath(lora)
    local = Path(text).expanduser()
    if local.is_file():
        location, weight_name, kind = str(local.resolve().parent), local.name, "local"
        content_hash = _file_hash(local)
    elif local.is_dir():
        location, kind = str(local.resolve()), "local"
        weight_name = weight_name or _lora_file_name(local)
        content_hash = _weights_hash(local, weight_name)
    else:
        location, kind, content_hash = text, "hub", None
        snapshot = _hub_snapshot(text, None)
        if snapshot is not None:  # offline, diffusers needs the file name
            weight_name = weight_name or _lora_file_name(snapshot)
    if use_safetensors and weight_name is not None and not str(weight_name).endswith(".safetensors"):
        # diffusers reads any other file name with torch.load, whatever use_safetensors says
        raise PipelineNotFoundError(
            f"pytest-diffeval: the LoRA {text!r} is the pickle file {weight_name!r} where a .safetensors file is "
            "expected: pickle files can execute code when loaded, so safetensors are the default (as for model "
            "folders). Fix: convert it once in a trusted environment "
            "(safetensors.torch.save_file(torch.load(F, weights_only=True), 'lora.safetensors')), or pass "
            "use_safetensors=False to diffusion_pipeline() if you trust this file.")
    try:
        pipe.load_lora_weights(location, weight_name=weight_name, adapter_name="diffeval_lora",
                               use_safetensors=use_safetensors)
    except ImportError:
        raise
    except Exception as exc:  # noqa: BLE001 - hub/network/format errors, re-raised with what was looked at
        looked = f"a local file or folder {local.resolve()} (not found)" if kind == "hub" else location
        error = WeightsNotAvailableError if kind == "hub" and _hub_snapshot(text, None) is None else PipelineNotFoundError
        raise error(
            f"pytest-diffeval: cannot load the LoRA {text!r} into {type(pipe).__name__}: {type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}\n  looked at: {looked}"
            + (" and the Hugging Face cache/hub" if kind == "hub" else "") +
            "\n  fix: pass a .safetensors LoRA file in diffusers/peft or kohya format, a folder holding one "
            "(lora_weight_name= picks the file), or a hub id available offline; the LoRA must match the "
            "model's architecture.",
            *([text] if error is WeightsNotAvailableError else []),
        ) from exc
    pipe.fuse_lora(lora_scale=scale, adapter_names=["diffeval_lora"])
    pipe.unload_lora_weights()  # keeps the fused weights, removes the adapter layers
    if kind == "hub":
        snapshot = _hub_snapshot(text, None)
        if snapshot is not None:
            content_hash = _weights_hash(snapshot, weight_name)
    return {"source": text, "kind": kind, "weight_name": weight_name, "hash": content_hash or "unknown",
            "scale": scale}
