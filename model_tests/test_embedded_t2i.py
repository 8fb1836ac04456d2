"""Release suite of the embedded text-to-image model (``diffeval/tiny-t2i``), written the
way we want users to write theirs:

* per-prompt expectations: each prompt gets a readable test with absolute floors;
* set-level checks against the stored baseline (paired, per (prompt, seed));
* distribution checks against held-out real images (FID, KID, CMMD) and against the
  baseline's own images (drift);
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

# Measured on the shipped model (README, "The embedded model"; scripts/quality_report.py):
# over the 32 held-out prompts x 2 seeds at guidance 2, tiny-CLIP scores images 87.6 with
# their own prompts and -7 with shuffled ones; the worst prompt averages 74.5 (over 4
# seeds: 77.5).  The floor sits halfway between mismatched and matched captions, so it
# catches images that do not show their prompt, with room for seed noise.
CLIP_FLOOR = 40.0
# The independent checker: colours 100%, digits 95.3% of the 64 held-out images (96.9% of
# 128); quality bars >= 95% and >= 80%.  Per prompt (4 seeds): colours on 3 of 4 seeds,
# the digit on 2 of 4 (measured: every prompt 3 or 4 of 4).
COLOUR_FLOOR, DIGIT_FLOOR = 0.95, 0.80
PER_PROMPT_COLOUR_FLOOR, PER_PROMPT_DIGIT_FLOOR = 0.75, 0.5
# FID in tiny-CLIP feature space against 128 real held-out images; the ceiling is about
# twice what the shipped model measures (README).
FID_CEILING = 10.0  # measured 4.8 (bootstrap spread 0.95)
# Prompt alignment asked of the embedded VLM (diffeval/tiny-vlm, through the transformers code path a
# real VLM uses; questions generated from each prompt's digit, stroke and background colour).  Measured
# over the 32 held-out prompts x 2 seeds with the tiny-vlm of 15:35 UTC: vqa_score 0.970, soft_tifa 0.961;
# the undertrained checkpoint 0.065 and 0.313 (both caught, paired and by the floors, which sit between).
VLM = "diffeval/tiny-vlm"
VQA_FLOOR, SOFT_TIFA_FLOOR = 0.80, 0.80


@pytest.mark.diffeval_plan(MODEL, HELDOUT_PROMPTS[::4], seeds=range(4), **SAMPLING)  # one batched generation
@pytest.mark.parametrize("prompt", HELDOUT_PROMPTS[::4])
def test_prompt_is_followed(generate, prompt):
    images = generate(MODEL, [prompt], seeds=range(4), **SAMPLING)
    assert_clip_score_at_least(images, CLIP_FLOOR)
    assert_metric(images, "colour_match", at_least=PER_PROMPT_COLOUR_FLOOR)
    assert_metric(images, "digit_match", at_least=PER_PROMPT_DIGIT_FLOOR)


@pytest.mark.diffeval_plan(MODEL, HELDOUT_PROMPTS, seeds=range(2), **SAMPLING)  # declared: idle xdist workers help
def test_heldout_prompts_against_baseline(generate, diffeval_baseline):
    images = generate(MODEL, HELDOUT_PROMPTS, seeds=range(2), **SAMPLING)  # 64 images
    diffeval_baseline.assert_no_regression(images, ["clip_score", "digit_match", "colour_match"])
    diffeval_baseline.assert_no_regression(images, ["vqa_score", "soft_tifa"], vqa_model=VLM)
    assert_metric(images, "colour_match", at_least=COLOUR_FLOOR)
    assert_metric(images, "digit_match", at_least=DIGIT_FLOOR)
    assert_metric(images, "vqa_score", at_least=VQA_FLOOR, vqa_model=VLM)
    assert_metric(images, "soft_tifa", at_least=SOFT_TIFA_FLOOR, vqa_model=VLM)


@pytest.mark.diffeval_plan(MODEL, HELDOUT_PROMPTS, seeds=range(4), **SAMPLING)
def test_distribution_matches_heldout_real_images(generate, heldout_real, diffeval_baseline):
    images = generate(MODEL, HELDOUT_PROMPTS, seeds=range(4), **SAMPLING)  # 128 images
    diffeval_baseline.assert_no_regression(images, ["fid", "kid", "cmmd"], reference=heldout_real)
    diffeval_baseline.assert_no_regression(images, "drift")  # vs the baseline's own images: no reference needed
    assert_fid_below(images, heldout_real, FID_CEILING)


def test_guidance_sweep(generate, diffeval_baseline):
    """Classifier-free guidance must help, and too much must not be the default: CLIP score
    rises from no guidance (1) to the shipped setting (2), which meets the floor (measured:
    86.2 -> 88.0; at 3 it falls to 74.8 as over-saturated colours appear, and the checker's
    digit agreement goes 85% -> 97% -> 66%)."""
    prompts = HELDOUT_PROMPTS[::2]
    scores = {}
    for scale in (1.0, SAMPLING["guidance_scale"]):
        images = generate(MODEL, prompts, seeds=[0], num_inference_steps=SAMPLING["num_inference_steps"],
                          guidance_scale=scale)
        scores[scale] = compute_metric("clip_score", images).per_sample
    gain = scores[SAMPLING["guidance_scale"]] - scores[1.0]
    assert gain.mean() > 0, f"guidance {SAMPLING['guidance_scale']} should align better than none: mean gain {gain.mean():.2f}"
    assert np.mean(scores[SAMPLING["guidance_scale"]]) >= CLIP_FLOOR
    diffeval_baseline.assert_no_regression(images, "clip_score")
