"""Deterministic, batched image generation and the :class:`ImageSet` it returns."""

from __future__ import annotations

import difflib
import hashlib
import inspect
import json
import math
import os
import platform
import re
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Sequence

import numpy as np

from ._io import atomic_path
from ._version import __version__
from .claims import release as release_claims
from .claims import try_claim, wait_for
from .devices import call_with_oom_backoff, device_kind  # noqa: F401 - device_kind re-exported
from .exceptions import InputError, PromptTruncatedWarning  # noqa: F401 - re-exported
from .identity import PipelineChangedWarning, execution_settings, pipeline_identity

if TYPE_CHECKING:
    import torch


@dataclass
class ImageSet:
    """Generated images with everything needed to judge and reproduce them.

    ``images`` is uint8 ``(N, H, W, 3)``; sample ``i`` was generated from
    ``prompts[i]`` with ``seeds[i]``.  Samples are ordered prompt-major (every seed of
    the first prompt, then the next prompt), and ``(prompt, seed)`` identifies a sample
    across runs, which is how baselines pair them.  For pipelines without a text prompt
    the prompts are labels: DiT's class names, Paint-by-Example's case names.

    ``inputs`` holds what else conditioned each sample, aligned with ``images`` (metrics
    read them when their option is not passed): ``source_images`` and ``exemplars`` uint8
    ``(N, H, W, 3)``, ``masks`` uint8 ``(N, H, W)`` (255 = the region to edit),
    ``class_labels`` (list of int), ``source_captions`` / ``target_captions`` (list of str).
    """

    images: np.ndarray
    prompts: list[str]
    seeds: list[int]
    call_kwargs: dict[str, Any] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)
    test_id: str | None = None
    saved_to: Path | None = None
    nonfinite: list[bool] | None = None  # per sample: the pipeline's output held NaN/inf
    inputs: dict[str, Any] = field(default_factory=dict)  # per sample: source images, masks, exemplars, labels...
    # The same generation again, uncached (the generate fixture sets it; --diffeval-calibrate calls it).
    regenerate: Callable[..., ImageSet] | None = field(default=None, repr=False, compare=False)
    tripwires_passed: bool = field(default=False, repr=False, compare=False)  # checked once per set

    def __post_init__(self) -> None:
        if self.images.dtype != np.uint8 or self.images.ndim != 4 or self.images.shape[-1] != 3:
            raise ValueError(f"ImageSet needs uint8 images of shape (N, H, W, 3), got {self.images.dtype} {self.images.shape}")
        if not (len(self.images) == len(self.prompts) == len(self.seeds)):
            raise ValueError(
                f"ImageSet: {len(self.images)} images, {len(self.prompts)} prompts and {len(self.seeds)} seeds must match"
            )
        for name, value in self.inputs.items():
            if len(value) != len(self.images):
                raise ValueError(f"ImageSet: inputs[{name!r}] holds {len(value)} entries for {len(self.images)} images; "
                                 "give one per image")

    def __repr__(self) -> str:
        h, w = self.image_size
        return (f"ImageSet({len(self)} images {h}x{w}, {len(set(self.prompts))} prompts, seeds {sorted(set(self.seeds))}, "
                f"model {self.provenance.get('model')!r})")

    def __len__(self) -> int:
        return len(self.images)

    @property
    def sample_keys(self) -> list[str]:
        """One key per sample, ``"<seed>|<prompt>"``: what pairs a sample with its baseline."""
        return [f"{seed}|{prompt}" for prompt, seed in zip(self.prompts, self.seeds)]

    @property
    def image_size(self) -> tuple[int, int]:
        return int(self.images.shape[1]), int(self.images.shape[2])

    def as_tensor(self, device: str | torch.device = "cpu") -> torch.Tensor:
        """uint8 ``(N, 3, H, W)``, the layout torchmetrics expects."""
        import torch

        return torch.from_numpy(self.images).permute(0, 3, 1, 2).contiguous().to(device)

    def to_pil(self) -> list[Any]:
        from PIL import Image

        return [Image.fromarray(image) for image in self.images]

    def save(self, directory: str | Path) -> Path:
        """Write each image as PNG, a labelled grid and ``samples.json``; return the folder."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        names = []
        for index, (image, prompt, seed) in enumerate(zip(self.to_pil(), self.prompts, self.seeds)):
            name = f"{index:04d}_seed{seed}_{_slug(prompt)}.png"
            image.save(directory / name)
            names.append({"file": name, "prompt": prompt, "seed": seed})
        self.grid().save(directory / "grid.png")
        self._save_inputs(directory, names)
        (directory / "samples.json").write_text(
            json.dumps({"samples": names, "call_kwargs": _jsonable(self.call_kwargs), "provenance": self.provenance}, indent=2)
        )
        self.saved_to = directory
        return directory

    def _save_inputs(self, directory: Path, names: list[dict[str, Any]]) -> None:
        """Input images as ``inputs/<index>_<kind>.png`` and text inputs in each sample's entry."""
        from PIL import Image

        for key, value in self.inputs.items():
            if key in IMAGE_INPUTS:
                folder = directory / "inputs"
                folder.mkdir(exist_ok=True)
                suffix = IMAGE_INPUTS[key][2]
                for index, (entry, image) in enumerate(zip(names, value)):
                    Image.fromarray(np.asarray(image)).save(folder / f"{index:04d}_{suffix}.png")
                    entry[key] = f"inputs/{index:04d}_{suffix}.png"
            else:
                for entry, item in zip(names, value):
                    entry[key] = _jsonable(item)

    def grid(self, columns: int | None = None, tile: int = 128) -> Any:
        """A labelled contact sheet of the images (nearest-neighbour upscaled)."""
        from PIL import Image, ImageDraw

        n = len(self)
        columns = columns or max(1, min(n, math.ceil(math.sqrt(n))))
        rows = math.ceil(n / columns)
        label_h = 24
        sheet = Image.new("RGB", (columns * tile, rows * (tile + label_h)), "white")
        draw = ImageDraw.Draw(sheet)
        for index, (image, prompt, seed) in enumerate(zip(self.to_pil(), self.prompts, self.seeds)):
            x, y = (index % columns) * tile, (index // columns) * (tile + label_h)
            sheet.paste(image.resize((tile, tile), Image.NEAREST), (x, y))
            draw.text((x + 2, y + tile + 1), f"s{seed} {prompt}"[: tile // 6], fill="black")
        return sheet

    def subset(self, indices: Sequence[int]) -> "ImageSet":
        return ImageSet(
            images=self.images[list(indices)],
            prompts=[self.prompts[i] for i in indices],
            seeds=[self.seeds[i] for i in indices],
            call_kwargs=dict(self.call_kwargs),
            provenance=dict(self.provenance),
            test_id=self.test_id,
            nonfinite=[self.nonfinite[i] for i in indices] if self.nonfinite is not None else None,
            inputs={k: v[list(indices)] if isinstance(v, np.ndarray) else [v[i] for i in indices]
                    for k, v in self.inputs.items()},
        )

    def by_prompt(self) -> dict[str, "ImageSet"]:
        """One ImageSet per prompt (per class for DiT), in prompt order: for per-class metrics."""
        groups: dict[str, list[int]] = {}
        for index, prompt in enumerate(self.prompts):
            groups.setdefault(prompt, []).append(index)
        return {prompt: self.subset(indices) for prompt, indices in groups.items()}


def _slug(text: str, limit: int = 40) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-")[:limit] or "empty"


def _jsonable(value: Any) -> Any:
    """Call arguments as JSON: tensors and images become a short description."""
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray) or type(value).__name__ == "Tensor":
        return f"<{type(value).__name__} shape={tuple(value.shape)} dtype={value.dtype}>"
    return repr(value)


def library_versions() -> dict[str, str]:
    import diffusers
    import torch
    import torchmetrics
    import transformers


    return {
        "pytest_diffeval": __version__,
        "diffusers": diffusers.__version__,
        "torch": torch.__version__,
        "torchmetrics": torchmetrics.__version__,
        "transformers": transformers.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
    }


def execution_device(pipe: Any) -> Any:
    """Where the pipeline computes: diffusers' ``_execution_device`` (the GPU of a pipeline
    with CPU offload or a device map, whose ``pipe.device`` says ``cpu``), else ``pipe.device``.
    Baselines are stored under this device's hardware key."""
    try:
        device = getattr(pipe, "_execution_device", None)
    except Exception:  # noqa: BLE001 - a property of a custom pipeline that cannot tell
        device = None
    return device if device is not None else getattr(pipe, "device", "cpu")


class GpuMeter:
    """GPU seconds and peak GPU memory of the batches a generation ran (None on the CPU):
    the clock is read after ``torch.cuda.synchronize`` so queued kernels are counted."""

    def __init__(self, device: Any) -> None:
        import torch

        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.seconds = 0.0
        self.images = 0
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)

    def __enter__(self) -> "GpuMeter":
        import torch

        if self.cuda:
            torch.cuda.synchronize(self.device)
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc: Any) -> None:
        import torch

        if self.cuda:
            torch.cuda.synchronize(self.device)
            self.seconds += time.perf_counter() - self._start

    def fields(self) -> dict[str, Any]:
        """``gpu_peak_memory_mb`` and ``gpu_s_per_image`` (None on the CPU or when nothing was generated)."""
        import torch

        if not self.cuda or not self.images:
            return {"gpu_peak_memory_mb": None, "gpu_s_per_image": None}
        peak = torch.cuda.max_memory_allocated(self.device) / 2**20
        return {"gpu_peak_memory_mb": round(peak, 1), "gpu_s_per_image": round(self.seconds / self.images, 4)}


