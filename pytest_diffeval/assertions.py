"""Assertion helpers with absolute thresholds (``assert_metric``, ``assert_clip_score_at_least``,
``assert_fid_below``, ...); what every check shares lives in :mod:`.recording`.  A failed
check inside a test lets the test go on and fails it at its end (:func:`.recording.check_failed`)."""

from __future__ import annotations

from typing import Any

import numpy as np

from . import split
from . import tripwires as wires
from .exceptions import SplitError
from .metrics import MetricResult, compute_metric
from .recording import (  # noqa: F401 - re-exported
    check_failed,
    current_test_id,
    fail,
    raise_at_once,
    record_check,
    results_folder,
    save_images,
)


def _per_prompt(images: Any, values: np.ndarray) -> dict[str, float]:
    means: dict[str, list[float]] = {}
    for prompt, value in zip(images.prompts, values):
        means.setdefault(prompt, []).append(float(value))
    return {prompt: float(np.mean(v)) for prompt, v in means.items()}


def _worst(per_prompt: dict[str, float], higher_is_better: bool, top: int = 5) -> str:
    ordered = sorted(per_prompt.items(), key=lambda kv: kv[1], reverse=not higher_is_better)[:top]
    return "\n".join(f"    {value:8.3f}  {prompt!r}" for prompt, value in ordered)


def assert_metric(images: Any, metric: str, *, at_least: float | None = None, at_most: float | None = None,
                  per_prompt: bool = False, tripwires: bool = True, **options: Any) -> MetricResult:
    """Fail unless the registered ``metric`` lies within ``[at_least, at_most]``: its value, or
    with ``per_prompt=True`` the mean over seeds of every prompt (per-sample metrics)."""
    __tracebackhide__ = True
    if at_least is None and at_most is None:
        raise ValueError("assert_metric needs at_least= and/or at_most=")
    if tripwires:

        wires.check(images)
    if split.info(images) is not None:  # a shard's part of a split generation: the merge judges the set
        if per_prompt:
            raise SplitError(f"pytest-diffeval: per_prompt=True cannot judge a diffeval_split generation's part; fix: "
                             f"check {metric!r} over the whole set (per_prompt=False) or remove the marker")
        return split.record_part(images, metric, options, at_least=at_least, at_most=at_most)
    result = compute_metric(metric, images, **options)

    def ok(value: float) -> bool:
        return (at_least is None or value >= at_least) and (at_most is None or value <= at_most)

    bound = " and ".join(b for b in [f">= {at_least}" if at_least is not None else "",
                                      f"<= {at_most}" if at_most is not None else ""] if b)
    if per_prompt and result.per_sample is None:
        raise ValueError(f"per_prompt=True needs a per-sample metric; {metric!r} gives one value per set")
    prompts = _per_prompt(images, result.per_sample) if result.per_sample is not None else {}
    failing = {p: v for p, v in prompts.items() if not ok(v)} if per_prompt else {}
    passed = not failing if per_prompt else ok(result.value)
    threshold = at_least if at_least is not None else at_most
    record_check(current_test_id(images), result, images, verdict="pass" if passed else "out of bounds",
                 threshold=threshold)
    if not passed:
        scope = f"{len(failing)} of {len(prompts)} prompts are outside" if per_prompt else "outside"
        worst = f"\n  worst prompts (mean over seeds):\n{_worst(prompts, at_least is not None)}" if prompts else ""
        check_failed(images, f"{metric} {result.value:.4g} over {len(images)} images ({result.backbone}): {scope} "
                     f"the bound {bound}.{worst}")
    return result


def assert_clip_score_at_least(images: Any, min_score: float, *, per_prompt: bool = False,
                               clip_model: str | None = None, **options: Any) -> MetricResult:
    """Fail unless the CLIP score (torchmetrics, 0-100) is at least ``min_score``: the mean
    over all images, or with ``per_prompt=True`` the mean over seeds of every prompt."""
    __tracebackhide__ = True
    return assert_metric(images, "clip_score", at_least=min_score, per_prompt=per_prompt, clip_model=clip_model,
                         **options)


def assert_fid_below(images: Any, reference: Any, max_fid: float, *, features: Any = None, tripwires: bool = True,
                     **options: Any) -> MetricResult:
    """Fail unless FID (torchmetrics) between ``images`` and ``reference`` (an ImageSet, a
    folder of images or a ``.safetensors`` statistics file) is below ``max_fid``."""
    __tracebackhide__ = True
    if tripwires:

        wires.check(images)
    if split.info(images) is not None:  # a shard's part of a split generation: the merge judges the set
        return split.record_part(images, "fid", {"reference": reference, "features": features, **options},
                                 below=max_fid)
    result = compute_metric("fid", images, reference=reference, features=features, **options)
    passed = result.value < max_fid
    record_check(current_test_id(images), result, images, verdict="pass" if passed else "above threshold",
                 threshold=max_fid)
    if not passed:
        note = f"\n  note: {result.details['warning']}" if "warning" in result.details else ""
        check_failed(images, f"fid {result.value:.4f} ({result.backbone}) between {len(images)} images and "
                     f"{result.details['n_reference']} reference images is not below {max_fid}.{note}")
    return result


def assert_clip_directional_similarity_at_least(images: Any, min_value: float, *, source_images: Any,
                                                source_captions: Any, target_captions: Any, per_prompt: bool = False,
                                                clip_model: str | None = None, **options: Any) -> MetricResult:
    """Fail unless the CLIP directional similarity of the edited ``images`` (cosine, -1..1,
    between the image change from ``source_images`` and the caption change from
    ``source_captions`` to ``target_captions``) is at least ``min_value``: the mean over
    all images, or with ``per_prompt=True`` the mean over seeds of every prompt."""
    __tracebackhide__ = True
    return assert_metric(images, "clip_directional_similarity", at_least=min_value, per_prompt=per_prompt,
                         source_images=source_images, source_captions=source_captions,
                         target_captions=target_captions, clip_model=clip_model, **options)


def assert_clip_image_similarity_at_least(images: Any, min_value: float, *, reference_images: Any,
                                          per_prompt: bool = False, clip_model: str | None = None,
                                          **options: Any) -> MetricResult:
    """Fail unless the CLIP image similarity (``100 * cos``, torchmetrics' image-to-image
    CLIPScore) between ``images`` and ``reference_images`` (the edit's source, or an
    exemplar; one per image or one for all) is at least ``min_value``."""
    __tracebackhide__ = True
    return assert_metric(images, "clip_image_similarity", at_least=min_value, per_prompt=per_prompt,
                         reference_images=reference_images, clip_model=clip_model, **options)
