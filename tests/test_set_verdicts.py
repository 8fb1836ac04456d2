"""Paired set-level verdicts (pytest_diffeval.set_verdicts): FID, KID, CMMD and drift compared
over joint resamples of the baseline's and this run's per-image features."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors import safe_open
from test_baselines import baseline_files, darken

from pytest_diffeval.baselines import derive_tolerance, judge
from pytest_diffeval.metrics import get_metric
from pytest_diffeval.metrics.distribution import cmmd_mmd2, kid_mmd2
from pytest_diffeval.metrics.statistics_files import features_state
from pytest_diffeval.set_verdicts import (
    RESAMPLES,
    SetFeatures,
    _statistic,
    compare_sets,
    frechet,
    minimum_detectable_effect,
    noise_floor,
    recording_details,
)

PROMPTS, SEEDS, DIM = 32, 4, 8


def _set(seed: int = 0, shift: float = 0.0) -> tuple[SetFeatures, dict[str, np.ndarray]]:
    """A prompts x seeds feature set (each prompt its own centre) and a reference of the same design."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(PROMPTS, DIM)) * 2.0
    x = np.repeat(centres, SEEDS, 0) + rng.normal(size=(PROMPTS * SEEDS, DIM))
    y = np.repeat(centres, SEEDS, 0) + rng.normal(size=(PROMPTS * SEEDS, DIM)) + shift
    keys = [f"{s}|prompt {p}" for p in range(PROMPTS) for s in range(SEEDS)]
    return SetFeatures(x, keys), {"mean": y.mean(0), "cov": np.cov(y, rowvar=False), "features": y}


def _shifted(side: SetFeatures, share: float, by: float, seed: int = 1) -> SetFeatures:
    """``side`` with ``share`` of its images (seeded choice) moved by ``by`` in every dimension."""
    x = side.features.copy()
    chosen = np.random.default_rng(seed).permutation(len(x))[: int(round(share * len(x)))]
    x[chosen] += by
    return SetFeatures(x, side.keys)


@pytest.mark.parametrize("metric", ["fid", "kid", "cmmd", "drift"])
def test_identical_sets_pass_with_effect_zero(metric: str) -> None:
    side, reference = _set()
    c = compare_sets(metric, "f", False, 1.0, 1.0, side, side, reference, 0.0)
    assert c.verdict == "pass" and c.method == "paired-bootstrap"
    assert c.effect == pytest.approx(0.0, abs=1e-9) and c.spread == pytest.approx(0.0, abs=1e-6)
    assert c.resamples == RESAMPLES and c.n == len(side.keys)


@pytest.mark.parametrize("metric", ["fid", "kid", "cmmd", "drift"])
def test_a_planted_shift_regresses_and_one_below_the_floor_passes(metric: str) -> None:
    side, reference = _set()
    floor = noise_floor(metric, side, reference)
    assert floor > 0
    big = compare_sets(metric, "f", False, 1.0, 1.0, _shifted(side, 0.5, 3.0), side, reference, floor)
    assert big.verdict == "regressed" and -big.bound > floor, (big.effect, big.spread, floor)
    tiny = compare_sets(metric, "f", False, 1.0, 1.0, _shifted(side, 0.05, 0.05), side, reference, floor)
    assert tiny.verdict == "pass" and abs(tiny.effect) < floor, (tiny.effect, floor)


def test_rows_pair_by_sample_key_not_by_position() -> None:
    side, reference = _set()
    order = np.random.default_rng(3).permutation(len(side.keys))
    shuffled = SetFeatures(side.features[order], [side.keys[i] for i in order])
    c = compare_sets("fid", "f", False, 1.0, 1.0, shuffled, side, reference, 0.0)
    assert c.effect == pytest.approx(0.0, abs=1e-9) and c.spread == pytest.approx(0.0, abs=1e-9)


def test_the_verdict_is_seeded() -> None:
    side, reference = _set()
    other = _shifted(side, 0.2, 1.0)
    a, b = (compare_sets("kid", "f", False, 1.0, 1.0, other, side, reference, 0.0, seed=5) for _ in range(2))
    c = compare_sets("kid", "f", False, 1.0, 1.0, other, side, reference, 0.0, seed=6)
    assert (a.bound, a.spread) == (b.bound, b.spread)
    assert c.spread != a.spread and c.effect == a.effect  # another seed: other resamples, the same full-set change


@pytest.mark.parametrize("metric", ["fid", "kid", "cmmd"])
def test_the_change_is_the_metrics_own_estimator(metric: str) -> None:
    """The full-set change equals the difference of the metric's own numbers (torchmetrics'
    Fréchet distance, metrics.distribution's unbiased MMD²): the reference-only term cancels."""
    from torchmetrics.image.fid import _compute_fid

    side, reference = _set()
    other = _shifted(side, 0.3, 0.7)
    if metric == "cmmd":  # CMMD's embeddings are L2-normalised
        norm = lambda a: a / np.linalg.norm(a, axis=1, keepdims=True)  # noqa: E731
        side, other = SetFeatures(norm(side.features), side.keys), SetFeatures(norm(other.features), other.keys)
        reference = {**reference, "features": norm(reference["features"])}

    def own(x: np.ndarray) -> float:
        t, y = torch.as_tensor(x), torch.as_tensor(reference["features"])
        if metric == "fid":
            return float(_compute_fid(torch.as_tensor(reference["mean"]), torch.as_tensor(reference["cov"]),
                                      t.mean(0), torch.cov(t.T)))
        return kid_mmd2(t, y) if metric == "kid" else cmmd_mmd2(t, y)

    c = compare_sets(metric, "f", False, 1.0, 1.0, other, side, reference, 0.0)
    assert -c.effect == pytest.approx(own(other.features) - own(side.features), rel=1e-6, abs=1e-9)
    full = np.arange(len(side.keys))
    if metric == "fid":
        assert _statistic("fid", reference, "unbiased")(side.features)(full) == pytest.approx(own(side.features))
        assert frechet(reference["mean"], reference["cov"], side.features.mean(0),
                       np.cov(side.features, rowvar=False)) == pytest.approx(own(side.features))


