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

The benign side (``--benign-seeds K``): the shipped model with every UNet tensor perturbed
by 0.05 x its std of seeded Gaussian noise (seeds 0..K-1; a change too small to matter),
all images its own, through the same checks: every check must pass.  ``--baselines DIR``
compares with the baselines in DIR instead of ``baselines/`` (e.g. freshly recorded ones).
``--benign-variants`` adds the shipped model itself generated with 1 and 2 torch threads and
batch sizes 1 and 16 (``tests/test_embedded_suite.py``'s variations; bit-close images).

The frontier (``--frontier``): every paired set-level comparison (fid, kid, cmmd, drift) is
kept as ``(effect, sd, tolerance)`` and re-decided by ``frontier.py`` for tolerance
multipliers ``--ks`` (x the noise floor) and bound confidences ``--zs`` (sd), without
computing anything again: per ``(k, z)`` the benign false alarms out of the benign
comparisons and each check's first share caught.  The row ``k = 1, z = 1.645`` is the shipped
rule and must agree with the verdicts above (checked).  Use with ``--benign-seeds 6
--benign-variants --shares 0 0.025 0.05 0.1 0.2 0.3 0.5``.

Prints a table (check x share -> pass/FAIL with the measured value), the perturbed models'
failed checks, with ``--frontier`` its table and one line ``frontier: {json}``, and, last,
one JSON line ``{"n": 128, "failed": {"0.0": [...], ...}, "benign": {"0": [...], ...}}``.
Nothing here is a test.  On a shared machine run it with ``OMP_NUM_THREADS=1`` (the frontier
run above: 37 min wall, 738 s CPU on 2 loaded cores; with torch's default 2 threads it made
almost no progress in 11 min).
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

from frontier import Observation, dominates, format_frontier, frontier, zero_false_alarm_points  # noqa: E402
from syrupy.data import Snapshot, SnapshotCollection  # noqa: E402

import pytest_diffeval.embedded.metrics  # noqa: E402,F401  registers digit_match / colour_match
from pytest_diffeval import ImageSet, compute_metric, generate_images, load_pipeline, settings  # noqa: E402
from pytest_diffeval.baselines import (  # noqa: E402
    DiffevalBaselineExtension,
    build_record,
    judge,
    read_baseline_file,
    statistics_file_for,
)
from pytest_diffeval.embedded.data import HELDOUT_PROMPTS, make_images  # noqa: E402
from pytest_diffeval.hardware import hardware_key  # noqa: E402
from pytest_diffeval.metrics import get_metric  # noqa: E402
from pytest_diffeval.set_verdicts import METHOD as PAIRED  # noqa: E402
from pytest_diffeval.set_verdicts import Z_ONE_SIDED, recording_details  # noqa: E402
from pytest_diffeval.verdicts import Comparison  # noqa: E402

MODEL, BAD_MODEL = "diffeval/tiny-t2i", "diffeval/tiny-t2i-undertrained"
SAMPLING = {"num_inference_steps": 20, "guidance_scale": 2.0}  # model_tests/conftest.py
BASELINES = ROOT / "baselines"  # --baselines
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


# --frontier: every paired set-level comparison's (effect, sd, tolerance), keyed by the table's column
OBSERVED: list[Observation] = []
# --benign-variants: (name, torch threads, batch size) of the shipped model itself
VARIANTS = [("threads=1", 1, 8), ("threads=2", 2, 8), ("batch_size=1", None, 1), ("batch_size=16", None, 16)]


def baseline_check(stem: str, images: ImageSet, metric: str, options: dict[str, Any],
                   column: Any = None) -> tuple[bool, str, str]:
    """One ``assert_no_regression`` check, the way ``DiffevalBaseline._check`` runs it:
    (passed, the value measured, the tolerance and the verdict's method).  A paired set-level
    comparison is also kept in ``OBSERVED`` under ``column`` (the frontier's input)."""
    path = BASELINES / "test_embedded_t2i" / f"{stem}.json"
    stored = read_baseline_file(path)["checks"][metric]
    extra: dict[str, Any] = {}
    stats = statistics_file_for(path, metric, hardware_key(images.provenance))
    if get_metric(metric).keeps_state and stats is not None and stats.is_file():  # drift's statistics
        extra["baseline_stats"] = stats
    result = compute_metric(metric, images, **options, **extra)
    record = build_record(result, images, options)
    if result.state is not None:  # set-level: this run's per-image features, for the paired verdict
        record["_state"] = result.state
    outcome = judge(record, stored, None, path)
    if not isinstance(outcome, Comparison):
        raise SystemExit(f"{stem} {metric}: the committed baseline cannot be compared: {outcome!r}")
    if outcome.method == PAIRED and column is not None:
        OBSERVED.append(Observation(metric, column, float(outcome.effect), float(outcome.spread or 0.0),
                                    float(outcome.tolerance)))
    return outcome.passed, f"{outcome.value:.4g}", f"{outcome.tolerance:.3g} ({outcome.method})"


def bound_check(images: ImageSet, metric: str, kind: str, bound: float,
                options: dict[str, Any]) -> tuple[bool, str, str]:
    """One absolute bound of the tests (``assert_metric`` / ``assert_fid_below``)."""
    value = compute_metric(metric, images, **options).value
    return (value >= bound if kind == ">=" else value < bound), f"{value:.4g}", "absolute bound"


def perturbed(pipe: Any, scale: float, seed: int) -> Any:
    """``pipe`` with every floating UNet tensor (more than one element) moved by ``scale`` x its
    std of seeded Gaussian noise, in memory (``tiny.perturb_weights`` does it on disk)."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in pipe.unet.state_dict(keep_vars=True).values():
            if tensor.is_floating_point() and tensor.numel() > 1:
                noise = torch.randn(tensor.shape, generator=generator, dtype=torch.float32)
                tensor.add_((scale * tensor.float().std() * noise).to(tensor.dtype))
    return pipe


def run_checks(full: ImageSet, bad: ImageSet | None, share: float, seed: int, reference: ImageSet,
               rows: dict[str, dict[Any, tuple[bool, str, str]]], column: Any) -> None:
    """Every check of the two tests on ``full`` with ``share`` of it replaced by ``bad``."""
    for index, (stem, seeds, checks, bounds) in enumerate(TESTS):
        keep = [i for i, s in enumerate(full.seeds) if s in set(seeds)]  # prompt-major order is kept
        good = full.subset(keep)
        images = mixed(good, bad.subset(keep), share, seed + index) if bad is not None else good
        for metric in checks:
            options = {"reference": reference} if metric in ("fid", "kid", "cmmd") else {}
            rows.setdefault(metric, {})[column] = baseline_check(stem, images, metric, options, column)
        for metric, kind, bound in bounds:
            options = {"reference": reference} if metric == "fid" else {}
            rows.setdefault(f"{metric}{kind}{bound:g}", {})[column] = bound_check(images, metric, kind, bound, options)


def generated(model: str, folder: Path | None) -> ImageSet:
    """``model``'s images of the distribution set; with ``--images FOLDER`` kept there (pixels as
    .npy, the rest as JSON: no pickle) and read back on the next run."""
    stem = model.replace("/", "--")
    if folder is not None and (folder / f"{stem}.npy").is_file():
        meta = json.loads((folder / f"{stem}.json").read_text())
        return ImageSet(images=np.load(folder / f"{stem}.npy"), **meta)
    images = generate_images(load_pipeline(model), HELDOUT_PROMPTS, seeds=range(4), **SAMPLING)
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
        np.save(folder / f"{stem}.npy", images.images)
        (folder / f"{stem}.json").write_text(json.dumps({"prompts": images.prompts, "seeds": images.seeds,
                                                         "call_kwargs": images.call_kwargs,
                                                         "provenance": images.provenance}, default=str))
    return images


def record_baselines(folder: Path, images: ImageSet, reference: ImageSet) -> None:
    """Record the distribution test's set-level entries in ``folder`` (a copy of ``baselines/``)
    from the shipped model's ``images``, through the plugin's own code: what ``pytest
    model_tests/ --snapshot-update`` records for them (per-image features, noise floor, minimum
    detectable effect), without a pytest run."""
    stem, _, checks, _ = TESTS[1]
    path = folder / "test_embedded_t2i" / f"{stem}.json"
    collection = SnapshotCollection(location=str(path))
    for metric in checks:
        options = {"reference": reference} if metric in ("fid", "kid", "cmmd") else {}
        result = compute_metric(metric, images, **options)
        extra = recording_details(metric, result.state, higher_is_better=result.higher_is_better,
                                  estimator=str(result.details.get("estimator", "unbiased")))
        result = dataclasses.replace(result, details={**result.details, **extra})
        record = {**build_record(result, images, options), "_state": result.state,
                  "_test": f"test_embedded_t2i.py::{stem}"}
        collection.add(Snapshot(name=f"{stem}[{metric}]", data=record))
        print(f"recorded {metric} = {result.value:.4g}: noise floor {extra.get('noise_floor', float('nan')):.4g}, "
              f"detects >= {extra.get('mde_share')} mismatched images (change {extra.get('mde_change')})")
    DiffevalBaselineExtension.write_snapshot_collection(snapshot_collection=collection)


def print_frontier(rows: dict[str, dict[Any, tuple[bool, str, str]]], shares: list[float], ks: list[float],
                   zs: list[float]) -> None:
    """The frontier table and its JSON line (see the module doc); checks that the shipped
    rule's row agrees with the verdicts actually taken."""
    table = frontier(OBSERVED, ks, zs)
    benign = sorted({o.variant for o in OBSERVED if isinstance(o.variant, str)})
    print(f"== frontier of the paired set-level rule: regressed when effect + z*sd < -k*floor; false alarms over "
          f"{len(benign)} benign runs x {len(table[0]['checks']) if table else 0} checks; a cell is the first share "
          f"caught from which every larger share is caught (that check's false alarms)")
    for line in format_frontier(table):
        print(line)
    for o in OBSERVED:  # the shipped rule, re-decided, must be the verdict taken
        if not isinstance(o.variant, str) and (o.effect + Z_ONE_SIDED * o.sd < -o.tolerance) == rows[o.check][o.variant][0]:
            print(f"WARNING: the frontier's re-decision of {o.check} at {o.variant} disagrees with the verdict")
    admissible = zero_false_alarm_points(table)
    shipped = next((r for r in table if r["k"] == 1.0 and abs(r["z"] - Z_ONE_SIDED) < 1e-9), None)
    better = [r for r in admissible if shipped is not None and dominates(r, shipped)]
    print("zero-false-alarm rules catching more than the shipped one: " + (", ".join(
        f"k={r['k']:g} z={r['z']:.3g}" for r in better) or "none"))
    spread = {f"{o.check}@{o.variant}": [round(o.effect, 5), round(o.sd, 5), round(o.tolerance, 5)] for o in OBSERVED}
    print("frontier: " + json.dumps({"shares": shares, "rows": table, "better_than_shipped": [
        {"k": r["k"], "z": r["z"]} for r in better], "observed (effect, sd, tolerance)": spread}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shares", type=float, nargs="+", default=[0.0, 0.025, 0.05, 0.1, 0.2])
    parser.add_argument("--seed", type=int, default=0, help="seed of the choice of replaced images")
    parser.add_argument("--benign-seeds", type=int, default=1, help="perturbed models (0.05 x std UNet noise) to run")
    parser.add_argument("--benign-variants", action="store_true",
                        help="also the shipped model with 1/2 torch threads and batch sizes 1/16 (benign)")
    parser.add_argument("--frontier", action="store_true",
                        help="re-decide the paired set-level comparisons for --ks x --zs (false alarms vs share caught)")
    parser.add_argument("--ks", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 1.0, 1.5],
                        help="tolerance multipliers of the noise floor (--frontier)")
    parser.add_argument("--zs", type=float, nargs="+", default=[Z_ONE_SIDED, 1.0, 0.0],
                        help="bound confidences in sd (--frontier; 1.645 is the shipped one-sided 95%%)")
    parser.add_argument("--baselines", type=Path, default=BASELINES, help="baselines folder to compare with")
    parser.add_argument("--images", type=Path, default=None,
                        help="folder keeping the generated images between runs (generated when absent)")
    parser.add_argument("--record", action="store_true",
                        help="first record the distribution test's entries into --baselines (a copy: not baselines/)")
    args = parser.parse_args()
    globals()["BASELINES"] = args.baselines
    start, cpu = time.perf_counter(), time.process_time()
    settings.push(settings.Settings(clip_model="diffeval/tiny-clip", fid_features="clip:diffeval/tiny-clip",
                                    baselines_dir=ROOT / "baselines", result_cache=False))
    full = {}
    for model in (MODEL, BAD_MODEL):
        full[model] = generated(model, args.images)
    reference = reference_set()
    if args.record:
        if args.baselines.resolve() == (ROOT / "baselines").resolve():
            raise SystemExit("--record writes into --baselines: name a copy, not the committed baselines/")
        record_baselines(args.baselines, full[MODEL], reference)
    rows: dict[str, dict[Any, tuple[bool, str, str]]] = {}
    for share in args.shares:
        run_checks(full[MODEL], full[BAD_MODEL], share, args.seed, reference, rows, share)
    n = len(full[MODEL])
    print(f"== sensitivity of the release suite's baseline checks (n={n} distribution set, "
          f"{n // 2} paired set; replaced by {BAD_MODEL}, choice seed {args.seed})")
    width = max(len(k) for k in rows) + 2
    print(f"{'check':<{width}}{'tolerance (verdict)':<24}" + "".join(f"{f'{s:.1%} bad':>14}" for s in args.shares))
    for name, cells in rows.items():
        print(f"{name:<{width}}{cells[args.shares[0]][2]:<24}" + "".join(
            f"{('pass ' if ok else 'FAIL ') + text:>14}" for ok, text, _ in (cells[s] for s in args.shares)))
    benign: dict[str, list[str]] = {}
    runs: list[tuple[str, str, Any, dict[str, Any]]] = [
        (str(seed), f"UNet + 0.05 x std noise (seed {seed})", seed, {}) for seed in range(args.benign_seeds)]
    if args.benign_variants:
        runs += [(name, f"the shipped model, {name}", None, {"threads": t, "batch_size": b}) for name, t, b in VARIANTS]
    import torch

    for key, label, seed, variation in runs:
        pipe = load_pipeline(MODEL)
        threads = torch.get_num_threads()
        if variation.get("threads"):
            torch.set_num_threads(variation["threads"])
        try:
            images = generate_images(pipe if seed is None else perturbed(pipe, 0.05, seed), HELDOUT_PROMPTS,
                                     seeds=range(4), batch_size=variation.get("batch_size", 8), **SAMPLING)
        finally:
            torch.set_num_threads(threads)
        images = dataclasses.replace(images, provenance=full[MODEL].provenance)  # the shipped model's signature
        benign_rows: dict[str, dict[Any, tuple[bool, str, str]]] = {}
        column = f"benign {key}"
        run_checks(images, None, 0.0, 0, reference, benign_rows, column)
        benign[key] = [name for name, cells in benign_rows.items() if not cells[column][0]]
        print(f"benign: {label}: " + ", ".join(
            f"{name} {'pass' if cells[column][0] else 'FAIL'} {cells[column][1]}" for name, cells in benign_rows.items()))
    if args.frontier:
        print_frontier(rows, args.shares, args.ks, args.zs)
    print(f"   {time.perf_counter() - start:.0f} s wall, {time.process_time() - cpu:.0f} s CPU")
    failed = {str(s): [name for name, cells in rows.items() if not cells[s][0]] for s in args.shares}
    print(json.dumps({"n": n, "failed": failed, "benign": benign}))


if __name__ == "__main__":
    main()
