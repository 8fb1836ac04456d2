"""LAION aesthetic score: the improved-aesthetic-predictor MLP (christophschuhmann/
improved-aesthetic-predictor, ``simple_inference.py``) on L2-normalised CLIP image
embeddings.  Its weights are a file the user gives (``aesthetic_weights=``); nothing is
downloaded.  Also the weights-file loader the VGG style loss shares: safetensors, or a
``.pth`` state dict through ``torch.load(..., weights_only=True)`` (never a pickle)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .. import process_cache, settings
from .._hashing import digest_file
from . import Metric, MetricResult, WeightsFileNotFoundError

if TYPE_CHECKING:  # imported where used: a cached result needs no torch
    import torch

# simple_inference.py's MLP: Linear, Dropout(0.2), Linear, Dropout(0.2), Linear, Dropout(0.1), Linear, Linear
LINEAR_INDICES = (0, 2, 4, 6, 7)
DROPOUTS = {1: 0.2, 3: 0.2, 5: 0.1}
LAION_WIDTHS = (1024, 128, 64, 16, 1)


def load_weights_file(path: str | Path, *, metric: str, option: str, fix: str) -> dict[str, torch.Tensor]:
    """A state dict from ``.safetensors`` (preferred) or a ``.pth``/``.pt``/``.bin`` holding only
    tensors (``torch.load(weights_only=True)``); errors name the file and ``fix``."""
    import torch

    path = Path(path).expanduser()
    if not path.is_file():
        raise WeightsFileNotFoundError(f"pytest-diffeval: {metric}: weights file {path} ({option}=) does not exist; fix: {fix}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as exc:  # noqa: BLE001 - reported with the file's name
            raise ValueError(f"pytest-diffeval: {metric}: cannot read {path} as safetensors: {exc}; fix: {fix}") from exc
    if path.suffix in {".pth", ".pt", ".bin", ".ckpt"}:
        try:
            loaded = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - reported with the file's name
            raise ValueError(
                f"pytest-diffeval: {metric}: {path} cannot be loaded with torch.load(weights_only=True) (it holds more "
                f"than tensors: {type(exc).__name__}); fix: save its state dict as .safetensors "
                "(safetensors.torch.save_file(state_dict, 'weights.safetensors')) and pass that"
            ) from exc
        if isinstance(loaded, dict) and isinstance(loaded.get("state_dict"), dict):
            loaded = loaded["state_dict"]  # a training checkpoint around the state dict
        if not isinstance(loaded, dict) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
            raise ValueError(f"pytest-diffeval: {metric}: {path} is not a state dict of tensors; fix: {fix}")
        return dict(loaded)
    raise ValueError(f"pytest-diffeval: {metric}: unsupported weights file {path} (suffix {path.suffix!r}); "
                     "use .safetensors (preferred) or a .pth state dict")


def laion_aesthetic_mlp(input_dim: int = 768, widths: tuple[int, ...] = LAION_WIDTHS) -> torch.nn.Sequential:
    """The improved-aesthetic-predictor MLP (``layers`` of its ``MLP`` class), input ``input_dim``."""
    import torch

    modules: list[torch.nn.Module] = []
    sizes = [input_dim, *widths]
    for index in range(8):
        if index in DROPOUTS:
            modules.append(torch.nn.Dropout(DROPOUTS[index]))
        else:
            layer = LINEAR_INDICES.index(index)
            modules.append(torch.nn.Linear(sizes[layer], sizes[layer + 1]))
    return torch.nn.Sequential(*modules)


def load_aesthetic_mlp(path: str | Path) -> tuple[torch.nn.Sequential, str]:
    """``(MLP in eval mode, content id)`` from a state dict in the LAION layout
    (``layers.0.weight`` ... ``layers.7.bias``); the input size is taken from the weights."""
    path = Path(path).expanduser()
    fix = ("pass aesthetic_weights=<path to the LAION improved-aesthetic-predictor weights, e.g. "
           "sac+logos+ava1-l14-linearMSE.pth converted to .safetensors>")
    stat = path.stat() if path.is_file() else None
    key = ("aesthetic", str(path.resolve()), stat.st_mtime_ns if stat else 0, stat.st_size if stat else 0)
    if stat is not None and process_cache.get(key) is not None:
        return process_cache.get(key)
    state = load_weights_file(path, metric="aesthetic", option="aesthetic_weights", fix=fix)
    state = {k[len("layers."):] if k.startswith("layers.") else k: v for k, v in state.items()}
    expected = {f"{i}.{p}" for i in LINEAR_INDICES for p in ("weight", "bias")}
    if set(state) != expected:
        missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
        raise ValueError(
            f"pytest-diffeval: aesthetic: {path} is not in the LAION improved-aesthetic-predictor layout "
            f"(layers.0/2/4/6/7 .weight/.bias, no activations); missing {missing[:6]}, unexpected {extra[:6]}; "
            "fix: pass the original predictor's weights (the variant with ReLU layers has other indices)"
        )
    weights = [state[f"{i}.weight"] for i in LINEAR_INDICES]
    sizes = [int(weights[0].shape[1])] + [int(w.shape[0]) for w in weights]
    if any(int(w.shape[1]) != sizes[j] for j, w in enumerate(weights)) or sizes[-1] != 1:
        raise ValueError(f"pytest-diffeval: aesthetic: the layer shapes in {path} do not chain "
                         f"({[tuple(w.shape) for w in weights]}); fix: pass an unmodified predictor state dict")
    mlp = laion_aesthetic_mlp(sizes[0], tuple(sizes[1:]))
    mlp.load_state_dict({k: v.float() for k, v in state.items()})
    mlp.eval()
    digest = digest_file(path, 12)
    result = (mlp, f"aesthetic:{path.name}@{digest}")
    return process_cache.put(key, result)


class Aesthetic(Metric):
    """LAION aesthetic score (roughly 1-10) per image: the improved-aesthetic-predictor MLP on
    the L2-normalised CLIP image embedding (ViT-L/14, 768-d, for the published weights).
    Default tolerance: 0.1."""

    name = "aesthetic"
    higher_is_better = True
    per_sample = True
    sample_wise = True
    absolute_tolerance = 0.1
    cacheable = True

    def compute(self, images: Any, *, aesthetic_weights: str | Path | None = None, clip_model: str | None = None,
                device: str | None = None, batch_size: int = 64) -> MetricResult:
        """Score ``images`` with the predictor in ``aesthetic_weights`` on ``clip_model``."""
        import torch

        from .backbones import load_clip

        if aesthetic_weights is None:
            raise ValueError(
                "pytest-diffeval: aesthetic needs aesthetic_weights=<path>: the LAION improved-aesthetic-predictor "
                "weights (sac+logos+ava1-l14-linearMSE.pth, for CLIP ViT-L/14) are not downloaded by this plugin; "
                "fix: download them once, convert to .safetensors (or pass the .pth) and give the path"
            )
        mlp, weights_id = load_aesthetic_mlp(aesthetic_weights)
        backbone = load_clip(clip_model or settings.current().clip_model, device or settings.resolved_device())
        in_dim = mlp[0].in_features
        if in_dim != backbone.embed_dim:
            raise ValueError(
                f"pytest-diffeval: aesthetic: the predictor in {aesthetic_weights} takes {in_dim}-d embeddings but the "
                f"CLIP backbone {backbone.id} gives {backbone.embed_dim}-d ones; fix: use the CLIP model the "
                "predictor was trained on (openai/clip-vit-large-patch14 for the LAION weights) via clip_model="
            )
        embeddings = backbone.image_features(images.as_tensor(backbone.device), batch_size)
        norms = embeddings.norm(dim=-1, keepdim=True)
        embeddings = embeddings / torch.where(norms == 0, torch.ones_like(norms), norms)  # as LAION's normalized()
        mlp = mlp.to(backbone.device)
        with torch.no_grad():
            per_sample = mlp(embeddings.float()).reshape(-1).double().cpu().numpy()
        return MetricResult(self.name, float(np.mean(per_sample)), f"{backbone.id}+{weights_id}", True,
                            per_sample=per_sample)


__all__ = ["Aesthetic", "laion_aesthetic_mlp", "load_aesthetic_mlp", "load_weights_file"]