def test_recording_details_and_tolerance_come_from_noise() -> None:
    side, reference = _set()
    state = features_state(side.features, side.keys, "f", {"features": reference["features"]})
    details = recording_details("kid", state)
    assert details["noise_floor"] == noise_floor("kid", side, reference) and details["resamples"] == RESAMPLES
    entry = {"value": 0.5, "details": {"n": 128, **details}}
    tolerance, source = derive_tolerance(get_metric("kid"), entry, None)
    assert tolerance == details["noise_floor"] and "seed-redraw noise at N=128" in source
    mde = minimum_detectable_effect("kid", side, reference, details["noise_floor"], shares=(0.5,))
    assert mde["share"] in (None, 0.5) and mde["n"] == len(side.keys)


def test_an_old_format_entry_compares_values_and_says_how_to_upgrade() -> None:
    """A set-level entry recorded before per-image features were stored: the old rule, by value."""
    side, reference = _set()
    signature = {"metric": "fid"}
    entry = {"value": 4.8, "signature": signature, "details": {"spread": 0.1}}
    record = {"metric": "fid", "backbone": "f", "higher_is_better": False, "value": 5.5, "signature": signature,
              "provenance": {"device": "cpu", "dtype": "torch.float32"},
              "_state": features_state(side.features, side.keys, "f", {"mean": reference["mean"],
                                                                        "cov": reference["cov"]})}
    comparison = judge(record, {"hardware": {"cpu/float32": entry}}, None)
    assert comparison.method == "value" and comparison.verdict == "regressed"  # 0.7 > 10% of 4.8
    assert "pytest --snapshot-update" in comparison.hint and "per-image features" in comparison.hint


SET_TEST = """
import numpy as np
from conftest import PIPE, CLIP
from pytest_diffeval import ImageSet
from pytest_diffeval.embedded.data import make_images

PROMPTS = ["a red digit 3 on a blue background", "a green circle left of a red square", "a photo of a cat"]

def test_sets(generate, diffeval_baseline):
    images = generate(PIPE, PROMPTS, seeds=range(4), num_inference_steps=2)
    pixels, captions = make_images(12, seed=0, split="heldout")  # real images: the model cannot move them
    reference = ImageSet(images=np.ascontiguousarray(pixels), prompts=captions, seeds=[0] * 12)
    diffeval_baseline.assert_no_regression(images, "fid", reference=reference, features="clip:" + CLIP)
    diffeval_baseline.assert_no_regression(images, "cmmd", reference=reference)
"""


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_a_set_level_baseline_stores_features_and_compares_paired(project: pytest.Pytester) -> None:
    """Record FID and CMMD with their per-image features, compare paired, catch a change, read
    an old-format entry by value (with the upgrade hint) and upgrade it with --snapshot-update."""
    project.makepyfile(test_user=SET_TEST)
    recorded = project.runpytest("--snapshot-update")
    recorded.assert_outcomes(passed=1)
    [file] = baseline_files(project)
    data = json.loads(file.read_text())
    for metric in ("fid", "cmmd"):  # what each recorded baseline protects, printed at recording
        details = data["checks"][metric]["hardware"]["cpu/float32"]["details"]
        [line] = [line for line in recorded.outlines if f" {metric}: noise floor " in line]
        assert f"noise floor {details['noise_floor']:.4g};" in line and "at N=12" in line
        assert ("detects >= " in line) == (details.get("mde_share") is not None)
    for metric in ("fid", "cmmd"):
        details = data["checks"][metric]["hardware"]["cpu/float32"]["details"]
        assert details["noise_floor"] > 0 and details["resamples"] == RESAMPLES
        features = file.parent / details["statistics_file"]
        assert features.name.endswith(f".{details['statistics_sha256']}.safetensors")
        with safe_open(str(features), "np") as handle:
            keys = json.loads(handle.metadata()["sample_keys"])
            assert handle.get_tensor("features").shape[0] == len(keys) == 12
    project.runpytest().assert_outcomes(passed=1)  # the same images: change 0

    old = json.loads(file.read_text())
    for metric in ("fid", "cmmd"):  # an entry recorded before per-image features were stored
        del old["checks"][metric]["hardware"]["cpu/float32"]["details"]["noise_floor"]
    file.write_text(json.dumps(old, indent=2))
    project.runpytest().assert_outcomes(passed=1)
    project.runpytest("--snapshot-update").assert_outcomes(passed=1)
    upgraded = json.loads(file.read_text())
    assert all("noise_floor" in upgraded["checks"][m]["hardware"]["cpu/float32"]["details"] for m in ("fid", "cmmd"))

    darken(project.path / "model")
    failed = project.runpytest()
    failed.assert_outcomes(failed=1)
    out = failed.stdout.str()
    assert "fid regressed against the baseline" in out and "joint resamples" in out and "noise floor" in out
