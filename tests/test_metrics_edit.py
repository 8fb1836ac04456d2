"""CLIP edit metrics against independent references: directional similarity against the
``DirectionalSimilarity`` module of the diffusers evaluation guide (its code path
reproduced below on the same tiny CLIP), image similarity against torchmetrics'
image-to-image ``clip_score``; the assertion helpers built on them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torchmetrics.functional.multimodal import clip_score

from pytest_diffeval import (
    assert_clip_directional_similarity_at_least,
    assert_clip_image_similarity_at_least,
    raise_at_once,
    settings,
)
from pytest_diffeval.generation import ImageSet
from pytest_diffeval.metrics import compute_metric, get_metric
from pytest_diffeval.metrics.backbones import load_clip

SOURCE_CAPTIONS = ["a photo of a cat", "a red car on a road", "a bowl of fruit", "a house by a lake"]
TARGET_CAPTIONS = ["a photo of a dog", "a blue car on a road", "a bowl of fruit, oil painting", "a house by a lake at night"]


def random_images(n: int, seed: int, size: int = 32, prompts: list[str] | None = None) -> ImageSet:
    rng = np.random.default_rng(seed)
    images = (rng.random((n, size, size, 3)) * 255).astype(np.uint8)
    return ImageSet(images=images, prompts=prompts or [f"edit {i % 2}" for i in range(n)], seeds=list(range(n)))


class DirectionalSimilarity(nn.Module):
    """The diffusers evaluation guide's module ("Evaluating Diffusion Models", image-conditioned
    text-to-image generation), with the device as an argument instead of "cuda"."""

    def __init__(self, tokenizer, text_encoder, image_processor, image_encoder, device="cpu"):
        super().__init__()
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder
        self.image_processor = image_processor
        self.image_encoder = image_encoder
        self.device = device

    def preprocess_image(self, image):
        image = self.image_processor(image, return_tensors="pt")["pixel_values"]
        return {"pixel_values": image.to(self.device)}

    def tokenize_text(self, text):
        inputs = self.tokenizer(text, max_length=self.tokenizer.model_max_length, padding="max_length",
                                truncation=True, return_tensors="pt")
        return {"input_ids": inputs.input_ids.to(self.device)}

    def encode_image(self, image):
        preprocessed_image = self.preprocess_image(image)
        image_features = self.image_encoder(**preprocessed_image).image_embeds
        return image_features / image_features.norm(dim=1, keepdim=True)

    def encode_text(self, text):
        tokenized_text = self.tokenize_text(text)
        text_features = self.text_encoder(**tokenized_text).text_embeds
        return text_features / text_features.norm(dim=1, keepdim=True)

    def compute_directional_similarity(self, img_feat_one, img_feat_two, text_feat_one, text_feat_two):
        return F.cosine_similarity(img_feat_two - img_feat_one, text_feat_two - text_feat_one)

    def forward(self, image_one, image_two, caption_one, caption_two):
        img_feat_one = self.encode_image(image_one)
        img_feat_two = self.encode_image(image_two)
        text_feat_one = self.encode_text(caption_one)
        text_feat_two = self.encode_text(caption_two)
        return self.compute_directional_similarity(img_feat_one, img_feat_two, text_feat_one, text_feat_two)


@pytest.fixture(scope="module")
def doc_module(tiny_models: dict[str, Path]) -> DirectionalSimilarity:
    """The guide's components, loaded the guide's way (separate tokenizer, processor and
    projection models from the CLIPModel checkpoint)."""
    from transformers import CLIPImageProcessor, CLIPTextModelWithProjection, CLIPTokenizer, CLIPVisionModelWithProjection

    clip_id = str(tiny_models["clip"])
    return DirectionalSimilarity(
        CLIPTokenizer.from_pretrained(clip_id),
        CLIPTextModelWithProjection.from_pretrained(clip_id).eval(),
        CLIPImageProcessor.from_pretrained(clip_id),
        CLIPVisionModelWithProjection.from_pretrained(clip_id).eval(),
    )


@pytest.fixture(autouse=True)
def results_dir(tmp_path: Path, tiny_models: dict[str, Path]):
    previous = settings.current()
    settings.configure(results_dir=tmp_path / "results", clip_model=str(tiny_models["clip"]), records=[])
    yield tmp_path / "results"
    settings.configure(results_dir=previous.results_dir, clip_model=previous.clip_model, records=[])


def test_directional_similarity_equals_the_diffusers_guide_module(doc_module: DirectionalSimilarity) -> None:
    edited, source = random_images(4, 0), random_images(4, 1)
    result = compute_metric("clip_directional_similarity", edited, source_images=source,
                            source_captions=SOURCE_CAPTIONS, target_captions=TARGET_CAPTIONS)
    expected = []
    with torch.no_grad():
        for i in range(4):  # the guide's loop: input image as numpy, edited image as PIL
            score = doc_module(source.images[i], edited.to_pil()[i], SOURCE_CAPTIONS[i], TARGET_CAPTIONS[i])
            expected.append(float(score))
    np.testing.assert_allclose(result.per_sample, expected, atol=1e-5)
    assert result.value == pytest.approx(np.mean(expected), abs=1e-5)
    assert len(set(np.round(expected, 4))) == 4  # the reference is not degenerate
    assert result.backbone.startswith("tiny-clip@")


def test_directional_similarity_is_antisymmetric_in_the_captions_and_zero_without_an_edit() -> None:
    edited, source = random_images(4, 2), random_images(4, 3)
    forward = compute_metric("clip_directional_similarity", edited, source_images=source,
                             source_captions=SOURCE_CAPTIONS, target_captions=TARGET_CAPTIONS).per_sample
    backward = compute_metric("clip_directional_similarity", edited, source_images=source,
                              source_captions=TARGET_CAPTIONS, target_captions=SOURCE_CAPTIONS).per_sample
    np.testing.assert_allclose(forward, -backward, atol=1e-6)
    unchanged = compute_metric("clip_directional_similarity", source, source_images=source.images,
                               source_captions=SOURCE_CAPTIONS, target_captions=TARGET_CAPTIONS).per_sample
    np.testing.assert_allclose(unchanged, 0.0, atol=1e-6)


def test_image_similarity_equals_torchmetrics_image_to_image_clip_score(tiny_models: dict[str, Path]) -> None:
    images, references = random_images(5, 4), random_images(5, 5)
    result = compute_metric("clip_image_similarity", images, reference_images=references)
    backbone = load_clip(str(tiny_models["clip"]))
    expected = clip_score(list(images.as_tensor()), list(references.as_tensor()),
                          model_name_or_path=backbone.as_torchmetrics)
    assert result.value == pytest.approx(float(expected.detach()), abs=1e-4)
    for i in range(5):  # per pair: torchmetrics clamps each call's mean at 0
        pair = clip_score([images.as_tensor()[i]], [references.as_tensor()[i]], model_name_or_path=backbone.as_torchmetrics)
        assert max(result.per_sample[i], 0.0) == pytest.approx(float(pair.detach()), abs=1e-4)
    itself = compute_metric("clip_image_similarity", images, reference_images=images)
    np.testing.assert_allclose(itself.per_sample, 100.0, atol=1e-3)
    assert get_metric("clip_image_similarity").higher_is_better


def test_one_reference_image_serves_all_images() -> None:
    images, exemplar = random_images(3, 6), random_images(1, 7)
    single = compute_metric("clip_image_similarity", images, reference_images=exemplar.images[0])
    repeated = compute_metric("clip_image_similarity", images, reference_images=np.repeat(exemplar.images, 3, axis=0))
    np.testing.assert_allclose(single.per_sample, repeated.per_sample, atol=1e-5)


def test_edit_inputs_must_match_the_images() -> None:
    images = random_images(4, 8)
    with pytest.raises(ValueError, match="source_images holds 3 images for 4 generated images"):
        compute_metric("clip_directional_similarity", images, source_images=random_images(3, 9),
                       source_captions=SOURCE_CAPTIONS, target_captions=TARGET_CAPTIONS)
    with pytest.raises(ValueError, match="target_captions holds 2 entries for 4 images"):
        compute_metric("clip_directional_similarity", images, source_images=random_images(4, 9),
                       source_captions=SOURCE_CAPTIONS, target_captions=TARGET_CAPTIONS[:2])
    with pytest.raises(ValueError, match="needs reference_images="):
        compute_metric("clip_image_similarity", images)
    with pytest.raises(ValueError, match=r"must be uint8 images of shape \(N, H, W, 3\), got float64"):
        compute_metric("clip_image_similarity", images, reference_images=np.zeros((4, 32, 32, 3)))


def test_helpers_pass_and_fail_with_the_metric_in_the_message(results_dir: Path) -> None:
    edited, source = random_images(4, 10), random_images(4, 11)
    edited.test_id = "tests/test_x.py::test_edit"  # not this test's node id: its rows stay out of this session's report
    options = dict(source_images=source, source_captions=SOURCE_CAPTIONS, target_captions=TARGET_CAPTIONS)
    result = assert_clip_directional_similarity_at_least(edited, -1.0, **options)
    assert settings.current().records[-1]["metric"] == "clip_directional_similarity"
    with pytest.raises(AssertionError, match=rf"clip_directional_similarity {result.value:.4g} over 4 images .*>= 1.01"), raise_at_once():
        assert_clip_directional_similarity_at_least(edited, 1.01, **options)
    similarity = assert_clip_image_similarity_at_least(edited, 0.0, reference_images=source)
    with pytest.raises(AssertionError, match=rf"clip_image_similarity {similarity.value:.4g} over 4 images"), raise_at_once():
        assert_clip_image_similarity_at_least(edited, 100.5, reference_images=source)
    with pytest.raises(AssertionError, match="1 of 2 prompts are outside"), raise_at_once():
        per_prompt = {p: similarity.per_sample[[i for i in range(4) if edited.prompts[i] == p]].mean()
                      for p in set(edited.prompts)}
        assert_clip_image_similarity_at_least(edited, float(np.mean(list(per_prompt.values()))),
                                              reference_images=source, per_prompt=True)
