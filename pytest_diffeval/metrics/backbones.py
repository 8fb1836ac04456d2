"""Metric backbones (CLIP), loaded once per process and identified precisely, because
scores from different backbones are not comparable."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..pipelines import model_fingerprint

LOADS: dict[str, int] = {}  # backbone id -> loads in this process
_CACHE: dict[tuple[str, str], "ClipBackbone"] = {}


class BackboneNotFoundError(FileNotFoundError):
    """A metric backbone (CLIP model, feature weights) could not be found."""


def resolve_model_dir(name: str) -> tuple[str, Path | None]:
    """``(backbone id, local path or None)`` for an embedded name, a local folder or a hub id.
    Local and embedded backbones carry a content hash in their id."""
    from ..embedded import resolve_embedded

    embedded = resolve_embedded(name)
    if embedded is not None:
        return f"{name}@{model_fingerprint(embedded)}", embedded
    path = Path(name).expanduser()
    if path.is_dir():
        return f"{path.resolve().name}@{model_fingerprint(path)}", path.resolve()
    return name, None


class _ClipAdapter(torch.nn.Module):
    """Gives torchmetrics' CLIP-score code the tensors it expects: with transformers 5,
    ``get_image_features`` returns an output object whose ``pooler_output`` is the
    projected embedding."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model
        self.config = model.config

    @staticmethod
    def _tensor(output: Any) -> torch.Tensor:
        return output if isinstance(output, torch.Tensor) else output.pooler_output

    def get_image_features(self, pixel_values: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        return self._tensor(self.model.get_image_features(pixel_values=pixel_values, **kwargs))

    def get_text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs: Any) -> torch.Tensor:
        return self._tensor(self.model.get_text_features(input_ids=input_ids, attention_mask=attention_mask, **kwargs))


class _TruncatingProcessor:
    """Tokenises with truncation at the text encoder's length (CLIP: 77), so the end-of-text
    token is kept; callers warn about the prompts that were cut."""

    def __init__(self, processor: Any, max_length: int) -> None:
        self.processor = processor
        self.max_length = max_length

    def __call__(self, text: Any = None, images: Any = None, **kwargs: Any) -> Any:
        if text is not None:
            kwargs.update(truncation=True, max_length=self.max_length)
        return self.processor(text=text, images=images, **kwargs)


@dataclass
class ClipBackbone:
    """A CLIP model and processor with the adapters torchmetrics needs."""

    id: str
    model: Any
    processor: Any
    device: str

    @property
    def max_length(self) -> int:
        return int(self.model.config.text_config.max_position_embeddings)

    @property
    def embed_dim(self) -> int:
        return int(self.model.config.projection_dim)

    def as_torchmetrics(self) -> tuple[_ClipAdapter, _TruncatingProcessor]:
        """The ``(model, processor)`` pair torchmetrics' ``clip_score`` accepts from a callable."""
        return _ClipAdapter(self.model), _TruncatingProcessor(self.processor, self.max_length)

    def warn_long_prompts(self, prompts: list[str]) -> list[str]:
        """Warn, naming each prompt longer than the text encoder takes; return them."""
        tokenizer = getattr(self.processor, "tokenizer", self.processor)
        long = [p for p in dict.fromkeys(prompts) if len(tokenizer(p)["input_ids"]) > self.max_length]
        for prompt in long:
            warnings.warn(
                f"pytest-diffeval: prompt {prompt!r} is longer than the {self.max_length} tokens of "
                f"{self.id}'s text encoder; it is truncated for scoring",
                UserWarning,
                stacklevel=3,
            )
        return long

    @torch.no_grad()
    def image_features(self, images: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
        """Projected (unnormalised) image embeddings of uint8 ``(N, 3, H, W)`` images."""
        model, processor = self.as_torchmetrics()
        out = []
        for start in range(0, len(images), batch_size):
            batch = [img.cpu() for img in images[start : start + batch_size]]
            pixels = processor(images=batch, return_tensors="pt")["pixel_values"].to(self.device)
            out.append(model.get_image_features(pixels).float())
        return torch.cat(out)

    @torch.no_grad()
    def text_features(self, texts: list[str], batch_size: int = 256) -> torch.Tensor:
        model, processor = self.as_torchmetrics()
        out = []
        for start in range(0, len(texts), batch_size):
            tokens = processor(text=texts[start : start + batch_size], return_tensors="pt", padding=True)
            out.append(model.get_text_features(tokens["input_ids"].to(self.device), tokens["attention_mask"].to(self.device)).float())
        return torch.cat(out)


def load_clip(name: str, device: str = "cpu") -> ClipBackbone:
    """Load (once per process and device) a CLIP backbone by hub id, local folder or
    embedded name such as ``diffeval/tiny-clip``."""
    backbone_id, path = resolve_model_dir(name)
    key = (backbone_id, device)
    if key in _CACHE:
        return _CACHE[key]
    from transformers import CLIPModel, CLIPProcessor

    location = str(path) if path is not None else name
    try:
        model = CLIPModel.from_pretrained(location, use_safetensors=True)
        processor = CLIPProcessor.from_pretrained(location)
    except OSError as exc:
        from huggingface_hub.constants import HF_HUB_CACHE

        raise BackboneNotFoundError(
            f"pytest-diffeval: cannot load the CLIP backbone {name!r} (looked for a local folder "
            f"{Path(name).expanduser().resolve()} and in the Hugging Face cache {HF_HUB_CACHE}): "
            f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}\n"
            "  fix: pass clip_model=<local folder with a CLIPModel and CLIPProcessor in hub layout>, "
            "set --diffeval-clip-model / ini diffeval_clip_model, or use the embedded 'diffeval/tiny-clip'."
        ) from exc
    model = model.to(device).eval()
    backbone = ClipBackbone(id=backbone_id, model=model, processor=processor, device=device)
    _CACHE[key] = backbone
    LOADS[backbone_id] = LOADS.get(backbone_id, 0) + 1
    return backbone


def clip_features_module(backbone: ClipBackbone) -> torch.nn.Module:
    """CLIP image embeddings as a torchmetrics feature extractor (uint8 in, float64 out)."""

    class ClipFeatures(torch.nn.Module):
        num_features = backbone.embed_dim

        def forward(self, images: torch.Tensor) -> torch.Tensor:
            return backbone.image_features(images).double()

    return ClipFeatures()
