"""Human-preference scorers built in: PickScore and HPS v2 / v2.1, each a per-image score
with the published formula, weights from a local path or a cached hub snapshot (never
downloaded, never unpickled), and a backbone id that carries the scorer's version and its
weights' content hash, so scores of other versions or weights are never compared.

* ``pick_score`` (Kirstain et al. 2023, github yuvalkirstain/PickScore): a transformers
  ``CLIPModel`` (ViT-H-14, ``yuvalkirstain/PickScore_v1``) with the processor of
  ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``; score = ``logit_scale.exp() * cos(image, prompt)``
  (about 18-23 for real images); prompts truncated at 77 tokens.
* ``hps_v2`` (Wu et al. 2023, github tgxs002/HPSv2): open_clip ViT-H-14 with the HPS
  checkpoint (``xswu/HPSv2``: ``HPS_v2_compressed.pt`` for v2.0, ``HPS_v2.1_compressed.pt``
  for v2.1); score = ``100 * cos(image, prompt)``, the scale of the HPSv2 benchmark table
  (``evaluation.py`` prints ``mean * 100``; ``hpsv2.score()`` returns the bare cosine, 0.2-0.3).
  open_clip is the extra ``pytest-diffeval[hps]``.

``image_reward`` lives in :mod:`~pytest_diffeval.metrics.image_reward`.
"""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from .. import process_cache, settings
from .._hashing import package_versions
from ..exceptions import (
    DiffevalError,
    MissingDependencyError,
    WeightsFileNotFoundError,
    WeightsNotAvailableError,
)
from ..fingerprints import file_fingerprint, hub_snapshot, resolve_model_dir
from . import Metric, MetricInputError, MetricResult
from .aesthetic import load_weights_file
from .result_cache import bound_options

PICKSCORE_MODEL = "yuvalkirstain/PickScore_v1"
PICKSCORE_PROCESSOR = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
HPS_REPO = "xswu/HPSv2"
HPS_FILES = {"v2.0": "HPS_v2_compressed.pt", "v2.1": "HPS_v2.1_compressed.pt"}
HPS_ARCHITECTURE = "ViT-H-14"
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)  # HPS: image_mean=None -> open_clip's OpenAI default
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
CONVERT_FIX = ("if torch.load(weights_only=True) refuses the file, convert it once, in an environment you trust, with "
               "`python -m pytest_diffeval convert-weights FILE.pt FILE.safetensors` and pass the .safetensors file")


def prompts_for(metric: str, images: Any, prompts: list[str] | None) -> list[str]:
    """The prompt of each image (``prompts=`` overrides the set's own), one per image."""
    prompts = list(prompts) if prompts is not None else list(images.prompts)
    if len(prompts) != len(images):
        raise MetricInputError(f"pytest-diffeval: {metric}: {len(prompts)} prompts for {len(images)} images; "
                               "fix: give one prompt per image")
    return prompts


def warn_truncated(metric: str, prompts: list[str], lengths: list[int], limit: int) -> list[str]:
    """Warn once per prompt whose token count exceeds ``limit`` (it is scored truncated)."""
    long = [p for p, n in dict(zip(prompts, lengths)).items() if n > limit]
    for prompt in long:
        warnings.warn(f"pytest-diffeval: {metric}: prompt {prompt!r} is longer than the {limit} tokens the scorer "
                      "reads; it is scored truncated", UserWarning, stacklevel=4)
    return long


def weights_file(value: str | Path | None, *, repo: str, filename: str, metric: str, option: str) -> Path:
    """The weights file of a scorer: ``value`` as a file, a folder holding ``filename`` (or its
    ``.safetensors`` conversion beside it), a hub id, or ``repo`` from the local Hugging Face
    cache.  Nothing is downloaded: a hub file that is not cached is
    :class:`WeightsNotAvailableError` (a skip in ``gpu`` tests) naming the download command."""
    converted = Path(filename).with_suffix(".safetensors").name

    def pick(folder: Path) -> Path | None:
        for name in (converted, filename):
            if (folder / name).is_file():
                return folder / name
        return None

    text = str(value) if value is not None else repo
    path = Path(text).expanduser()
    if path.is_file():
        return path
    if path.is_dir():
        found = pick(path)
        if found is None:
            raise WeightsFileNotFoundError(f"pytest-diffeval: {metric}: the folder {path} ({option}=) holds neither "
                                           f"{filename} nor {converted}; fix: pass the weights file itself")
        return found
    snapshot = hub_snapshot(text) if "/" in text and not text.startswith((".", "/", "~")) else None
    found = pick(snapshot) if snapshot is not None else None
    if found is not None:
        return found
    if value is not None and (text.startswith((".", "/", "~")) or text.endswith((".pt", ".pth", ".safetensors"))):
        raise WeightsFileNotFoundError(f"pytest-diffeval: {metric}: weights file {path} ({option}=) does not exist; "
                                       f"fix: pass the path of {filename} or of its .safetensors conversion")
    from huggingface_hub.constants import HF_HUB_CACHE

    raise WeightsNotAvailableError(
        f"pytest-diffeval: {metric}: the weights {filename} of {text!r} are not in the Hugging Face cache "
        f"{HF_HUB_CACHE} (nothing is downloaded at test time); fix: `huggingface-cli download {text} {filename}` "
        f"on a machine with access (then point HF_HOME at that cache), or pass {option}=<path of the file>", text)


