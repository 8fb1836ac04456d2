"""Stratified resampling of a generated set: prompts × seeds, not i.i.d. images.

A set of ``P`` prompts × ``S`` seeds has two sources of variation.  Resampling its images
as if they were independent draws mixes them: a bootstrap of i.i.d. images measures "another
mix of prompts and seeds", which for set-level metrics (FID, KID, CMMD, drift) is several
times what re-drawing the seeds of the *same* prompts moves them (issue 17: FID's and
CMMD's i.i.d. spreads were ~4× the seed-redraw noise).  Every spread and every seed-noise
estimate of the package resamples through this module instead:

* :func:`bootstrap_indices`: the two-stage (cluster) bootstrap: draw the prompts with
  replacement, then, for every prompt drawn, its seeds with replacement.  Used for the
  uncertainty of a set-level value and, applied to the baseline and this run *jointly*
  (the same index arrays on both, sample keys aligned), for paired set-level verdicts.
* :func:`split_halves`: each prompt's seeds split into two halves at random: two sets of
  the same prompts that differ only in their seeds, whose distance is the seed-redraw
  noise at half the set size.

Samples are identified by their keys ``"<seed>|<prompt>"`` (``ImageSet.sample_keys``); the
functions return integer index arrays into that key list, so the caller applies them to
features, per-sample values or images alike.  Pure functions of the keys and a seed:
numpy only, the same indices for the same keys and seed on every platform.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["bootstrap_indices", "prompt_of", "rng", "split_halves", "strata"]


def prompt_of(key: str) -> str:
    """The prompt of a sample key ``"<seed>|<prompt>"`` (the prompt may itself hold ``|``)."""
    seed, sep, prompt = key.partition("|")
    if not sep:
        raise ValueError(f"pytest-diffeval: sample key {key!r} is not '<seed>|<prompt>'")
    return prompt


def rng(seed: int | np.random.Generator) -> np.random.Generator:
    """A numpy generator from a seed (or the generator itself): resampling is always seeded."""
    return seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)


def strata(keys: Sequence[str]) -> list[np.ndarray]:
    """The indices of each prompt's samples, prompts in order of first appearance and each
    prompt's samples in key order."""
    groups: dict[str, list[int]] = {}
    for index, key in enumerate(keys):
        groups.setdefault(prompt_of(key), []).append(index)
    return [np.asarray(members, dtype=np.int64) for members in groups.values()]


def bootstrap_indices(keys: Sequence[str], seed: int | np.random.Generator, resamples: int,
                      *, within: bool = True) -> list[np.ndarray]:
    """``resamples`` two-stage bootstrap resamples of the set whose sample keys are ``keys``:
    each draws as many prompts as there are, with replacement, and for every prompt drawn
    (``within``) as many of its seeds as it has, with replacement (``within=False``: all its
    seeds, the cluster bootstrap).  Returns one index array per resample (all of length
    ``len(keys)`` when every prompt has the same number of seeds)."""
    if resamples < 0:
        raise ValueError(f"pytest-diffeval: resamples must be >= 0, got {resamples}")
    groups = strata(keys)
    generator = rng(seed)
    out = []
    for _ in range(resamples):
        chosen = generator.integers(0, len(groups), size=len(groups)) if groups else np.empty(0, np.int64)
        parts = []
        for g in chosen:
            members = groups[g]
            parts.append(members[generator.integers(0, len(members), size=len(members))] if within else members)
        out.append(np.concatenate(parts) if parts else np.empty(0, np.int64))
    return out


def split_halves(keys: Sequence[str], seed: int | np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Each prompt's seeds split at random into two halves: two index arrays of the same
    prompts that differ in their seeds only.  A prompt with an odd number of seeds gives its
    extra seed to the half that is smaller so far (ties: at random), so the halves differ in
    size by at most one; a prompt with one seed thus lands wholly in one half."""
    generator = rng(seed)
    first: list[np.ndarray] = []
    second: list[np.ndarray] = []
    sizes = [0, 0]
    for members in strata(keys):
        order = members[generator.permutation(len(members))]
        half = len(members) // 2
        a, b, extra = order[:half], order[half : 2 * half], order[2 * half :]
        if len(extra):
            to_first = sizes[0] < sizes[1] or (sizes[0] == sizes[1] and bool(generator.integers(0, 2)))
            a, b = (np.concatenate([a, extra]), b) if to_first else (a, np.concatenate([b, extra]))
        first.append(a)
        second.append(b)
        sizes[0] += len(a)
        sizes[1] += len(b)
    empty = np.empty(0, np.int64)
    return (np.sort(np.concatenate(first)) if first else empty, np.sort(np.concatenate(second)) if second else empty)
