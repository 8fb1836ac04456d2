"""Metric backbones (CLIP), loaded once per process and identified precisely, because
scores from different backbones are not comparable; and the on-disk feature cache that
spares a rerun every backbone pass it already did."""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from .. import process_cache, settings
from .._hashing import digest_stream
from .._io import atomic_path
from ..counters import COUNTERS
from ..devices import device_kind
from ..exceptions import BackboneNotFoundError  # noqa: F401 - re-exported
from ..fingerprints import (
    hub_snapshot,
    resolve_model_dir,  # noqa: F401 - also imported from here
)

LOADS: dict[str, int] = {}  # backbone id -> loads in this process


class FeatureCache:
    """Backbone outputs on disk, one safetensors file per sample, keyed by the backbone's
    content id, what was computed (image or text features), the device kind, library
    versions and the content hash of the sample's processed input tensor.  Only the samples
    not found are computed (in one batch); writes are atomic (temporary file, then
    ``os.replace``).  Each entry carries its key and backbone in its metadata: an entry
    under another key (a swapped or stale file), a corrupt one, one that is not a 1-D float
    tensor or whose shape differs from the batch's is a miss, recomputed and rewritten,
    never a result.  A forged entry written under its right key cannot be told apart:
    share a cache only among trusted runs."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)

    def key(self, backbone: str, kind: str, row: torch.Tensor, context: str) -> str:
        data = row.detach().to("cpu").contiguous()
        header = f"{backbone}|{kind}|{context}|{data.dtype}|{tuple(data.shape)}|".encode()
        return digest_stream([header, data.reshape(-1).view(torch.uint8).numpy()], 32)

    def _path(self, key: str) -> Path:
        return self.directory / key[:2] / f"{key}.safetensors"

    def get(self, key: str, backbone: str) -> torch.Tensor | None:
        path = self._path(key)
        if not path.is_file():
            return None
        try:
            from safetensors import safe_open

            with safe_open(str(path), "pt") as handle:
                meta = handle.metadata() or {}
                if (meta.get("key"), meta.get("backbone"), list(handle.keys())) != (key, backbone, ["features"]):
                    return None  # another entry's file, or not one of ours
                features = handle.get_tensor("features")
        except Exception:  # noqa: BLE001 - a corrupt entry is a miss
            return None
        return features if features.dim() == 1 and features.is_floating_point() else None

    def put(self, key: str, backbone: str, features: torch.Tensor) -> None:
        from safetensors.torch import save_file

        try:
            with atomic_path(self._path(key)) as tmp:
                save_file({"features": features.detach().to("cpu").contiguous()}, str(tmp),
                          metadata={"backbone": backbone, "key": key})
        except OSError:
            pass  # a read-only or full cache costs a recomputation, not the test

    def lookup(self, backbone: str, kind: str, rows: torch.Tensor, context: str,
               compute: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """``compute(rows)``, with each row's output read from the cache when there and the
        rest computed in one call and stored."""

        keys = [self.key(backbone, kind, row, context) for row in rows]
        found = {key: self.get(key, backbone) for key in dict.fromkeys(keys)}
        if len({tuple(v.shape) for v in found.values() if v is not None}) > 1:
            found = dict.fromkeys(found)  # entries that disagree in shape: recompute them all
        dtype = None

        def fill(missing: list[str]) -> torch.Tensor:
            first = {key: keys.index(key) for key in missing}
            selected = [first[key] for key in missing]
            computed = compute(rows if len(selected) == len(rows) else rows[selected])
            for key, features in zip(missing, computed):
                self.put(key, backbone, features)
                found[key] = features
            return computed

        missing = [key for key, value in found.items() if value is None]  # each distinct input once
        if missing:
            computed = fill(missing)
            dtype = computed.dtype
            odd = [key for key, value in found.items()
                   if tuple(value.shape) != tuple(computed.shape[1:])]  # type: ignore[union-attr]
            if odd:  # cached entries of another shape than computed now: recompute them too
                fill(odd)
                missing += odd
        COUNTERS.feature_hits += len(rows) - len(missing)
        COUNTERS.feature_misses += len(missing)
        dtype = dtype or found[keys[0]].dtype  # type: ignore[union-attr]
        return torch.stack([found[key].to(device=rows.device, dtype=dtype) for key in keys])  # type: ignore[union-attr]


_FEATURES: FeatureCache | None = None


def feature_cache() -> FeatureCache | None:
    """The feature cache under ``settings.current().cache_dir`` (None without a cache dir or
    with ``--diffeval-no-cache``)."""
    global _FEATURES

    directory = settings.current().cache_dir
    if directory is None or not COUNTERS.feature_cache_enabled:
        return None
    path = Path(directory) / "features"
    if _FEATURES is None or _FEATURES.directory != path:
        _FEATURES = FeatureCache(path)
    COUNTERS.feature_dir = str(path)
    return _FEATURES


def _context(device: Any) -> str:
    """What besides the backbone and the input changes its output: device kind, versions."""
    return _context_of(str(device))


@functools.lru_cache(maxsize=None)
def _context_of(device: str) -> str:
    import transformers


    return f"{device_kind(device)}|torch {torch.__version__}|transformers {transformers.__version__}"


class _ClipAdapter(torch.nn.Module):
    """Gives torchmetrics' CLIP-score code the tensors it expects: with transformers 5,
    ``get_image_features`` returns an output object whose ``pooler_output`` is the
    projected embedding.  With a ``cache_id`` (the backbone's content id) every pass goes
    through the feature cache."""

    def __init__(self, model: torch.nn.Module, cache_id: str | None = None) -> None:
        super().__init__()
        self.model = model
        self.config = model.config
        self.cache_id = cache_id

    @staticmethod
    def _tensor(output: Any) -> torch.Tensor:
        return output if isinstance(output, torch.Tensor) else output.pooler_output

    def _cached(self, kind: str, rows: torch.Tensor, compute: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        cache = feature_cache() if self.cache_id else None
        if cache is None or len(rows) == 0:
            return compute(rows)
        return cache.lookup(self.cache_id, kind, rows, _context(rows.device), compute)  # type: ignore[arg-type]

    def get_image_features(self, pixel_values: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        def compute(pixels: torch.Tensor) -> torch.Tensor:
            return self._tensor(self.model.get_image_features(pixel_values=pixels, **kwargs))

        return self._cached("image", pixel_values, compute) if not kwargs else compute(pixel_values)

    def get_text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs: Any) -> torch.Tensor:
        def compute(rows: torch.Tensor) -> torch.Tensor:
            ids, mask = (rows[:, 0], rows[:, 1]) if rows.dim() == 3 else (rows, None)
            return self._tensor(self.model.get_text_features(input_ids=ids, attention_mask=mask, **kwargs))

        if kwargs:
            return self._tensor(self.model.get_text_features(input_ids=input_ids, attention_mask=attention_mask, **kwargs))
        rows = input_ids if attention_mask is None else torch.stack([input_ids, attention_mask.to(input_ids.dtype)], 1)
        return self._cached("text", rows, compute)


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
    cache_id: str | None = None  # content identity for the feature cache (None: never cached)

    @property
    def max_length(self) -> int:
        return int(self.model.config.text_config.max_position_embeddings)

    @property
    def embed_dim(self) -> int:
        return int(self.model.config.projection_dim)

    def as_torchmetrics(self) -> tuple[_ClipAdapter, _TruncatingProcessor]:
        """The ``(model, processor)`` pair torchmetrics' ``clip_score`` accepts from a callable."""
        return _ClipAdapter(self.model, self.cache_id), _TruncatingProcessor(self.processor, self.max_length)

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
    key = ("clip", backbone_id, device)
    cached = process_cache.get(key)
    if cached is not None:
        return cached
    from transformers import CLIPModel, CLIPProcessor

    # A hub id whose snapshot is in the Hugging Face cache loads from that folder, so nothing
    # asks the hub (with the hub unreachable and HF_HUB_OFFLINE unset, transformers would
    # otherwise retry for minutes); only a hub id the cache does not hold goes to the hub.
    snapshot = hub_snapshot(*backbone_id.split("@", 1)) if path is None and "@" in backbone_id else None
    location = str(path) if path is not None else str(snapshot) if snapshot is not None else name
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
    commit = getattr(model.config, "_commit_hash", None)
    if path is None and "@" not in backbone_id and commit:  # downloaded just now: not in the cache before
        backbone_id = f"{name}@{commit}"
    backbone = ClipBackbone(id=backbone_id, model=model, processor=processor, device=device,
                            cache_id=_cache_id(backbone_id, path))
    process_cache.put(key, backbone)
    LOADS[backbone_id] = LOADS.get(backbone_id, 0) + 1
    return backbone


def _cache_id(backbone_id: str, path: Path | None) -> str | None:
    """Local and embedded backbones are identified by content; a hub backbone by the commit
    it was loaded from, part of its id (None, never cached, when that is unknown)."""
    return backbone_id if path is not None or "@" in backbone_id else None


def clip_features_module(backbone: ClipBackbone) -> torch.nn.Module:
    """CLIP image embeddings as a torchmetrics feature extractor (uint8 in, float64 out)."""

    class ClipFeatures(torch.nn.Module):
        num_features = backbone.embed_dim

        def forward(self, images: torch.Tensor) -> torch.Tensor:
            return backbone.image_features(images).double()

    return ClipFeatures()
