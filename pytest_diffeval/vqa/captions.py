"""Captions of images, for edit metrics whose user has none (``clip_directional_similarity``
needs a caption of each source image).  Two backends:

* ``"clip"``: CLIP-Interrogator's approach, ranking a candidate list by CLIP similarity and
  taking the best (offline with ``diffeval/tiny-clip`` over the embedded vocabulary, the
  default candidates);
* ``"vlm"``: generation with a transformers vision-language model (``vqa_model=``), greedy.

Each captioner has an identity (:func:`captioner_id`: the backbone's content id and the
candidates' or prompt's hash) that edit metrics record in their baseline signature.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from .. import settings
from .._hashing import digest_json
from ..embedded import resolve_embedded
from ..embedded.data import ALL_COMBOS
from ..embedded.data import caption as embedded_caption
from ..exceptions import MetricInputError
from ..fingerprints import resolve_model_dir
from .transformers_backend import DEFAULT_VQA_MODEL, load_vqa_backend

BACKENDS = ("clip", "vlm")
TINY_CLIP = "diffeval/tiny-clip"
DEFAULT_CAPTION_PROMPT = "Describe this image in one short sentence."


def embedded_vocabulary() -> list[str]:
    """Every caption of the embedded data (digit, stroke and background colour): the default
    candidates of the CLIP captioner."""
    return [embedded_caption(*combo) for combo in ALL_COMBOS]


def _array(images: Any) -> np.ndarray:
    """uint8 ``(N, H, W, 3)`` from an ImageSet, an array or a list of arrays."""
    if hasattr(images, "images") and hasattr(images, "sample_keys"):
        images = images.images
    array = np.asarray(np.stack([np.asarray(i) for i in images]) if isinstance(images, (list, tuple)) else images)
    if array.ndim == 3:
        array = array[None]
    if array.dtype != np.uint8 or array.ndim != 4 or array.shape[-1] != 3:
        raise MetricInputError(f"pytest-diffeval: caption: images must be uint8 of shape (N, H, W, 3), got "
                               f"{array.dtype} {array.shape}; fix: convert with pytest_diffeval.generation.to_uint8")
    return array


def _candidates(candidates: Sequence[str] | None, clip_model: str) -> list[str]:
    """The captions to rank: ``candidates``, or with the embedded tiny-clip the embedded
    vocabulary (a real CLIP model has no default: digit captions would describe no photo)."""
    if candidates is None:
        tiny = resolve_embedded(TINY_CLIP)
        if tiny is None or resolve_embedded(clip_model) != tiny:
            raise MetricInputError(
                f"pytest-diffeval: caption: backend='clip' with {clip_model!r} needs candidates= (the captions to "
                f"choose from; the embedded vocabulary is the default only with {TINY_CLIP!r}); fix: pass "
                "candidates=[...] (caption_candidates= in edit metrics), backend='vlm', or the captions themselves")
        return embedded_vocabulary()
    words = list(candidates)
    if not words or not all(isinstance(w, str) and w.strip() for w in words):
        raise MetricInputError("pytest-diffeval: caption: candidates must be a non-empty list of non-empty strings; "
                               "fix: pass the captions to choose from")
    return words


def _check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise MetricInputError(f"pytest-diffeval: caption backend {backend!r} is not one of {BACKENDS}; fix: 'clip' "
                               "(rank candidates by CLIP similarity) or 'vlm' (generate with a transformers VLM)")
    return backend


def captioner_id(backend: str = "clip", *, candidates: Sequence[str] | None = None, clip_model: str | None = None,
                 vqa_model: str | None = None, prompt: str = DEFAULT_CAPTION_PROMPT) -> str:
    """The captioner's identity, without loading it: ``clip-rank:<backbone id>:<candidates hash>``
    or ``vlm:<model id>:<prompt hash>`` (backbones by content, as the metrics key them)."""
    if _check_backend(backend) == "clip":
        clip_model = clip_model or settings.current().clip_model
        words = _candidates(candidates, clip_model)
        return f"clip-rank:{resolve_model_dir(clip_model)[0]}:{digest_json(words, 16)}"
    return f"vlm:{resolve_model_dir(vqa_model or DEFAULT_VQA_MODEL)[0]}:{digest_json(prompt, 16)}"


def caption(images: Any, backend: str = "clip", *, candidates: Sequence[str] | None = None,
            clip_model: str | None = None, vqa_model: str | None = None, prompt: str = DEFAULT_CAPTION_PROMPT,
            device: str | None = None, batch_size: int = 64, max_new_tokens: int = 30) -> list[str]:
    """One caption per image: the CLIP-closest of ``candidates`` (``clip_model`` default: the
    session's CLIP model; with ``diffeval/tiny-clip`` the candidates default to the embedded
    vocabulary), or with ``backend="vlm"`` the text ``vqa_model`` generates after ``prompt``."""
    array = _array(images)
    device = device or settings.resolved_device()
    if _check_backend(backend) == "vlm":
        return load_vqa_backend(vqa_model, device).generate(array, prompt, max_new_tokens)
    clip_model = clip_model or settings.current().clip_model
    words = _candidates(candidates, clip_model)
    import torch
    import torch.nn.functional as F

    from ..metrics.backbones import load_clip

    clip = load_clip(clip_model, device)
    image_features = F.normalize(clip.image_features(torch.from_numpy(np.array(array)).permute(0, 3, 1, 2),
                                                     batch_size), dim=-1)
    text_features = F.normalize(clip.text_features(words), dim=-1)
    best = (image_features @ text_features.T).argmax(dim=1).cpu().tolist()
    return [words[i] for i in best]


__all__ = ["BACKENDS", "DEFAULT_CAPTION_PROMPT", "caption", "captioner_id", "embedded_vocabulary"]