def converted_from(path: Path) -> str | None:
    """The sha256 of the pickle a ``.safetensors`` file was converted from, as
    ``python -m pytest_diffeval convert-weights`` records it in the metadata (read from the
    header with the standard library); None for any other file."""
    if path.suffix != ".safetensors":
        return None
    try:
        with open(path, "rb") as handle:
            size = int.from_bytes(handle.read(8), "little")
            header = json.loads(handle.read(size)) if 0 < size <= 100_000_000 else {}
    except (OSError, ValueError):
        return None
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    source = meta.get("source_sha256") if isinstance(meta, dict) else None
    return source if isinstance(source, str) and re.fullmatch(r"[0-9a-f]{64}", source) else None


def weights_id(path: Path) -> str:
    """The weights' content hash (16 hex digits of sha256; a hub blob is named by its hash).
    A file made by ``convert-weights`` keeps the id of the pickle it came from (its tensors
    are that file's), so baselines recorded with the pickle still compare."""
    source = converted_from(Path(path))
    return source[:16] if source is not None else file_fingerprint(path)


# --------------------------------------------------------------------------- PickScore


def _model_location(name: str, metric: str, option: str) -> tuple[str, Path]:
    """``(id with content hash or commit, local folder)`` of a transformers model folder."""
    model_id, path = resolve_model_dir(name)
    if path is None and "@" in model_id:
        path = hub_snapshot(name)
    if path is None:
        from huggingface_hub.constants import HF_HUB_CACHE

        raise WeightsNotAvailableError(
            f"pytest-diffeval: {metric}: {name!r} ({option}=) is neither a local folder nor in the Hugging Face "
            f"cache {HF_HUB_CACHE} (nothing is downloaded at test time); fix: `huggingface-cli download {name}` on a "
            f"machine with access, or pass {option}=<local folder in hub layout>", name)
    return model_id, path


def _projected(output: Any) -> Any:
    """transformers 5 returns an output object whose ``pooler_output`` is the projection."""
    return output if hasattr(output, "norm") else output.pooler_output


def load_pickscore(model: str, processor: str | None, device: str) -> tuple[Any, Any, str]:
    """``(CLIPModel, CLIPProcessor, backbone id)``, loaded once per process; ``processor``
    None: the model folder's own processor files, else PickScore's published processor."""
    model_id, model_path = _model_location(model, "pick_score", "pickscore_model")
    if processor is None:
        has_own = (model_path / "tokenizer_config.json").is_file() and any(
            (model_path / name).is_file() for name in ("preprocessor_config.json", "processor_config.json"))
        processor = str(model_path) if has_own else PICKSCORE_PROCESSOR
    processor_id, processor_path = _model_location(processor, "pick_score", "pickscore_processor")
    backbone = f"pick_score:{model_id}" + ("" if processor_path == model_path else f"+processor:{processor_id}")

    def load() -> tuple[Any, Any, str]:
        from transformers import CLIPModel, CLIPProcessor

        loaded = CLIPModel.from_pretrained(str(model_path)).to(device).eval()
        return loaded, CLIPProcessor.from_pretrained(str(processor_path)), backbone

    return process_cache.get_or_load(("pick_score", backbone, device), load)


class _PromptScorer(Metric):
    """What PickScore and HPS share: one score per image against its prompt (77 CLIP tokens),
    higher is better, default tolerance 0.2, cached, and spread over torchrun ranks by block."""

    higher_is_better = True
    per_sample = True
    sample_wise = True  # under torchrun: each rank scores its block
    per_sample_options = ("prompts",)
    absolute_tolerance = 0.2
    cacheable = True
    max_tokens = 77


