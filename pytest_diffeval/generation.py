"""Deterministic, batched image generation and the :class:`ImageSet` it returns."""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Sequence

import numpy as np

if TYPE_CHECKING:
    import torch


@dataclass
class ImageSet:
    """Generated images with everything needed to judge and reproduce them.

    ``images`` is uint8 ``(N, H, W, 3)``; sample ``i`` was generated from
    ``prompts[i]`` with ``seeds[i]``.  Samples are ordered prompt-major (every seed of
    the first prompt, then the next prompt), and ``(prompt, seed)`` identifies a sample
    across runs, which is how baselines pair them.
    """

    images: np.ndarray
    prompts: list[str]
    seeds: list[int]
    call_kwargs: dict[str, Any] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)
    test_id: str | None = None
    saved_to: Path | None = None
    nonfinite: list[bool] | None = None  # per sample: the pipeline's output held NaN/inf

    def __post_init__(self) -> None:
        if self.images.dtype != np.uint8 or self.images.ndim != 4 or self.images.shape[-1] != 3:
            raise ValueError(f"ImageSet needs uint8 images of shape (N, H, W, 3), got {self.images.dtype} {self.images.shape}")
        if not (len(self.images) == len(self.prompts) == len(self.seeds)):
            raise ValueError(
                f"ImageSet: {len(self.images)} images, {len(self.prompts)} prompts and {len(self.seeds)} seeds must match"
            )

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
        (directory / "samples.json").write_text(
            json.dumps({"samples": names, "call_kwargs": _jsonable(self.call_kwargs), "provenance": self.provenance}, indent=2)
        )
        self.saved_to = directory
        return directory

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
        )


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

    from . import __version__

    return {
        "pytest_diffeval": __version__,
        "diffusers": diffusers.__version__,
        "torch": torch.__version__,
        "torchmetrics": torchmetrics.__version__,
        "transformers": transformers.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
    }


def device_kind(device: torch.device | str) -> str:
    """``"cpu"`` or the GPU's name with its compute capability, e.g. ``"NVIDIA H100 (sm90)"``."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        major, minor = torch.cuda.get_device_capability(index)
        return f"{torch.cuda.get_device_name(index)} (sm{major}{minor})"
    return device.type


def pipeline_provenance(pipe: Any) -> dict[str, Any]:
    """What identifies the model and its configuration, for results and baselines."""
    base = dict(getattr(pipe, "_diffeval_provenance", {}))
    if not base:
        name = getattr(getattr(pipe, "config", None), "_name_or_path", None)
        base = {"model": name, "model_kind": "object", "model_path": None, "model_hash": None, "revision": None}
    scheduler = getattr(pipe, "scheduler", None)
    device = getattr(pipe, "device", "cpu")
    return {
        **base,
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


class ImageCache:
    """Generated images on disk, one PNG per sample, keyed by everything that determines
    it: model content hash, pipeline class, scheduler config, every call argument, prompt,
    seed, dtype, device kind and library versions.  Change one input and only the samples
    it affects miss.  A corrupt entry is regenerated, never trusted; writes are atomic."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self.hits = 0
        self.misses = 0

    def key(self, provenance: dict[str, Any], call_kwargs: dict[str, Any], prompt: str, seed: int) -> str | None:
        if not provenance.get("model_hash") or provenance.get("model_hash") == "unknown":
            return None  # a pipeline object we cannot identify by content is never cached
        material = {k: provenance.get(k) for k in ("model_hash", "revision", "pipeline_class", "scheduler",
                                                    "scheduler_config", "dtype", "device_kind", "versions")}
        material.update(call_kwargs=_fingerprint(call_kwargs), prompt=prompt, seed=seed)
        return hashlib.sha256(json.dumps(material, sort_keys=True, default=repr).encode()).hexdigest()[:32]

    def _path(self, key: str) -> Path:
        return self.directory / key[:2] / f"{key}.png"

    def get(self, key: str | None) -> tuple[np.ndarray, bool] | None:
        if key is None or not self._path(key).is_file():
            return None
        from PIL import Image

        try:
            with Image.open(self._path(key)) as image:
                image.load()
                array = np.asarray(image.convert("RGB"), dtype=np.uint8)
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
        path.parent.mkdir(parents=True, exist_ok=True)
        info = PngImagePlugin.PngInfo()
        info.add_text("diffeval_nonfinite", "1" if nonfinite else "0")
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        Image.fromarray(image).save(tmp, format="PNG", pnginfo=info)
        os.replace(tmp, path)


def generate_images(
    pipe: Any,
    prompts: Sequence[str] | str,
    *,
    seeds: Iterable[int] = (0,),
    batch_size: int = 8,
    test_id: str | None = None,
    cache: ImageCache | None = None,
    **call_kwargs: Any,
) -> ImageSet:
    """Generate one image per ``(prompt, seed)``, batched; samples found in ``cache`` are
    read instead of generated.

    Each image gets its own CPU ``torch.Generator`` seeded with its seed, so its pixels do
    not depend on the batch it landed in nor on the device's RNG.
    """
    import torch

    if isinstance(prompts, str):
        prompts = [prompts]
    prompts = list(prompts)
    seeds = [int(s) for s in seeds]
    if not prompts:
        raise ValueError("pytest-diffeval: generate() got an empty prompt list; pass at least one prompt")
    if not seeds:
        raise ValueError("pytest-diffeval: generate() got an empty seed list; pass e.g. seeds=range(4)")
    if batch_size < 1:
        raise ValueError(f"pytest-diffeval: batch_size must be >= 1, got {batch_size}")
    jobs = [(prompt, seed) for prompt in prompts for seed in seeds]
    provenance = pipeline_provenance(pipe)
    keys = [cache.key(provenance, call_kwargs, p, s) if cache is not None else None for p, s in jobs]
    results: list[tuple[np.ndarray, bool] | None] = [cache.get(k) if cache is not None else None for k in keys]
    missing = [i for i, r in enumerate(results) if r is None]
    for batch in _batches(missing, batch_size):
        generators = [torch.Generator("cpu").manual_seed(jobs[i][1]) for i in batch]
        output = pipe(prompt=[jobs[i][0] for i in batch], generator=generators, output_type="np", **call_kwargs)
        raw = np.asarray(output.images, dtype=np.float32)
        flags = ~np.isfinite(raw).reshape(len(raw), -1).all(axis=1)
        for index, image, flag in zip(batch, to_uint8(raw), flags):
            results[index] = (image, bool(flag))
            if cache is not None:
                cache.misses += 1
                cache.put(keys[index], image, bool(flag))
    return ImageSet(
        images=np.stack([r[0] for r in results]),
        prompts=[p for p, _ in jobs],
        seeds=[s for _, s in jobs],
        call_kwargs=_jsonable(call_kwargs),
        provenance=provenance,
        test_id=test_id,
        nonfinite=[r[1] for r in results],
    )


def to_uint8(images: Any) -> np.ndarray:
    """Pipeline output (float in [0, 1], NHWC numpy or NCHW tensor) to uint8 NHWC, rounding
    the way diffusers' ``numpy_to_pil`` does.  Non-finite values become 0."""
    if type(images).__name__ == "Tensor":
        images = images.detach().float().cpu().permute(0, 2, 3, 1).numpy()
    images = np.asarray(images, dtype=np.float32)
    images = np.nan_to_num(images, nan=0.0, posinf=1.0, neginf=0.0)
    return (images.clip(0.0, 1.0) * 255).round().astype(np.uint8)
