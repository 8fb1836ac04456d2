"""Masked-region preservation for inpainting and masked edits: how well the pixels the edit
was NOT allowed to touch (outside the mask) match the source image.  PSNR and SSIM come
from torchmetrics.

Masks: uint8 (0/255, white = the region to edit; 0/1 is accepted too) or bool (True = edit),
shaped ``(H, W)`` (one for all), ``(N, H, W)`` or ``(N, H, W, 1|3)``; same size as the images.
Without ``source_images=`` / ``masks=`` the ones the ImageSet carries from
``generate(..., source_images=..., masks=...)`` are used.

* ``preservation_psnr``: torchmetrics' PSNR (data range 255) over the unmasked pixels only
  (all three channels).  Identical unmasked pixels give infinite PSNR, reported as the cap
  ``max_psnr`` (default 100 dB) so values stay finite for baselines and reports.
* ``preservation_ssim``: the masked region of the edited image is replaced by the source's
  pixels (so the edit cannot leak into SSIM windows that straddle the mask border), the
  full torchmetrics SSIM map (Gaussian window σ=1.5, images scaled to [0, 1] in float32,
  data range 1) is computed against the source, and it is averaged over the unmasked
  pixels only (the trivially perfect masked region would otherwise inflate the score by
  the mask's share).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from . import BLOCK_SAMPLES, Metric, MetricResult
from .edit import block_images, carried, image_array

PSNR_CAP_DB = 100.0


def mask_array(masks: Any, *, metric: str, count: int, size: tuple[int, int]) -> np.ndarray:
    """Masks as bool ``(count, H, W)``, True = the region the edit may change."""
    if masks is None:
        raise ValueError(f"pytest-diffeval: {metric} needs masks= (uint8 0/255 or bool, white/True = the region to "
                         "edit), one per image or one for all, or images generated with generate(..., masks=...)")
    if hasattr(masks, "images") and hasattr(masks, "sample_keys"):
        masks = masks.images
    if isinstance(masks, (list, tuple)):
        masks = np.stack([np.asarray(m) for m in masks])
    array = np.asarray(masks)
    if array.dtype not in (np.uint8, np.bool_):
        raise ValueError(f"pytest-diffeval: {metric}: masks must be uint8 (0/255, white = edit) or bool, got "
                         f"{array.dtype}; fix: e.g. (mask > 0.5).astype(bool)")
    h, w = size
    if array.ndim == 2 or (array.ndim == 3 and array.shape[:2] == (h, w) and array.shape[2] in (1, 3)):
        array = array[None]
    if array.ndim == 4 and array.shape[-1] in (1, 3):
        array = array.max(axis=-1)
    if array.ndim != 3 or array.shape[1:] != (h, w):
        raise ValueError(f"pytest-diffeval: {metric}: masks of shape {array.shape} do not match the {h}x{w} images; "
                         "give (H, W), (N, H, W) or (N, H, W, 1|3) masks of the images' size")
    if array.dtype == np.uint8:
        array = array > (0 if array.max() <= 1 else 127)
    if len(array) == 1 and count != 1:
        array = np.broadcast_to(array, (count, h, w))
    if len(array) != count:
        raise ValueError(f"pytest-diffeval: {metric}: {len(array)} masks for {count} images; give one per image "
                         "or one for all")
    return array.astype(bool)


def _inputs(metric: str, images: Any, source_images: Any, masks: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    source_images = carried(images, source_images, "source_images")
    masks = carried(images, masks, "masks")
    source = image_array(source_images, metric=metric, option="source_images", count=len(images))
    if source.shape[1:] != images.images.shape[1:]:
        raise ValueError(f"pytest-diffeval: {metric}: source_images are {source.shape[1]}x{source.shape[2]} but the "
                         f"images are {images.images.shape[1]}x{images.images.shape[2]}; pixels can only be compared "
                         "at the same size (resize the source the way the pipeline did)")
    mask = mask_array(masks, metric=metric, count=len(images), size=images.image_size)
    full = np.flatnonzero(mask.reshape(len(mask), -1).all(axis=1))
    if len(full):
        raise ValueError(f"pytest-diffeval: {metric}: the mask of sample {int(full[0])} covers the whole image, so "
                         "nothing is left to preserve; fix: check the masks (white = the region to edit)")
    return images.images, source, mask


class _Preservation(Metric):
    """What the preservation metrics share under torchrun: each value depends on its image,
    its source and its mask alone, so each rank scores its block (``metrics._per_block``)."""

    sample_wise = True
    per_sample_options = ("source_images", "masks")

    def block_options(self, images: Any, options: dict[str, Any]) -> dict[str, Any]:
        """The block's source images and masks (one for all, or one per image, as given)."""
        options = dict(options)
        if options.get("masks") is not None:  # bool (N, H, W) first: a single mask is no rows of masks
            options["masks"] = mask_array(options["masks"], metric=self.name, count=len(images),
                                          size=images.image_size)
        return block_images(self, images, options, "source_images")

    def combine(self, per_sample: np.ndarray, details: list[dict[str, Any]]) -> tuple[float, dict[str, Any]]:
        """The mean, and the details with ``unmasked_share`` over the whole set (the blocks'
        shares weighted by their sizes: equal to one process's up to float rounding)."""
        value, combined = super().combine(per_sample, details)
        combined["unmasked_share"] = float(sum(d["unmasked_share"] * d[BLOCK_SAMPLES] for d in details)
                                           / len(per_sample))
        return value, combined