class PickScore(_PromptScorer):
    """PickScore per image: ``logit_scale.exp() * cos(CLIP image embedding, prompt embedding)``
    (the published ``calc_probs`` before its softmax over images).  Default tolerance 0.2."""

    name = "pick_score"

    def cache_material(self, images: Any, options: dict[str, Any]) -> Any:
        """The options, and the model and processor by content hash or hub commit."""
        ids = [resolve_model_dir(options.get("pickscore_model") or PICKSCORE_MODEL)[0],
               resolve_model_dir(options.get("pickscore_processor") or PICKSCORE_PROCESSOR)[0]]
        return {"options": bound_options(self.compute, images, options), "backbone": ids}

    def compute(self, images: Any, *, pickscore_model: str | None = None, pickscore_processor: str | None = None,
                prompts: list[str] | None = None, device: str | None = None, batch_size: int = 32) -> MetricResult:
        """Score ``images`` against their prompts with the PickScore model."""
        import torch

        prompts = prompts_for(self.name, images, prompts)
        device = device or settings.resolved_device()
        model, processor, backbone = load_pickscore(pickscore_model or PICKSCORE_MODEL, pickscore_processor, device)
        tokenizer = processor.tokenizer
        long = warn_truncated(self.name, prompts, [len(tokenizer(p)["input_ids"]) for p in prompts], self.max_tokens)
        pixels = images.as_tensor("cpu")
        values = []
        with torch.no_grad():
            for start in range(0, len(images), batch_size):
                stop = start + batch_size
                image_inputs = processor(images=list(pixels[start:stop]), return_tensors="pt")
                text_inputs = tokenizer(prompts[start:stop], padding=True, truncation=True,
                                        max_length=self.max_tokens, return_tensors="pt")
                image_embeds = _projected(model.get_image_features(pixel_values=image_inputs["pixel_values"].to(device)))
                text_embeds = _projected(model.get_text_features(input_ids=text_inputs["input_ids"].to(device),
                                                                 attention_mask=text_inputs["attention_mask"].to(device)))
                image_embeds = image_embeds / image_embeds.norm(dim=-1, keepdim=True)
                text_embeds = text_embeds / text_embeds.norm(dim=-1, keepdim=True)
                scores = model.logit_scale.exp() * (image_embeds * text_embeds).sum(-1)
                values.append(scores.double().cpu())
        per_sample = torch.cat(values).numpy().astype(np.float64)
        return MetricResult(self.name, float(per_sample.mean()), backbone, True, per_sample=per_sample,
                            details={"truncated_prompts": long})


# --------------------------------------------------------------------------- HPS v2 / v2.1


def import_open_clip() -> Any:
    """``open_clip``, or :class:`MissingDependencyError` naming the extra."""
    try:
        import open_clip
    except Exception as exc:  # noqa: BLE001 - ImportError, or torchvision failing to load its ops
        raise MissingDependencyError(
            f"pytest-diffeval: hps_v2 needs open_clip (HPS is an open_clip ViT-H-14), which cannot be imported here "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); fix: "
            "`pip install 'pytest-diffeval[hps]'` (open_clip_torch; it needs a torchvision built for your torch)"
        ) from exc
    return open_clip


def hps_version(version: str) -> str:
    """``"v2.0"`` or ``"v2.1"`` (``"2.1"``, ``"v2"`` accepted), else a clear error."""
    text = str(version).strip().lower().lstrip("v")
    text = {"2": "2.0"}.get(text, text)
    if f"v{text}" not in HPS_FILES:
        raise MetricInputError(f"pytest-diffeval: hps_v2: unknown hps_version {version!r}; fix: pass "
                               "hps_version='v2.0' or 'v2.1' (their scores are not comparable)")
    return f"v{text}"


