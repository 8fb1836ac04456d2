"""Style loss: the VGG19 stack has torchvision's module indices (so its state dicts load),
the loss equals Gatys' formula computed here with plain ``F.conv2d`` on the same weights,
is 0 for the same style and grows as the style image drifts; missing weights fail clearly.
Weights are random and narrow (the widths are read from the file), so this runs fast."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from pytest_diffeval.generation import ImageSet
from pytest_diffeval.metrics import compute_metric
from pytest_diffeval.metrics.style import vgg19_features

# torchvision.models.vgg19().features: convs (each followed by ReLU) and max-pools, by index
TORCHVISION_CONVS = [0, 2, 5, 7, 10, 12, 14, 16, 19, 21, 23, 25, 28, 30, 32, 34]
TORCHVISION_POOLS = [4, 9, 18, 27, 36]
GATYS_RELUS = [1, 6, 11, 20, 29]  # relu1_1, relu2_1, relu3_1, relu4_1, relu5_1
MEAN, STD = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])


def as_set(images: np.ndarray) -> ImageSet:
    return ImageSet(images=images, prompts=["p"] * len(images), seeds=list(range(len(images))))


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A narrow random VGG19 saved the way torchvision's full model state dict is keyed
    (``features.<i>.weight``), with classifier keys that must be ignored."""
    torch.manual_seed(0)
    state = {f"features.{k}": v for k, v in vgg19_features((8, 12, 16, 24, 24)).state_dict().items()}
    state["classifier.0.weight"] = torch.zeros(2, 2)
    path = tmp_path_factory.mktemp("vgg") / "vgg19-random.safetensors"
    save_file(state, str(path))
    return path


def gatys_reference(images: np.ndarray, styles: np.ndarray, path: Path) -> np.ndarray:
    """Gatys et al. eqs. 3-5 straight from the weights file: ImageNet-normalised input, conv
    3x3 pad 1 + ReLU, max-pool 2 at torchvision's indices; E_l = Σ(G-A)²/(4N²M²), mean over
    the five layers."""
    from safetensors.torch import load_file

    state = load_file(str(path))

    def features(batch: np.ndarray) -> list[torch.Tensor]:
        x = torch.from_numpy(((batch / 255.0 - MEAN) / STD).transpose(0, 3, 1, 2)).double()
        taken = []
        for index in range(max(GATYS_RELUS) + 1):
            if index in TORCHVISION_CONVS:
                x = F.conv2d(x, state[f"features.{index}.weight"].double(), state[f"features.{index}.bias"].double(), padding=1)
            elif index in TORCHVISION_POOLS:
                x = F.max_pool2d(x, 2)
            else:
                x = F.relu(x)
            if index in GATYS_RELUS:
                taken.append(x.flatten(2))
        return taken

    losses = np.zeros(len(images))
    for f, a in zip(features(images), features(styles)):
        n, m = f.shape[1], f.shape[2]
        g, s = f @ f.transpose(1, 2), a @ a.transpose(1, 2)
        losses += (((g - s) ** 2).sum(dim=(1, 2)) / (4 * n**2 * m**2)).numpy()
    return losses / 5


def test_stack_has_torchvisions_indices_and_keys() -> None:
    stack = vgg19_features()
    assert len(stack) == 37
    assert [i for i, m in enumerate(stack) if isinstance(m, torch.nn.Conv2d)] == TORCHVISION_CONVS
    assert [i for i, m in enumerate(stack) if isinstance(m, torch.nn.MaxPool2d)] == TORCHVISION_POOLS
    assert all(isinstance(stack[i], torch.nn.ReLU) for i in GATYS_RELUS)
    assert set(stack.state_dict()) == {f"{i}.{p}" for i in TORCHVISION_CONVS for p in ("weight", "bias")}
    assert stack[0].weight.shape == (64, 3, 3, 3) and stack[34].weight.shape == (512, 512, 3, 3)


def test_style_loss_equals_gatys_formula(weights: Path) -> None:
    rng = np.random.default_rng(0)
    images = (rng.random((3, 32, 32, 3)) * 255).astype(np.uint8)
    styles = (rng.random((3, 32, 32, 3)) ** 3 * 255).astype(np.uint8)
    result = compute_metric("style_loss", as_set(images), style_images=styles, vgg_weights=weights)
    expected = gatys_reference(images, styles, weights)
    np.testing.assert_allclose(result.per_sample, expected, rtol=1e-4)
    assert expected.min() > 0 and not result.higher_is_better
    assert result.backbone.startswith("vgg19:vgg19-random.safetensors@")


def test_zero_for_the_same_style_and_growing_with_the_difference(weights: Path) -> None:
    rng = np.random.default_rng(1)
    image = (rng.random((32, 32, 3)) * 255).astype(np.uint8)
    stripes = np.zeros((32, 32, 3), dtype=np.uint8)
    stripes[:, ::4] = [255, 40, 0]
    same = compute_metric("style_loss", as_set(image[None]), style_images=image, vgg_weights=weights)
    drifting = np.stack([np.round((1 - t) * image + t * stripes).astype(np.uint8) for t in (0.25, 0.5, 0.75, 1.0)])
    losses = compute_metric("style_loss", as_set(np.repeat(image[None], 4, axis=0)), style_images=drifting,
                            vgg_weights=weights).per_sample
    assert same.value == pytest.approx(0.0, abs=1e-6 * losses[0])
    assert np.all(np.diff(losses) > 0), losses


def test_features_only_pth_state_dict_loads_the_same(weights: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    features_only = {k[len("features."):]: v for k, v in load_file(str(weights)).items() if k.startswith("features.")}
    torch.save(features_only, tmp_path / "vgg19-features.pth")
    rng = np.random.default_rng(2)
    images = as_set((rng.random((2, 16, 16, 3)) * 255).astype(np.uint8))
    style = (rng.random((16, 16, 3)) * 255).astype(np.uint8)
    a = compute_metric("style_loss", images, style_images=style, vgg_weights=weights).per_sample
    b = compute_metric("style_loss", images, style_images=style, vgg_weights=tmp_path / "vgg19-features.pth").per_sample
    np.testing.assert_allclose(a, b, rtol=1e-6)


def test_missing_or_wrong_weights_and_small_images_fail_clearly(weights: Path, tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    images = as_set((rng.random((2, 16, 16, 3)) * 255).astype(np.uint8))
    style = images.images[0]
    with pytest.raises(ValueError, match="style_loss needs vgg_weights=<path>"):
        compute_metric("style_loss", images, style_images=style)
    with pytest.raises(FileNotFoundError, match=f"weights file {tmp_path / 'vgg19.safetensors'} \\(vgg_weights=\\) does not exist"):
        compute_metric("style_loss", images, style_images=style, vgg_weights=tmp_path / "vgg19.safetensors")
    save_file({"0.weight": torch.zeros(4, 3, 3, 3)}, str(tmp_path / "partial.safetensors"))
    with pytest.raises(ValueError, match="is not a torchvision VGG19 features state dict; missing"):
        compute_metric("style_loss", images, style_images=style, vgg_weights=tmp_path / "partial.safetensors")
    with pytest.raises(ValueError, match="needs style_images="):
        compute_metric("style_loss", images, vgg_weights=weights)
    with pytest.raises(ValueError, match="at least 16x16 pixels"):
        compute_metric("style_loss", as_set(images.images[:, :8, :8]), style_images=style, vgg_weights=weights)
