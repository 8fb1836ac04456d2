"""Image-editing metrics on CLIP embeddings: directional similarity (does the edit follow
the instruction?) and image similarity (does the edit keep the source, or match an
exemplar?).  Also the input helpers the other edit metrics share: images and captions
given as options, one per generated image or one for all, or carried by the ImageSet
(``ImageSet.inputs``, filled by ``generate``) when an option is not given."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from .. import settings
from ..vqa.captions import caption, captioner_id
from . import Metric, MetricInputError, MetricResult

if TYPE_CHECKING:  # imported where used: a cached result needs no torch
    import torch

    from .backbones import ClipBackbone


def image_array(value: Any, *, metric: str, option: str, count: int) -> np.ndarray:
    """``value`` (an ImageSet, a uint8 ``(N, H, W, 3)`` or ``(H, W, 3)`` array, or a list of
    ``(H, W, 3)`` arrays) as uint8 ``(count, H, W, 3)``; a single image is used for all."""
    if value is None:
        raise MetricInputError(f"pytest-diffeval: {metric} needs {option}= (an ImageSet or uint8 images of shape "
                         f"(N, H, W, 3), one per generated image or one for all), or images generated with "
                         f"generate(..., source_images=...), which carry their inputs")
    if hasattr(value, "images") and hasattr(value, "sample_keys"):
        value = value.images
    elif "torch" in sys.modules and isinstance(value, sys.modules["torch"].Tensor):  # no import for the check
        raise TypeError(f"pytest-diffeval: {metric}: {option} is a torch.Tensor; pass an ImageSet or a uint8 "
                        "numpy array of shape (N, H, W, 3) (e.g. tensor.permute(0, 2, 3, 1).numpy())")
    elif isinstance(value, (list, tuple)):
        if not value:
            raise MetricInputError(f"pytest-diffeval: {metric}: {option} is empty; give one image per generated image")
        value = [np.asarray(v) for v in value]
        if len({v.shape for v in value}) != 1:
            raise MetricInputError(f"pytest-diffeval: {metric}: the images in {option} differ in size "
                             f"({sorted({v.shape for v in value})}); resize them to one size")
        value = np.stack(value)
    array = np.asarray(value)
    if array.ndim == 3:
        array = array[None]
    if array.dtype != np.uint8 or array.ndim != 4 or array.shape[-1] != 3:
        raise MetricInputError(f"pytest-diffeval: {metric}: {option} must be uint8 images of shape (N, H, W, 3), got "
                         f"{array.dtype} {array.shape}; fix: convert with pytest_diffeval.generation.to_uint8")
    if len(array) == 1 and count != 1:
        array = np.broadcast_to(array, (count, *array.shape[1:]))
    if len(array) != count:
        raise MetricInputError(f"pytest-diffeval: {metric}: {option} holds {len(array)} images for {count} generated "
                         "images; give one per generated image (same order) or a single one for all")
    return array


def carried(images: Any, value: Any, *keys: str) -> Any:
    """``value``, or when it is None the first of ``images.inputs[key]`` that the ImageSet
    carries (``generate(..., source_images=...)`` records its inputs there)."""
    if value is not None:
        return value
    inputs = getattr(images, "inputs", None) or {}
    return next((inputs[key] for key in keys if inputs.get(key) is not None), None)


def block_images(metric: Metric, images: Any, options: dict[str, Any], *names: str) -> dict[str, Any]:
    """:meth:`Metric.block_options` for a metric whose options ``names`` hold images in any
    form :func:`image_array` takes (one per image, or one for all): made ``(N, H, W, 3)``
    first, so that one image for all is never taken for rows of images, then sliced to the
    rank's block (one image for all stays one for all)."""
    full, single = dict(options), {}
    for name in names:
        if full.get(name) is not None:
            array = image_array(full.pop(name), metric=metric.name, option=name, count=len(images))
            if array.strides[0] == 0:
                single[name] = np.broadcast_to(array[:1], (len(images.block), *array.shape[1:]))
            else:
                full[name] = array
    return {**Metric.block_options(metric, images, full), **single}


