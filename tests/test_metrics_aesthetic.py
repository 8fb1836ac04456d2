"""LAION aesthetic score: weights in the improved-aesthetic-predictor layout give what that
layout's own forward gives (the MLP written out here, as in ``simple_inference.py``), from
safetensors or a tensors-only ``.pth``; missing or foreign weights fail clearly."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from safetensors.torch import save_file

from pytest_diffeval.generation import ImageSet
from pytest_diffeval.metrics import compute_metric
from pytest_diffeval.metrics.backbones import load_clip


class MLP(nn.Module):
    """simple_inference.py's MLP (a LightningModule there; only ``layers`` and ``forward`` matter)."""

    def __init__(self, input_size: int) -> None:
        super().__init__()
        self.input_size = input_size
        self.layers = nn.Sequential(
            nn.Linear(self.input_size, 1024),
            nn.Dropout(0.2),
            nn.Linear(1024, 128),
            nn.Dropout(0.2),
            nn.Linear(128, 64),
            nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def normalized(a: np.ndarray, axis: int = -1, order: int = 2) -> np.ndarray:
    """simple_inference.py's normalisation of the CLIP embedding."""
    l2 = np.atleast_1d(np.linalg.norm(a, order, axis))
    l2[l2 == 0] = 1
    return a / np.expand_dims(l2, axis)


def random_images(n: int, seed: int) -> ImageSet:
    rng = np.random.default_rng(seed)
    return ImageSet(images=(rng.random((n, 32, 32, 3)) * 255).astype(np.uint8), prompts=["p"] * n, seeds=list(range(n)))


@pytest.fixture(scope="module")
def predictor(tiny_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> tuple[MLP, Path, Path]:
    """A random predictor for the tiny CLIP's 16-d embeddings, saved in the LAION layout as
    safetensors and as a ``.pth`` state dict (what ``torch.save(model.state_dict())`` writes)."""
    dim = load_clip(str(tiny_models["clip"])).embed_dim
    torch.manual_seed(0)
    model = MLP(dim).eval()
    with torch.no_grad():  # spread the outputs so that images score visibly differently
        model.layers[0].weight.mul_(20)
    folder = tmp_path_factory.mktemp("aesthetic")
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(folder / "predictor.safetensors"))
    torch.save(state, folder / "predictor.pth")
    return model, folder / "predictor.safetensors", folder / "predictor.pth"


def test_laion_layout_gives_the_layouts_own_forward(predictor, tiny_models: dict[str, Path]) -> None:
    model, weights, pth = predictor
    assert sorted(model.state_dict()) == sorted(f"layers.{i}.{p}" for i in (0, 2, 4, 6, 7) for p in ("weight", "bias"))
    images = random_images(6, 0)
    result = compute_metric("aesthetic", images, aesthetic_weights=weights, clip_model=str(tiny_models["clip"]))
    embeddings = load_clip(str(tiny_models["clip"])).image_features(images.as_tensor()).numpy()
    with torch.no_grad():
        expected = model(torch.from_numpy(normalized(embeddings)).float()).reshape(-1).numpy()
    np.testing.assert_allclose(result.per_sample, expected, rtol=1e-5, atol=1e-5)
    assert np.ptp(expected) > 1e-3  # images score differently: the comparison can fail
    assert result.value == pytest.approx(float(expected.mean()), abs=1e-5)
    assert result.backbone.startswith("tiny-clip@") and "+aesthetic:predictor.safetensors@" in result.backbone
    from_pth = compute_metric("aesthetic", images, aesthetic_weights=pth, clip_model=str(tiny_models["clip"]))
    np.testing.assert_allclose(from_pth.per_sample, result.per_sample, rtol=1e-6)


def test_missing_weights_say_what_to_pass(tmp_path: Path, tiny_models: dict[str, Path]) -> None:
    images = random_images(2, 1)
    with pytest.raises(ValueError, match="aesthetic needs aesthetic_weights=<path>"):
        compute_metric("aesthetic", images, clip_model=str(tiny_models["clip"]))
    missing = tmp_path / "sac+logos+ava1-l14-linearMSE.safetensors"
    with pytest.raises(FileNotFoundError, match=re.escape(f"weights file {missing} (aesthetic_weights=) does not exist; fix: pass")):
        compute_metric("aesthetic", images, aesthetic_weights=missing, clip_model=str(tiny_models["clip"]))


def test_foreign_weights_are_refused_clearly(tmp_path: Path, tiny_models: dict[str, Path]) -> None:
    images, clip = random_images(2, 2), str(tiny_models["clip"])
    relu_variant = nn.Sequential(nn.Linear(16, 1024), nn.ReLU(), nn.Dropout(0.2), nn.Linear(1024, 1))
    save_file({f"layers.{k}": v for k, v in relu_variant.state_dict().items()}, str(tmp_path / "relu.safetensors"))
    with pytest.raises(ValueError, match="not in the LAION improved-aesthetic-predictor layout"):
        compute_metric("aesthetic", images, aesthetic_weights=tmp_path / "relu.safetensors", clip_model=clip)
    save_file({k: v.contiguous() for k, v in MLP(768).state_dict().items()}, str(tmp_path / "l14.safetensors"))
    with pytest.raises(ValueError, match=r"takes 768-d embeddings but the CLIP backbone .* gives 16-d"):
        compute_metric("aesthetic", images, aesthetic_weights=tmp_path / "l14.safetensors", clip_model=clip)
    torch.save(MLP(16), tmp_path / "pickled-module.pth")  # a whole pickled module: never unpickled
    with pytest.raises(ValueError, match=r"cannot be loaded with torch.load\(weights_only=True\).*\.safetensors"):
        compute_metric("aesthetic", images, aesthetic_weights=tmp_path / "pickled-module.pth", clip_model=clip)
