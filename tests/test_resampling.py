"""Stratified resampling (pytest_diffeval.resampling): prompts × seeds, not i.i.d. images."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from pytest_diffeval.resampling import bootstrap_indices, prompt_of, split_halves, strata


def keys(prompts: int, seeds: int) -> list[str]:
    """Prompt-major sample keys, as ImageSet.sample_keys lists a generated set."""
    return [f"{s}|p{p}" for p in range(prompts) for s in range(seeds)]


def test_prompt_of_keeps_bars_in_the_prompt_and_refuses_a_key_without_seed():
    assert prompt_of("3|a|b") == "a|b"
    with pytest.raises(ValueError, match="is not '<seed>|<prompt>'"):
        prompt_of("no seed")


def test_strata_group_each_prompts_seeds_in_order():
    groups = strata(["0|a", "0|b", "1|a", "1|b", "2|a"])
    assert [g.tolist() for g in groups] == [[0, 2, 4], [1, 3]]


def test_bootstrap_draws_whole_prompts_and_seeds_within_them():
    ks = keys(8, 4)
    resamples = bootstrap_indices(ks, 0, 50)
    assert len(resamples) == 50 and all(len(r) == len(ks) for r in resamples)
    for indices in resamples:
        prompts = Counter(prompt_of(ks[i]) for i in indices)
        assert all(count % 4 == 0 for count in prompts.values())  # each prompt drawn brings 4 of its seeds
    # prompts are drawn with replacement: some resample repeats a prompt (8 draws of 8)
    assert any(max(Counter(prompt_of(ks[i]) for i in r).values()) > 4 for r in resamples)
    # seeds within a prompt with replacement: some resample repeats a (prompt, seed)
    assert any(max(Counter(r.tolist()).values()) > 1 for r in resamples)


def test_cluster_bootstrap_keeps_every_seed_of_a_drawn_prompt():
    ks = keys(5, 3)
    for indices in bootstrap_indices(ks, 1, 20, within=False):
        for members in strata(ks):
            hits = np.isin(members, indices)
            assert hits.all() or not hits.any()


def test_bootstrap_is_seeded():
    ks = keys(6, 2)
    a, b, c = bootstrap_indices(ks, 7, 5), bootstrap_indices(ks, 7, 5), bootstrap_indices(ks, 8, 5)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))
    generator = np.random.default_rng(7)
    assert all(np.array_equal(x, y) for x, y in zip(a, bootstrap_indices(ks, generator, 5)))


def test_bootstrap_refuses_a_negative_count():
    with pytest.raises(ValueError, match="resamples must be >= 0"):
        bootstrap_indices(keys(2, 2), 0, -1)


def test_split_halves_splits_each_prompts_seeds():
    ks = keys(16, 4)
    a, b = split_halves(ks, 3)
    assert sorted(np.concatenate([a, b]).tolist()) == list(range(len(ks)))
    assert Counter(prompt_of(ks[i]) for i in a) == Counter(prompt_of(ks[i]) for i in b)  # same prompts, 2 each
    assert not np.array_equal(a, split_halves(ks, 4)[0])  # another seed, another split
    assert np.array_equal(a, split_halves(ks, 3)[0])


def test_split_halves_balances_odd_seed_counts():
    ks = keys(7, 3) + ["0|lone"]  # 21 + 1 samples: every prompt has an extra seed to place
    a, b = split_halves(ks, 0)
    assert len(a) + len(b) == len(ks) and abs(len(a) - len(b)) <= 1
    assert not set(a.tolist()) & set(b.tolist())
