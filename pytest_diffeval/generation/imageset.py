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

from ..distributed import merge_shares
from ..exceptions import DistributedError
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

    def gather(self) -> np.ndarray:
        """The whole set's pixels (under torchrun gathered from the ranks: :class:`ShardedImageSet`)."""
        return self.images

    def map_samples(self, function: Callable[[np.ndarray], Any], what: str = "map samples") -> list[Any]:
        """``function`` of each sample's pixels, in sample order (under torchrun each rank maps
        its own block: :class:`ShardedImageSet`)."""
        return [function(image) for image in self.images]

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


class ShardedImageSet(ImageSet):
    """An :class:`ImageSet` made under torchrun: every rank holds the prompts, seeds, inputs
    and flags of the whole set, but only the pixels of its own block of samples (``block``,
    the global indices; see :func:`~pytest_diffeval.distributed.share`).

    Distribution-aware code works on the block: :meth:`local_set`, :meth:`gather_rows` (a
    per-sample value or feature row from each rank's block, gathered in sample order) and
    :meth:`map_samples`.  Anything else that reads ``images`` (reports, user code) gets the
    whole set's pixels, all-gathered once and kept: a collective, so every rank must read it
    (rank-0-only code calls :meth:`gather` on every rank first)."""

    def __init__(self, *, local: np.ndarray, block: range, group: Any, image_size: tuple[int, int],
                 **fields: Any) -> None:
        self.local, self.block, self.group, self._size = local, block, group, image_size
        self._whole: np.ndarray | None = None
        super().__init__(images=None, **fields)  # type: ignore[arg-type]  # the pixels stay on their ranks

    @classmethod
    def from_whole(cls, images: ImageSet, group: Any) -> ShardedImageSet:
        """This rank's view of a set every rank holds whole (its block of ``group.share``), for
        code that has the whole set everywhere (a reference set, tests) and wants its metrics
        computed on the blocks."""
        block = group.share(len(images))
        return cls(local=images.images[list(block)], block=block, group=group, image_size=images.image_size,
                   prompts=list(images.prompts), seeds=list(images.seeds), call_kwargs=dict(images.call_kwargs),
                   provenance=dict(images.provenance), test_id=images.test_id, nonfinite=images.nonfinite,
                   inputs=dict(images.inputs))

    def __post_init__(self) -> None:
        if not (len(self.prompts) == len(self.seeds)) or len(self.local) != len(self.block):
            raise ValueError(f"ShardedImageSet: {len(self.prompts)} prompts, {len(self.seeds)} seeds, block "
                             f"{self.block} with {len(self.local)} images")

    @property  # type: ignore[override]
    def images(self) -> np.ndarray:
        """The whole set's pixels: gathered from every rank on first use (a collective)."""
        return self.gather()

    @images.setter
    def images(self, value: np.ndarray | None) -> None:
        self._whole = value

    def gather(self) -> np.ndarray:
        """The whole set's pixels on every rank (all-gathered once; every rank must call it)."""
        if self._whole is None:
            what = f"gather the pixels of {len(self)} samples"
            self._whole = self.group.gather_samples(self.local, what, kind="pixels")
        return self._whole

    def __len__(self) -> int:
        return len(self.prompts)

    def whole_set(self) -> ImageSet:
        """The whole set as a plain ImageSet (its pixels gathered: a collective)."""
        return ImageSet(images=self.gather(), prompts=self.prompts, seeds=self.seeds, call_kwargs=self.call_kwargs,
                        provenance=self.provenance, test_id=self.test_id, nonfinite=self.nonfinite,
                        inputs=self.inputs)

    @property
    def image_size(self) -> tuple[int, int]:
        return self._size

    def local_set(self) -> ImageSet:
        """This rank's block as a plain ImageSet (inputs and flags sliced to it)."""
        indices = list(self.block)
        return ImageSet(
            images=self.local, prompts=[self.prompts[i] for i in indices], seeds=[self.seeds[i] for i in indices],
            call_kwargs=dict(self.call_kwargs), provenance=dict(self.provenance), test_id=self.test_id,
            nonfinite=[self.nonfinite[i] for i in indices] if self.nonfinite is not None else None,
            inputs={k: v[indices] if isinstance(v, np.ndarray) else [v[i] for i in indices]
                    for k, v in self.inputs.items()})

    def subset(self, indices: Sequence[int]) -> ImageSet:
        """The samples ``indices`` (increasing: e.g. one class of ``by_prompt``) as a sharded set
        whose blocks are each rank's own samples among them, so per-class metrics stay spread;
        other orders get the gathered whole set's subset."""
        indices = [int(i) for i in indices]
        if any(b <= a for a, b in zip(indices, indices[1:])):
            return self.whole_set().subset(indices)
        mine = [i for i in indices if i in self.block]
        start = sum(i < self.block.start for i in indices)  # the samples of earlier ranks come first
        return ShardedImageSet(
            local=self.local[[i - self.block.start for i in mine]], block=range(start, start + len(mine)),
            group=self.group, image_size=self._size, prompts=[self.prompts[i] for i in indices],
            seeds=[self.seeds[i] for i in indices], call_kwargs=dict(self.call_kwargs),
            provenance=dict(self.provenance), test_id=self.test_id,
            nonfinite=[self.nonfinite[i] for i in indices] if self.nonfinite is not None else None,
            inputs={k: v[indices] if isinstance(v, np.ndarray) else [v[i] for i in indices]
                    for k, v in self.inputs.items()})

    def gather_rows(self, compute: Callable[[ImageSet], Any], what: str) -> np.ndarray:
        """``compute`` (one row per sample: per-sample values, features) run on this rank's
        block, gathered into the whole set's rows in sample order on every rank (see
        :meth:`block_rows`)."""
        return merge_shares(self.group.all_gather_array(self.block_rows(compute, what), what, kind="rows"))

    def block_rows(self, compute: Callable[[ImageSet], Any], what: str) -> np.ndarray:
        """``compute`` (one row per sample) run on this rank's block: its rows, as an array (an
        empty block: no rows).  When it raises on one rank every rank raises (none is left
        waiting at the collective that follows)."""
        rows, error = np.zeros((0,), dtype=np.float64), None
        if len(self.block):
            try:
                rows = compute(self.local_set())
                rows = np.asarray(rows.detach().cpu().numpy() if hasattr(rows, "detach") else rows)
            except Exception as exc:  # noqa: BLE001 - raised below, after telling the other ranks
                error = exc
        errors = self.group.all_gather_json(None if error is None else f"{type(error).__name__}: {error}",
                                            f"{what}: errors")
        if error is not None:
            raise error
        failed = [(rank, message) for rank, message in enumerate(errors) if message]
        if failed:
            rank, message = failed[0]
            raise DistributedError(f"pytest-diffeval: rank {rank} failed to {what}: {message}; fix: read that "
                                   "rank's output for the traceback")
        return rows

    def map_samples(self, function: Callable[[np.ndarray], Any], what: str = "map samples") -> list[Any]:
        """``function`` of each sample's pixels (JSON-serialisable), for the whole set in sample
        order: each rank maps its block and the results are all-gathered."""
        parts = self.group.all_gather_json([function(image) for image in self.local], what)
        return [item for part in parts for item in part]
