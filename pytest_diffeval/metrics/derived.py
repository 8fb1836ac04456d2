"""Metrics derived from a per-sample metric: the share of good images, and how much a
prompt's score moves between seeds."""

from __future__ import annotations

from typing import Any

import numpy as np

from . import Metric, MetricInputError, MetricResult, compute_metric, get_metric
from .result_cache import Unkeyable, bound_options, call_material

BOOTSTRAP_RESAMPLES = 50
BOOTSTRAP_SEED = 0


class _Derived(Metric):
    """A metric computed from another (``of``): keyed in the result cache by its own options
    and the inner metric's key material, so a hit computes neither."""

    cacheable = True
    reads_blocks = True  # it reads the prompts; the inner metric handles a torchrun rank's block

    def cache_material(self, images: Any, options: dict[str, Any]) -> Any:
        own = {k: v for k, v in options.items() if k in ("of", "threshold")}
        material = bound_options(self.compute, images, own)
        try:
            inner = get_metric(material["of"])
        except (KeyError, TypeError):
            raise Unkeyable("unknown inner metric") from None  # compute raises the clear error
        if not inner.cacheable or inner.name in {"good_image_rate", "seed_stability"}:
            raise Unkeyable(f"inner metric {inner.name!r} is not cacheable")
        rest = {k: v for k, v in options.items() if k not in own}
        return {**material, "inner": call_material(inner, images, rest)}


def _inner(metric: str, of: str, images: Any, options: dict[str, Any]) -> MetricResult:
    if of in {"good_image_rate", "seed_stability"}:
        raise MetricInputError(f"pytest-diffeval: {metric}: of={of!r} is itself derived; choose a per-sample metric "
                         "such as 'clip_score' or 'aesthetic'")
    result = compute_metric(of, images, **options)
    if result.per_sample is None:
        raise MetricInputError(f"pytest-diffeval: {metric} needs a per-sample metric, but {of!r} gives one value per set; "
                         "choose e.g. of='clip_score', 'aesthetic' or a registered per-sample metric")
    return result


class GoodImageRate(_Derived):
    """Share of images whose ``of`` metric (default ``clip_score``) passes ``threshold``: at
    least it if higher is better for that metric, at most it otherwise.  Per sample 1 or 0,
    so runs pair like any per-sample metric.  Default tolerance: 0.05 (5 points)."""

    name = "good_image_rate"
    higher_is_better = True
    per_sample = True
    binary = True  # 1 or 0 per image: paired verdicts use McNemar
    absolute_tolerance = 0.05

    def compute(self, images: Any, *, of: str = "clip_score", threshold: float | None = None,
                **options: Any) -> MetricResult:
        """``options`` go to the ``of`` metric (e.g. ``clip_model=``, ``aesthetic_weights=``)."""
        if threshold is None:
            raise MetricInputError(f"pytest-diffeval: good_image_rate needs threshold= (the value of {of!r} an image must "
                             "reach to count as good)")
        inner = _inner(self.name, of, images, options)
        values = np.asarray(inner.per_sample, dtype=np.float64)
        good = values >= threshold if inner.higher_is_better else values <= threshold
        per_sample = good.astype(np.float64)
        return MetricResult(self.name, float(per_sample.mean()), inner.backbone, True, per_sample=per_sample,
                            details={"of": of, "threshold": float(threshold), "n_good": int(good.sum()),
                                     "rule": f"{of} {'>=' if inner.higher_is_better else '<='} {threshold}",
                                     "of_value": inner.value})


class SeedStability(_Derived):
    """Spread of a per-sample metric (``of``, default ``clip_score``) across seeds: per prompt,
    the standard deviation over its seeds (ddof=1); the value is the mean over prompts.
    Lower is better (more stable).  Needs at least 2 seeds per prompt.  One value per set
    (compared unpaired); ``details["spread"]`` is its std over bootstrap resamples of the
    prompts.  Default tolerance: 25% (a spread estimated from a few seeds is noisy), or
    twice the baseline's spread if larger."""

    name = "seed_stability"
    higher_is_better = False
    per_sample = False
    relative_tolerance = 0.25

    def compute(self, images: Any, *, of: str = "clip_score", **options: Any) -> MetricResult:
        """``options`` go to the ``of`` metric."""
        inner = _inner(self.name, of, images, options)
        groups: dict[str, list[float]] = {}
        for prompt, value in zip(images.prompts, inner.per_sample):
            groups.setdefault(prompt, []).append(float(value))
        single = [p for p, v in groups.items() if len(v) < 2]
        if single:
            raise MetricInputError(f"pytest-diffeval: seed_stability needs at least 2 seeds per prompt; {len(single)} prompt(s) "
                             f"have one, e.g. {single[0]!r}; fix: generate with seeds=range(4) or more")
        spread = {prompt: float(np.std(values, ddof=1)) for prompt, values in groups.items()}
        ranked = sorted(spread.items(), key=lambda kv: kv[1], reverse=True)
        stds = np.array(list(spread.values()))
        # how much the value would move with other prompts: std over seeded bootstrap resamples of
        # the prompts (baselines derive the tolerance of set-level metrics from "spread")
        rng = np.random.default_rng(BOOTSTRAP_SEED)
        resampled = [stds[rng.integers(len(stds), size=len(stds))].mean() for _ in range(BOOTSTRAP_RESAMPLES)]
        return MetricResult(self.name, float(stds.mean()), inner.backbone, False,
                            details={"of": of, "per_prompt_std": spread, "prompts_by_spread": [list(kv) for kv in ranked],
                                     "spread": float(np.std(resampled, ddof=1)),
                                     "n_prompts": len(spread), "seeds_per_prompt": sorted({len(v) for v in groups.values()}),
                                     "of_value": inner.value})


__all__ = ["GoodImageRate", "SeedStability"]
