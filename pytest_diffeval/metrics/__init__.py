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

import functools
import importlib
import json
import warnings
from typing import Any, Callable

import numpy as np

from .. import distributed
from ..counters import COUNTERS
from ..exceptions import (  # noqa: F401 - re-exported
    DiffevalError,
    DiffevalInputError,
    MetricError,
    MetricInputError,
    MissingDependencyError,
    NonFiniteMetricError,
    UnknownMetricError,
    WeightsFileNotFoundError,
)
from ..fingerprints import resolve_model_dir
from .result import MetricResult  # noqa: F401 - re-exported
from .result_cache import bound_options, reemit, result_cache, warning_records

BLOCK_SAMPLES = "block_samples"  # under torchrun: a block's number of samples, in the details combine() gets


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
    # Per-sample values are pass/fail (0 or 1): paired verdicts use the exact McNemar test
    # (verdicts.py).  None: decided from the values (McNemar when every one is 0 or 1).
    binary: bool | None = None
    # True: compute_metric may return a stored result (metrics/result_cache.py).  Only for
    # metrics whose result depends on nothing but the images, the options and the backbone.
    cacheable: bool = False
    # True: each sample's value depends on that sample alone, so under torchrun each rank
    # computes the metric on its block of the set and the per-sample values are gathered
    # (``_compute``); the set's value and details then come from :meth:`combine`.
    sample_wise: bool = False
    # True: ``compute`` takes a ShardedImageSet as it is (FID, KID, CMMD, drift: each rank's
    # features, gathered).  Other metrics get the whole set's pixels, gathered, under torchrun.
    reads_blocks: bool = False
    per_sample_options: tuple[str, ...] = ()  # options holding one entry per image: sliced to the block
    # True: under torchrun the result's per-image ``state`` is on rank 0 alone (FID, drift: the
    # feature sums are all-reduced, the features gathered to rank 0, which decides); the other
    # ranks' results carry rank 0's value and details and no state (cached under their own key).
    state_on_root: bool = False

    def compute(self, images: Any, **options: Any) -> MetricResult:
        raise NotImplementedError

    def combine(self, per_sample: np.ndarray, details: list[dict[str, Any]]) -> tuple[float, dict[str, Any]]:
        """A sample-wise metric's value and details for the whole set, from its per-sample
        values and each rank's block's details (rank order; each with its number of samples
        under :data:`BLOCK_SAMPLES`): the mean, and rank 0's details with the
        ``truncated_prompts`` of every block."""
        combined = dict(details[0]) if details else {}
        if "truncated_prompts" in combined:
            combined["truncated_prompts"] = list(dict.fromkeys(
                prompt for block in details for prompt in block.get("truncated_prompts", [])))
        return float(per_sample.mean()), combined

    def block_options(self, images: Any, options: dict[str, Any]) -> dict[str, Any]:
        """The options of this rank's block of a sharded set (``images.block``): each option
        named in ``per_sample_options`` that holds one entry per image (a list or an array;
        not a str) sliced to the block, the others as given."""
        indices = list(images.block)

        def sliced(name: str, value: Any) -> Any:
            if (name not in self.per_sample_options or value is None or isinstance(value, (str, bytes))
                    or len(value) != len(images)):
                return value
            return value[indices] if isinstance(value, np.ndarray) else [value[i] for i in indices]

        return {name: sliced(name, value) for name, value in options.items()}

    def cache_material(self, images: Any, options: dict[str, Any]) -> Any:
        """What besides the images and the code determines this call's result: the options
        bound to ``compute``, keyed by content (raises ``Unkeyable`` when one cannot be)."""

        return bound_options(self.compute, images, options)

    def default_tolerance(self, baseline_value: float) -> float:
        return max(self.absolute_tolerance, self.relative_tolerance * abs(baseline_value))


class FunctionMetric(Metric):
    """A metric from a function returning per-sample values (the mean is the value)."""

    def __init__(self, name: str, func: Callable[..., Any], *, higher_is_better: bool,
                 absolute_tolerance: float, relative_tolerance: float, backbone: str,
                 cacheable: bool = False, binary: bool | None = None) -> None:
        self.name = name
        self.binary = binary
        self.func = func
        self.higher_is_better = higher_is_better
        self.absolute_tolerance = absolute_tolerance
        self.relative_tolerance = relative_tolerance
        self.backbone = backbone
        self.cacheable = cacheable
        self.sample_wise = True  # a function of the images returning one value per image

    def cache_material(self, images: Any, options: dict[str, Any]) -> Any:
        """The function's options and its backbone (an embedded name or folder by its files)."""

        return {"options": bound_options(self.func, images, options),
                "backbone": resolve_model_dir(self.backbone)[0]}

    def compute(self, images: Any, **options: Any) -> MetricResult:
        values = np.asarray(self.func(images, **options), dtype=np.float64).reshape(-1)
        if len(values) != len(images):
            raise MetricInputError(f"pytest-diffeval: metric {self.name!r} returned {len(values)} values for "
                                   f"{len(images)} images; return one per image")
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
    "inception_score": ("inception_score", "InceptionScore"),
    # human-preference scorers (issue 20)
    "pick_score": ("preference", "PickScore"),
    "hps_v2": ("preference", "HPSv2"),
    "image_reward": ("image_reward", "ImageReward"),
    # prompt alignment by VQA (issue 19): modules of the vqa package, relative to this one
    "vqa_score": (".vqa.metrics", "VQAScore"),
    "tifa": (".vqa.metrics", "Tifa"),
    "soft_tifa": (".vqa.metrics", "SoftTifa"),
}


