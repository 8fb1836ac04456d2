"""Assertion helpers with absolute thresholds, and what every check shares: the record
kept for reports and the failure that says what was measured and where the images are."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, NoReturn

import numpy as np

from . import settings
from .metrics import MetricResult, compute_metric


def current_test_id(images: Any = None) -> str:
    test_id = getattr(images, "test_id", None)
    if test_id:
        return test_id
    current = os.environ.get("PYTEST_CURRENT_TEST", "")
    return current.rsplit(" (", 1)[0] or "outside-pytest"


def results_folder(test_id: str) -> Path:
    safe = re.sub(r"[^A-Za-z0-9_.\-\[\]]+", "_", test_id.replace("::", "__")).strip("._") or "test"
    return Path(settings.current().results_dir) / safe[:180]


def save_images(images: Any) -> Path | None:
    """Save the run's images (once) under the results directory; return the folder."""
    if images is None or not hasattr(images, "save"):
        return None
    if images.saved_to is None:
        images.save(results_folder(current_test_id(images)))
    return images.saved_to


def record_check(test_id: str, result: MetricResult, images: Any, *, verdict: str, threshold: float | None = None,
                 baseline_file: str | None = None, comparison: Any = None) -> dict[str, Any]:
    """Keep one row per metric check for the terminal summary and reports."""
    row: dict[str, Any] = {
        "test": test_id, "metric": result.metric, "backbone": result.backbone, "value": result.value,
        "higher_is_better": result.higher_is_better, "verdict": verdict, "threshold": threshold,
        "baseline": comparison.baseline if comparison is not None else None,
        "tolerance": comparison.tolerance if comparison is not None else None,
        "delta": comparison.delta if comparison is not None else None,
        "baseline_file": baseline_file,
        "per_sample": None if result.per_sample is None else [float(v) for v in result.per_sample],
        # For reports (metrics.json, HTML): sample i's prompt and seed, and the model's provenance.
        "prompts": [str(p) for p in getattr(images, "prompts", None) or []] or None,
        "seeds": [int(s) for s in getattr(images, "seeds", None) or []] or None,
        "provenance": json.loads(json.dumps(getattr(images, "provenance", None) or {}, default=str)) or None,
        "details": {k: v for k, v in result.details.items() if isinstance(v, (str, int, float, bool, list))},
    }
    if verdict not in {"pass", "improved", "recorded"} or settings.current().results_always:
        row["images"] = str(save_images(images)) if images is not None else None
    settings.current().records.append(row)
    return row


def fail(images: Any, message: str, *, error: type[Exception] = AssertionError) -> NoReturn:
    """Raise ``error`` with ``message`` and the folder the images were saved to."""
    __tracebackhide__ = True
    folder = save_images(images)
    where = f"\n  images of this run: {folder} (grid.png shows them all)" if folder else ""
    raise error(f"pytest-diffeval: {message}{where}")


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
        from . import tripwires as wires

        wires.check(images)
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
        fail(images, f"{metric} {result.value:.4g} over {len(images)} images ({result.backbone}): {scope} "
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
        from . import tripwires as wires

        wires.check(images)
    result = compute_metric("fid", images, reference=reference, features=features, **options)
    passed = result.value < max_fid
    record_check(current_test_id(images), result, images, verdict="pass" if passed else "above threshold",
                 threshold=max_fid)
    if not passed:
        note = f"\n  note: {result.details['warning']}" if "warning" in result.details else ""
        fail(images, f"fid {result.value:.4f} ({result.backbone}) between {len(images)} images and "
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
