"""PixelTextToImagePipeline (pixel_pipeline.py), on the embedded tiny-t2i weights loaded the
way a hub model is: determinism per image, the pooled-text conditioning reaching the UNet,
and clear errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pytest_diffeval.embedded import WEIGHTS_DIR
from pytest_diffeval.pixel_pipeline import PixelTextToImagePipeline

PROMPTS = ["a red digit 3 on a blue background", "a white digit 7 on a black background"]


@pytest.fixture(scope="module")
def pipe() -> PixelTextToImagePipeline:
    pipe = PixelTextToImagePipeline.from_pretrained(WEIGHTS_DIR / "tiny-t2i")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run(pipe: PixelTextToImagePipeline, prompts: list[str], seeds: list[int], **kwargs) -> np.ndarray:
    generators = [torch.Generator().manual_seed(s) for s in seeds]
    return pipe(prompts, generator=generators, num_inference_steps=4, output_type="np", **kwargs).images


def test_each_image_depends_only_on_its_prompt_and_seed(pipe: PixelTextToImagePipeline) -> None:
    both = run(pipe, PROMPTS, [0, 1])
    assert both.shape == (2, 16, 16, 3) and both.dtype == np.float32
    assert np.array_equal(both, run(pipe, PROMPTS, [0, 1]))  # same seeds, same images
    alone = run(pipe, PROMPTS[1:], [1])
    np.testing.assert_allclose(alone[0], both[1], atol=1e-3)  # batch maths moves it < 1/4 of a uint8 level
    assert not np.allclose(run(pipe, PROMPTS, [0, 2])[1], both[1], atol=1e-3)  # another seed, another image


def test_the_unet_gets_the_pooled_text_embedding_of_prompt_and_negative(pipe: PixelTextToImagePipeline) -> None:
    seen: list[torch.Tensor | None] = []
    hook = pipe.unet.register_forward_pre_hook(lambda m, args, kwargs: seen.append(kwargs.get("class_labels")),
                                               with_kwargs=True)
    try:
        run(pipe, PROMPTS, [0, 1], guidance_scale=3.0)
    finally:
        hook.remove()
    _, pooled = pipe.encode_prompt(["", ""] + PROMPTS, return_pooled=True)
    if pipe.unet.config.class_embed_type == "projection":
        assert len(seen) == 4 and all(torch.equal(labels, pooled) for labels in seen)
    else:
        assert seen == [None] * 4


def test_bad_arguments_are_named(pipe: PixelTextToImagePipeline) -> None:
    with pytest.raises(ValueError, match="output_type must be 'pil', 'np' or 'pt', not 'latent'"):
        pipe(PROMPTS, output_type="latent")
    with pytest.raises(ValueError, match="got 1 generators for 2 images"):
        pipe(PROMPTS, generator=[torch.Generator()], num_inference_steps=2)
    with pytest.raises(ValueError, match="got 3 negative prompts for 2 prompts"):
        pipe(PROMPTS, negative_prompt=["a", "b", "c"], num_inference_steps=2)