def load_hps(version: str, weights: str | Path | None, architecture: str, device: str) -> tuple[Any, Any, Any, str]:
    """``(open_clip model, tokenizer, preprocess, backbone id)`` of one HPS version, loaded
    once per process.  The backbone id is ``hps_v2.1:<weights sha>`` (plus the architecture
    when not ViT-H-14): another version or other weights are another, never-compared backbone."""
    path = weights_file(weights, repo=HPS_REPO, filename=HPS_FILES[version], metric="hps_v2", option="hps_weights")
    backbone = f"hps_{version}:{weights_id(path)}" + ("" if architecture == HPS_ARCHITECTURE else f"+{architecture}")
    open_clip = import_open_clip()

    def load() -> tuple[Any, Any, Any, str]:
        fix = f"pass hps_weights=<{HPS_FILES[version]} of {HPS_REPO}, or its .safetensors conversion>; {CONVERT_FIX}"
        try:
            state = load_weights_file(path, metric="hps_v2", option="hps_weights", fix=fix)
        except ValueError as exc:  # a pickle weights_only=True refuses, or no state dict
            raise MetricInputError(f"{str(exc).split('; fix:')[0]}; fix: {fix}") from exc
        model = open_clip.create_model(architecture, pretrained=None, device="cpu")
        try:
            model.load_state_dict(state)
        except RuntimeError as exc:
            raise MetricInputError(f"pytest-diffeval: hps_v2: {path} is not an HPS checkpoint for open_clip "
                                   f"{architecture}: {str(exc).splitlines()[0]}; fix: {fix}") from exc
        model = model.to(device).eval()
        # HPSv2's preprocess_val: resize the longest side to the model's size, pad to a square
        # (open_clip's resize_mode="longest"); OpenAI mean/std (image_mean=None in HPSv2).
        preprocess = open_clip.image_transform(model.visual.image_size, is_train=False, mean=OPENAI_MEAN,
                                               std=OPENAI_STD, resize_mode="longest")
        return model, open_clip.get_tokenizer(architecture), preprocess, backbone

    return process_cache.get_or_load(("hps", backbone, device), load)


class HPSv2(_PromptScorer):
    """HPS v2 / v2.1 per image: ``100 * cos(image features, prompt features)`` of open_clip
    with the HPS checkpoint (``hps_version=`` "v2.1" by default).  Default tolerance 0.2."""

    name = "hps_v2"

    def cache_material(self, images: Any, options: dict[str, Any]) -> Any:
        """The options, and the weights by content hash ("unavailable" when they cannot be
        found: ``compute`` then raises the clear error, and nothing is stored)."""
        try:
            version = hps_version(options.get("hps_version", "v2.1"))
            path = weights_file(options.get("hps_weights"), repo=HPS_REPO, filename=HPS_FILES[version],
                                metric="hps_v2", option="hps_weights")
            weights = f"{version}:{weights_id(path)}"
        except DiffevalError:
            weights = "unavailable"
        return {"options": bound_options(self.compute, images, options), "weights": weights,
                "packages": package_versions("open_clip_torch", "torchvision", "timm")}

    def compute(self, images: Any, *, hps_version: str = "v2.1", hps_weights: str | Path | None = None,
                prompts: list[str] | None = None, device: str | None = None, batch_size: int = 16,
                hps_architecture: str = HPS_ARCHITECTURE) -> MetricResult:
        """Score ``images`` against their prompts with HPS ``hps_version``."""
        import torch

        version = _version(hps_version)
        prompts = prompts_for(self.name, images, prompts)
        device = device or settings.resolved_device()
        model, tokenizer, preprocess, backbone = load_hps(version, hps_weights, hps_architecture, device)
        encoder = getattr(tokenizer, "encode", None) or getattr(getattr(tokenizer, "tokenizer", None), "encode", None)
        lengths = [len(encoder(p)) + 2 if encoder else 0 for p in prompts]  # + start and end tokens
        long = warn_truncated(self.name, prompts, lengths, self.max_tokens)
        values = []
        with torch.no_grad():
            pil = images.to_pil()
            for start in range(0, len(images), batch_size):
                stop = start + batch_size
                pixels = torch.stack([preprocess(image) for image in pil[start:stop]]).to(device)
                tokens = tokenizer(prompts[start:stop]).to(device)
                image_features = model.encode_image(pixels, normalize=True)
                text_features = model.encode_text(tokens, normalize=True)
                values.append((100 * (image_features * text_features).sum(-1)).double().cpu())
        per_sample = torch.cat(values).numpy().astype(np.float64)
        return MetricResult(self.name, float(per_sample.mean()), backbone, True, per_sample=per_sample,
                            details={"hps_version": version, "truncated_prompts": long})


_version = hps_version  # compute's parameter shadows the function's name

__all__ = ["HPSv2", "PickScore", "hps_version", "import_open_clip", "load_hps", "load_pickscore",
           "prompts_for",
           "warn_truncated", "weights_file", "weights_id"]
