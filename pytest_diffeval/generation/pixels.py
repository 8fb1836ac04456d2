"""Pixels into and out of a generation: input images (files, folders, PIL images, arrays)
read faithfully as uint8 arrays, and pipeline output converted to uint8."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from ..exceptions import InputError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
# generate_images' image inputs: the pipeline argument each feeds, its pixel mode, a file suffix.
IMAGE_INPUTS = {
    "source_images": ("image", "RGB", "source"),
    "masks": ("mask_image", "L", "mask"),
    "exemplars": ("example_image", "RGB", "exemplar"),
}


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


def to_uint8(images: Any) -> np.ndarray:
    """Pipeline output (float in [0, 1], NHWC numpy or NCHW tensor) to uint8 NHWC, rounding
    the way diffusers' ``numpy_to_pil`` does.  Non-finite values become 0."""
    if type(images).__name__ == "Tensor":
        images = images.detach().float().cpu().permute(0, 2, 3, 1).numpy()
    images = np.asarray(images, dtype=np.float32)
    images = np.nan_to_num(images, nan=0.0, posinf=1.0, neginf=0.0)
    return (images.clip(0.0, 1.0) * 255).round().astype(np.uint8)
