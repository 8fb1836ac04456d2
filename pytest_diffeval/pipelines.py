"""Loading diffusers pipelines: where a model comes from, how it is identified, and a
per-process cache so that many tests using one model load it once per worker."""

from __future__ import annotations

import gc
import hashlib
import importlib
import importlib.util
import json
import os
import re
import sys
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import settings
from .embedded import resolve_embedded
from .exceptions import InputError, PipelineNotFoundError, WeightsNotAvailableError  # noqa: F401 - re-exported
from .fingerprints import hub_snapshot, model_fingerprint
from .identity import changed_since_load, describe_option, module_identity, options_identity, remember_identity

if TYPE_CHECKING:
    import torch

# torch is imported where a pipeline is loaded, not here: a warm rerun whose images are all
# cached resolves model sources through this module without loading any model.
DTYPES = ("float32", "float16", "bfloat16")


def _known_pipeline_classes() -> dict[str, type]:
    """Pipeline classes shipped by this package, looked up by the name in model_index.json
    (diffusers itself would otherwise try to load them as remote code)."""
    from .pixel_pipeline import PixelTextToImagePipeline

    return {"PixelTextToImagePipeline": PixelTextToImagePipeline}


def resolve_source(source: str | os.PathLike) -> tuple[str, Path | None]:
    """Return ``(kind, path)``: ``("embedded", path)`` for a name like ``diffeval/tiny-t2i``,
    ``("local", path)`` for an existing directory, ``("hub", None)`` otherwise."""
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


MODEL_INDEX_FIX = ("each component entry is [library, class] as `pipeline.save_pretrained(DIR)` writes it, e.g. "
                   '"unet": ["diffusers", "UNet2DConditionModel"], and "_class_name" names a diffusers pipeline class; '
                   "re-save the model or correct the entry")


