"""Style loss (Gatys et al. 2016): how far the Gram matrices of VGG19 feature maps of a
generated image are from those of a target style image.  Lower is better.

torchvision is not a dependency, so the VGG19 ``features`` stack is defined here with the
same module indices as ``torchvision.models.vgg19().features``: a torchvision state dict
(``features.0.weight`` ..., or ``0.weight`` ... of ``features`` alone; ``classifier.*``
keys are ignored) loads as is.  The weights are a file the user gives (``vgg_weights=``):
``.safetensors`` (preferred) or torchvision's ``.pth`` through ``torch.load(weights_only=True)``.

Definition used (Gatys et al., eqs. 3-5, equal layer weights w_l = 1/5): for the layers
relu1_1, relu2_1, relu3_1, relu4_1, relu5_1 (Gatys' "conv1_1" ... "conv5_1"; Caffe's ReLU is
in place, so those blobs are rectified), with F_l the (N_l channels x M_l positions)
feature map, G_l = F_l F_lᵀ and A_l the style image's,
``E_l = Σ (G_l - A_l)² / (4 N_l² M_l²)`` and ``loss = Σ_l E_l / 5``.  Inputs are scaled to
[0, 1] and normalised with the ImageNet mean and std, as torchvision's weights expect.
The channel widths are read from the weights, so a narrow VGG19 with random weights works
for tests; real scores need the ImageNet weights (torchvision ``vgg19-dcbb9e9d.pth``).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .. import process_cache, settings
from .._hashing import digest_file
from . import Metric, MetricResult
from .aesthetic import load_weights_file
from .edit import block_images, image_array

if TYPE_CHECKING:  # imported where used: a cached result needs no torch
    import torch

# torchvision's cfg "E": channels per conv, "M" for max pooling
VGG19_CFG: tuple[int | str, ...] = (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M",
                                    512, 512, 512, 512, "M", 512, 512, 512, 512, "M")
VGG19_WIDTHS = (64, 128, 256, 512, 512)
STYLE_LAYERS = {"relu1_1": 1, "relu2_1": 6, "relu3_1": 11, "relu4_1": 20, "relu5_1": 29}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _cfg(widths: tuple[int, ...]) -> list[int | str]:
    block, out = 0, []
    for item in VGG19_CFG:
        if item == "M":
            out.append("M")
            block += 1
        else:
            out.append(widths[block])
    return out


def vgg19_features(widths: tuple[int, ...] = VGG19_WIDTHS) -> torch.nn.Sequential:
    """VGG19's ``features`` (16 convs 3x3 + ReLU, 5 max-pools) with torchvision's module
    indices; ``widths`` are the channels of the five blocks (torchvision: 64-512)."""
    import torch

    layers: list[torch.nn.Module] = []
    channels = 3
    for item in _cfg(tuple(widths)):
        if item == "M":
            layers.append(torch.nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            layers.append(torch.nn.Conv2d(channels, int(item), kernel_size=3, padding=1))
            layers.append(torch.nn.ReLU(inplace=True))
            channels = int(item)
    return torch.nn.Sequential(*layers)


def conv_indices() -> list[int]:
    """Indices of the convolutions in ``vgg19_features()`` (torchvision's: 0, 2, 5, ...)."""
    import torch

    return [i for i, m in enumerate(vgg19_features((1, 1, 1, 1, 1))) if isinstance(m, torch.nn.Conv2d)]


def load_vgg19_features(path: str | Path) -> tuple[torch.nn.Sequential, str]:
    """``(features in eval mode, content id)`` from a torchvision-layout VGG19 state dict."""
    path = Path(path).expanduser()
    fix = ("pass vgg_weights=<torchvision VGG19 ImageNet weights (vgg19-dcbb9e9d.pth), ideally converted to "
           ".safetensors with safetensors.torch.save_file(state_dict, ...)>")
    stat = path.stat() if path.is_file() else None
    key = ("vgg19", str(path.resolve()), stat.st_mtime_ns if stat else 0, stat.st_size if stat else 0)
    if stat is not None and process_cache.get(key) is not None:
        return process_cache.get(key)
    raw = load_weights_file(path, metric="style_loss", option="vgg_weights", fix=fix)
    state = {(k[len("features."):] if k.startswith("features.") else k): v for k, v in raw.items()
             if not k.startswith("classifier.")}
    convs = conv_indices()
    expected = {f"{i}.{p}" for i in convs for p in ("weight", "bias")}
    if set(state) != expected:
        missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
        raise ValueError(f"pytest-diffeval: style_loss: {path} is not a torchvision VGG19 features state dict; "
                         f"missing {missing[:6]}, unexpected {extra[:6]}; fix: {fix}")
    cfg_convs = [item for item in _cfg((0, 1, 2, 3, 4)) if item != "M"]  # block number of each conv
    widths = tuple(int(state[f"{convs[cfg_convs.index(b)]}.weight"].shape[0]) for b in range(5))
    model = vgg19_features(widths)
    try:
        model.load_state_dict({k: v.float() for k, v in state.items()})
    except RuntimeError as exc:
        raise ValueError(f"pytest-diffeval: style_loss: the tensor shapes in {path} are not VGG19's "
                         f"({str(exc).splitlines()[0]}); fix: {fix}") from exc
    model.eval()
    digest = digest_file(path, 12)
    result = (model, f"vgg19:{path.name}@{digest}")
    return process_cache.put(key, result)


def gram_matrices(model: torch.nn.Sequential, images: np.ndarray, device: str, batch_size: int = 16) -> list[torch.Tensor]:
    """Per style layer, ``G/M`` (Gram matrix over the M positions) for uint8 NHWC ``images``."""
    import torch

    mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)
    last = max(STYLE_LAYERS.values())
    out: list[list[torch.Tensor]] = [[] for _ in STYLE_LAYERS]
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            batch = torch.from_numpy(np.array(images[start : start + batch_size])).to(device)
            x = (batch.permute(0, 3, 1, 2).float() / 255.0 - mean) / std
            taken = 0
            for index, module in enumerate(model):
                x = module(x)
                if index in STYLE_LAYERS.values():
                    flat = x.flatten(2)  # (B, N_l, M_l)
                    out[taken].append(flat @ flat.transpose(1, 2) / flat.shape[-1])
                    taken += 1
                if index == last:
                    break
    return [torch.cat(parts) for parts in out]


