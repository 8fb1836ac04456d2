"""Paired set-level verdicts: the set-level twin of the paired t (FID, KID, CMMD, drift).

A set-level metric has one number per run, so comparing two numbers says nothing about how
sure the change is.  A baseline of a set-level metric therefore stores the per-image
features of its images (beside the JSON, ``metrics.statistics_files.features_state``), and
a later run is compared with it **paired**: both sets are resampled *jointly*, with the same
index arrays over the same (prompt, seed) keys, by the cluster bootstrap of
:mod:`~pytest_diffeval.resampling` (prompts with replacement, each drawn prompt with all its
seeds: ``WITHIN_PROMPT = False``), and the metric's change is computed on each resample.
Resampling the seeds within each drawn prompt as well (the two-stage bootstrap) counts the
within-prompt variance twice, so it overstates the spread of a mean over prompts × seeds
(Davison & Hinkley 1997, §3.8); measured on the release suite it widened the spread of the
change by 1.2–1.4× (FID 0.61 vs 0.48 at 5% bad images) and gave up catches at 20%.

* FID, KID, CMMD: ``metric(this run[idx], reference) - metric(baseline[idx], reference)``,
  the reference fixed (this run's; it is the same images for both sides);
* drift: the Fréchet distance between ``baseline[idx]`` and ``this run[idx]`` (0 for the
  baseline against itself).

The effect is the change on the full sets (signed so that + is better), its spread ``sd``
the std of the resampled changes, and the one-sided 95% bound ``effect - 1.645 sd`` (the
normal bootstrap bound: stable at a few hundred resamples, where a 5th percentile is not).
A run **regressed** when that bound is worse than ``-tolerance``: identical sets give effect
0 and sd 0 and pass; a change carried by a few images has a wide sd and needs to be large.

``RESAMPLES = 200`` resamples, seeded (``SEED``): the std of a std from B resamples has a
relative error of about 1/sqrt(2B), 5% at 200.  Measured on the release suite (128 images,
64-d tiny-CLIP features, 2 CPU cores): FID 0.3 s, KID 0.4 s, CMMD 0.4 s, drift 0.3 s per
comparison.  The Fréchet distance of d-dimensional features costs an eigendecomposition of
a d x d matrix per resample; above ``MAX_FEATURES`` (256; e.g. Inception's 2048) the
resampled distances are computed on the features projected onto the top ``MAX_FEATURES``
principal directions of the two sets and the reference together (one projection for every
resample, so the sd stays paired), while the effect is the full-dimensional change.  KID and
CMMD resample kernel means (``metrics.distribution``'s unbiased estimators; pairs of copies
a resample draws are left out like the diagonal), whose cost does not grow with d.

Tolerance floors come from noise, not percentages (:func:`noise_floor`): the change that
re-drawing the seeds would cause at this N, from ``SPLITS`` splits of each prompt's seeds in
two (``resampling.split_halves``): FID/KID/CMMD ``|m(half a) - m(half b)| / sqrt(2)`` (two
independent halves differ by sqrt(2) x what two full seed sets do, as the metric's variance
falls as 1/N), drift ``distance(a, b) / 2`` (``metrics.drift``), the 95th percentile.

:func:`minimum_detectable_effect` simulates, on the recorded features, a share of the
images replaced by *mismatched* images (each chosen image's features moved away from it by
twice its distance to a random image of another prompt, ``2 x_j - x_i``) and reports the
smallest share of a grid the rule flags, with the change it caused: a model of bad images,
stated as such; ``benchmarks/sensitivity.py`` measures shares of a real worse model's images.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from statistics import NormalDist
from typing import Any

import numpy as np
from threadpoolctl import threadpool_limits

from .metrics.distribution import CMMD_SCALE, _cmmd_kernel, _poly
from .metrics.statistics_files import FEATURES_KEY
from .resampling import bootstrap_indices, prompt_of, split_halves
from .verdicts import CONFIDENCE, Comparison, _require_finite_baseline, _require_tolerance

SET_METRICS = ("fid", "kid", "cmmd", "drift")
RESAMPLES = 200
SEED = 0
SPLITS = 20
MAX_FEATURES = 256
MDE_SHARES = (0.025, 0.05, 0.1, 0.2, 0.5)
Z_ONE_SIDED = NormalDist().inv_cdf(CONFIDENCE)
Z_TWO_SIDED = NormalDist().inv_cdf(0.5 + CONFIDENCE / 2)
METHOD = "paired-bootstrap"
WITHIN_PROMPT = False  # the verdict's resamples draw prompts only, each with all its seeds (see the module doc)


def _single_threaded(func: Callable[..., Any]) -> Callable[..., Any]:
    """Run ``func`` with one BLAS thread: its matrices are small (d x d, N x N), where threads
    cost more than they give, and busy-waiting BLAS threads on a loaded machine made a
    comparison 20x slower (measured: a 64-d eigendecomposition 10 ms with threads, 1 ms
    without).  threadpoolctl comes with scikit-learn, a dependency."""
    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with threadpool_limits(1):
            return func(*args, **kwargs)
    return wrapper


@dataclass(frozen=True)
class SetFeatures:
    """One run's per-image features (rows) and their sample keys ``"<seed>|<prompt>"``."""

    features: np.ndarray
    keys: list[str]


