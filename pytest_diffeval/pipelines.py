"""Loading diffusers pipelines: where a model comes from, how it is identified, and a
per-process cache so that many tests using one model load it once per worker."""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .fingerprints import hub_snapshot, model_fingerprint

if TYPE_CHECKING:
    import torch

# torch is imported where a pipeline is loaded, not here: a warm rerun whose images are all
# cached resolves model sources through this module without loading any model.
DTYPES = ("float32", "float16", "bfloat16")


class PipelineNotFoundError(FileNotFoundError):
    """A model source could not be found locally nor in the Hugging Face cache/hub."""


class WeightsNotAvailableError(PipelineNotFoundError):
    """A hub model (or hub LoRA) is neither in the local Hugging Face cache nor downloadable
    here.  In a test marked ``gpu`` the plugin turns it into a skip whose reason names the
    model and how to get it, and into a failure under ``--diffeval-require-gpu``."""

    def __init__(self, message: str, model_id: str) -> None:
        super().__init__(message)
        self.model_id = model_id

    def how_to_get(self) -> str:
        """One line: how to make these weights available to a run."""
        return (f"fetch them with `huggingface-cli download {self.model_id}` (into the Hugging Face cache; "
                "on another machine, then point HF_HOME at a copy of that cache), or point the test at a "
                f"local copy with --diffeval-model={self.model_id}=PATH")


def _known_pipeline_classes() -> dict[str, type]:
    """Pipeline classes shipped by this package, looked up by the name in model_index.json
    (diffusers itself would otherwise try to load them as remote code)."""
    from .pixel_pipeline import PixelTextToImagePipeline

    return {"PixelTextToImagePipeline": PixelTextToImagePipeline}


def resolve_source(source: str | os.PathLike) -> tuple[str, Path | None]:
    """Return ``(kind, path)``: ``("embedded", path)`` for a name like ``diffeval/tiny-t2i``,
    ``("local", path)`` for an existing directory, ``("hub", None)`` otherwise."""
    from .embedded import resolve_embedded

    text = os.fspath(source)
    embedded = resolve_embedded(text)
    if embedded is not None:
        return "embedded", embedded
    path = Path(text).expanduser()
    if path.is_dir():
        return "local", path.resolve()
    return "hub", None


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")  # "org/name" or "name", not a path


def _missing_model_error(source: str, exc: BaseException) -> PipelineNotFoundError:
    """Where a model was looked for and how to fix it; a hub id (not a path) that is not
    here is :class:`WeightsNotAvailableError`, which ``gpu`` tests turn into a skip."""
    from huggingface_hub.constants import HF_HUB_CACHE, HF_HUB_OFFLINE

    hub_id = _HUB_ID.match(source) is not None and ".." not in source
    return (WeightsNotAvailableError if hub_id else PipelineNotFoundError)(
        f"pytest-diffeval: cannot load the diffusion model {source!r}.\n"
        f"  looked for a local directory: {Path(source).expanduser().resolve()} (not found)\n"
        f"  looked in the Hugging Face cache {HF_HUB_CACHE} and the hub "
        f"(HF_HUB_OFFLINE={int(bool(HF_HUB_OFFLINE))}): {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}\n"
        "  fix: pass the path of a local copy in diffusers layout (a folder with model_index.json), "
        "e.g. one made by `huggingface-cli download <id> --local-dir DIR` on a machine with access, "
        "or set HF_HOME to a cache that holds it; embedded offline models: 'diffeval/tiny-t2i'.",
        *([source] if hub_id else []),
    )


def _not_diffusers_layout(path: Path) -> PipelineNotFoundError:
    return PipelineNotFoundError(
        f"pytest-diffeval: {path} is a directory but not a diffusers pipeline: it has no "
        "model_index.json. Fix: point at the folder that holds model_index.json (one made by "
        "`pipeline.save_pretrained(DIR)`), not at a single component or weights file."
    )


