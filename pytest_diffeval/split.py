"""One generation split across CI shards (``@pytest.mark.diffeval_split`` under ``--diffeval-splits
N --diffeval-group i``): the test runs on every shard, each ``generate()`` call makes only its
shard's block of the (prompt, seed) samples (every sample with its own seed, so the images are
those of a single run), and each FID/KID/CMMD/drift check stores its part's features instead of
judging a part: FID and drift the float64 sums Σf, Σfᵀf and n (the statistics-file keys), KID and
CMMD the per-image features, each with the reference side.  ``python -m pytest_diffeval results
merge`` adds the sums (or joins the features in sample order), computes the whole set's value
as a single run would, and gives the check's verdict.

A part is written to ``<results dir>/diffeval-split/`` (safetensors: never unpickled) and its
row in ``metrics.json`` has the verdict ``partial`` (it passes: no shard can judge the set) and
``split_*`` details naming the file, the part and the bounds the merge applies."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from . import distributed, settings
from ._hashing import digest_text
from ._io import inside
from .exceptions import SplitError, UnsafePath
from .generation import ImageSet
from .metrics import MetricResult
from .metrics.distribution import _reference_arrays, cmmd_mmd2, kid_mmd2
from .metrics.drift import _compute_fid, _features, load_statistics
from .metrics.fid import (
    _feature_extractor,
    _update_from_arrays,
    real_moments,
    reference_statistics,
    set_feature_precision,
    update_capturing_features,
)
from .metrics.statistics_files import STAT_KEYS, write_statistics
from .planning import plain_text_to_image
from .recording import current_test_id, record_check

SPLIT_METRICS = ("fid", "drift", "kid", "cmmd")
FOLDER = "diffeval-split"  # beside metrics.json in a shard's results directory
WRITER = "pytest-diffeval split part"
PARTIAL = "partial"  # the verdict of a part's row: the merge judges the set
FIX = ("rerun the shards with one pytest-diffeval and the same options, and merge the results directories "
       "as the runs wrote them")


@dataclass(frozen=True)
class SplitInfo:
    """Which samples of a split generation this shard made: ``indices`` of ``total``
    (prompt-major sample order), part ``part`` (1-based) of ``of``."""

    part: int
    of: int
    indices: range
    total: int


def info(images: Any) -> SplitInfo | None:
    """The split part ``images`` are, or None (a whole set)."""
    return getattr(images, "diffeval_split", None)


def sample_calls(prompts: int, seeds: int, block: range) -> list[tuple[list[int], list[int]]]:
    """The ``generate()`` calls that make the samples ``block`` of ``prompts`` x ``seeds``
    (prompt-major): ``(prompt indices, seed positions)`` per call, in sample order; prompts
    that take the same seeds share a call (a contiguous block needs at most three)."""
    calls: list[tuple[list[int], list[int]]] = []
    for prompt in range(prompts):
        positions = [k - prompt * seeds for k in block if prompt * seeds <= k < (prompt + 1) * seeds]
        if not positions:
            continue
        if calls and calls[-1][1] == positions:
            calls[-1][0].append(prompt)
        else:
            calls.append(([prompt], positions))
    return calls


_PER_PROMPT = ("negative_prompt", "prompt_2", "negative_prompt_2")


def generate_part(call: Callable[..., Any], prompts: Any, seeds: list[int], call_kwargs: dict[str, Any],
                  part: int, of: int, nodeid: str) -> Any:
    """This shard's block of the samples of ``call(prompts, seeds=seeds, **call_kwargs)`` (the
    fixture's ``generate`` without the split) as one ImageSet, marked with its :class:`SplitInfo`."""
    unconditional = prompts is None
    listed = [None] if unconditional else plain_text_to_image(prompts, call_kwargs)
    if listed is None:
        raise SplitError(f"pytest-diffeval: {nodeid} is marked diffeval_split, but this generate() call is not a "
                         "text-to-image or unconditional call (input images, class labels): only (prompt, seed) "
                         "samples can be split across shards; fix: remove the marker from this test, or generate "
                         "text-to-image samples in it")
    total = len(listed) * len(seeds)
    block = distributed.share(total, part - 1, of)
    sets = []
    for prompt_ids, positions in sample_calls(len(listed), len(seeds), block):
        kwargs = {k: ([v[j] for j in prompt_ids] if k in _PER_PROMPT and isinstance(v, (list, tuple)) else v)
                  for k, v in call_kwargs.items()}
        sets.append(call(None if unconditional else [listed[j] for j in prompt_ids],
                         [seeds[t] for t in positions], kwargs))
    if not sets:
        raise SplitError(f"pytest-diffeval: {nodeid}: shard {part} of {of} gets none of the {total} samples of a "
                         f"diffeval_split generation; fix: run fewer shards (--diffeval-splits <= {total}) or "
                         "generate more samples")
    first = sets[0]
    images = ImageSet(images=np.concatenate([s.images for s in sets]), prompts=sum((s.prompts for s in sets), []),
                      seeds=sum((s.seeds for s in sets), []), call_kwargs=dict(first.call_kwargs),
                      provenance=dict(first.provenance), test_id=first.test_id,
                      nonfinite=(sum((list(s.nonfinite) for s in sets), []) if all(s.nonfinite is not None for s in sets)
                                 else None))
    images.diffeval_split = SplitInfo(part, of, block, total)
    return images