class PreservationPSNR(_Preservation):
    """PSNR (dB) between the edited and the source image over the pixels outside the mask,
    capped at ``max_psnr`` (100 dB).  Default tolerance: 0.5 dB."""

    name = "preservation_psnr"
    higher_is_better = True
    per_sample = True
    absolute_tolerance = 0.5
    cacheable = True

    def compute(self, images: Any, *, source_images: Any = None, masks: Any = None,
                max_psnr: float = PSNR_CAP_DB) -> MetricResult:
        """PSNR of each image's unmasked pixels against ``source_images``."""
        import torch  # here, not at import: a cached result needs neither torch nor torchmetrics
        from torchmetrics.functional.image import peak_signal_noise_ratio

        edited, source, mask = _inputs(self.name, images, source_images, masks)
        values = []
        for index in range(len(edited)):
            keep = ~mask[index]
            preds = torch.from_numpy(edited[index][keep].astype(np.float64))
            target = torch.from_numpy(source[index][keep].astype(np.float64))
            value = float(peak_signal_noise_ratio(preds, target, data_range=255.0))
            values.append(min(value, max_psnr))
        per_sample = np.asarray(values, dtype=np.float64)
        capped = int((per_sample >= max_psnr).sum())
        return MetricResult(self.name, float(per_sample.mean()), "pixels", True, per_sample=per_sample,
                            details={"max_psnr": max_psnr, "capped": capped,
                                     "unmasked_share": float((~mask).mean())})

    def combine(self, per_sample: np.ndarray, details: list[dict[str, Any]]) -> tuple[float, dict[str, Any]]:
        """As :meth:`_Preservation.combine`, with ``capped`` counted over the whole set."""
        value, combined = super().combine(per_sample, details)
        combined["capped"] = int(sum(d["capped"] for d in details))
        return value, combined


class PreservationSSIM(_Preservation):
    """SSIM (torchmetrics map, Gaussian σ=1.5) between the edited image, its masked region
    filled with the source's pixels, and the source, averaged over the unmasked pixels.
    Default tolerance: 0.01."""

    name = "preservation_ssim"
    higher_is_better = True
    per_sample = True
    absolute_tolerance = 0.01
    cacheable = True

    def compute(self, images: Any, *, source_images: Any = None, masks: Any = None, batch_size: int = 16) -> MetricResult:
        """SSIM of each image's unmasked region against ``source_images``."""
        import torch
        from torchmetrics.functional.image import structural_similarity_index_measure

        edited, source, mask = _inputs(self.name, images, source_images, masks)
        if min(images.image_size) < 6:
            raise ValueError(f"pytest-diffeval: {self.name} needs images of at least 6x6 pixels (SSIM's window), got "
                             f"{images.image_size[0]}x{images.image_size[1]}")
        values = []
        for start in range(0, len(edited), batch_size):
            m = mask[start : start + batch_size]
            src = np.array(source[start : start + batch_size])
            filled = np.where(m[..., None], src, edited[start : start + batch_size])
            # float32 in [0, 1]: CPU convolutions in float64 are ~10x slower; SSIM agrees to ~1e-6
            preds = torch.from_numpy(filled).permute(0, 3, 1, 2).float() / 255.0
            target = torch.from_numpy(src).permute(0, 3, 1, 2).float() / 255.0
            _, full = structural_similarity_index_measure(preds, target, data_range=1.0, return_full_image=True)
            ssim_map = full.double().mean(dim=1).numpy()  # (B, H, W): mean over channels
            values.extend(float(ssim_map[i][~m[i]].mean()) for i in range(len(m)))
        per_sample = np.asarray(values, dtype=np.float64)
        return MetricResult(self.name, float(per_sample.mean()), "pixels", True, per_sample=per_sample,
                            details={"unmasked_share": float((~mask).mean()), "masked_region": "filled with source"})


__all__ = ["PSNR_CAP_DB", "PreservationPSNR", "PreservationSSIM", "mask_array"]
