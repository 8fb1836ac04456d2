"""Cache entries are tied to their keys: a feature file swapped between entries, one written
under another key or one of the wrong shape or dtype is a miss and recomputed, never a
result (the image, result and reference-statistics caches have theirs in
test_generation.py, test_result_cache.py and test_metrics_correctness.py)."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from pytest_diffeval.metrics.backbones import FeatureCache

ROWS = torch.arange(12.0).reshape(3, 4)


class Backbone:
    """A stand-in backbone pass that records the batch sizes it is asked for."""

    def __init__(self) -> None:
        self.calls: list[int] = []

    def __call__(self, rows: torch.Tensor) -> torch.Tensor:
        self.calls.append(len(rows))
        return torch.cat([rows * 2, rows.sum(dim=1, keepdim=True)], dim=1)


def test_a_feature_entry_swapped_with_another_is_a_miss(tmp_path: Path) -> None:
    cache, backbone = FeatureCache(tmp_path), Backbone()
    first = cache.lookup("clip@abc", "image", ROWS, "cpu", backbone)
    keys = [cache.key("clip@abc", "image", row, "cpu") for row in ROWS]
    shutil.copyfile(cache._path(keys[1]), cache._path(keys[0]))  # row 1's features in row 0's place
    again = cache.lookup("clip@abc", "image", ROWS, "cpu", backbone)
    assert torch.equal(again, first) and backbone.calls == [3, 1]  # row 0 recomputed
    assert cache.get(keys[0], "clip@abc") is not None  # and rewritten: a hit again
    assert cache.get(keys[0], "other@def") is None  # the same file is no entry of another backbone


def test_a_feature_entry_of_the_wrong_shape_or_dtype_is_recomputed(tmp_path: Path) -> None:
    cache, backbone = FeatureCache(tmp_path), Backbone()
    keys = [cache.key("clip@abc", "image", row, "cpu") for row in ROWS]
    expected = backbone(ROWS)
    backbone.calls.clear()

    cache.put(keys[0], "clip@abc", torch.zeros(7))  # under its own key, but 7 features where there are 5
    got = cache.lookup("clip@abc", "image", ROWS, "cpu", backbone)  # rows 1, 2 missing, row 0 misshapen
    assert torch.equal(got, expected) and backbone.calls == [2, 1]

    cache.put(keys[2], "clip@abc", torch.zeros(7))  # all cached, and they disagree: all recomputed
    got = cache.lookup("clip@abc", "image", ROWS, "cpu", backbone)
    assert torch.equal(got, expected) and backbone.calls == [2, 1, 3]

    cache.put(keys[1], "clip@abc", torch.zeros(5, dtype=torch.int64))  # not features at all
    cache.put(keys[2], "clip@abc", torch.zeros(1, 5))
    assert cache.get(keys[1], "clip@abc") is None and cache.get(keys[2], "clip@abc") is None
    got = cache.lookup("clip@abc", "image", ROWS, "cpu", backbone)
    assert torch.equal(got, expected) and backbone.calls == [2, 1, 3, 2]