def register_metric(
    name_or_metric: str | Metric,
    *,
    higher_is_better: bool = True,
    absolute_tolerance: float = 0.0,
    relative_tolerance: float = 0.0,
    backbone: str = "custom",
    cacheable: bool = False,
    binary: bool | None = None,
) -> Any:
    """Register a :class:`Metric` instance, or (as a decorator) a per-sample function.

    ``cacheable=True`` lets the result cache keep the function's results: promise that they
    depend only on the images, the options and ``backbone`` (an embedded name or a local
    folder is keyed by its files; the function's own source file is part of the key).
    ``binary=True`` declares pass/fail values (1 or 0 per image): baselines compare them with
    the exact McNemar test; the default (None) does so whenever every value is 0 or 1.
    Under torchrun the function gets each rank's block of the set and the values are gathered,
    so each value must depend on its own image alone (for a set-level number register a
    :class:`Metric` whose ``sample_wise`` is False)."""
    if isinstance(name_or_metric, Metric):
        _REGISTRY[name_or_metric.name] = name_or_metric
        return name_or_metric

    def decorator(func: Callable[..., Any]) -> Callable[..., Any]:
        _REGISTRY[name_or_metric] = FunctionMetric(
            name_or_metric, func, higher_is_better=higher_is_better,
            absolute_tolerance=absolute_tolerance, relative_tolerance=relative_tolerance, backbone=backbone,
            cacheable=cacheable, binary=binary,
        )
        return func

    return decorator


def get_metric(name: str) -> Metric:
    if name not in _REGISTRY and name in _BUILTINS:
        module, cls = _BUILTINS[name]
        register_metric(getattr(importlib.import_module(f".{module}", __name__), cls)())
    if name not in _REGISTRY:
        raise UnknownMetricError(f"pytest-diffeval: unknown metric {name!r}; known: {sorted(set(_REGISTRY) | set(_BUILTINS))} "
                       "(register your own with pytest_diffeval.metrics.register_metric)")
    return _REGISTRY[name]


def compute_metric(name: str, images: Any, **options: Any) -> MetricResult:
    """Compute a registered metric, or read its result from the result cache when the
    metric is cacheable and nothing it depends on changed; an unexpected error names the
    metric."""

    metric = get_metric(name)
    cache = key = None
    if metric.cacheable:

        cache = result_cache()
        key = cache.key(metric, images, options) if cache is not None else None
        found = cache.get(key, name, len(images)) if key is not None else None
        if hasattr(images, "gather_rows") and not distributed.everyone(found is not None, f"agree on {name}'s cache"):
            found = None  # under torchrun: computed by all ranks (it gathers) unless every rank has it stored
        if found is not None:
            COUNTERS.result_hits += 1
            reemit(found[1])
            return found[0]
    COUNTERS.result_misses += 1
    if key is None:
        return _compute(metric, images, options)

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
    """``metric.compute`` with its errors named and its result checked for NaN/inf.  Under
    torchrun a sample-wise metric runs on this rank's block of the set (:func:`_per_block`)."""
    try:
        if metric.sample_wise and hasattr(images, "gather_rows"):
            result = _per_block(metric, images, options)
        elif hasattr(images, "gather_rows") and not metric.reads_blocks:
            result = metric.compute(images.whole_set(), **options)  # correct, if not spread: every rank computes
        else:
            result = metric.compute(images, **options)
    except Exception as exc:
        if _passes_through(exc):
            raise  # our own clear errors about the input, and errors already named
        raise metric_error(metric.name, exc) from exc
    check_finite(metric.name, images, result)
    return result