# Provenance fields of one run (how long, how much memory), not of the model: never part of a
# cache key nor of the provenance memo.
RUN_FIELDS = ("gpu_peak_memory_mb", "gpu_s_per_image")


def pipeline_provenance(pipe: Any) -> dict[str, Any]:
    """What identifies the model and its configuration, for results and baselines."""
    base = dict(getattr(pipe, "_diffeval_provenance", {}))
    if not base:
        name = getattr(getattr(pipe, "config", None), "_name_or_path", None)
        base = {"model": name, "model_kind": "object", "model_path": None, "model_hash": None, "revision": None}
    if base.get("model_hash") not in (None, "unknown"):
        base["pipeline_id"] = pipeline_identity(pipe)  # re-identified when changed after loading
        if base["pipeline_id"] is None:
            warnings.warn(PipelineChangedWarning(
                f"pytest-diffeval: the pipeline loaded from {base.get('model')!r} cannot be identified by content: a "
                "load option or a change made after loading is neither a plain value, a path, a torch module with "
                "its weights in this process, a scheduler nor a tokenizer; its images are not cached. fix: pass "
                "modules as load options, e.g. diffusion_pipeline(MODEL, vae=my_vae), and plain values"),
                stacklevel=3)
    scheduler = getattr(pipe, "scheduler", None)
    device = execution_device(pipe)
    return {
        **base,
        "execution": execution_settings(pipe),
        "pipeline_class": type(pipe).__name__,
        "scheduler": type(scheduler).__name__ if scheduler is not None else None,
        "scheduler_config": _jsonable(dict(scheduler.config)) if scheduler is not None else None,
        "dtype": str(getattr(pipe, "dtype", None)),
        "device": str(device),
        "device_kind": device_kind(device),
        "versions": library_versions(),
    }


