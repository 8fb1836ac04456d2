"""A metric per class of a class-conditional image set (DiT: one class per prompt), e.g.
FID/KID/IS per class, each class against the reference images of the same class."""

from __future__ import annotations

import dataclasses
from typing import Any

from ..exceptions import add_note
from . import MetricInputError, MetricResult, compute_metric


def _is_image_set(value: Any) -> bool:
    return hasattr(value, "by_prompt") and hasattr(value, "sample_keys")


def split_reference(reference: Any, labels: list[str]) -> tuple[dict[str, Any], str]:
    """``({label: reference for that class}, how it was split)``.  A dict gives each class
    its own reference; an ImageSet with the same labels (prompts) is split by them; an
    ImageSet with none of them, a folder or a statistics file serves every class whole."""
    if isinstance(reference, dict):
        missing = [label for label in labels if label not in reference]
        if missing:
            raise MetricInputError(f"pytest-diffeval: compute_per_class: the reference dict has no entry for the "
                                   f"classes {missing}; fix: give one reference per class, keyed by the prompts "
                                   f"{labels}")
        return {label: reference[label] for label in labels}, "dict"
    if _is_image_set(reference):
        groups = reference.by_prompt()
        shared = [label for label in labels if label in groups]
        if shared:
            missing = [label for label in labels if label not in groups]
            if missing:
                raise MetricInputError(
                    f"pytest-diffeval: compute_per_class: the reference ImageSet has images of the classes "
                    f"{sorted(groups)} but none of {missing}; fix: add reference images of those classes (prompt = "
                    "class name), or pass reference={class: images} or a reference without labels to use it whole"
                )
            return {label: groups[label] for label in labels}, "by label"
    return {label: reference for label in labels}, "whole"


def compute_per_class(metric: str, images: Any, reference: Any = None, **options: Any) -> dict[str, MetricResult]:
    """``metric`` on each class of ``images`` (its samples grouped by prompt, which is the
    class name for DiT), in prompt order: ``{class: MetricResult}``.  ``reference`` (for
    FID, KID, CMMD) is split by the same labels where it has them (see
    :func:`split_reference`); each result's ``details`` name its ``class`` and how the
    reference was split.  Other ``options`` go to the metric."""
    if not _is_image_set(images):
        raise MetricInputError(f"pytest-diffeval: compute_per_class needs an ImageSet, got {type(images).__name__}")
    groups = images.by_prompt()
    references, split = (split_reference(reference, list(groups)) if reference is not None else ({}, None))
    results = {}
    for label, subset in groups.items():
        extra = {"reference": references[label]} if reference is not None else {}
        try:
            result = compute_metric(metric, subset, **options, **extra)
        except Exception as exc:
            add_note(exc, f"pytest-diffeval: while computing {metric!r} for the class {label!r} "
                          f"({len(subset)} images)")
            raise
        details = {**result.details, "class": label}
        if split is not None:
            details["reference_split"] = split
        results[label] = dataclasses.replace(result, details=details)
    return results


__all__ = ["compute_per_class", "split_reference"]
