"""The same shape of tests for real hub checkpoints.  They need a CUDA GPU and the
weights (in the Hugging Face cache, or downloadable): on a machine without a GPU, or on
a GPU machine without the weights, they skip with a reason that names the model and how
to get it (``huggingface-cli download <id>``, ``HF_HOME``, ``--diffeval-model=<id>=PATH``),
and ``--diffeval-require-gpu`` turns that skip into a failure.

Run them on a GPU runner::

    pytest model_tests/test_hub_checkpoints.py --diffeval-require-gpu --snapshot-update  # first time
    pytest model_tests/test_hub_checkpoints.py --diffeval-require-gpu
"""

from __future__ import annotations

import pytest

from pytest_diffeval import assert_clip_score_at_least

CLIP = "openai/clip-vit-large-patch14"  # the backbone the published numbers use
PROMPTS = [
    "a red apple on a wooden table",
    "a photo of an astronaut riding a horse",
    "a blue bird sitting on a branch, watercolor",
    "two cats playing with a ball of yarn",
]
CHECKPOINTS = {
    "sd15": ("stable-diffusion-v1-5/stable-diffusion-v1-5", {"num_inference_steps": 30, "guidance_scale": 7.5}),
    "sdxl": ("stabilityai/stable-diffusion-xl-base-1.0", {"num_inference_steps": 30, "guidance_scale": 5.0}),
}


@pytest.mark.gpu
@pytest.mark.parametrize("name", sorted(CHECKPOINTS))
def test_hub_text_to_image(generate, diffeval_baseline, name):
    model_id, sampling = CHECKPOINTS[name]
    images = generate(model_id, PROMPTS, seeds=range(4), batch_size=4, **sampling)
    # ViT-L/14 CLIP score of healthy SD 1.5 / SDXL images is ~30-36; noise scores ~20-24.
    assert_clip_score_at_least(images, 26.0, clip_model=CLIP)
    diffeval_baseline.assert_no_regression(images, "clip_score", clip_model=CLIP)