def _pipeline_class(path: Path | None, pipeline_class: type | str | None) -> type:
    import diffusers

    if isinstance(pipeline_class, type):
        return pipeline_class
    known = _known_pipeline_classes()
    name = pipeline_class
    if name is None and path is not None:
        name = json.loads((path / "model_index.json").read_text()).get("_class_name")
    if name in known:
        return known[name]
    if name is not None and hasattr(diffusers, name):
        return getattr(diffusers, name)
    return diffusers.DiffusionPipeline


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
    ``device``/``dtype``, put every module in eval mode and attach its provenance.

    ``lora=`` (a ``.safetensors`` file, a folder holding one, or a hub id; optional
    ``lora_weight_name=``) loads LoRA weights with diffusers' ``load_lora_weights`` and fuses
    them at ``lora_scale=`` (default 1.0; needs ``peft``); provenance records its content hash."""
    lora = from_pretrained_kwargs.pop("lora", None)
    lora_scale = from_pretrained_kwargs.pop("lora_scale", None)
    lora_weight_name = from_pretrained_kwargs.pop("lora_weight_name", None)
    if lora is None and (lora_scale is not None or lora_weight_name is not None):
        raise ValueError("pytest-diffeval: lora_scale=/lora_weight_name= were given without lora=; pass the LoRA "
                         "too, e.g. diffusion_pipeline(MODEL, lora='path/to/lora.safetensors', lora_scale=0.8)")
    _register_moved_pipeline_modules()
    kind, path = resolve_source(source)
    if kind != "hub" and not (path / "model_index.json").is_file():
        raise _not_diffusers_layout(path)
    torch_dtype = resolve_dtype(dtype, device)
    cls = _pipeline_class(path, pipeline_class)
    kwargs = {"use_safetensors": True, **from_pretrained_kwargs}
    _quiet_progress_bars()
    location = str(path) if path is not None else os.fspath(source)
    try:
        pipe = cls.from_pretrained(location, torch_dtype=torch_dtype, **kwargs)
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
    pipe = pipe.to(device)
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
    revision = from_pretrained_kwargs.get("revision")
    if kind == "hub":
        path = _hub_snapshot(os.fspath(source), revision)
        revision = path.name if path is not None else revision  # the snapshot folder is the commit hash
    pipe._diffeval_provenance = {
        "model": os.fspath(source),
        "model_kind": kind,
        "model_path": str(path) if path is not None else None,
        "model_hash": model_fingerprint(path) if path is not None else "unknown",
        "revision": revision,
    }
    if lora_provenance is not None:
        pipe._diffeval_provenance["lora"] = lora_provenance
    return pipe


def _register_moved_pipeline_modules() -> None:
    """Let checkpoints that name a component ``["paint_by_example", ...]`` (e.g.
    ``Fantasy-Studio/Paint-by-Example``) load again: diffusers (after 0.33) moved that pipeline
    under ``diffusers.pipelines.deprecated`` and no longer resolves the old name."""
    import importlib

    from diffusers import pipelines

    for name in ("paint_by_example",):
        try:
            getattr(pipelines, name)
            continue
        except (AttributeError, ImportError):
            pass
        try:
            setattr(pipelines, name, importlib.import_module(f"diffusers.pipelines.deprecated.{name}"))
        except ImportError:
            pass


def _file_hash(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:16]


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


def _quiet_progress_bars() -> None:
    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()


def _hub_snapshot(repo_id: str, revision: str | None) -> Path | None:
    """The local snapshot folder of a hub model that ``from_pretrained`` just loaded."""
    return hub_snapshot(repo_id, revision)


@dataclass(frozen=True)
class PipelineKey:
    """Everything that changes a loaded pipeline: two equal keys share one load."""

    source: str
    pipeline_class: str | None
    dtype: str
    device: str
    scheduler: str | None
    kwargs: str


class PipelineCache:
    """Loaded pipelines of this process, keyed by :class:`PipelineKey`, with a load counter."""

    def __init__(self) -> None:
        self._pipes: dict[PipelineKey, Any] = {}
        self.loads: dict[str, int] = {}

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
            kwargs=json.dumps(from_pretrained_kwargs, sort_keys=True, default=repr),
        )
        if key not in self._pipes:
            self._pipes[key] = load_pipeline(
                source, pipeline_class=pipeline_class, dtype=dtype, device=device,
                scheduler=scheduler, **from_pretrained_kwargs,
            )
            self.loads[key.source] = self.loads.get(key.source, 0) + 1
        return self._pipes[key]

    def loaded(self, source: str | os.PathLike, *, dtype: str | None, device: str) -> Any:
        """The pipeline ``get(source, dtype=dtype, device=device)`` would return, if this
        process has already loaded it (with no other options); None otherwise (never loads)."""
        _, path = resolve_source(source)
        wanted = str(path) if path is not None else os.fspath(source)
        for key, pipe in self._pipes.items():
            if (key.source == wanted and key.device == device and key.pipeline_class is None
                    and key.scheduler == _scheduler_key(None) and key.kwargs == "{}"
                    and key.dtype == str(resolve_dtype(dtype, device))):
                return pipe
        return None

    def clear(self) -> None:
        self._pipes.clear()
