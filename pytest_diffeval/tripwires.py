"""Checks that fail regardless of baselines and thresholds, because no number computed on
such images means anything: non-finite pipeline output, constant images (the safety
checker's black replacement, a broken VAE) and identical images for different prompts
(the prompt is ignored).  A black frame can out-score a bad image on CLIP, so these are
not left to the metrics.  Every assertion helper runs them first (``tripwires=False``
turns them off for a call).  Each problem says what to check to fix it."""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

from ._hashing import digest_bytes
from .exceptions import TripwireError  # noqa: F401 - re-exported
from .recording import fail

FIX_NONFINITE = ("fix: run in float32 (--diffeval-dtype=float32) or keep the VAE in float32; "
                 "if float32 overflows too, check the weights for inf/NaN or huge values")
FIX_BLACK = ("fix: pass safety_checker=None to diffusion_pipeline() if the safety checker blanked them, "
             "else check the VAE (its dtype, its scaling_factor)")
FIX_CONSTANT = "fix: check the VAE decode and the output range (output_type, scaling_factor, clip)"
FIX_IDENTICAL = ("fix: check that the text encoder's output reaches the UNet (encoder_hidden_states, "
                 "cross_attention_dim) and that the tokenizer does not map the prompts to the same ids")
TURN_OFF = "if the images are meant to look like this, pass tripwires=False to this one assertion"


def _sample(images: Any, index: int) -> str:
    return f"seed {images.seeds[index]} {images.prompts[index]!r}"


def find_problems(images: Any, *, identical_tolerance: int = 0) -> list[str]:
    """Human-readable problems of an ImageSet (empty when healthy), each with its fix."""
    problems = []
    # One line per sample (constant?, first value, content digest): under torchrun each rank
    # summarises its own block, so no rank needs the whole set's pixels.
    summaries = (images.map_samples(_summary, "summarise the samples for the tripwires")
                 if hasattr(images, "map_samples") else [_summary(image) for image in images.images])
    nonfinite = [i for i, bad in enumerate(images.nonfinite or []) if bad]
    if nonfinite:
        problems.append(f"{len(nonfinite)} of {len(images)} images had NaN/inf in the pipeline's output "
                        f"(e.g. fp16 overflow), first: {_sample(images, nonfinite[0])}; {FIX_NONFINITE}")
    constant = [i for i, summary in enumerate(summaries) if summary[0]]
    if constant:
        level = int(summaries[constant[0]][1])
        kind = "all black (safety checker replacement or broken VAE)" if level == 0 else f"constant (value {level})"
        fix = FIX_BLACK if level == 0 else FIX_CONSTANT
        problems.append(f"{len(constant)} of {len(images)} images are {kind}, first: "
                        f"{_sample(images, constant[0])}; {fix}")
    if identical_tolerance:  # near-identical pixels: compared in full
        flat = images.images.reshape(len(images), -1).astype(np.int16)
        identical = _identical_pair(images, lambda a, b: np.abs(flat[a] - flat[b]).max() <= identical_tolerance)
    else:
        identical = _identical_pair(images, lambda a, b: summaries[a][2] == summaries[b][2])
    if identical:
        seed, a, b = identical
        problems.append(f"different prompts gave identical images with seed {seed}: {images.prompts[a]!r} "
                        f"and {images.prompts[b]!r} (is the text conditioning ignored?); {FIX_IDENTICAL}")
    return problems


def _summary(image: np.ndarray) -> list[Any]:
    """Whether ``image`` is constant, its first value and a digest of its pixels."""
    return [bool(image.min() == image.max()), int(image.reshape(-1)[0]),
            digest_bytes(np.ascontiguousarray(image).tobytes(), 32)]


def _identical_pair(images: Any, same: Callable[[int, int], bool]) -> tuple[int, int, int] | None:
    """The first (seed, i, j) whose two different prompts gave the same picture (``same``)."""
    by_seed: dict[int, list[int]] = {}
    for index, seed in enumerate(images.seeds):
        by_seed.setdefault(seed, []).append(index)
    for seed, indices in by_seed.items():
        for a_pos, a in enumerate(indices):
            for b in indices[a_pos + 1:]:
                if images.prompts[a] != images.prompts[b] and same(a, b):
                    return seed, a, b
    return None


def check(images: Any) -> None:
    """Raise :class:`TripwireError` if ``images`` trip a wire (checked once per ImageSet)."""
    __tracebackhide__ = True
    if getattr(images, "tripwires_passed", False) or not hasattr(images, "nonfinite"):
        return
    problems = find_problems(images)
    if problems:
        fail(images, "tripwire: " + "\n  tripwire: ".join(problems) + f"\n  ({TURN_OFF})", error=TripwireError)
    images.tripwires_passed = True
