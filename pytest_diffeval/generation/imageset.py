"""The generated image set: :class:`ImageSet`, the images of one ``generate()`` call with
their prompts, seeds, inputs and provenance, and how it is saved, sliced and shown."""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np

from .pixels import IMAGE_INPUTS

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
            json.dumps({"samples": names, "call_kwargs": jsonable(self.call_kwargs), "provenance": self.provenance}, indent=2)
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
                    entry[key] = jsonable(item)

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


def jsonable(value: Any) -> Any:
    """Call arguments as JSON: tensors and images become a short description."""
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, np.ndarray) or type(value).__name__ == "Tensor":
        return f"<{type(value).__name__} shape={tuple(value.shape)} dtype={value.dtype}>"
    return repr(value)
