"""The release suite's LoRA-compatibility example (``model_tests/test_preference_checks.py``,
GhostReview's style loss) in both directions: the committed LoRA loads into the embedded
pipeline through the normal ``lora=`` path and, on the shipped model at the showcase's seed,
reproduces the committed showcase images; the check's ceiling passes the shipped model with
the LoRA and fails the same prompts without the LoRA and with the LoRA on the under-trained
checkpoint."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pytest_diffeval.generation import generate_images
from pytest_diffeval.identity import load_provenance
from pytest_diffeval.metrics import compute_metric
from pytest_diffeval.pipelines import load_pipeline
from pytest_diffeval.tiny import build_random_vgg19

ROOT = Path(__file__).resolve().parents[1]
SUITE = ROOT / "model_tests" / "test_preference_checks.py"
LORA = ROOT / "model_tests" / "lora" / "tiny-t2i-scanlines"


def suite_constant(name: str):
    """A module-level constant of the release suite's file, as the suite uses it (read, not imported:
    the suite's module imports its own conftest)."""
    for node in ast.parse(SUITE.read_text()).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == name for t in node.targets):
            return ast.literal_eval(node.value)
    raise LookupError(name)


@pytest.fixture(scope="module")
def page() -> dict:
    data = json.loads((LORA / "showcase.json").read_text())
    data["showcase"] = {item["prompt"]: np.asarray(Image.open(LORA / item["file"]).convert("RGB"))
                        for item in data["images"]}
    return data


@pytest.fixture(scope="module")
def vgg(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(build_random_vgg19(tmp_path_factory.mktemp("vgg") / "vgg.safetensors", seed=0))


def style_loss(base: str, scale: float, page: dict, vgg: str, seeds) -> float:
    """What the suite's check computes: the mean style loss of the showcase prompts x ``seeds``
    with the LoRA at ``scale`` on ``base``, each image against its prompt's showcase image."""
    pipe = load_pipeline(base, lora=LORA, lora_scale=scale)
    images = generate_images(pipe, list(page["showcase"]), seeds=list(seeds),
                             num_inference_steps=page["num_inference_steps"], guidance_scale=page["guidance_scale"])
    styles = np.stack([page["showcase"][p] for p in images.prompts])
    return compute_metric("style_loss", images, style_images=styles, vgg_weights=vgg).value


def test_the_showcase_images_are_the_lora_on_the_shipped_model(page: dict) -> None:
    pipe = load_pipeline(page["base_model"], lora=LORA, lora_scale=page["lora_scale"])
    assert load_provenance(pipe)["lora"]["weight_name"] == "pytorch_lora_weights.safetensors"
    images = generate_images(pipe, list(page["showcase"]), seeds=[page["seed"]],
                             num_inference_steps=page["num_inference_steps"], guidance_scale=page["guidance_scale"])
    for prompt, image in zip(images.prompts, images.images):
        assert np.abs(image.astype(int) - page["showcase"][prompt].astype(int)).max() <= 2, prompt
    rows = images.images.astype(float)  # the style: every second row darker
    assert rows[:, 1::2].mean() < 0.7 * rows[:, 0::2].mean()


def test_style_check_passes_the_lora_and_fails_without_it_or_on_a_broken_base(page: dict, vgg: str) -> None:
    ceiling, seeds = suite_constant("STYLE_LOSS_CEILING"), suite_constant("LORA_SEEDS")
    shipped = style_loss("diffeval/tiny-t2i", page["lora_scale"], page, vgg, seeds)
    without = style_loss("diffeval/tiny-t2i", 0.0, page, vgg, seeds)  # a LoRA that does nothing
    broken = style_loss("diffeval/tiny-t2i-undertrained", page["lora_scale"], page, vgg, seeds)
    print(f"style loss: shipped + LoRA {shipped:.4g}, without the LoRA {without:.4g}, under-trained + LoRA {broken:.4g}")
    assert shipped <= ceiling < min(without, broken)


def test_the_random_vgg19_is_the_same_file_for_a_seed_and_loads_as_vgg19(tmp_path: Path) -> None:
    from pytest_diffeval.metrics.style import load_vgg19_features

    first, again, other = (build_random_vgg19(tmp_path / f"{name}.safetensors", seed=seed)
                           for name, seed in [("a", 0), ("b", 0), ("c", 1)])
    assert first.read_bytes() == again.read_bytes() != other.read_bytes()
    model, weights_id = load_vgg19_features(first)
    assert [m.out_channels for m in model if hasattr(m, "out_channels")] == [16] * 2 + [32] * 2 + [64] * 12
    assert weights_id.startswith("vgg19:a.safetensors@")
