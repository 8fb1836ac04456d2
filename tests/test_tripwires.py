"""Tripwires: broken images fail every assertion before any metric judges them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pytest_diffeval import assert_metric, settings
from pytest_diffeval.generation import ImageSet
from pytest_diffeval.metrics import register_metric
from pytest_diffeval.tripwires import TripwireError, find_problems


@register_metric("always_one")
def always_one(images):
    return np.ones(len(images))


def healthy(n: int = 4) -> ImageSet:
    rng = np.random.default_rng(0)
    return ImageSet(images=rng.integers(0, 256, (n, 8, 8, 3), dtype=np.uint8), prompts=["a", "b"] * (n // 2),
                    seeds=[0, 0, 1, 1][:n], nonfinite=[False] * n, test_id="t::wires")


@pytest.fixture(autouse=True)
def results(tmp_path: Path):
    previous = settings.current().results_dir
    settings.configure(results_dir=tmp_path)
    yield
    settings.configure(results_dir=previous)


def test_healthy_images_pass() -> None:
    assert find_problems(healthy()) == []
    assert_metric(healthy(), "always_one", at_least=1)


def test_nan_output_trips() -> None:
    images = healthy()
    images.nonfinite = [False, True, False, False]
    with pytest.raises(TripwireError, match=r"1 of 4 images had NaN/inf .*seed 0 'b'"):
        assert_metric(images, "always_one", at_least=1)


def test_black_image_trips_and_names_the_likely_cause() -> None:
    images = healthy()
    images.images[2] = 0
    with pytest.raises(TripwireError, match="all black \\(safety checker replacement or broken VAE\\)"):
        assert_metric(images, "always_one", at_least=1)


def test_identical_images_for_different_prompts_trip() -> None:
    images = healthy()
    images.images[3] = images.images[2]  # seed 1: prompts 'a' and 'b' gave the same picture
    with pytest.raises(TripwireError, match="different prompts gave identical images with seed 1: 'a' and 'b'"):
        assert_metric(images, "always_one", at_least=1)


def test_tripwires_can_be_turned_off_per_call() -> None:
    images = healthy()
    images.images[:] = 0
    assert_metric(images, "always_one", at_least=1, tripwires=False)