# --------------------------------------------------------------------------- a shard: measure and store its part


def _fid_part(images: Any, options: dict[str, Any]) -> tuple[dict[str, Any], str]:
    device = options.get("device") or settings.resolved_device()
    batch_size = int(options.get("batch_size") or 64)
    metric, feature_id, preprocessing = _feature_extractor(options.get("features") or settings.current().fid_features,
                                                           device)
    metric, preprocessing = set_feature_precision(metric.to(device), device, preprocessing)
    reference_statistics(metric, feature_id, preprocessing, options["reference"], device, batch_size)
    update_capturing_features(metric, images, False, device, batch_size)
    mean, cov = real_moments(metric)
    sums = {k: getattr(metric, k.replace("real", "fake")).detach().cpu() for k in STAT_KEYS}
    return {**sums, "reference_mean": mean, "reference_cov": cov}, feature_id


def _drift_part(images: Any, options: dict[str, Any]) -> tuple[dict[str, Any], str]:
    if options.get("baseline_stats") is None:
        raise SplitError("pytest-diffeval: a split drift check needs baseline_stats= (the statistics file it is "
                         "measured against); fix: pass baseline_stats=<file> to assert_metric(images, 'drift', ...)")
    device = options.get("device") or settings.resolved_device()
    metric, feature_id, _, _ = _features(images, options.get("features") or settings.current().fid_features,
                                         device, int(options.get("batch_size") or 64))
    mean, cov = load_statistics(Path(options["baseline_stats"]), feature_id, int(metric.real_features_sum.shape[0]))
    sums = {k: getattr(metric, k).detach().cpu() for k in STAT_KEYS}
    return {**sums, "reference_mean": mean, "reference_cov": cov}, feature_id


def _kid_part(images: Any, options: dict[str, Any]) -> tuple[dict[str, Any], str]:
    from torchmetrics.image.kid import KernelInceptionDistance
    from torchmetrics.utilities import dim_zero_cat


    device = options.get("device") or settings.resolved_device()
    batch_size = int(options.get("batch_size") or 64)
    fid, feature_id, _ = _feature_extractor(options.get("features") or settings.current().fid_features, device)
    metric = KernelInceptionDistance(feature=fid.inception, subsets=1, subset_size=1, reset_real_features=False,
                                     normalize=False).to(device)
    _update_from_arrays(metric, _reference_arrays(options["reference"]), True, device, batch_size)
    _update_from_arrays(metric, iter(images.images), False, device, batch_size)
    return {"features": dim_zero_cat(metric.fake_features).double().cpu(),
            "reference_features": dim_zero_cat(metric.real_features).double().cpu()}, feature_id


