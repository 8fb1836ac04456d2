"""ImageReward per image (Xu et al. 2023, github THUDM/ImageReward): the ImageReward
package's own BLIP-based reward, run in this process when the package imports here, else in
a virtual environment of its own through the external-metric route (``metrics/external.py``),
because ImageReward 1.5 needs an older transformers than this plugin's.

What is native here: finding the weights (``ImageReward.pt`` and ``med_config.json`` from a
local path or the cached hub snapshot of ``THUDM/ImageReward``, never downloaded), loading
them safely (``external_scorers/diffeval_image_reward.py``: safetensors or
``torch.load(weights_only=True)``), the backbone id ``image_reward:ImageReward-v1.0:<weights
sha>`` and the routing.  The reward itself (BLIP ViT-L + BERT cross-attention + MLP,
``(reward - mean) / std`` with the published mean 0.16717 and std 1.03334, prompts cut at
35 tokens) is the package's code, not a reimplementation.

Its own environment, once::

    python3 -m venv ~/venvs/image-reward
    ~/venvs/image-reward/bin/pip install image-reward==1.5 transformers==4.40.2 diffusers==0.31.0 \
        timm==0.6.13 fairscale==0.4.13 openai-clip "setuptools<81"   # + a torch/torchvision pair

(the pins ``.ci/run`` tests with the real package, offline, on a random-weight model of its
architecture: ``tests/test_image_reward_real.py``; README, "Human-preference scorers")

then ``image_reward_python="~/venvs/image-reward/bin/python"`` (option) or
``DIFFEVAL_IMAGE_REWARD_PYTHON=...`` (environment).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from pathlib import Path
from typing import Any

import numpy as np

from .. import settings
from .._hashing import package_versions
from ..exceptions import DiffevalError, MetricInputError, MissingDependencyError
from ..external_scorers import diffeval_image_reward as scorer_module
from ..fingerprints import hub_snapshot
from . import Metric, MetricResult
from .external import ExternalMetric, ExternalScorer
from .preference import prompts_for, warn_truncated, weights_file, weights_id
from .result_cache import bound_options

REPO = "THUDM/ImageReward"
WEIGHTS_FILE = "ImageReward.pt"
MED_CONFIG_FILE = "med_config.json"
MEAN, STD = 0.16717362830052426, 1.0333394966054072  # ImageReward/ImageReward.py, applied by the package
MAX_TOKENS = 35
PYTHON_ENV = "DIFFEVAL_IMAGE_REWARD_PYTHON"
SCORER_FILE = Path(scorer_module.__file__).resolve()


def package_importable() -> bool:
    """Whether the ImageReward package can be found in this environment (not imported here)."""
    try:
        return importlib.util.find_spec("ImageReward") is not None
    except (ImportError, ValueError):
        return False


def warn_long_prompts(prompts: list[str]) -> list[str] | None:
    """Warn about the prompts longer than the 35 tokens ImageReward reads, counted with BLIP's
    tokenizer (``bert-base-uncased``) when it is in the Hugging Face cache; None when it is not."""
    snapshot = hub_snapshot("bert-base-uncased") or hub_snapshot("google-bert/bert-base-uncased")
    if snapshot is None:
        return None
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(snapshot))
    return warn_truncated("image_reward", prompts, [len(tokenizer(p)["input_ids"]) for p in prompts], MAX_TOKENS)


class ImageReward(Metric):
    """ImageReward per image (standardised: about -2 to 2; higher is better).  Default
    tolerance 0.05."""

    name = "image_reward"
    higher_is_better = True
    per_sample = True
    absolute_tolerance = 0.05
    cacheable = True
    sample_wise = True  # under torchrun each rank scores its block (each reward: its image and prompt)
    per_sample_options = ("prompts",)

    def combine(self, per_sample: np.ndarray, details: list[dict[str, Any]]) -> tuple[float, dict[str, Any]]:
        """The mean, and rank 0's details (route, scoring environment) with the long prompts of
        every block in sample order; None (not counted) when a block had no tokenizer to count."""
        combined = dict(details[0]) if details else {}
        blocks = [block.get("truncated_prompts") for block in details]
        combined["truncated_prompts"] = (None if any(block is None for block in blocks)
                                         else list(dict.fromkeys(p for block in blocks for p in block)))
        return float(per_sample.mean()), combined

    @staticmethod
    def files(weights: str | Path | None, med_config: str | Path | None) -> tuple[Path, Path]:
        """``(ImageReward.pt or its .safetensors conversion, med_config.json)``."""
        found = weights_file(weights, repo=REPO, filename=WEIGHTS_FILE, metric="image_reward",
                             option="image_reward_weights")
        config = weights_file(med_config if med_config is not None else (found.parent if weights is not None else None),
                              repo=REPO, filename=MED_CONFIG_FILE, metric="image_reward",
                              option="image_reward_med_config")
        return found, config

    @staticmethod
    def interpreter(python: str | os.PathLike[str] | None) -> str | None:
        """The other environment's interpreter: the option, else ``$DIFFEVAL_IMAGE_REWARD_PYTHON``."""
        value = python if python is not None else os.environ.get(PYTHON_ENV) or None
        return None if value is None else os.path.expanduser(os.fspath(value))

    def external(self, python: str, weights: Path, med_config: Path, device: str, timeout: float) -> ExternalMetric:
        scorer = ExternalScorer(python=python, scorer=f"{SCORER_FILE}:score", timeout=timeout,
                                options={"med_config": str(med_config), "device": device}, weights=str(weights))
        return ExternalMetric(self.name, scorer, higher_is_better=True)

    def cache_material(self, images: Any, options: dict[str, Any]) -> Any:
        """The options, the weights' and config's hashes and the environment that scores."""
        try:
            weights, config = self.files(options.get("image_reward_weights"), options.get("image_reward_med_config"))
        except DiffevalError:  # compute raises the clear error; nothing is stored
            return {"options": bound_options(self.compute, images, options), "files": "unavailable"}
        python = self.interpreter(options.get("image_reward_python"))
        material: dict[str, Any] = {"options": bound_options(self.compute, images, options),
                                    "files": [weights_id(weights), weights_id(config)]}
        if python is None:
            material["packages"] = package_versions("image-reward", "timm", "fairscale")
        else:
            device = options.get("device") or settings.resolved_device()
            material["environment"] = self.external(python, weights, config, device, 600.0).environment().key()
        return material

    def compute(self, images: Any, *, image_reward_weights: str | Path | None = None,
                image_reward_med_config: str | Path | None = None, image_reward_python: str | None = None,
                prompts: list[str] | None = None, device: str | None = None, timeout: float = 1800.0) -> MetricResult:
        """Score ``images`` against their prompts: in this process when the ImageReward package
        imports here and no interpreter is given, else with ``image_reward_python``."""
        prompts = prompts_for(self.name, images, prompts)
        weights, config = self.files(image_reward_weights, image_reward_med_config)
        backbone = f"image_reward:{scorer_module.VERSION}:{weights_id(weights)}"
        python = self.interpreter(image_reward_python)
        if python is None and not package_importable():
            raise MissingDependencyError(
                "pytest-diffeval: image_reward needs the ImageReward package, which is not installed here; fix: "
                "`pip install 'pytest-diffeval[image-reward]'`, or (its pins clash with this environment's "
                "transformers) install `image-reward` in a virtual environment of its own and pass "
                f"image_reward_python=<that environment's bin/python> or set {PYTHON_ENV}")
        long = warn_long_prompts(prompts)
        device = device or settings.resolved_device()
        if python is None:
            try:
                values = np.asarray(scorer_module.score(images.to_pil(), prompts, weights=str(weights),
                                                        med_config=str(config), device=device), dtype=np.float64)
            except ValueError as exc:
                if str(exc).startswith("pytest-diffeval:"):  # the scorer's own clear errors (an unsafe pickle)
                    raise MetricInputError(str(exc)) from exc
                raise
            return MetricResult(self.name, float(values.mean()), backbone, True, per_sample=values,
                                details={"route": "in-process", "truncated_prompts": long})
        metric = self.external(python, weights, config, device, timeout)
        scored = images if list(images.prompts) == prompts else dataclasses.replace(images, prompts=prompts)
        result = metric.compute(scored)
        return MetricResult(self.name, result.value, backbone, True, per_sample=result.per_sample,
                            details={"route": "external", "truncated_prompts": long, **result.details})


__all__ = ["ImageReward", "MAX_TOKENS", "MEAN", "STD", "package_importable"]
