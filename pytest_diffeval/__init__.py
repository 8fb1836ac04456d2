"""pytest-diffeval: quality regressions of diffusion models fail like unit tests.

Fixtures (``diffusion_pipeline``, ``generate``, ``diffeval_baseline``, ``diffeval_device``)
come with the plugin; this module exports the helpers tests call.  None of these modules
imports torch, diffusers, transformers or torchmetrics at module level (they are imported
when a model is loaded or a metric computed), so loading the plugin stays cheap;
``tests/test_imports.py`` checks it.
"""

from __future__ import annotations

from ._version import __version__
from .assertions import (
    assert_clip_directional_similarity_at_least,
    assert_clip_image_similarity_at_least,
    assert_clip_score_at_least,
    assert_fid_below,
    assert_metric,
    raise_at_once,
)
from .baselines import DiffevalBaseline
from .exceptions import (
    BaselineError,
    DiffevalError,
    MetricError,
    MetricInputError,
    NonFiniteMetricError,
    PipelineNotFoundError,
    TripwireError,
    WeightsNotAvailableError,
)
from .generation import ImageSet, generate_images
from .metrics import Metric, MetricResult, compute_metric, register_metric
from .metrics.per_class import compute_per_class
from .metrics.reference_stats import save_reference_statistics
from .pipelines import load_pipeline
from .plugin.options import skip_or_fail
from .prompts import PromptRecord, load_drawbench, load_parti_prompts
from .verdicts import Comparison
from .vqa import VQABackend, caption, load_questions

__all__ = [
    "__version__",
    "assert_clip_score_at_least",
    "assert_clip_directional_similarity_at_least",
    "assert_clip_image_similarity_at_least",
    "assert_fid_below",
    "assert_metric",
    "raise_at_once",
    "BaselineError",
    "DiffevalBaseline",
    "DiffevalError",
    "ImageSet",
    "generate_images",
    "Metric",
    "MetricResult",
    "compute_metric",
    "register_metric",
    "MetricError",
    "MetricInputError",
    "NonFiniteMetricError",
    "compute_per_class",
    "save_reference_statistics",
    "PipelineNotFoundError",
    "TripwireError",
    "WeightsNotAvailableError",
    "load_pipeline",
    "skip_or_fail",
    "Comparison",
    "PromptRecord",
    "load_drawbench",
    "load_parti_prompts",
    "VQABackend",
    "caption",
    "load_questions",
]
