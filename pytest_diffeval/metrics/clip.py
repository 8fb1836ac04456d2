"""CLIP score (text-image alignment), computed by torchmetrics' own CLIP-score code."""

from __future__ import annotations

from typing import Any

import numpy as np

from .. import settings
from . import Metric, MetricInputError, MetricResult


class ClipScore(Metric):
    """``100 * cos(image embedding, prompt embedding)`` per image; the value is
    torchmetrics' ``max(mean, 0)``.  Default tolerance: 1 point (see README, "Tolerances")."""

    name = "clip_score"
    higher_is_better = True
    per_sample = True
    absolute_tolerance = 1.0
    cacheable = True
    sample_wise = True
    per_sample_options = ("prompts",)

    def combine(self, per_sample: np.ndarray, details: list[dict[str, Any]]) -> tuple[float, dict[str, Any]]:
        """torchmetrics' ``max(mean, 0)``; the truncated prompts of every rank's block."""
        value, combined = super().combine(per_sample, details)
        return max(value, 0.0), combined

    def compute(
        self,
        images: Any,
        *,
        clip_model: str | None = None,
        prompts: list[str] | None = None,
        device: str | None = None,
        batch_size: int = 64,
    ) -> MetricResult:
        """Score ``images`` against their own prompts (or ``prompts``, one per image)."""
        import torch  # here, not at import: a cached result needs neither torch nor torchmetrics
        from torchmetrics.functional.multimodal.clip_score import _clip_score_update

        from .backbones import load_clip

        prompts = list(prompts) if prompts is not None else list(images.prompts)
        if len(prompts) != len(images):
            raise MetricInputError(f"clip_score: {len(prompts)} prompts for {len(images)} images; give one prompt per image")
        backbone = load_clip(clip_model or settings.current().clip_model, device or settings.resolved_device())
        long_prompts = backbone.warn_long_prompts(prompts)
        model, processor = backbone.as_torchmetrics()
        tensor = images.as_tensor(backbone.device)
        scores = []
        with torch.no_grad():
            for start in range(0, len(images), batch_size):
                batch = list(tensor[start : start + batch_size])
                score, _ = _clip_score_update(batch, prompts[start : start + batch_size], model, processor)
                scores.append(score.detach().double().cpu())
        per_sample = torch.cat(scores).numpy().astype(np.float64)
        value = max(float(per_sample.mean()), 0.0)  # torchmetrics clamps the mean, not each sample
        return MetricResult(self.name, value, backbone.id, True, per_sample=per_sample,
                            details={"truncated_prompts": long_prompts})