def frechet(mean_a: np.ndarray, cov_a: np.ndarray, mean_b: np.ndarray, cov_b: np.ndarray) -> float:
    """The Fréchet distance of two Gaussians, as torchmetrics computes it (trace of the square
    root from the eigenvalues of ``cov_a @ cov_b``), in float64 numpy."""
    root = np.sqrt(np.linalg.eigvals(cov_a @ cov_b).astype(np.complex128)).real.sum()
    return float(((mean_a - mean_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * root)


def _moments(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return x.mean(0), np.cov(x, rowvar=False)


def _symmetric_root(cov: np.ndarray) -> np.ndarray:
    values, vectors = np.linalg.eigh(cov)
    return (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T


def _statistic(metric: str, reference: Mapping[str, np.ndarray], estimator: str) -> Callable[[np.ndarray],
                                                                                              Callable[[np.ndarray], float]]:
    """``prepare(features) -> value(index array)``: the metric of ``features[index]`` against the
    reference, up to a term of the reference alone (it cancels in every change and noise
    estimate here).  FID: the Fréchet distance, the reference's square root taken once
    (``tr sqrt(C_r C_x) = tr sqrt(R C_x R)``, ``R = C_r^1/2``, a symmetric eigenproblem).
    KID/CMMD: ``metrics.distribution``'s kernels and unbiased (or, CMMD ``estimator="biased"``,
    biased) kernel means, the kernel matrices computed once per side; pairs of copies a
    resample draws are left out like the diagonal, as :func:`~pytest_diffeval.metrics.
    distribution.kid_mmd2` does with ``x_ids``."""
    import torch

    if metric == "fid":
        mean_r, cov_r = reference["mean"], reference["cov"]
        root, trace_r = _symmetric_root(cov_r), float(np.trace(cov_r))

        def prepare_fid(x: np.ndarray) -> Callable[[np.ndarray], float]:
            def value(idx: np.ndarray) -> float:
                mean, cov = _moments(x[idx])
                inner = np.linalg.eigvalsh(root @ cov @ root)
                return float(((mean - mean_r) ** 2).sum() + np.trace(cov) + trace_r
                             - 2 * np.sqrt(np.clip(inner, 0, None)).sum())
            return value
        return prepare_fid
    if metric not in ("kid", "cmmd"):
        raise ValueError(f"pytest-diffeval: {metric!r} has no paired set-level verdict (one of "
                         f"{', '.join(SET_METRICS)})")
    kernel, scale = (_poly, 1.0) if metric == "kid" else (_cmmd_kernel, CMMD_SCALE)
    unbiased = metric == "kid" or estimator != "biased"
    y = torch.as_tensor(np.asarray(reference["features"]), dtype=torch.float64)

    def prepare_mmd(x: np.ndarray) -> Callable[[np.ndarray], float]:
        xt = torch.as_tensor(x, dtype=torch.float64)
        within = kernel(xt, xt).numpy()
        cross = kernel(xt, y).numpy().mean(1)

        def value(idx: np.ndarray) -> float:
            block = within[np.ix_(idx, idx)]
            if unbiased:
                keep = idx[:, None] != idx[None, :]
                inner = float(block[keep].mean()) if keep.any() else math.nan
            else:
                inner = float(block.mean())
            return scale * (inner - 2 * float(cross[idx].mean()))
        return value
    return prepare_mmd


def _projection(metric: str, arrays: Sequence[np.ndarray], reference: Mapping[str, np.ndarray]) -> tuple[
        list[np.ndarray], Mapping[str, np.ndarray]]:
    """Above ``MAX_FEATURES`` Fréchet dimensions: ``arrays`` and the reference projected onto the
    top principal directions of them all (see the module doc); else unchanged."""
    dims = arrays[0].shape[1]
    if metric not in ("fid", "drift") or dims <= MAX_FEATURES:
        return list(arrays), reference
    pooled = np.concatenate(list(arrays))
    centre = pooled.mean(0)
    covariance = np.cov(pooled, rowvar=False) + (reference["cov"] if metric == "fid" else 0)
    _, vectors = np.linalg.eigh(covariance)
    basis = vectors[:, -MAX_FEATURES:]
    projected = [(a - centre) @ basis for a in arrays]
    if metric == "fid":
        reference = {"mean": (reference["mean"] - centre) @ basis, "cov": basis.T @ reference["cov"] @ basis}
    return projected, reference


def _aligned(current: SetFeatures, baseline: SetFeatures) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Both feature matrices with rows in the baseline's key order, over the keys both hold."""
    where = {k: i for i, k in enumerate(current.keys)}
    keys = [k for k in baseline.keys if k in where]
    rows_b = [i for i, k in enumerate(baseline.keys) if k in where]
    return (np.asarray(current.features, np.float64)[[where[k] for k in keys]],
            np.asarray(baseline.features, np.float64)[rows_b], keys)


def paired_changes(metric: str, current: np.ndarray, baseline: np.ndarray, keys: Sequence[str],
                   reference: Mapping[str, np.ndarray], *, estimator: str = "unbiased", resamples: int = RESAMPLES,
                   seed: int = SEED) -> tuple[float, np.ndarray]:
    """``(change on the full sets, changes on the joint resamples)`` of ``metric`` (this run
    minus baseline, in the metric's units; drift: the distance), rows of both paired by row."""
    full = np.arange(len(keys))
    indices = bootstrap_indices(keys, seed, resamples, within=WITHIN_PROMPT)
    if metric == "drift":
        observed = frechet(*_moments(baseline), *_moments(current))
        cur_p, base_p = _projection(metric, [current, baseline], reference)[0]
        resampled = [frechet(*_moments(base_p[idx]), *_moments(cur_p[idx])) for idx in indices]
    else:
        prepare = _statistic(metric, reference, estimator)
        observed = prepare(current)(full) - prepare(baseline)(full)
        (cur_p, base_p), ref_p = _projection(metric, [current, baseline], reference)
        if ref_p is not reference:
            prepare = _statistic(metric, ref_p, estimator)
        cur_v, base_v = prepare(cur_p), prepare(base_p)
        resampled = [cur_v(idx) - base_v(idx) for idx in indices]
    changes = np.asarray(resampled, dtype=np.float64)
    return float(observed), changes[np.isfinite(changes)]


@_single_threaded
def compare_sets(metric: str, backbone: str, higher_is_better: bool, value: float, baseline_value: float,
                 current: SetFeatures, baseline: SetFeatures, reference: Mapping[str, np.ndarray], tolerance: float,
                 *, estimator: str = "unbiased", resamples: int = RESAMPLES, seed: int = SEED) -> Comparison:
    """Compare a set-level metric paired over joint resamples (see the module doc): regressed
    when the one-sided 95% bound of the change is worse than ``-tolerance``."""
    _require_tolerance(metric, tolerance)
    _require_finite_baseline(metric, [baseline_value])
    cur, base, keys = _aligned(current, baseline)
    if not math.isfinite(value) or not np.isfinite(cur).all():
        return Comparison(metric, backbone, higher_is_better, value, baseline_value, tolerance, math.nan, None,
                          math.nan, len(keys), METHOD, "regressed",
                          note=f"this run measured a non-finite {metric} ({value!r}) or non-finite features")
    sign = 1.0 if higher_is_better else -1.0
    observed, changes = paired_changes(metric, cur, base, keys, reference, estimator=estimator,
                                       resamples=resamples, seed=seed)
    effect = sign * observed
    sd = float(changes.std(ddof=1)) if len(changes) >= 2 else 0.0
    upper, lower = effect + Z_ONE_SIDED * sd, effect - Z_ONE_SIDED * sd
    interval = (effect - Z_TWO_SIDED * sd, effect + Z_TWO_SIDED * sd)
    if upper < -tolerance:
        verdict, bound = "regressed", upper
    elif lower > tolerance and metric != "drift":  # drift is a distance: it cannot improve
        verdict, bound = "improved", lower
    else:
        verdict, bound = "pass", upper
    comparison = Comparison(metric, backbone, higher_is_better, value, baseline_value, tolerance, effect, interval,
                            bound, len(keys), METHOD, verdict, spread=sd)
    comparison.resamples = len(changes)
    return comparison


@_single_threaded
def noise_floor(metric: str, side: SetFeatures, reference: Mapping[str, np.ndarray], *,
                estimator: str = "unbiased", splits: int = SPLITS, seed: int = SEED) -> float:
    """The change that re-drawing the seeds would cause at this N (see the module doc): the
    95th percentile over ``splits`` seeded splits of each prompt's seeds.  0 when a half
    would hold fewer than 2 images."""
    x = np.asarray(side.features, np.float64)
    generator = np.random.default_rng(seed)
    values = []
    value = None if metric == "drift" else _statistic(metric, reference, estimator)(x)
    for _ in range(splits):
        a, b = split_halves(side.keys, generator)
        if min(len(a), len(b)) < 2:
            return 0.0
        if value is None:
            values.append(frechet(*_moments(x[a]), *_moments(x[b])) / 2.0)
        else:
            values.append(abs(value(a) - value(b)) / math.sqrt(2.0))
    return float(np.percentile(values, 95))


def mismatched(side: SetFeatures, share: float, seed: int = SEED) -> np.ndarray:
    """``side``'s features with ``round(share * N)`` rows (seeded choice) replaced by a mismatched
    image's: ``2 x_j - x_i`` for a random image ``j`` of another prompt (see the module doc)."""
    x = np.asarray(side.features, np.float64).copy()
    generator = np.random.default_rng(seed)
    prompts = np.array([prompt_of(k) for k in side.keys])
    chosen = generator.permutation(len(x))[: int(round(share * len(x)))]
    for i in chosen:
        others = np.flatnonzero(prompts != prompts[i])
        if len(others):
            j = others[generator.integers(len(others))]
            x[i] = 2 * x[j] - x[i]
    return x


@_single_threaded
def minimum_detectable_effect(metric: str, side: SetFeatures, reference: Mapping[str, np.ndarray], tolerance: float,
                              *, higher_is_better: bool = False, estimator: str = "unbiased",
                              shares: Sequence[float] = MDE_SHARES) -> dict[str, Any]:
    """The smallest share of ``shares`` whose simulated mismatched images (:func:`mismatched`)
    the rule flags against ``side`` itself, and the change they caused (metric units); share
    None when none of them is flagged.  CMMD's features are L2-normalised again."""
    out: dict[str, Any] = {"share": None, "change": None, "n": len(side.keys), "model": "mismatched images 2x_j - x_i"}
    for share in shares:
        bad = mismatched(side, share)
        if metric == "cmmd":
            bad /= np.linalg.norm(bad, axis=1, keepdims=True)
        comparison = compare_sets(metric, "", higher_is_better, 0.0, 0.0, SetFeatures(bad, side.keys), side, reference,
                                  tolerance, estimator=estimator)
        if comparison.verdict == "regressed":
            sign = 1.0 if higher_is_better else -1.0
            out.update(share=share, change=float(sign * comparison.effect))
            break
    return out


def state_features(state: Any) -> tuple[SetFeatures, dict[str, np.ndarray]] | None:
    """This run's features (with their sample keys) and the reference tensors from a set-level
    result's ``state`` (``statistics_files.features_state``); None when it holds no features."""
    if not isinstance(state, Mapping) or FEATURES_KEY not in state.get("tensors", {}):
        return None
    tensors = state["tensors"]
    keys = json.loads(state.get("metadata", {}).get("sample_keys", "[]"))
    reference = {name[len("reference_"):]: np.asarray(value, dtype=np.float64) for name, value in tensors.items()
                 if name.startswith("reference_")}
    return SetFeatures(np.asarray(tensors[FEATURES_KEY], dtype=np.float64), list(keys)), reference


def recording_details(metric: str, state: Any, *, higher_is_better: bool = False, estimator: str = "unbiased",
                      tolerance: float | None = None) -> dict[str, Any]:
    """What a set-level baseline records beside its value for the paired verdict: the noise
    floor (:func:`noise_floor`), the resample count and the minimum detectable effect under the
    tolerance the comparisons will use (``tolerance``, else the floor)."""
    parsed = state_features(state)
    if parsed is None or metric not in SET_METRICS:
        return {}
    side, reference = parsed
    floor = noise_floor(metric, side, reference, estimator=estimator)
    mde = minimum_detectable_effect(metric, side, reference, floor if tolerance is None else max(tolerance, 0.0),
                                    higher_is_better=higher_is_better, estimator=estimator)
    return {"noise_floor": floor, "resamples": RESAMPLES, "mde_share": mde["share"], "mde_change": mde["change"]}