def _module_exists(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def _pipelines_attribute(name: str) -> bool:
    """Whether ``diffusers.pipelines`` has ``name`` (a module registered by name, as
    :func:`_register_moved_pipeline_modules` does)."""
    from diffusers import pipelines

    try:
        return getattr(pipelines, name, None) is not None
    except ImportError:
        return False


def _library(name: str) -> Any:
    """The ``diffusers`` or ``transformers`` module (imported by name, never dynamically)."""
    if name == "transformers":
        import transformers

        return transformers
    import diffusers

    return diffusers


def check_model_index(path: Path, *, pipeline_class: type | str | None = None, custom: bool = False) -> dict[str, Any]:
    """The model folder's ``model_index.json``, checked before diffusers reads it: an object
    whose ``_class_name`` (unless ``pipeline_class`` or a custom pipeline overrides it) is a
    pipeline class diffusers or this package has, and whose component entries are
    ``[library, class]`` with a library diffusers can load from and, for ``diffusers`` and
    ``transformers``, a class that library has.  Anything else is
    :class:`PipelineNotFoundError` naming the file, the entry and the fix (diffusers' own
    errors are bare unpacking or attribute errors)."""
    file = path / "model_index.json"

    def bad(entry: str, value: Any, why: str) -> PipelineNotFoundError:
        return PipelineNotFoundError(f"pytest-diffeval: {file}: {entry} is {value!r}, {why}. Fix: {MODEL_INDEX_FIX}")

    try:
        index = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise PipelineNotFoundError(f"pytest-diffeval: {file}: cannot read it as JSON ({exc}). "
                                    f"Fix: {MODEL_INDEX_FIX}") from None
    if not isinstance(index, dict):
        raise bad("the file", type(index).__name__, "not a JSON object")
    name = index.get("_class_name")
    if pipeline_class is None and not custom and name is not None:
        import diffusers

        if not isinstance(name, str) or not (name in _known_pipeline_classes() or hasattr(diffusers, name)):
            raise bad("'_class_name'", name, "not a pipeline class of diffusers nor of pytest-diffeval "
                      "(or pass pipeline_class=)")
    for key, value in index.items():
        if key.startswith("_") or value is None or isinstance(value, (bool, int, float, dict)):
            continue  # settings such as "requires_safety_checker": true, not components
        if (not isinstance(value, (list, tuple)) or len(value) != 2
                or not all(v is None or isinstance(v, str) for v in value) or (value[0] is None) != (value[1] is None)):
            raise bad(f"entry {key!r}", value, "not a [library, class] pair")
        library, class_name = value
        if library is None:  # an optional component that is absent
            continue
        if library in ("diffusers", "transformers") and _module_exists(library):
            if not hasattr(_library(library), class_name):
                raise bad(f"entry {key!r}", value, f"but {library} has no class {class_name!r}")
        elif not (any(_module_exists(m) for m in (library, f"diffusers.pipelines.{library}",
                                                   f"diffusers.pipelines.deprecated.{library}"))
                  or _pipelines_attribute(library)):
            raise bad(f"entry {key!r}", value, f"but there is no library or diffusers pipeline module {library!r}")
    return index


def _pipeline_class(path: Path | None, pipeline_class: type | str | None) -> type:
    import diffusers

    if isinstance(pipeline_class, type):
        return pipeline_class
    known = _known_pipeline_classes()
    name = pipeline_class
    if name is None and path is not None:
        name = json.loads((path / "model_index.json").read_text()).get("_class_name")
        name = name if isinstance(name, str) else None  # a custom pipeline: diffusers resolves it
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
    pipe._diffeval_provenance = {
        "model": os.fspath(source),
        "model_kind": kind,
        "model_path": str(path) if path is not None else None,
        "model_hash": model_fingerprint(path) if path is not None else "unknown",
        "revision": revision,
    }
    if lora_provenance is not None:
        pipe._diffeval_provenance["lora"] = lora_provenance
    if offload is not None:
        pipe._diffeval_provenance["offload"] = offload
    if device_mapped:
        pipe._diffeval_provenance["device_map"] = repr(kwargs["device_map"])
    identity = _identity(pipe._diffeval_provenance["model_hash"], pipeline_class, torch_dtype,
                         {**requested, "scheduler": scheduler})
    pipe._diffeval_provenance["load_options"] = describe_option(requested)
    pipe._diffeval_provenance["pipeline_id"] = identity
    remember_identity(pipe, identity)
    return pipe


# --------------------------------------------------------------------------- identity and load options

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


def _identity(source_id: str | None, pipeline_class: Any, dtype: Any, options: dict[str, Any]) -> str | None:
    """The pipeline identity: the source's content id, the class asked for, the dtype and
    every load option by content (see identity.py); None when something is not identifiable."""
    if not source_id or source_id == "unknown":
        return None
    opts = options_identity(options)
    if opts is None:
        return None
    asked = module_identity(pipeline_class) if pipeline_class is not None else None
    return hashlib.sha256(json.dumps([source_id, asked, str(dtype), opts]).encode()).hexdigest()[:24]


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


def _register_moved_pipeline_modules() -> None:
    """Let checkpoints that name a component ``["paint_by_example", ...]`` (e.g.
    ``Fantasy-Studio/Paint-by-Example``) load again: diffusers (after 0.33) moved that pipeline
    under ``diffusers.pipelines.deprecated`` and no longer resolves the old name."""
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
            self._pipes[key] = load_pipeline(
                source, pipeline_class=pipeline_class, dtype=dtype, device=device,
                scheduler=scheduler, **from_pretrained_kwargs,
            )
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


# Deliberately per process, not per pytest session: a pytest run inside a test run (pytester,
# in-process) and the run around it share the models this process loaded.
_PROCESS_PIPELINES: list[PipelineCache] = []


def process_pipelines() -> PipelineCache:
    """This process's pipeline cache (one load per model identity per process)."""
    if not _PROCESS_PIPELINES:
        _PROCESS_PIPELINES.append(PipelineCache())
    return _PROCESS_PIPELINES[0]


def loaded_pipelines() -> PipelineCache | None:
    """The process's pipeline cache if anything created it (None: no pipeline was loaded)."""
    return _PROCESS_PIPELINES[0] if _PROCESS_PIPELINES else None