def _cmmd_part(images: Any, options: dict[str, Any]) -> tuple[dict[str, Any], str]:
    import torch

    from .metrics.backbones import clip_features_module, load_clip

    backbone = load_clip(options.get("clip_model") or settings.current().clip_model,
                         options.get("device") or settings.resolved_device())
    embed = clip_features_module(backbone)
    real = np.stack(list(_reference_arrays(options["reference"])))
    x = torch.nn.functional.normalize(embed(images.as_tensor(backbone.device)), dim=-1).double()
    y = torch.nn.functional.normalize(embed(torch.from_numpy(real).permute(0, 3, 1, 2).to(backbone.device)),
                                      dim=-1).double()
    return {"features": x.cpu(), "reference_features": y.cpu()}, backbone.id


_PARTS = {"fid": _fid_part, "drift": _drift_part, "kid": _kid_part, "cmmd": _cmmd_part}
_OPTIONS = {"fid": {"reference", "features", "device", "batch_size"},
            "drift": {"baseline_stats", "features", "device", "batch_size"},
            "kid": {"reference", "features", "device", "batch_size", "subsets", "subset_size"},
            "cmmd": {"reference", "clip_model", "device", "batch_size", "estimator"}}


def part_file_name(test_id: str, metric: str, part: int, of: int, occurrence: int = 0) -> str:
    """The part file's name in ``diffeval-split/``: readable, unique per test, metric (and its
    ``occurrence`` in the test, for a second check of one metric) and part."""
    readable = re.sub(r"[^A-Za-z0-9_.\-]+", "_", test_id)[-80:].strip("._") or "test"
    which = f"{metric}-{occurrence + 1}" if occurrence else metric
    return f"{readable}~{digest_text(test_id, 8)}__{which}__part-{part}-of-{of}.safetensors"


def record_part(images: Any, metric: str, options: dict[str, Any], *, at_least: float | None = None,
                at_most: float | None = None, below: float | None = None) -> MetricResult:
    """On a shard: measure ``metric`` on this shard's part of a split generation, write the
    part's statistics or features, and record a ``partial`` row with the bounds the merge will
    apply (``at_least``/``at_most`` inclusive, ``below`` strict).  Returns the part's result
    (its value: the part alone measured against the whole reference, for the log only)."""
    part = info(images)
    assert part is not None
    test_id = current_test_id(images)
    if metric not in _PARTS:
        raise SplitError(f"pytest-diffeval: {test_id} is marked diffeval_split, and {metric!r} cannot be combined "
                         f"across shards (only {', '.join(SPLIT_METRICS)} can); fix: check {metric!r} in a test "
                         "without the marker")
    unknown = set(options) - _OPTIONS[metric]
    if unknown:
        raise SplitError(f"pytest-diffeval: {test_id}: option(s) {sorted(unknown)} of {metric!r} are not supported "
                         f"for a split generation (supported: {sorted(_OPTIONS[metric])}); fix: leave them out or "
                         "remove the diffeval_split marker")
    if metric == "kid" and options.get("subset_size") is not None:
        raise SplitError(f"pytest-diffeval: {test_id}: KID subset_size= is not supported for a split generation "
                         "(the merged value is the full-set estimate); fix: leave it out")
    tensors, feature_id = _PARTS[metric](images, options)
    earlier = sum(1 for r in settings.current().records
                  if (r["test"], r["metric"], r["verdict"]) == (test_id, metric, PARTIAL))
    name = part_file_name(test_id, metric, part.part, part.of, earlier)
    folder = Path(settings.current().results_dir) / FOLDER
    metadata = {"feature_id": feature_id, "written_by": WRITER, "metric": metric, "test": test_id,
                "part": str(part.part), "of": str(part.of), "total": str(part.total),
                "sample_indices": json.dumps([part.indices.start, part.indices.stop]),
                "estimator": str(options.get("estimator") or "unbiased")}
    write_statistics(tensors, folder / name, metadata)
    parsed = read_part(folder / name, folder / name)
    try:
        value, extra = combine(metric, [parsed])
    except Exception:  # noqa: BLE001 - a part too small to measure alone: the merge still can
        value, extra = 0.0, {}
    if not np.isfinite(value):  # e.g. a 1-sample part's covariance
        value, extra = 0.0, {}
    details = {"split_part": part.part, "split_of": part.of, "split_file": name, "split_total": part.total,
               "split_samples": len(part.indices), "n": len(part.indices), **extra}
    for key, bound in (("split_at_least", at_least), ("split_at_most", at_most), ("split_below", below)):
        if bound is not None:
            details[key] = float(bound)
    result = MetricResult(metric, value, feature_id, False, details=details)
    threshold = below if below is not None else (at_least if at_least is not None else at_most)
    record_check(test_id, result, images, verdict=PARTIAL, threshold=threshold)
    return result


