"""What a metric returns: one value for an image set, its per-sample values and details."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class MetricResult:
    """One metric measured on one image set."""

    metric: str
    value: float
    backbone: str
    higher_is_better: bool
    per_sample: np.ndarray | None = None  # aligned with ImageSet.sample_keys
    details: dict[str, Any] = field(default_factory=dict)
    state: dict[str, Any] | None = None  # tensors a baseline keeps beside its JSON (drift's feature statistics)