def _per_block(metric: Metric, images: Any, options: dict[str, Any]) -> MetricResult:
    """A sample-wise metric of a :class:`~pytest_diffeval.generation.ShardedImageSet`: computed
    on this rank's block, its per-sample values all-gathered in sample order (one process's
    values, up to the float effects of embedding other batches), its details combined."""
    results: list[MetricResult] = []
    options = metric.block_options(images, options)

    def values(block: Any) -> np.ndarray:
        results.append(metric.compute(block, **options))
        return np.asarray(results[-1].per_sample, dtype=np.float64).reshape(-1)

    per_sample = images.gather_rows(values, f"gather the per-sample values of {metric.name}")
    mine = results[0] if results else None  # None: more ranks than samples left this one none
    parts = images.group.all_gather_json(
        None if mine is None else [mine.backbone, json.loads(json.dumps(mine.details, default=repr)), len(images.block)],
        f"gather the details of {metric.name}")
    backbone = next(part[0] for part in parts if part is not None)
    value, details = metric.combine(per_sample, [{**part[1], BLOCK_SAMPLES: part[2]} for part in parts
                                                 if part is not None])
    details.pop(BLOCK_SAMPLES, None)
    return MetricResult(metric.name, value, backbone, metric.higher_is_better, per_sample=per_sample,
                        details=details, state=None if mine is None else mine.state)


def _passes_through(exc: Exception) -> bool:
    """The package's own errors (clear input errors, and errors that already name a metric,
    e.g. a derived metric's inner one) are raised unchanged."""
    return isinstance(exc, DiffevalError)


@functools.lru_cache(maxsize=None)
def _error_class(kind: type[BaseException]) -> type[MetricError]:
    """``MetricError`` combined with ``kind``, so ``except ValueError`` (or the original's own
    type) still catches the named error; plain ``MetricError`` when they cannot combine."""
    if issubclass(kind, MetricError) or kind in (Exception, RuntimeError):
        return MetricError
    try:
        return type(f"Metric{kind.__name__}", (MetricError, kind), {"__module__": __name__})
    except TypeError:  # an instance layout that does not combine
        return MetricError


def metric_error(name: str, exc: Exception) -> MetricError:
    """A :class:`MetricError` naming the metric ``name`` for ``exc``, of ``exc``'s type (or
    its nearest base that can be built from a message)."""
    message = (f"pytest-diffeval: metric {name!r} failed: {type(exc).__name__}: {exc}\n"
               "  (an error inside the metric, not a verdict on the images: its traceback is above; "
               "fix the metric or the options passed to it)")
    for kind in type(exc).__mro__:
        if not (isinstance(kind, type) and issubclass(kind, Exception)):
            continue
        try:
            error = _error_class(kind)(message)
        except Exception:  # noqa: BLE001 - a constructor that takes other arguments: try its base
            continue
        error.metric = name
        return error
    error = MetricError(message)
    error.metric = name
    return error


def check_finite(name: str, images: Any, result: MetricResult) -> None:
    """Raise :class:`NonFiniteMetricError` when the value or a per-sample value is NaN/inf
    (or not a number), naming the samples (prompt, seed): no verdict is given on bad data."""
    try:
        value_ok = bool(np.isfinite(float(result.value)))
        per_sample = None if result.per_sample is None else np.asarray(result.per_sample, np.float64).reshape(-1)
    except (TypeError, ValueError):
        value_ok, per_sample = False, None
    bad = [] if per_sample is None else np.flatnonzero(~np.isfinite(per_sample)).tolist()
    if value_ok and not bad:
        return
    where = _where_nonfinite(images, result, per_sample, bad)
    error = NonFiniteMetricError(
        f"pytest-diffeval: metric {name!r} gave a non-finite result: {where}. No verdict is given on bad data.\n"
        "  fix: look at those images (all-black or NaN output: run in float32, --diffeval-dtype=float32, or check "
        "the weights); a user metric must return finite numbers (np.isfinite) for every image"
    )
    error.metric = name
    raise error


def _where_nonfinite(images: Any, result: MetricResult, per_sample: np.ndarray | None, bad: list[int]) -> str:
    """Which values are not finite, by (prompt, seed), and which images held NaN already."""
    prompts, seeds = list(getattr(images, "prompts", None) or []), list(getattr(images, "seeds", None) or [])

    def sample(i: int) -> str:
        return f"(prompt {prompts[i]!r}, seed {seeds[i]})" if i < len(prompts) == len(seeds) else f"sample {i}"

    if bad and per_sample is not None:
        shown = ", ".join(f"{sample(i)} = {per_sample[i]}" for i in bad[:5])
        where = (f"{len(bad)} of {len(per_sample)} per-sample values are NaN/inf: {shown}"
                 + (f" and {len(bad) - 5} more" if len(bad) > 5 else ""))
    else:
        where = f"its value over the {len(prompts) or '?'} images is {result.value!r}"
    flagged = [i for i, flag in enumerate(getattr(images, "nonfinite", None) or []) if flag]
    if flagged:
        where += f"; the pipeline output of {', '.join(sample(i) for i in flagged[:5])} held NaN/inf"
    return where


__all__ = ["BLOCK_SAMPLES", "DiffevalInputError", "FunctionMetric", "Metric", "MetricError", "MetricInputError", "MetricResult",
           "MissingDependencyError", "NonFiniteMetricError", "UnknownMetricError", "check_finite", "compute_metric",
           "get_metric", "metric_error", "register_metric"]
