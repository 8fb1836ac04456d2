"""Metrics: each one turns an :class:`~pytest_diffeval.ImageSet` into a
:class:`MetricResult` (state in, number out, like a torchmetrics ``Metric``), declares
whether higher is better, and is found by name in a registry that user metrics join.

A user metric::

    from pytest_diffeval.metrics import register_metric

    @register_metric("brightness", higher_is_better=True, absolute_tolerance=2.0)
    def brightness(images):            # per-sample values, one per image
        return images.images.mean(axis=(1, 2, 3))

then works everywhere a built-in does: ``diffeval_baseline.assert_no_regression(images, "brightness")``.

Results of cacheable metrics (the built-ins; user metrics that pass ``cacheable=True``)
are kept on disk by :mod:`~pytest_diffeval.metrics.result_cache`: a rerun on the same
images with the same options and backbones computes nothing.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np


@dataclass
class MetricResult:
    """One metric measured on one image set."""

    metric: str
    value: float
    backbone: str
    higher_is_better: bool
    per_sample: np.ndarray | None = None  # aligned with ImageSet.sample_keys
    details: dict[str, Any] = field(default_factory=dict)
    state: dict[str, Any] | None = None  # tensors a baseline keeps beside its JSON (drift's feature statistics)


class Metric:
    """Base of every metric.  Subclasses set the class attributes and implement ``compute``.

    ``absolute_tolerance``/``relative_tolerance`` give the default regression tolerance
    (the larger of the two, relative to the baseline's value) used when a test passes none.
    """

    name: str = ""
    higher_is_better: bool = True
    per_sample: bool = True
    absolute_tolerance: float = 0.0
    relative_tolerance: float = 0.0
    keeps_state: bool = False  # True: baselines store the result's ``state`` beside their JSON
    # True: compute_metric may return a stored result (metrics/result_cache.py).  Only for
    # metrics whose result depends on nothing but the images, the options and the backbone.
    cacheable: bool = False

    def compute(self, images: Any, **options: Any) -> MetricResult:
        raise NotImplementedError

    def cache_material(self, images: Any, options: dict[str, Any]) -> Any:
        """What besides the images and the code determines this call's result: the options
        bound to ``compute``, keyed by content (raises ``Unkeyable`` when one cannot be)."""
        from .result_cache import bound_options

        return bound_options(self.compute, images, options)

    def default_tolerance(self, baseline_value: float) -> float:
        return max(self.absolute_tolerance, self.relative_tolerance * abs(baseline_value))


class FunctionMetric(Metric):
    """A metric from a function returning per-sample values (the mean is the value)."""

    def __init__(self, name: str, func: Callable[..., Any], *, higher_is_better: bool,
                 absolute_tolerance: float, relative_tolerance: float, backbone: str,
                 cacheable: bool = False) -> None:
        self.name = name
        self.func = func
        self.higher_is_better = higher_is_better
        self.absolute_tolerance = absolute_tolerance
        self.relative_tolerance = relative_tolerance
        self.backbone = backbone
        self.cacheable = cacheable

    def cache_material(self, images: Any, options: dict[str, Any]) -> Any:
        """The function's options and its backbone (an embedded name or folder by its files)."""
        from ..fingerprints import resolve_model_dir
        from .result_cache import bound_options

        return {"options": bound_options(self.func, images, options),
                "backbone": resolve_model_dir(self.backbone)[0]}

    def compute(self, images: Any, **options: Any) -> MetricResult:
        values = np.asarray(self.func(images, **options), dtype=np.float64).reshape(-1)
        if len(values) != len(images):
            raise ValueError(f"metric {self.name!r} returned {len(values)} values for {len(images)} images; return one per image")
        return MetricResult(self.name, float(values.mean()), self.backbone, self.higher_is_better, per_sample=values)


_REGISTRY: dict[str, Metric] = {}
# Built-ins are imported when first asked for: importing torchmetrics costs seconds,
# and the plugin is loaded by every pytest run in the environment.
_BUILTINS: dict[str, tuple[str, str]] = {
    "clip_score": ("clip", "ClipScore"),
    "fid": ("fid", "FID"),
    "drift": ("drift", "Drift"),
    "kid": ("distribution", "KID"),
    "cmmd": ("distribution", "CMMD"),
    "clip_directional_similarity": ("edit", "ClipDirectionalSimilarity"),
    "clip_image_similarity": ("edit", "ClipImageSimilarity"),
    "aesthetic": ("aesthetic", "Aesthetic"),
    "preservation_psnr": ("preservation", "PreservationPSNR"),
    "preservation_ssim": ("preservation", "PreservationSSIM"),
    "style_loss": ("style", "StyleLoss"),
    "good_image_rate": ("derived", "GoodImageRate"),
    "seed_stability": ("derived", "SeedStability"),
}


def register_metric(
    name_or_metric: str | Metric,
    *,
    higher_is_better: bool = True,
    absolute_tolerance: float = 0.0,
    relative_tolerance: float = 0.0,
    backbone: str = "custom",
    cacheable: bool = False,
) -> Any:
    """Register a :class:`Metric` instance, or (as a decorator) a per-sample function.

    ``cacheable=True`` lets the result cache keep the function's results: promise that they
    depend only on the images, the options and ``backbone`` (an embedded name or a local
    folder is keyed by its files; the function's own source file is part of the key)."""
    if isinstance(name_or_metric, Metric):
        _REGISTRY[name_or_metric.name] = name_or_metric
        return name_or_metric

    def decorator(func: Callable[..., Any]) -> Callable[..., Any]:
        _REGISTRY[name_or_metric] = FunctionMetric(
            name_or_metric, func, higher_is_better=higher_is_better,
            absolute_tolerance=absolute_tolerance, relative_tolerance=relative_tolerance, backbone=backbone,
            cacheable=cacheable,
        )
        return func

    return decorator


def get_metric(name: str) -> Metric:
    if name not in _REGISTRY and name in _BUILTINS:
        import importlib

        module, cls = _BUILTINS[name]
        register_metric(getattr(importlib.import_module(f"{__name__}.{module}"), cls)())
    if name not in _REGISTRY:
        raise KeyError(f"pytest-diffeval: unknown metric {name!r}; known: {sorted(set(_REGISTRY) | set(_BUILTINS))} "
                       "(register your own with pytest_diffeval.metrics.register_metric)")
    return _REGISTRY[name]


def compute_metric(name: str, images: Any, **options: Any) -> MetricResult:
    """Compute a registered metric, or read its result from the result cache when the
    metric is cacheable and nothing it depends on changed; an unexpected error names the
    metric."""
    from ..planning import COUNTERS

    metric = get_metric(name)
    cache = key = None
    if metric.cacheable:
        from .result_cache import reemit, result_cache

        cache = result_cache()
        key = cache.key(metric, images, options) if cache is not None else None
        found = cache.get(key, name, len(images)) if key is not None else None
        if found is not None:
            COUNTERS.result_hits += 1
            reemit(found[1])
            return found[0]
    COUNTERS.result_misses += 1
    if key is None:
        return _compute(metric, images, options)
    from .result_cache import warning_records

    caught: list[warnings.WarningMessage] = []
    try:
        with warnings.catch_warnings(record=True) as caught:  # stored with the result, raised on every hit
            warnings.simplefilter("always")
            result = _compute(metric, images, options)
        cache.put(key, result, warning_records(caught))  # type: ignore[union-attr]
    finally:
        reemit(warning_records(caught))
    return result


def _compute(metric: Metric, images: Any, options: dict[str, Any]) -> MetricResult:
    try:
        return metric.compute(images, **options)
    except (KeyError, ValueError, FileNotFoundError, TypeError, ImportError):
        raise  # our own clear errors about the input
    except Exception as exc:  # noqa: BLE001 - re-raised with the metric's name
        raise RuntimeError(f"pytest-diffeval: metric {metric.name!r} failed: {type(exc).__name__}: {exc}") from exc


__all__ = ["Metric", "MetricResult", "FunctionMetric", "register_metric", "get_metric", "compute_metric"]