def _batches(items: list[Any], size: int) -> Iterable[list[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _fingerprint(value: Any) -> Any:
    """Call arguments for a cache key: arrays and images by content, the rest as JSON."""
    if isinstance(value, dict):
        return {str(k): _fingerprint(v) for k, v in sorted(value.items())}
    if isinstance(value, (list, tuple)):
        return [_fingerprint(v) for v in value]
    if isinstance(value, np.ndarray) or type(value).__name__ == "Tensor":
        array = np.ascontiguousarray(value.detach().cpu().numpy() if hasattr(value, "detach") else value)
        return f"array:{array.dtype}:{array.shape}:{hashlib.sha256(array.tobytes()).hexdigest()[:16]}"
    if hasattr(value, "tobytes") and hasattr(value, "size"):  # PIL image
        return f"image:{value.size}:{hashlib.sha256(value.tobytes()).hexdigest()[:16]}"
    return value if isinstance(value, (str, int, float, bool, type(None))) else repr(value)


CLAIM_TIMEOUT_S = 1800.0  # a sample another live process claimed is waited for at most this long, then made here


class ImageCache:
    """Generated images on disk, one PNG per sample, keyed by everything that determines
    it: model content hash (and a fused LoRA's), the pipeline identity (every load option,
    module arguments by content, re-identified after a change; identity.py), the execution
    settings (attention, torch.compile, TF32/cuDNN/determinism flags, watermark), pipeline
    class, scheduler config, every call argument and input image, prompt, seed, dtype, device
    kind and library versions.  Change one input and only the samples
    it affects miss.  Writes are atomic.  Each PNG carries its key in a text chunk
    (``diffeval_key``) and is read back only under that key, as 8-bit RGB: a swapped or
    stale file, a corrupt one or one of another mode is a miss, regenerated, never
    trusted.  A forged PNG written under its right key cannot be told apart: share a cache
    only among trusted runs."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self.hits = 0
        self.misses = 0
        self.unwritable = False  # set (and warned about once) when an entry could not be written

    def key(self, provenance: dict[str, Any], call_kwargs: dict[str, Any], prompt: str, seed: int) -> str | None:
        if not provenance.get("model_hash") or provenance.get("model_hash") == "unknown":
            return None  # a pipeline object we cannot identify by content is never cached
        if "pipeline_id" in provenance and not provenance["pipeline_id"]:
            return None  # changed after loading in a way that cannot be identified by content
        # pipeline_id: the source's content and every load option by content (identity.py);
        # execution: attention processors, torch.compile, TF32/cuDNN/determinism flags, watermark
        material = {k: provenance.get(k) for k in ("model_hash", "revision", "pipeline_class", "scheduler",
                                                    "scheduler_config", "dtype", "device_kind", "versions",
                                                    "pipeline_id", "execution")}
        if provenance.get("lora"):  # fused LoRA weights change the model without changing its files
            material["lora"] = provenance["lora"]
        material.update(call_kwargs=_fingerprint(call_kwargs), prompt=prompt, seed=seed)
        return hashlib.sha256(json.dumps(material, sort_keys=True, default=repr).encode()).hexdigest()[:32]

    def _path(self, key: str) -> Path:
        return self.directory / key[:2] / f"{key}.png"

    def claim_path(self, key: str | None) -> Path | None:
        """Where a process marks that it is generating this sample (see claims.py)."""
        return None if key is None else self._path(key).with_suffix(".claim")

    def get(self, key: str | None) -> tuple[np.ndarray, bool] | None:
        if key is None or not self._path(key).is_file():
            return None
        from PIL import Image

        try:
            with Image.open(self._path(key)) as image:
                image.load()
                if (image.format, image.mode, image.info.get("diffeval_key")) != ("PNG", "RGB", key):
                    return None  # another sample's file (swapped or stale), or not one we wrote
                if image.info.get("diffeval_nonfinite") not in ("0", "1"):
                    return None
                array = np.asarray(image, dtype=np.uint8)
                nonfinite = image.info.get("diffeval_nonfinite") == "1"
        except Exception:  # noqa: BLE001 - a corrupt entry is a miss
            return None
        self.hits += 1
        return array, nonfinite

    def put(self, key: str | None, image: np.ndarray, nonfinite: bool) -> None:
        if key is None:
            return
        from PIL import Image, PngImagePlugin

        path = self._path(key)
        info = PngImagePlugin.PngInfo()
        info.add_text("diffeval_nonfinite", "1" if nonfinite else "0")
        info.add_text("diffeval_key", key)
        try:
            with atomic_path(path) as tmp:
                Image.fromarray(image).save(tmp, format="PNG", pnginfo=info)
        except OSError as exc:  # a read-only or full cache disk: the image is still used, just not kept
            if not self.unwritable:
                self.unwritable = True
                warnings.warn(f"pytest-diffeval: cannot write to the image cache {self.directory}: "
                              f"{type(exc).__name__}: {exc}; running without caching images; fix: free space or "
                              f"make {self.directory} writable, or point --diffeval-cache-dir at a writable folder",
                              UserWarning, stacklevel=2)


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
# generate_images' image inputs: the pipeline argument each feeds, its pixel mode, a file suffix.
IMAGE_INPUTS = {
    "source_images": ("image", "RGB", "source"),
    "masks": ("mask_image", "L", "mask"),
    "exemplars": ("example_image", "RGB", "exemplar"),
}
_ALIASES = {"image": "source_images", "mask_image": "masks", "example_image": "exemplars"}
# Text arguments given once (str: for every prompt) or per prompt (list), sent per sample.
_PER_PROMPT_TEXT = ("negative_prompt", "prompt_2", "negative_prompt_2")
# Samplers that draw noise in scheduler.step: DiTPipeline does not pass its generators to
# step, so with these its images would come from the global RNG.
_STOCHASTIC_SCHEDULERS = {"DDPMScheduler", "EulerAncestralDiscreteScheduler", "KDPM2AncestralDiscreteScheduler",
                          "DPMSolverSDEScheduler", "LCMScheduler", "TCDScheduler", "EDMEulerScheduler"}


SEED_MAX = 2**63 - 1


def check_seeds(seeds: Iterable[Any]) -> list[int]:
    """The seeds as ints, each in ``[0, 2**63 - 1]``.  ``torch.Generator.manual_seed`` takes
    ``[-2**63, 2**64 - 1]`` and maps a negative seed ``s`` to ``2**64 + s`` (so ``-1`` and
    ``2**64 - 1`` make the same images but would count as two samples), and anything wider is
    a bare overflow error; ``[0, 2**63 - 1]`` is the range where each seed is one generator
    state and also fits the int64 the seeds are stored as."""
    try:
        values = [int(s) for s in seeds]
    except (TypeError, ValueError) as exc:
        raise InputError(f"pytest-diffeval: seeds must be integers ({exc}); fix: pass e.g. seeds=range(4)") from None
    for seed in values:
        if not 0 <= seed <= SEED_MAX:
            raise InputError(f"pytest-diffeval: seed {seed} is outside [0, 2**63 - 1], the seeds that each give "
                             "their own torch generator state (a negative seed s aliases 2**64 + s); "
                             "fix: use seeds in that range, e.g. seeds=range(4)")
    return values


def _call_parameters(pipe: Any) -> set[str] | None:
    """Names the pipeline's ``__call__`` takes; None when it takes only ``**kwargs``."""
    try:
        parameters = inspect.signature(pipe.__call__).parameters
    except (TypeError, ValueError):
        return None
    names = {name for name, p in parameters.items() if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
    return names or None


PIXELS_FIX = "fix: save it as an 8- or 16-bit PNG, or as float pixels in [0, 1] without NaN or infinity"


def read_pixels(image: Any, mode: str = "RGB", *, name: Any, error: type[Exception] = InputError) -> np.ndarray:
    """A PIL image's pixels as uint8 ``(H, W, 3)`` (``mode="RGB"``) or ``(H, W)`` (``"L"``),
    read faithfully: 16-bit and 32-bit integer greyscale (``I;16``, ``I``) are scaled by
    1/257 (65535 -> 255), float greyscale (``F``) in [0, 1] by 255.  PIL's own ``convert``
    clips those at 255 and turns NaN black, which silently changes a metric; a float image
    with NaN or infinite pixels, or values outside its range, is ``error`` naming ``name``."""
    kind = getattr(image, "mode", "")
    if kind != "F" and not kind.startswith("I"):
        return np.asarray(image.convert(mode), dtype=np.uint8)
    values = np.asarray(image)
    if kind == "F":
        if not np.isfinite(values).all():
            bad = int(values.size - np.isfinite(values).sum())
            raise error(f"pytest-diffeval: {name} is a float image with {bad} NaN or infinite pixels; {PIXELS_FIX}")
        scale, top, described = 255.0, 1, "a float image"
    else:
        scale, top, described = 1 / 257, 65535, f"an integer image (PIL mode {kind})"
    if values.size and (values.min() < 0 or values.max() > top):
        raise error(f"pytest-diffeval: {name} is {described} with pixels in [{values.min()}, {values.max()}], "
                    f"outside [0, {top}]; {PIXELS_FIX}")
    grey = np.rint(values.astype(np.float64) * scale).astype(np.uint8)
    return grey if mode == "L" else np.repeat(grey[..., None], 3, axis=-1)


def _to_array(item: Any, *, what: str, name: str, mode: str) -> np.ndarray:
    """One image (PIL, path or array) as uint8 ``(H, W, 3)``, or for ``mode="L"`` a
    binarised uint8 ``(H, W)`` mask (0 / 255)."""
    from PIL import Image

    if isinstance(item, (str, os.PathLike)):
        path = Path(item)
        if not path.is_file():
            raise InputError(f"pytest-diffeval: {what}: {path} is not an image file (nor a folder of images)")
        try:
            with Image.open(path) as image:
                item = read_pixels(image, mode, name=f"{what}: {path}")
        except OSError as exc:
            raise InputError(f"pytest-diffeval: {what}: cannot read {path}: {exc}; fix: replace or remove it") from exc
    elif hasattr(item, "convert") and hasattr(item, "size"):  # PIL image
        item = read_pixels(item, mode, name=f"{what}: {name}")
    elif type(item).__name__ == "Tensor":
        raise InputError(f"pytest-diffeval: {what}: {name} is a torch.Tensor; pass PIL images, paths or uint8 numpy "
                         "arrays (e.g. tensor.permute(1, 2, 0).numpy())")
    array = np.asarray(item)
    if mode == "L":
        if array.ndim == 3 and array.shape[-1] in (1, 3):
            array = array.max(axis=-1)
        if array.ndim != 2 or array.dtype not in (np.uint8, np.bool_):
            raise InputError(f"pytest-diffeval: {what}: {name} is {array.dtype} {array.shape}; a mask must be "
                             "uint8 (0/255) or bool of shape (H, W), white/True = the region to edit")
        if array.dtype == np.bool_:
            return array.astype(np.uint8) * 255
        return np.where(array > (0 if array.max() <= 1 else 127), 255, 0).astype(np.uint8)
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[-1] != 3:
        raise InputError(f"pytest-diffeval: {what}: {name} is {array.dtype} {array.shape}; images must be uint8 "
                         "(H, W, 3) arrays, PIL images or image files (convert floats with to_uint8)")
    return np.ascontiguousarray(array)


def load_input_images(value: Any, *, what: str, mode: str = "RGB") -> tuple[list[np.ndarray], list[str]]:
    """Input images from a folder (its image files sorted by name), a file, a list of paths,
    PIL images or uint8 arrays, one stacked uint8 array or an :class:`ImageSet`; return the
    arrays and a name for each (for error messages).  All must have one size.  A mask
    array is one ``(H, W)`` mask or a stack ``(N, H, W)`` / ``(N, H, W, 1|3)``."""
    if isinstance(value, (str, os.PathLike)) and Path(value).is_dir():
        folder = Path(value)
        files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise InputError(f"pytest-diffeval: {what}: the folder {folder} holds no images "
                             f"({', '.join(IMAGE_SUFFIXES)})")
        items, names = files, [p.name for p in files]
    elif hasattr(value, "images") and hasattr(value, "sample_keys"):  # an ImageSet
        items, names = list(value.images), [f"sample {i}" for i in range(len(value))]
    elif isinstance(value, np.ndarray) and (value.ndim == 4 or (mode == "L" and value.ndim == 3)):
        # a stack: (N, H, W, 3) images; (N, H, W) or (N, H, W, 1|3) masks
        items, names = list(value), [f"item {i}" for i in range(len(value))]
    elif isinstance(value, (list, tuple)):
        items = list(value)
        names = [Path(v).name if isinstance(v, (str, os.PathLike)) else f"item {i}" for i, v in enumerate(items)]
    else:
        items, names = [value], [Path(value).name if isinstance(value, (str, os.PathLike)) else "the image"]
    if not items:
        raise InputError(f"pytest-diffeval: {what} is empty; give one image per prompt, or one for all")
    arrays = [_to_array(item, what=what, name=name, mode=mode) for item, name in zip(items, names)]
    sizes = {a.shape[:2] for a in arrays}
    if len(sizes) > 1:
        first = arrays[0].shape[:2]
        odd = next(i for i, a in enumerate(arrays) if a.shape[:2] != first)
        raise InputError(f"pytest-diffeval: {what}: {names[odd]} is {arrays[odd].shape[0]}x{arrays[odd].shape[1]} "
                         f"(HxW) but {names[0]} is {first[0]}x{first[1]}; give images of one size")
    return arrays, names


def _digest(arrays: Sequence[np.ndarray]) -> str:
    digest = hashlib.sha256()
    for array in arrays:
        digest.update(str(array.shape).encode())
        digest.update(np.ascontiguousarray(array).tobytes())
    h, w = arrays[0].shape[:2]
    return f"{len(arrays)} x {h}x{w} sha256:{digest.hexdigest()[:16]}"


def _class_label(pipe: Any, label: Any) -> tuple[int, str]:
    """``(class id, name)`` of a DiT class given by id or by one of its names (``id2label``)."""
    known: dict[str, int] = dict(getattr(pipe, "labels", None) or {})
    transformer = getattr(pipe, "transformer", None)
    count = getattr(getattr(transformer, "config", None), "num_embeds_ada_norm", None)
    if isinstance(label, (int, np.integer)) and not isinstance(label, bool):
        label = int(label)
        if label < 0 or (count is not None and label >= count):
            raise InputError(f"pytest-diffeval: class label {label} is out of range; "
                             f"{type(pipe).__name__} has classes 0..{(count or 1) - 1}")
        names = [name for name, index in known.items() if index == label]
        return label, _id2label(pipe).get(label) or (", ".join(names) if names else f"class {label}")
    if not isinstance(label, str):
        raise InputError(f"pytest-diffeval: class label {label!r} is neither a class id (int) nor a class name (str)")
    if label.strip() not in known:
        close = difflib.get_close_matches(label.strip(), list(known), n=3)
        hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
        raise InputError(f"pytest-diffeval: {label!r} is not a class name of {type(pipe).__name__} ({len(known)} names "
                         f"known from its id2label){hint} Pass a name from pipe.labels or a class id (int).")
    return known[label.strip()], label


def _id2label(pipe: Any) -> dict[int, str]:
    """The full ``id2label`` names of a loaded DiT checkpoint (its ``model_index.json``)."""
    path = getattr(pipe, "_diffeval_provenance", {}).get("model_path")
    try:
        index = json.loads((Path(path) / "model_index.json").read_text()) if path else {}
        return {int(k): str(v) for k, v in (index.get("id2label") or {}).items()}
    except (OSError, ValueError, AttributeError):
        return {}


def _per_prompt(value: Any, *, what: str, count: int) -> list[Any] | None:
    """A text given once (str) or per prompt (list) as one entry per prompt."""
    if value is None:
        return None
    if isinstance(value, str):
        return [value] * count
    values = list(value)
    if len(values) != count:
        raise InputError(f"pytest-diffeval: {what} holds {len(values)} entries for {count} prompts; give one per "
                         "prompt (same order) or a single str for all")
    return values


def _token_count(tokenizer: Any, text: str) -> int | None:
    try:
        return len(tokenizer(text, truncation=False)["input_ids"])
    except Exception:  # noqa: BLE001 - a tokenizer we cannot call this way: no warning rather than no images
        return None


def warn_long_prompts(pipe: Any, prompts: Sequence[str], texts: dict[str, list[Any] | None]) -> list[str]:
    """Warn once per prompt longer than the pipeline's text encoder takes
    (``tokenizer.model_max_length`` tokens, start/end tokens included, 77 for CLIP), naming
    the prompt, its length and the limit: diffusers cuts the tail off silently, so the
    images do not show it.  SDXL's second encoder (``tokenizer_2``) reads ``prompt_2``
    when given, else the prompt.  Return the prompts warned about."""
    pairs: list[tuple[str, Any, list[Any]]] = []
    tokenizer, tokenizer_2 = getattr(pipe, "tokenizer", None), getattr(pipe, "tokenizer_2", None)
    if tokenizer is not None:
        pairs.append(("tokenizer", tokenizer, [*prompts, *(texts.get("negative_prompt") or [])]))
    if tokenizer_2 is not None:
        second = texts.get("prompt_2") or prompts
        negative = texts.get("negative_prompt_2") or texts.get("negative_prompt") or []
        pairs.append(("tokenizer_2", tokenizer_2, [*second, *negative]))
    long: dict[str, list[str]] = {}
    for name, tok, items in pairs:
        limit = getattr(tok, "model_max_length", None)
        if not isinstance(limit, int) or limit <= 0 or limit > 100_000:  # unset: transformers' huge sentinel
            continue
        for text in dict.fromkeys(t for t in items if isinstance(t, str) and t):
            count = _token_count(tok, text)
            if count is not None and count > limit:
                long.setdefault(text, []).append(f"{count} tokens > {name}'s limit of {limit}")
    for text, reasons in long.items():
        warnings.warn(
            f"pytest-diffeval: prompt {text!r} is longer than {type(pipe).__name__}'s text encoder takes "
            f"({'; '.join(reasons)}); the tail beyond the limit is cut off and does not reach the images. "
            "Fix: shorten the prompt (or accept that its end is ignored).",
            PromptTruncatedWarning, stacklevel=3,
        )
    return list(long)


def generate_images(
    pipe: Any,
    prompts: Sequence[str | int] | str | None = None,
    *,
    seeds: Iterable[int] = (0,),
    batch_size: int = 8,
    test_id: str | None = None,
    cache: ImageCache | None = None,
    source_images: Any = None,
    masks: Any = None,
    exemplars: Any = None,
    class_labels: Sequence[int | str] | None = None,
    source_captions: str | Sequence[str] | None = None,
    target_captions: str | Sequence[str] | None = None,
    _prefetch: bool = False,
    **call_kwargs: Any,
) -> ImageSet:
    """Generate one image per ``(prompt, seed)``, batched; samples found in ``cache`` are
    read instead of generated.

    Each image gets its own CPU ``torch.Generator`` seeded with its seed, so its pixels do
    not depend on the batch it landed in nor on the device's RNG.

    What each pipeline takes (its ``__call__`` decides; everything is checked before any
    generation, and carried in ``ImageSet.inputs`` for the metrics):

    * text-to-image (SD, SDXL): ``prompts``; ``negative_prompt`` (and SDXL's
      ``prompt_2`` / ``negative_prompt_2``) once for all or one per prompt.
    * img2img, InstructPix2Pix: ``source_images`` (``prompts`` are the instructions);
      inpainting: also ``masks`` (white = repaint; the output has the sources' size);
      Paint-by-Example: ``source_images``, ``masks`` and ``exemplars``, ``prompts`` are
      optional case labels.  Images come from a folder, a list of paths / PIL images /
      uint8 arrays, or an ImageSet: one per prompt, or one for all.  diffusers' names
      ``image=``, ``mask_image=``, ``example_image=`` are accepted too.
    * DiT: class ids or names in place of ``prompts`` (or ``class_labels=``).
    * unconditional (DDPM): no prompts; ``seeds`` decide the samples.

    ``source_captions`` / ``target_captions`` (once or per prompt) only travel to the
    metrics (CLIP directional similarity).  Other keyword arguments go to the pipeline.
    """
    import torch

    given = {"source_images": source_images, "masks": masks, "exemplars": exemplars}
    for alias, name in _ALIASES.items():
        if alias in call_kwargs:
            if given[name] is not None:
                raise InputError(f"pytest-diffeval: both {alias}= and {name}= were given; pass the images once")
            given[name] = call_kwargs.pop(alias)
    seeds = check_seeds(seeds)
    if not seeds:
        raise ValueError("pytest-diffeval: generate() got an empty seed list; pass e.g. seeds=range(4)")
    if batch_size < 1:
        raise ValueError(f"pytest-diffeval: batch_size must be >= 1, got {batch_size}")
    if "num_images_per_prompt" in call_kwargs:
        raise InputError("pytest-diffeval: num_images_per_prompt is not supported; more images per prompt come "
                         "from more seeds (seeds=range(4)), each with its own generator")
    params = _call_parameters(pipe)
    pipe_name = type(pipe).__name__
    strength, steps = call_kwargs.get("strength"), call_kwargs.get("num_inference_steps")
    if isinstance(strength, (int, float)) and isinstance(steps, int) and int(steps * strength) < 1:
        raise InputError(f"pytest-diffeval: strength={strength} x num_inference_steps={steps} leaves no denoising step "
                         "(diffusers runs int(steps * strength) of them); raise num_inference_steps or strength")
    class_conditional = params is not None and "class_labels" in params
    takes_prompt = (params is None or "prompt" in params) and not class_conditional
    unconditional = params is not None and not ({"prompt", "class_labels", "image"} & params)

    # ---- cases (one per prompt / class / label), each paired with its inputs
    if isinstance(prompts, str):
        prompts = [prompts]
    prompts = list(prompts) if prompts is not None else None
    if prompts is not None and not prompts:
        raise ValueError("pytest-diffeval: generate() got an empty prompt list; pass at least one prompt")
    labels: list[int] | None = None
    if class_conditional:
        if (prompts is None) == (class_labels is None):
            raise InputError(f"pytest-diffeval: {pipe_name} is class-conditional: give its classes once, as names or "
                             "ids in place of the prompts (generate(model, ['tabby cat', 207])) or as class_labels=")
        resolved = [_class_label(pipe, label) for label in (prompts if prompts is not None else list(class_labels))]
        labels, prompts = [r[0] for r in resolved], [r[1] for r in resolved]
    elif class_labels is not None:
        raise InputError(f"pytest-diffeval: class_labels= is for class-conditional pipelines (DiT); {pipe_name} "
                         "takes no class labels")
    elif takes_prompt:
        if prompts is None:
            raise InputError(f"pytest-diffeval: {pipe_name} needs prompts; pass a list of prompts (or instructions)")
        bad = [p for p in prompts if not isinstance(p, str)]
        if bad:
            raise InputError(f"pytest-diffeval: prompts must be str, got {bad[0]!r}")

    loaded: dict[str, list[np.ndarray]] = {}
    names: dict[str, list[str]] = {}
    for key, value in given.items():
        argument, mode, _ = IMAGE_INPUTS[key]
        if value is None:
            if params is not None and argument in params:
                raise InputError(f"pytest-diffeval: {pipe_name} needs {key}= ({argument}= of the pipeline): a folder, "
                                 "a list of paths, PIL images or uint8 arrays, one per prompt or one for all")
            continue
        if params is not None and argument not in params:
            raise InputError(f"pytest-diffeval: {pipe_name} takes no {key} (its __call__ has no {argument}=); "
                             "load the pipeline class that does, e.g. pipeline_class='StableDiffusionImg2ImgPipeline'")
        loaded[key], names[key] = load_input_images(value, what=key, mode=mode)

    if not takes_prompt and not class_conditional and prompts is not None:
        bad = [p for p in prompts if not isinstance(p, str)]
        if bad:
            raise InputError(f"pytest-diffeval: labels must be str, got {bad[0]!r}")
    if prompts is None:  # no text prompt: label the cases
        counts = {key: len(arrays) for key, arrays in loaded.items() if len(arrays) > 1}
        if len(set(counts.values())) > 1:
            raise InputError(f"pytest-diffeval: {pipe_name} got no prompts, so the cases come from the input images, "
                             f"but they disagree: {', '.join(f'{k} holds {n}' for k, n in counts.items())}; give every "
                             "input the same number of images (or one for all), or pass one label per case as prompts")
        count = max((len(v) for v in loaded.values()), default=1)
        prompts = [""] if unconditional or not loaded else [f"example {i}" for i in range(count)]
    if unconditional and len(prompts) != 1:
        raise InputError(f"pytest-diffeval: {pipe_name} is unconditional: every label would give the same images; "
                         "pass prompts=None (or one label) and choose the samples with seeds=")
    n_cases = len(prompts)
    for key, arrays in loaded.items():
        if len(arrays) not in (1, n_cases):
            raise InputError(f"pytest-diffeval: {key} holds {len(arrays)} images for {n_cases} "
                             f"{'prompts' if takes_prompt else 'cases'}; give one per prompt (same order) or one for all")
    if "masks" in loaded and "source_images" in loaded:
        mask_size, source_size = loaded["masks"][0].shape[:2], loaded["source_images"][0].shape[:2]
        if mask_size != source_size:
            raise InputError(f"pytest-diffeval: masks are {mask_size[0]}x{mask_size[1]} (HxW) but source_images are "
                             f"{source_size[0]}x{source_size[1]}; give masks of the source images' size")
    factor = getattr(pipe, "vae_scale_factor", None)
    if "source_images" in loaded and isinstance(factor, int) and factor > 1:
        h, w = loaded["source_images"][0].shape[:2]
        if h % factor or w % factor:
            raise InputError(f"pytest-diffeval: source_images are {h}x{w} (HxW) but {pipe_name} works at multiples of "
                             f"{factor} pixels; resize them (e.g. to {h - h % factor}x{w - w % factor}) so the "
                             "output stays aligned with its source")
    if (loaded or class_conditional) and len(set(prompts)) < n_cases:
        duplicate = next(p for p in prompts if prompts.count(p) > 1)
        raise InputError(f"pytest-diffeval: the prompt {duplicate!r} appears twice; prompts identify samples (baselines "
                         "pair them by (prompt, seed)), so give each source its own prompt or label")
    texts = {name: _per_prompt(call_kwargs.get(name), what=name, count=n_cases) for name in _PER_PROMPT_TEXT}
    if takes_prompt:
        warn_long_prompts(pipe, prompts, texts)
    captions = {"source_captions": _per_prompt(source_captions, what="source_captions", count=n_cases),
                "target_captions": _per_prompt(target_captions, what="target_captions", count=n_cases)}
    if class_conditional:
        scheduler = getattr(pipe, "scheduler", None)
        stochastic = type(scheduler).__name__ in _STOCHASTIC_SCHEDULERS or str(
            getattr(getattr(scheduler, "config", None), "algorithm_type", "")).startswith("sde")
        if stochastic:
            raise InputError(f"pytest-diffeval: {pipe_name} does not pass its generators to the scheduler, so "
                             f"{type(scheduler).__name__} would draw noise from the global RNG and images would not be "
                             "reproducible; load it with a deterministic sampler, e.g. scheduler='DDIMScheduler' or "
                             "'DPMSolverMultistepScheduler'")

    def pick(key: str, case: int) -> np.ndarray:
        arrays = loaded[key]
        return arrays[case if len(arrays) > 1 else 0]

    case_keys: list[dict[str, Any]] = []
    for case in range(n_cases):
        material: dict[str, Any] = {key: _fingerprint(pick(key, case)) for key in loaded}
        if labels is not None:
            material["class_label"] = labels[case]
        case_keys.append(material)

    # ---- generation (cached per sample)
    jobs = [(case, seed) for case in range(n_cases) for seed in seeds]
    provenance = pipeline_provenance(pipe)

    def key_kwargs(case: int) -> dict[str, Any]:
        return {**call_kwargs, "_inputs": case_keys[case]} if case_keys[case] else call_kwargs

    keys = [cache.key(provenance, key_kwargs(c), prompts[c], s) if cache is not None else None for c, s in jobs]
    results: list[tuple[np.ndarray, bool] | None] = [cache.get(k) if cache is not None else None for k in keys]
    missing = [i for i, r in enumerate(results) if r is None]
    pil_cache: dict[tuple[str, int], Any] = {}

    def pil(key: str, case: int) -> Any:
        from PIL import Image

        index = case if len(loaded[key]) > 1 else 0
        if (key, index) not in pil_cache:
            pil_cache[key, index] = Image.fromarray(loaded[key][index], mode=IMAGE_INPUTS[key][1])
        return pil_cache[key, index]

    pipe_kwargs = {k: v for k, v in call_kwargs.items() if k not in _PER_PROMPT_TEXT}
    if "source_images" in loaded and params is not None and "height" in params and \
            "height" not in call_kwargs and "width" not in call_kwargs:
        pipe_kwargs["height"], pipe_kwargs["width"] = loaded["source_images"][0].shape[:2]
    def produce(indices: list[int], claimed: dict[int, Path]) -> None:
        """Generate ``indices`` in batches, store them, and release each batch's claims."""
        for batch in _batches(indices, batch_size):
            cases = [jobs[i][0] for i in batch]
            kwargs = dict(pipe_kwargs)
            if takes_prompt:
                kwargs["prompt"] = [prompts[c] for c in cases]
            if labels is not None:
                kwargs["class_labels"] = [labels[c] for c in cases]
            for name, values in texts.items():
                if values is not None:
                    kwargs[name] = [values[c] for c in cases]
            for key in loaded:
                kwargs[IMAGE_INPUTS[key][0]] = [pil(key, c) for c in cases]
            if unconditional and "batch_size" in params:
                kwargs["batch_size"] = len(batch)
            generators = [torch.Generator("cpu").manual_seed(jobs[i][1]) for i in batch]

            with meter:
                output = call_with_oom_backoff(pipe, generators, output_type="np", **kwargs)
            meter.images += len(batch)
            raw = np.asarray(output.images, dtype=np.float32)
            if len(raw) != len(batch):
                raise RuntimeError(f"pytest-diffeval: {pipe_name} returned {len(raw)} images for a batch of {len(batch)}")
            flags = ~np.isfinite(raw).reshape(len(raw), -1).all(axis=1)
            for index, image, flag in zip(batch, to_uint8(raw), flags):
                results[index] = (image, bool(flag))
                fresh.add(index)
                if cache is not None:
                    cache.misses += 1
                    cache.put(keys[index], image, bool(flag))
            release_claims([claimed.pop(i) for i in batch if i in claimed])

    meter = GpuMeter(provenance.get("device") or "cpu")
    fresh: set[int] = set()  # indices generated by this call (the others came from the cache)

    # Processes sharing the cache (xdist workers) claim each batch before generating it and
    # wait for samples another process claimed: they split shared samples, never make one twice.
    claimed: dict[int, Path] = {}
    waiting: dict[int, Path] = {}
    candidates = list(missing)

    def next_batch() -> list[int]:
        batch: list[int] = []
        while candidates and len(batch) < batch_size:
            i = candidates.pop(0)
            claim = cache.claim_path(keys[i]) if cache is not None else None
            if claim is None:
                batch.append(i)
            elif try_claim(claim):
                done = cache.get(keys[i])  # finished by another process just before
                if done is not None:
                    results[i] = done
                    release_claims([claim])
                else:
                    claimed[i] = claim
                    batch.append(i)
            else:
                waiting[i] = claim
        return batch

    try:
        while candidates:
            produce(next_batch(), claimed)
    finally:
        release_claims(claimed.values())
    if _prefetch:
        return None  # type: ignore[return-value]  # prefetch_images: samples other processes claimed stay theirs
    if waiting:
        found = wait_for(waiting, lambda i: cache.get(keys[i]), timeout=CLAIM_TIMEOUT_S)
        for i, value in found.items():
            results[i] = value
        produce([i for i, value in found.items() if value is None], {})  # the owner gave up or died

    # A cache entry under this call's key whose size differs from its siblings' (a forged or
    # corrupt file) is a miss: generated again, never stacked into a bare shape error.
    if len({r[0].shape for r in results}) > 1:
        made = {results[i][0].shape for i in fresh}
        produce([i for i in range(len(results)) if i not in fresh and (not made or results[i][0].shape not in made)],
                {})

    # ---- what the ImageSet carries
    job_cases = [c for c, _ in jobs]
    inputs: dict[str, Any] = {}
    for key, arrays in loaded.items():
        if len(arrays) == 1:  # one image for all: a stride-0 view, embedded once by the metrics
            inputs[key] = np.broadcast_to(arrays[0], (len(jobs), *arrays[0].shape))
        else:
            inputs[key] = np.stack([arrays[c] for c in job_cases])
    if labels is not None:
        inputs["class_labels"] = [labels[c] for c in job_cases]
    for key, values in captions.items():
        if values is not None:
            inputs[key] = [values[c] for c in job_cases]
    recorded = _jsonable(call_kwargs)
    generation_inputs = {key: _digest(arrays) for key, arrays in loaded.items()}
    if labels is not None:
        generation_inputs["class_labels"] = list(labels)
    if generation_inputs:
        recorded["inputs"] = generation_inputs  # in the baseline signature: other inputs, other numbers
    return ImageSet(
        images=np.stack([r[0] for r in results]),
        prompts=[prompts[c] for c in job_cases],
        seeds=[s for _, s in jobs],
        call_kwargs=recorded,
        provenance={**provenance, **meter.fields()},
        test_id=test_id,
        nonfinite=[r[1] for r in results],
        inputs=inputs,
    )


def prefetch_images(pipe: Any, prompts: Sequence[str], *, seeds: Iterable[int], batch_size: int, cache: ImageCache,
                    **call_kwargs: Any) -> int:
    """Generate into ``cache`` the text-to-image samples that are neither cached nor claimed
    by another process, without waiting for the claimed ones; returns how many this made.
    An idle xdist worker uses it to take a share of the samples other workers' tests still
    need (claims keep every sample made once)."""
    before = cache.misses
    generate_images(pipe, list(prompts), seeds=seeds, batch_size=batch_size, cache=cache, _prefetch=True,
                    **call_kwargs)
    return cache.misses - before


def to_uint8(images: Any) -> np.ndarray:
    """Pipeline output (float in [0, 1], NHWC numpy or NCHW tensor) to uint8 NHWC, rounding
    the way diffusers' ``numpy_to_pil`` does.  Non-finite values become 0."""
    if type(images).__name__ == "Tensor":
        images = images.detach().float().cpu().permute(0, 2, 3, 1).numpy()
    images = np.asarray(images, dtype=np.float32)
    images = np.nan_to_num(images, nan=0.0, posinf=1.0, neginf=0.0)
    return (images.clip(0.0, 1.0) * 255).round().astype(np.uint8)
