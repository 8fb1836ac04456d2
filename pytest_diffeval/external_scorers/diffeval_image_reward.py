"""ImageReward (github THUDM/ImageReward, ``ImageReward/ImageReward.py``) as a scorer: the
package's own model and ``score(prompt, image)``, with its weights loaded safely.

The reward is the package's: BLIP's ViT-L image embeddings, cross-attended by its BERT text
encoder over the prompt (truncated at 35 tokens), the [CLS] feature through an MLP, then
``(reward - 0.16717362830052426) / 1.0333394966054072`` (the published mean and std).  Nothing
of it is reimplemented here: this module only builds the package's ``ImageReward`` class
and loads ``ImageReward.pt`` with ``torch.load(weights_only=True)`` (or a ``.safetensors``
conversion) instead of the package's ``load()``, which would unpickle the file (and download
it when missing).  The package's BLIP tokenizer is ``bert-base-uncased``: it must be in that
environment's Hugging Face cache.

Runs in-process (``metrics/image_reward.py``) or in an environment of its own through the
external child (protocol 1 of ``external_child.py``): ``score(images, prompts, **options)``
takes PNG paths or PIL images.  Only the standard library is imported at module level.
"""

from __future__ import annotations

import hashlib
import importlib
import os
import sys

VERSION = "ImageReward-v1.0"
_MODELS: dict = {}


def _sha(path):
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def state_dict(weights):
    """The checkpoint's tensors: safetensors, or ``torch.load(weights_only=True)`` (never a
    full unpickle); a ``{"state_dict": ...}`` wrapper is unwrapped."""
    import torch

    if str(weights).endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(str(weights))
    try:
        loaded = torch.load(str(weights), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - reported with the fix
        raise ValueError(
            "pytest-diffeval: image_reward: %s cannot be loaded with torch.load(weights_only=True) (%s); fix: convert "
            "it once, in an environment you trust: python -m pytest_diffeval convert-weights %s %s"
            % (weights, type(exc).__name__, weights, os.path.splitext(str(weights))[0] + ".safetensors")) from exc
    if isinstance(loaded, dict) and isinstance(loaded.get("state_dict"), dict):
        loaded = loaded["state_dict"]
    return loaded


SCORED = ("blip.visual_encoder.", "blip.text_encoder.", "mlp.")  # the modules score() runs


def _check_covered(weights, model, missing):
    """Refuse a file that lacks parameters ``score()`` uses: ``strict=False`` would leave them
    at their random initialisation and the rewards would be noise, silently."""
    parameters = {name for name, _ in model.named_parameters()}
    lacking = sorted(name for name in missing if name in parameters and name.startswith(SCORED))
    if lacking:
        raise ValueError(
            "pytest-diffeval: image_reward: %s lacks %d of the model's parameters (%s%s), which would stay random; "
            "fix: pass the ImageReward.pt of THUDM/ImageReward (or its safetensors conversion), a state dict of the "
            "whole ImageReward model" % (weights, len(lacking), ", ".join(lacking[:3]), ", ..." if len(lacking) > 3 else ""))


def load(weights, med_config, device="cpu"):
    """The package's ``ImageReward`` model with ``weights``, once per process (per file
    version: a file rewritten in place is loaded again)."""
    key = tuple((str(path), os.stat(str(path)).st_mtime_ns, os.stat(str(path)).st_size)
                for path in (weights, med_config)) + (str(device),)
    if key not in _MODELS:
        module = importlib.import_module("ImageReward.ImageReward")  # the submodule; the package re-exports a class
        try:
            model = module.ImageReward(med_config=str(med_config), device=device).to(device)
        except OSError as exc:  # BertTokenizer.from_pretrained('bert-base-uncased') found no cached tokenizer
            if not os.path.isfile(str(med_config)):
                raise
            raise ValueError(
                "pytest-diffeval: image_reward: the ImageReward package could not load its BLIP tokenizer "
                "'bert-base-uncased' in %s (%s: %s); fix: put it in this environment's Hugging Face cache once, "
                "online: %s -c \"from transformers import BertTokenizer; BertTokenizer.from_pretrained("
                "'bert-base-uncased')\"" % (sys.executable, type(exc).__name__, str(exc).splitlines()[0][:200],
                                            sys.executable)) from exc
        loaded = model.load_state_dict(state_dict(weights), strict=False)  # strict=False as the package's load()
        _check_covered(weights, model, loaded.missing_keys)
        _MODELS[key] = model.eval()
    return _MODELS[key]


def info(weights=None, med_config=None, **_options):
    """What identifies the scorer beyond its code: the version and the weights' hashes."""
    found = {"version": VERSION}
    if weights and os.path.isfile(str(weights)):
        found["weights_sha256"] = _sha(weights)
    if med_config and os.path.isfile(str(med_config)):
        found["med_config_sha256"] = _sha(med_config)
    return found


def score(images, prompts, weights=None, med_config=None, device="cpu", **_options):
    """ImageReward of each image (a PNG path or a PIL image) for its prompt, in order."""
    import torch

    if weights is None or med_config is None:
        raise ValueError("pytest-diffeval: image_reward needs weights= (ImageReward.pt) and med_config= "
                         "(med_config.json) of THUDM/ImageReward")
    if len(images) != len(prompts):
        raise ValueError("pytest-diffeval: image_reward: %d images for %d prompts" % (len(images), len(prompts)))
    model = load(weights, med_config, device)
    with torch.no_grad():
        return [float(model.score(prompt, image)) for image, prompt in zip(images, prompts)]
