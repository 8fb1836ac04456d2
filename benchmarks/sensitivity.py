"""Power of the release suite's baseline checks: which checks fail when a share of the
images comes from a worse model (issue 17's figure).

    python benchmarks/sensitivity.py [--shares 0 0.025 0.05 0.1 0.2] [--seed 0]

Generates the sets of ``test_heldout_prompts_against_baseline`` (32 held-out prompts x 2
seeds) and ``test_distribution_matches_heldout_real_images`` (x 4 seeds) with the shipped
model ``diffeval/tiny-t2i`` and with ``diffeval/tiny-t2i-undertrained`` (same prompts,
seeds and sampling as ``model_tests/``), once each, kept in memory.  For every share p it
replaces ``round(p * n)`` images of each set, chosen with a seeded RNG (nested: a larger
share keeps the smaller one's images), by the under-trained model's image of the same
(prompt, seed), and runs every check of the two tests through the plugin's own code:
``compute_metric`` + ``baselines.judge`` against the committed baselines in
``baselines/`` (derived tolerances, as in the suite), and the tests' absolute bounds
(``colour_match >= 0.95``, ``digit_match >= 0.80``, ``fid < 10``).  The mixed set keeps
the shipped model's provenance, so every signature matches the baseline's.

Prints a table (check x share -> pass/FAIL with the measured value) and, last, one JSON
line ``{"n": 128, "failed": {"0.0": [...], ...}}``.  Nothing here is a test.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import pytest_diffeval.embedded.metrics  # noqa: E402,F401  registers digit_match / colour_match
from pytest_diffeval import ImageSet, compute_metric, generate_images, load_pipeline, settings  # noqa: E402
from pytest_diffeval.baselines import build_record, judge, read_baseline_file, statistics_file_for  # noqa: E402
from pytest_diffeval.embedded.data import HELDOUT_PROMPTS, make_images  # noqa: E402
from pytest_diffeval.hardware import hardware_key  # noqa: E402
from pytest_diffeval.verdicts import Comparison  # noqa: E402

MODEL, BAD_MODEL = "diffeval/tiny-t2i", "diffeval/tiny-t2i-undertrained"
SAMPLING = {"num_inference_steps": 20, "guidance_scale": 2.0}  # model_tests/conftest.py
BASELINES = ROOT / "baselines" / "test_embedded_t2i"
# model_tests/test_embedded_t2i.py: the absolute bounds of the two tests
COLOUR_FLOOR, DIGIT_FLOOR, FID_CEILING = 0.95, 0.80, 10.0
# (baseline file stem, seeds, baseline checks, absolute bounds (metric, kind, bound))
TESTS = [
    ("test_heldout_prompts_against_baseline", range(2), ["clip_score", "digit_match", "colour_match"],
     [("colour_match", ">=", COLOUR_FLOOR), ("digit_match", ">=", DIGIT_FLOOR)]),
    ("test_distribution_matches_heldout_real_images", range(4), ["fid", "kid", "cmmd", "drift"],
     [("fid", "<", FID_CEILING)]),
]


def reference_set() -> ImageSet:
    """The held-out real images of ``model_tests/conftest.py::heldout_real``."""
    images, captions = make_images(128, seed=0, split="heldout")
    return ImageSet(images=np.ascontiguousarray(images), prompts=captions, seeds=[0] * len(captions))


def mixed(good: ImageSet, bad: ImageSet, share: float, seed: int) -> ImageSet:
    """``good`` with ``round(share * n)`` images (seeded choice) replaced by ``bad``'s image of
    the same (prompt, seed); the provenance stays ``good``'s."""
    assert good.sample_keys == bad.sample_keys
    order = np.random.default_rng(seed).permutation(len(good))
    images = good.images.copy()
    chosen = order[: int(round(share * len(good)))]
    images[chosen] = bad.images[chosen]
    return dataclasses.replace(good, images=images)


