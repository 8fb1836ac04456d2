"""pytest-diffeval: quality regressions of diffusion models fail like unit tests.

Fixtures (``diffusion_pipeline``, ``generate``, ``diffeval_baseline``, ``diffeval_device``)
come with the plugin; this module exports the helpers tests call.  Names are imported
on first use, so loading the plugin does not import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "assert_clip_score_at_least": "assertions",
    "assert_clip_directional_similarity_at_least": "assertions",
    "assert_clip_image_similarity_at_least": "assertions",
    "assert_fid_below": "assertions",
    "assert_metric": "assertions",
    "BaselineError": "baselines",
    "DiffevalBaseline": "baselines",
    "ImageSet": "generation",
    "generate_images": "generation",
    "Metric": "metrics",
    "MetricResult": "metrics",
    "compute_metric": "metrics",
    "register_metric": "metrics",
    "MetricError": "metrics",
    "MetricInputError": "metrics",
    "NonFiniteMetricError": "metrics",
    "compute_per_class": "metrics.per_class",
    "save_reference_statistics": "metrics.reference_stats",
    "PipelineNotFoundError": "pipelines",
    "WeightsNotAvailableError": "pipelines",
    "load_pipeline": "pipelines",
    "Comparison": "verdicts",
    "PromptRecord": "prompts",
    "load_drawbench": "prompts",
    "load_parti_prompts": "prompts",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
