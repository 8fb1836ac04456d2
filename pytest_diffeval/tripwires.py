"""Checks that fail regardless of baselines and thresholds, because no number computed on
such images means anything: non-finite pipeline output, constant images (the safety
checker's black replacement, a broken VAE) and identical images for different prompts
(the prompt is ignored).  A black frame can out-score a bad image on CLIP, so these are
not left to the metrics.  Every assertion helper runs them first (``tripwires=False``
turns them off for a call)."""

from __future__ import annotations

from typing import Any

import numpy as np


class TripwireError(AssertionError):
    """The images are broken in a way no metric should be asked to judge."""


def find_problems(images: Any, *, identical_tolerance: int = 0) -> list[str]:
    """Human-readable problems of an ImageSet (empty when healthy)."""
    problems = []
    flat = images.images.reshape(len(images), -1).astype(np.int16)
    nonfinite = [i for i, bad in enumerate(images.nonfinite or []) if bad]
    if nonfinite:
        problems.append(f"{len(nonfinite)} of {len(images)} images had NaN/inf in the pipeline's output "
                        f"(e.g. fp16 overflow), first: seed {images.seeds[nonfinite[0]]} {images.prompts[nonfinite[0]]!r}")
    constant = [i for i in range(len(images)) if flat[i].max() == flat[i].min()]
    if constant:
        level = int(flat[constant[0]][0])
        kind = "all black (safety checker replacement or broken VAE)" if level == 0 else f"constant (value {level})"
        problems.append(f"{len(constant)} of {len(images)} images are {kind}, first: seed "
                        f"{images.seeds[constant[0]]} {images.prompts[constant[0]]!r}")
    by_seed: dict[int, list[int]] = {}
    for index, seed in enumerate(images.seeds):
        by_seed.setdefault(seed, []).append(index)
    for seed, indices in by_seed.items():
        for a_pos, a in enumerate(indices):
            for b in indices[a_pos + 1:]:
                if images.prompts[a] != images.prompts[b] and np.abs(flat[a] - flat[b]).max() <= identical_tolerance:
                    problems.append(f"different prompts gave identical images with seed {seed}: {images.prompts[a]!r} "
                                    f"and {images.prompts[b]!r} (is the text conditioning ignored?)")
                    return problems
    return problems


def check(images: Any) -> None:
    """Raise :class:`TripwireError` if ``images`` trip a wire (checked once per ImageSet)."""
    __tracebackhide__ = True
    if getattr(images, "_tripwires_passed", False) or not hasattr(images, "nonfinite"):
        return
    problems = find_problems(images)
    if problems:
        from .assertions import fail

        fail(images, "tripwire: " + "\n  tripwire: ".join(problems), error=TripwireError)
    images._tripwires_passed = True