def text_list(value: Any, *, metric: str, option: str, count: int) -> list[str]:
    """``value`` (a list of strings, one per image, or one string for all) as a list."""
    if value is None:
        raise MetricInputError(f"pytest-diffeval: {metric} needs {option}= (a list of captions, one per image, or one "
                         f"str for all), or pass it to generate(..., {option}=...) so the images carry it")
    texts = [value] * count if isinstance(value, str) else list(value)
    if len(texts) != count or not all(isinstance(t, str) for t in texts):
        raise MetricInputError(f"pytest-diffeval: {metric}: {option} holds {len(texts)} entries for {count} images; "
                         "give one caption (str) per image, or a single str for all")
    return texts


def _unique_features(backbone: ClipBackbone, array: np.ndarray, batch_size: int) -> torch.Tensor:
    """L2-normalised image embeddings of ``array``, computing a broadcast single image once."""
    import torch
    import torch.nn.functional as F

    if array.strides[0] == 0:  # one image given for all
        single = torch.from_numpy(np.array(array[:1])).permute(0, 3, 1, 2).to(backbone.device)
        return F.normalize(backbone.image_features(single, batch_size), dim=-1).expand(len(array), -1)
    tensor = torch.from_numpy(np.array(array)).permute(0, 3, 1, 2).to(backbone.device)
    return F.normalize(backbone.image_features(tensor, batch_size), dim=-1)


def _text_features(backbone: ClipBackbone, texts: Sequence[str]) -> torch.Tensor:
    """L2-normalised text embeddings, each distinct text encoded once."""
    import torch.nn.functional as F

    unique = list(dict.fromkeys(texts))
    features = F.normalize(backbone.text_features(unique), dim=-1)
    index = {text: i for i, text in enumerate(unique)}
    return features[[index[t] for t in texts]]


class ClipDirectionalSimilarity(Metric):
    """CLIP directional similarity (Gal et al. 2021; InstructPix2Pix; the diffusers evaluation
    guide): per image ``cos(E(edited) - E(source), T(target caption) - T(source caption))``
    on L2-normalised CLIP embeddings, in [-1, 1].  The value is the mean (not clamped).
    Default tolerance: 0.01 (the diffusers guide reports 0.08 for InstructPix2Pix)."""

    name = "clip_directional_similarity"
    higher_is_better = True
    per_sample = True
    absolute_tolerance = 0.01
    cacheable = True
    sample_wise = True  # under torchrun each rank scores its block (each value: its image, source, captions)
    per_sample_options = ("source_images", "source_captions", "target_captions")

    def block_options(self, images: Any, options: dict[str, Any]) -> dict[str, Any]:
        return block_images(self, images, options, "source_images")

    def combine(self, per_sample: np.ndarray, details: list[dict[str, Any]]) -> tuple[float, dict[str, Any]]:
        """The mean, and the details with every block's captions of its source images, in sample order."""
        value, combined = super().combine(per_sample, details)
        if "source_captions" in combined:
            combined["source_captions"] = [c for block in details for c in block.get("source_captions", [])]
        return value, combined

    def compute(self, images: Any, *, source_images: Any = None, source_captions: Any = None,
                target_captions: Any = None, clip_model: str | None = None, device: str | None = None,
                batch_size: int = 64, captioner: str | None = "clip",
                caption_candidates: Sequence[str] | None = None) -> MetricResult:
        """Score the edited ``images`` against ``source_images`` and the caption pair (by
        default those the ImageSet carries from ``generate``).  With no captions given or
        carried, ``captioner`` (:func:`pytest_diffeval.vqa.captions.caption`: ``"clip"``
        ranks ``caption_candidates``, default the embedded vocabulary; ``"vlm"``; None: an
        error) captions the source images and the target captions are the images' prompts;
        the captioner's identity joins the baseline signature."""
        import torch.nn.functional as F

        from .backbones import load_clip

        n = len(images)
        source_images = carried(images, source_images, "source_images")
        source_captions = carried(images, source_captions, "source_captions")
        target_captions = carried(images, target_captions, "target_captions")
        source = image_array(source_images, metric=self.name, option="source_images", count=n)
        scorer: dict[str, Any] = {}
        if captioner is not None and source_captions is None:
            options = {"candidates": caption_candidates, "clip_model": clip_model}
            source_captions = caption(source, captioner, **options, device=device)
            scorer["captioner"] = captioner_id(captioner, **options)
        if captioner is not None and target_captions is None:
            target_captions, scorer["target_captions"] = list(images.prompts), "prompts"
        before = text_list(source_captions, metric=self.name, option="source_captions", count=n)
        after = text_list(target_captions, metric=self.name, option="target_captions", count=n)
        backbone = load_clip(clip_model or settings.current().clip_model, device or settings.resolved_device())
        long_captions = backbone.warn_long_prompts(before + after)
        edited = F.normalize(backbone.image_features(images.as_tensor(backbone.device), batch_size), dim=-1)
        original = _unique_features(backbone, source, batch_size)
        direction = F.cosine_similarity(edited - original, _text_features(backbone, after) - _text_features(backbone, before))
        per_sample = direction.double().cpu().numpy()
        return MetricResult(self.name, float(per_sample.mean()), backbone.id, True, per_sample=per_sample,
                            details={"truncated_prompts": long_captions,
                                     **({"scorer": scorer, "source_captions": before} if scorer else {})})


