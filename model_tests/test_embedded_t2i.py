"""Release suite of the embedded text-to-image model (``diffeval/tiny-t2i``), written the
way we want users to write theirs:

* per-prompt expectations: each prompt gets a readable test with absolute floors;
* set-level checks against the stored baseline (paired, per (prompt, seed));
* distribution checks against held-out real images (FID, KID, CMMD);
* a guidance-scale sweep.

All prompts are held out: their (digit, colour, colour) combinations never occur in
training.  Floors are derived from measurements (README, "The embedded model").
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import MODEL, SAMPLING

from pytest_diffeval import assert_clip_score_at_least, assert_fid_below, assert_metric, compute_metric
from pytest_diffeval.embedded.data import HELDOUT_PROMPTS

# The tiny CLIP scores real images with their own captions ~87 and with shuffled
# captions ~2 (scripts/quality_report.py); a floor halfway catches images that do not
# show their prompt while leaving room for seed noise.
CLIP_FLOOR = 45.0
# Quality bars of the shipped model (issue: >= 80% digits, >= 95% colours over the
# held-out set); per prompt, 3 of 4 seeds.
DIGIT_FLOOR, COLOUR_FLOOR, PER_PROMPT_FLOOR = 0.80, 0.95, 0.75
# FID in tiny-CLIP feature space against 128 real held-out images: the good model
# measures ~FID_GOOD (README); the ceiling is twice that.
FID_CEILING = 20.0


@pytest.mark.parametrize("prompt", HELDOUT_PROMPTS[::4])
def test_prompt_is_followed(generate, prompt):
    images = generate(MODEL, [prompt], seeds=range(4), **SAMPLING)
    assert_clip_score_at_least(images, CLIP_FLOOR)
    assert_metric(images, "digit_match", at_least=PER_PROMPT_FLOOR)
    assert_metric(images, "colour_match", at_least=PER_PROMPT_FLOOR)


def test_heldout_prompts_against_baseline(generate, diffeval_baseline):
    images = generate(MODEL, HELDOUT_PROMPTS, seeds=range(2), **SAMPLING)  # 64 images
    diffeval_baseline.assert_no_regression(images, ["clip_score", "digit_match", "colour_match"])
    assert_metric(images, "digit_match", at_least=DIGIT_FLOOR)
    assert_metric(images, "colour_match", at_least=COLOUR_FLOOR)


def test_distribution_matches_heldout_real_images(generate, heldout_real, diffeval_baseline):
    images = generate(MODEL, HELDOUT_PROMPTS, seeds=range(4), **SAMPLING)  # 128 images
    diffeval_baseline.assert_no_regression(images, ["fid", "kid", "cmmd"], reference=heldout_real)
    assert_fid_below(images, heldout_real, FID_CEILING)


def test_guidance_sweep_improves_alignment(generate, diffeval_baseline):
    """Classifier-free guidance must help: CLIP score rises from no guidance (1) to the
    shipped setting (5), and the shipped setting meets the floor."""
    prompts = HELDOUT_PROMPTS[::2]
    scores = {}
    for scale in (1.0, 3.0, 5.0):
        images = generate(MODEL, prompts, seeds=[0], num_inference_steps=SAMPLING["num_inference_steps"],
                          guidance_scale=scale)
        scores[scale] = compute_metric("clip_score", images).per_sample
    gain = scores[5.0] - scores[1.0]
    assert gain.mean() > 0, f"guidance 5 should align better than no guidance: mean gain {gain.mean():.2f}"
    assert np.mean(scores[5.0]) >= CLIP_FLOOR
    diffeval_baseline.assert_no_regression(images, "clip_score")