# --------------------------------------------------------------------------- the merge: combine and judge


@dataclass
class Part:
    """One shard's stored part of a split check."""

    path: Path
    metric: str
    feature_id: str
    part: int
    of: int
    total: int
    block: range
    estimator: str
    tensors: dict[str, np.ndarray]


def read_part(path: Path, source: Path | str) -> Part:
    """A part file (safetensors, never unpickled), checked: a :class:`SplitError` naming it."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), "np") as handle:
            meta = dict(handle.metadata() or {})
            tensors = {k: handle.get_tensor(k) for k in handle.keys()}
        start, stop = json.loads(meta["sample_indices"])
        part = Part(path, meta["metric"], meta["feature_id"], int(meta["part"]), int(meta["of"]), int(meta["total"]),
                    range(int(start), int(stop)), meta.get("estimator", "unbiased"), tensors)
    except FileNotFoundError:
        raise SplitError(f"pytest-diffeval: {source}: the split part file {path} is missing; fix: {FIX} (keep the "
                         f"{FOLDER}/ folder of each shard's results directory)") from None
    except Exception as exc:  # noqa: BLE001 - truncated, not safetensors, bad metadata
        raise SplitError(f"pytest-diffeval: {source}: cannot read the split part file {path} "
                         f"({type(exc).__name__}: {exc}); fix: {FIX}") from None
    needed = STAT_KEYS + ("reference_mean", "reference_cov") if part.metric in ("fid", "drift") \
        else ("features", "reference_features")
    missing = [k for k in needed if k not in tensors]
    if meta.get("written_by") != WRITER or missing or not 1 <= part.part <= part.of:
        raise SplitError(f"pytest-diffeval: {source}: {path} is not a split part file (missing {missing}); fix: {FIX}")
    if part.metric in ("kid", "cmmd") and len(tensors["features"]) != len(part.block):
        raise SplitError(f"pytest-diffeval: {source}: {path} holds {len(tensors['features'])} feature rows for "
                         f"{len(part.block)} samples; fix: {FIX}")
    return part


def _frechet(parts: list[Part]) -> float:
    import torch


    sums = [torch.from_numpy(np.asarray(np.sum([p.tensors[k].astype(np.float64) for p in parts], axis=0)))
            for k in STAT_KEYS]
    total, cov_sum, n = sums[0], sums[1], sums[2].reshape(())
    mean = total / n
    cov = (cov_sum - n * torch.outer(mean, mean)) / (n - 1)
    reference = parts[0].tensors
    return float(_compute_fid(torch.from_numpy(reference["reference_mean"]).double(),
                              torch.from_numpy(reference["reference_cov"]).double(), mean, cov))


def combine(metric: str, parts: list[Part]) -> tuple[float, dict[str, Any]]:
    """The whole set's value from its parts, computed as a single run computes it: FID and
    drift from the summed statistics, KID (:func:`kid_mmd2`) and CMMD (:func:`cmmd_mmd2`) from
    the features joined in sample order."""
    import torch

    n = sum(len(p.block) for p in parts)
    if metric in ("fid", "drift"):
        value = _frechet(parts)
        if metric == "fid" and -1e-3 < value < 1e-9 or metric == "drift" and -1e-3 < value < 0:
            value = 0.0  # float error on (near-)identical sets, as a single run rounds it
        return value, {"n": n}
    ordered = sorted(parts, key=lambda p: p.block.start)
    x = torch.from_numpy(np.concatenate([p.tensors["features"] for p in ordered])).double()
    y = torch.from_numpy(parts[0].tensors["reference_features"]).double()
    if metric == "kid":
        return kid_mmd2(x, y), {"n": n, "n_reference": len(y), "estimator": "unbiased"}
    return cmmd_mmd2(x, y, parts[0].estimator == "unbiased"), {"n": n, "n_reference": len(y),
                                                                "estimator": parts[0].estimator}


def is_part(check: dict[str, Any]) -> bool:
    """Whether a ``metrics.json`` check is a part of a split check."""
    return check.get("verdict") == PARTIAL and isinstance(check.get("details"), dict) \
        and "split_of" in check["details"]


def merge_parts(test: str, metric: str, found: list[tuple[Path, Path, dict[str, Any]]]) -> dict[str, Any]:
    """One check from the parts ``found`` (``(results dir, its metrics.json, the part's
    check)``, one per shard): every part present once, read and checked against the others
    (same metric, features, split and reference), combined and judged by the bounds the shards
    recorded.  A :class:`SplitError` naming the file and the fix otherwise."""
    parts: list[Part] = []
    for source, path, check in found:
        details = check["details"]
        try:
            file = inside(source / FOLDER, details.get("split_file"), source=path, what="split part file",
                          fix=FIX)
        except UnsafePath as exc:
            raise SplitError(str(exc)) from None
        parts.append(read_part(file, path))
    first = parts[0]
    numbers = sorted(p.part for p in parts)
    if numbers != list(range(1, first.of + 1)):
        missing = sorted(set(range(1, first.of + 1)) - set(numbers))
        raise SplitError(f"pytest-diffeval: {test} ({metric}) is split over {first.of} shards, and the merge has parts "
                         f"{numbers}" + (f" (missing {missing})" if missing else " (some twice)") +
                         f" from {', '.join(str(s) for s, _, _ in found)}; fix: merge the results directories of all "
                         f"{first.of} shards of one run, once each")
    for part in parts[1:]:
        same = (part.metric, part.feature_id, part.of, part.total, part.estimator) == \
            (first.metric, first.feature_id, first.of, first.total, first.estimator)
        reference = "reference_mean" if metric in ("fid", "drift") else "reference_features"
        a, b = first.tensors[reference], part.tensors[reference]
        if not same or a.shape != b.shape or not np.allclose(a, b, rtol=1e-6, atol=1e-9):
            raise SplitError(f"pytest-diffeval: {test} ({metric}): part {part.part} ({part.path}) was measured with "
                             f"other features, reference or samples than part {first.part} ({first.path}); fix: "
                             f"{FIX}")
    if sum(len(p.block) for p in parts) != first.total:
        raise SplitError(f"pytest-diffeval: {test} ({metric}): the parts hold {sum(len(p.block) for p in parts)} of "
                         f"{first.total} samples; fix: {FIX}")
    value, extra = combine(metric, parts)
    template = dict(found[0][2])
    details = {k: v for k, v in template["details"].items() if not k.startswith("split_") or k in _BOUNDS}
    details.update(extra, split_parts=first.of)
    low, high, below = (details.get(k) for k in _BOUNDS)
    passed = (low is None or value >= low) and (high is None or value <= high) and (below is None or value < below)
    verdict = "pass" if passed else ("above threshold" if below is not None else "out of bounds")
    template.update(value=value, verdict=verdict, passed=passed, details=details, samples=[], images=None)
    return template


_BOUNDS = ("split_at_least", "split_at_most", "split_below")