class ClipImageSimilarity(Metric):
    """CLIP image similarity in torchmetrics' ``CLIPScore`` image-to-image convention: per image
    ``100 * cos(E(image), E(reference))`` on CLIP image embeddings; the value is
    ``max(mean, 0)`` like ``clip_score``.  Divide by 100 for the plain cosine that
    InstructPix2Pix plots (0.75-0.9).  Default tolerance: 1 point."""

    name = "clip_image_similarity"
    higher_is_better = True
    per_sample = True
    absolute_tolerance = 1.0
    cacheable = True
    sample_wise = True  # under torchrun each rank scores its block (each value: its image and reference)
    per_sample_options = ("reference_images",)

    def block_options(self, images: Any, options: dict[str, Any]) -> dict[str, Any]:
        return block_images(self, images, options, "reference_images")

    def combine(self, per_sample: np.ndarray, details: list[dict[str, Any]]) -> tuple[float, dict[str, Any]]:
        """``max(mean, 0)`` as :meth:`compute`, and the details (the same in every block)."""
        value, combined = super().combine(per_sample, details)
        return max(value, 0.0), combined

    def compute(self, images: Any, *, reference_images: Any = None, clip_model: str | None = None,
                device: str | None = None, batch_size: int = 64) -> MetricResult:
        """Compare each image with its reference (the source of an edit, or an exemplar).  By
        default the ImageSet's carried exemplars (Paint-by-Example), else its source images."""
        import torch.nn.functional as F

        from .backbones import load_clip

        inputs = getattr(images, "inputs", None) or {}
        used = "given" if reference_images is not None else next(
            (key for key in ("exemplars", "source_images") if inputs.get(key) is not None), "none")
        reference_images = carried(images, reference_images, "exemplars", "source_images")
        reference = image_array(reference_images, metric=self.name, option="reference_images", count=len(images))
        backbone = load_clip(clip_model or settings.current().clip_model, device or settings.resolved_device())
        generated = F.normalize(backbone.image_features(images.as_tensor(backbone.device), batch_size), dim=-1)
        per_sample = (100 * (generated * _unique_features(backbone, reference, batch_size)).sum(-1)).double().cpu().numpy()
        return MetricResult(self.name, max(float(per_sample.mean()), 0.0), backbone.id, True, per_sample=per_sample,
                            details={"reference": used})