class StyleLoss(Metric):
    """Gatys style loss between each image and its style image (VGG19 Gram matrices of
    relu1_1 ... relu5_1, equal weights); 0 for the same style.  Default tolerance: 10%."""

    name = "style_loss"
    higher_is_better = False
    per_sample = True
    relative_tolerance = 0.10
    cacheable = True
    sample_wise = True  # under torchrun each rank scores its block (each value: its image and style image)
    per_sample_options = ("style_images",)

    def block_options(self, images: Any, options: dict[str, Any]) -> dict[str, Any]:
        return block_images(self, images, options, "style_images")

    def compute(self, images: Any, *, style_images: Any = None, vgg_weights: str | Path | None = None,
                device: str | None = None, batch_size: int = 16) -> MetricResult:
        """Style loss of ``images`` against ``style_images`` (one per image or one for all)."""
        import torch

        style = image_array(style_images, metric=self.name, option="style_images", count=len(images))
        if vgg_weights is None:
            raise ValueError("pytest-diffeval: style_loss needs vgg_weights=<path>: torchvision's VGG19 ImageNet "
                             "weights are not downloaded by this plugin; fix: get vgg19-dcbb9e9d.pth once, convert "
                             "it to .safetensors (or pass the .pth) and give the path")
        small = min(min(images.image_size), min(style.shape[1:3]))
        if small < 16:
            raise ValueError(f"pytest-diffeval: style_loss needs images of at least 16x16 pixels (VGG19 pools 4 times "
                             f"before relu5_1), got {small} px; fix: upscale the images or the style images")
        model, weights_id = load_vgg19_features(vgg_weights)
        device = device or settings.resolved_device()
        model = model.to(device)
        generated = gram_matrices(model, images.images, device, batch_size)
        single = style.strides[0] == 0
        targets = gram_matrices(model, style[:1] if single else style, device, batch_size)
        per_sample = torch.zeros(len(images), dtype=torch.float64)
        for g, a in zip(generated, targets):
            per_sample += ((g.double() - a.double()) ** 2).mean(dim=(1, 2)) / 4
        per_sample = (per_sample / len(STYLE_LAYERS)).cpu().numpy()
        return MetricResult(self.name, float(per_sample.mean()), weights_id, False, per_sample=per_sample,
                            details={"layers": list(STYLE_LAYERS), "weights": "equal"})


__all__ = ["STYLE_LAYERS", "StyleLoss", "conv_indices", "gram_matrices", "load_vgg19_features", "vgg19_features"]
