"""Metrics of the embedded model's independent checker (a digit classifier and pixel
colour statistics, no CLIP): does each image show the digit and colours its prompt asks
for?  Importing this module registers them, the way a team registers its own scorer.

* ``digit_match``  - 1 if the checker reads the prompt's digit, else 0
* ``colour_match`` - 1 if both the stroke and the background colour are the prompt's

Both are shares (higher is better), and cacheable: they depend only on the images, their
prompts and the checker's weights, which key their results (the checker, and torch with
it, is loaded only when a result is not cached).  Their default tolerance, 0.05, is one image in 20:
the good model scores at the ceiling (1.0), so a paired drop beyond that is a regression.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import numpy as np

from ..metrics import register_metric
from . import resolve_embedded

CHECKER = "diffeval/tiny-checker"


@lru_cache(maxsize=1)
def checker() -> Any:
    """The embedded checker, loaded once per process."""
    from .checker import DigitChecker

    path = resolve_embedded(CHECKER)
    if path is None:
        raise FileNotFoundError(f"pytest-diffeval: the embedded checker {CHECKER!r} has no weights in the package; "
                                "fix: reinstall pytest-diffeval or run scripts/train_embedded.py")
    return DigitChecker.from_pretrained(path)


@register_metric("digit_match", higher_is_better=True, absolute_tolerance=0.05, backbone=CHECKER, cacheable=True,
                 binary=True)
def digit_match(images: Any) -> np.ndarray:
    return checker().check(images.images, images.prompts)["digit"].astype(np.float64)


@register_metric("colour_match", higher_is_better=True, absolute_tolerance=0.05, backbone=CHECKER, cacheable=True,
                 binary=True)
def colour_match(images: Any) -> np.ndarray:
    verdict = checker().check(images.images, images.prompts)
    return (verdict["fg"] & verdict["bg"]).astype(np.float64)
