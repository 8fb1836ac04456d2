"""Captions for edit metrics (issue 19): CLIP ranking over candidates (tiny-clip over the
embedded vocabulary, offline) reads held-out digit images right; generation with a
transformers VLM; ``clip_directional_similarity`` with no captions uses them, and the
captioner's identity is in its baseline signature."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from test_vqa import build_tiny_llava

from pytest_diffeval import caption
from pytest_diffeval.baselines import signature
from pytest_diffeval.embedded.data import make_images, parse_caption
from pytest_diffeval.exceptions import MetricInputError
from pytest_diffeval.generation import ImageSet
from pytest_diffeval.metrics import compute_metric
from pytest_diffeval.vqa.captions import captioner_id, embedded_vocabulary

CLIP = "diffeval/tiny-clip"


@pytest.fixture(scope="module")
def heldout() -> tuple[np.ndarray, list[str]]:
    return make_images(24, seed=0, split="heldout")  # digit samples tiny-clip never saw


def test_clip_ranking_picks_the_right_caption_of_embedded_digit_images(heldout: tuple[np.ndarray, list[str]]) -> None:
    images, truth = heldout
    among_true = caption(images, candidates=sorted(set(truth)), clip_model=CLIP, device="cpu")
    assert among_true == truth  # measured: 24 of 24 among the 18 captions these images have
    vocabulary = caption(images, clip_model=CLIP, device="cpu")  # all 300 captions of the embedded data
    assert set(vocabulary) <= set(embedded_vocabulary()) and len(embedded_vocabulary()) == 300
    exact = np.mean([got == want for got, want in zip(vocabulary, truth)])
    colours = np.mean([parse_caption(g)[1:] == parse_caption(w)[1:] for g, w in zip(vocabulary, truth)])
    assert exact >= 0.75 and colours == 1.0  # measured 0.875 (21 of 24; chance 1 in 300) and 1.0


def test_clip_directional_similarity_captions_the_source_when_no_captions_are_given(
        heldout: tuple[np.ndarray, list[str]]) -> None:
    source, truth = heldout[0][:4], heldout[1][:4]
    edited_prompts = [f"a {'green' if parse_caption(t)[1] != 'green' else 'red'} digit {parse_caption(t)[0]} on a "
                      f"{parse_caption(t)[2]} background" for t in truth]
    edited = ImageSet(images=source[:, ::-1].copy(), prompts=edited_prompts, seeds=[0, 1, 2, 3])
    automatic = compute_metric("clip_directional_similarity", edited, source_images=source, clip_model=CLIP,
                               device="cpu")
    source_captions = caption(source, clip_model=CLIP, device="cpu")
    given = compute_metric("clip_directional_similarity", edited, source_images=source, clip_model=CLIP, device="cpu",
                           source_captions=source_captions, target_captions=edited_prompts)
    np.testing.assert_allclose(automatic.per_sample, given.per_sample, atol=1e-6)
    assert automatic.details["source_captions"] == source_captions and "scorer" not in given.details
    identity = captioner_id("clip", clip_model=CLIP)
    assert identity.startswith("clip-rank:diffeval/tiny-clip@")
    assert signature(automatic, edited, {})["scorer"] == {"captioner": identity, "target_captions": "prompts"}
    other = captioner_id("clip", clip_model=CLIP, candidates=["a digit"])
    assert other != identity and captioner_id("vlm", vqa_model="some/model") != captioner_id(
        "vlm", vqa_model="some/model", prompt="Caption it.")
    with pytest.raises(MetricInputError, match="needs source_captions="):
        compute_metric("clip_directional_similarity", edited, source_images=source, clip_model=CLIP, captioner=None)
    with pytest.raises(MetricInputError, match="with 'openai/clip-vit-large-patch14' needs candidates="):
        caption(source, clip_model="openai/clip-vit-large-patch14")  # no digit vocabulary for a photo model


def test_caption_by_generation_with_a_transformers_vlm(tmp_path: Path) -> None:
    from transformers import AutoModelForImageTextToText, AutoProcessor

    folder = build_tiny_llava(tmp_path / "tiny-llava")
    images = np.random.default_rng(1).integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)
    texts = caption(images, "vlm", vqa_model=str(folder), prompt="Describe this image.", max_new_tokens=4,
                    device="cpu")
    model, processor = AutoModelForImageTextToText.from_pretrained(folder), AutoProcessor.from_pretrained(folder)
    text = processor.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text":
                                          "Describe this image."}]}], add_generation_prompt=True, tokenize=False)
    from PIL import Image

    for image, got in zip(images, texts):
        inputs = processor(images=[Image.fromarray(image)], text=[text], return_tensors="pt")
        out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
        assert got == processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()
    with pytest.raises(MetricInputError, match="caption backend 'blip' is not one of"):
        caption(images, "blip")