def baseline_check(stem: str, images: ImageSet, metric: str, options: dict[str, Any]) -> tuple[bool, str, str]:
    """One ``assert_no_regression`` check, the way ``DiffevalBaseline._check`` runs it:
    (passed, the value measured, the tolerance and the verdict's method)."""
    path = BASELINES / f"{stem}.json"
    stored = read_baseline_file(path)["checks"][metric]
    extra: dict[str, Any] = {}
    stats = statistics_file_for(path, metric, hardware_key(images.provenance))
    if stats is not None and stats.is_file():
        extra["baseline_stats"] = stats
    result = compute_metric(metric, images, **options, **extra)
    outcome = judge(build_record(result, images, options), stored, None)
    if not isinstance(outcome, Comparison):
        raise SystemExit(f"{stem} {metric}: the committed baseline cannot be compared: {outcome!r}")
    return outcome.passed, f"{outcome.value:.4g}", f"{outcome.tolerance:.3g} ({outcome.method})"


def bound_check(images: ImageSet, metric: str, kind: str, bound: float,
                options: dict[str, Any]) -> tuple[bool, str, str]:
    """One absolute bound of the tests (``assert_metric`` / ``assert_fid_below``)."""
    value = compute_metric(metric, images, **options).value
    return (value >= bound if kind == ">=" else value < bound), f"{value:.4g}", "absolute bound"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shares", type=float, nargs="+", default=[0.0, 0.025, 0.05, 0.1, 0.2])
    parser.add_argument("--seed", type=int, default=0, help="seed of the choice of replaced images")
    args = parser.parse_args()
    start, cpu = time.perf_counter(), time.process_time()
    settings.push(settings.Settings(clip_model="diffeval/tiny-clip", fid_features="clip:diffeval/tiny-clip",
                                    baselines_dir=ROOT / "baselines", result_cache=False))
    full = {}
    for model in (MODEL, BAD_MODEL):
        pipe = load_pipeline(model)
        full[model] = generate_images(pipe, HELDOUT_PROMPTS, seeds=range(4), **SAMPLING)
    reference = reference_set()
    rows: dict[str, dict[float, tuple[bool, str, str]]] = {}
    for index, (stem, seeds, checks, bounds) in enumerate(TESTS):
        keep = [i for i, s in enumerate(full[MODEL].seeds) if s in set(seeds)]  # prompt-major order is kept
        good, bad = full[MODEL].subset(keep), full[BAD_MODEL].subset(keep)
        for share in args.shares:
            images = mixed(good, bad, share, args.seed + index)
            for metric in checks:
                options = {"reference": reference} if metric in ("fid", "kid", "cmmd") else {}
                rows.setdefault(metric, {})[share] = baseline_check(stem, images, metric, options)
            for metric, kind, bound in bounds:
                options = {"reference": reference} if metric == "fid" else {}
                rows.setdefault(f"{metric}{kind}{bound:g}", {})[share] = bound_check(images, metric, kind, bound,
                                                                                    options)
    n = len(full[MODEL])
    print(f"== sensitivity of the release suite's baseline checks (n={n} distribution set, "
          f"{n // 2} paired set; replaced by {BAD_MODEL}, choice seed {args.seed})")
    width = max(len(k) for k in rows) + 2
    print(f"{'check':<{width}}{'tolerance (verdict)':<24}" + "".join(f"{f'{s:.1%} bad':>14}" for s in args.shares))
    for name, cells in rows.items():
        print(f"{name:<{width}}{cells[args.shares[0]][2]:<24}" + "".join(
            f"{('pass ' if ok else 'FAIL ') + text:>14}" for ok, text, _ in (cells[s] for s in args.shares)))
    print(f"   {time.perf_counter() - start:.0f} s wall, {time.process_time() - cpu:.0f} s CPU")
    failed = {str(s): [name for name, cells in rows.items() if not cells[s][0]] for s in args.shares}
    print(json.dumps({"n": n, "failed": failed}))


if __name__ == "__main__":
    main()
