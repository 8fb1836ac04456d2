"""Absolute-threshold helpers: pass, fail, and what the failure says."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pytest_diffeval import assert_clip_score_at_least, assert_fid_below, raise_at_once, settings
from pytest_diffeval.generation import ImageSet


@pytest.fixture
def images() -> ImageSet:
    rng = np.random.default_rng(0)
    return ImageSet(images=(rng.random((6, 32, 32, 3)) * 255).astype(np.uint8),
                    prompts=["a red digit 3", "a red digit 3", "a cat", "a cat", "a blue square", "a blue square"],
                    seeds=[0, 1] * 3, test_id="tests/test_x.py::test_y")


@pytest.fixture(autouse=True)
def results_dir(tmp_path: Path, tiny_models: dict[str, Path]):
    previous = settings.current()
    settings.configure(results_dir=tmp_path / "results", clip_model=str(tiny_models["clip"]), records=[])
    yield tmp_path / "results"
    settings.configure(results_dir=previous.results_dir, clip_model=previous.clip_model, records=[])


def test_clip_floor_passes_and_records_the_check(images: ImageSet, results_dir: Path) -> None:
    result = assert_clip_score_at_least(images, 0.0)
    [row] = settings.current().records
    assert row["metric"] == "clip_score" and row["verdict"] == "pass" and row["value"] == result.value
    assert row["threshold"] == 0.0 and row["backbone"] == result.backbone
    assert not results_dir.exists()  # nothing saved for a pass


def test_clip_floor_failure_names_metric_backbone_value_worst_prompts_and_images(images: ImageSet, results_dir: Path) -> None:
    result_value = assert_clip_score_at_least(images, 0.0).value
    with pytest.raises(AssertionError) as info, raise_at_once():
        assert_clip_score_at_least(images, 99.0)
    message = str(info.value)
    assert f"clip_score {result_value:.4g} over 6 images (tiny-clip@" in message
    assert "outside the bound >= 99.0" in message
    assert "worst prompts" in message and "'a cat'" in message and "'a blue square'" in message
    folder = results_dir / "tests_test_x.py__test_y"
    assert f"images of this run: {folder}" in message
    assert (folder / "grid.png").is_file() and (folder / "samples.json").is_file()


def test_per_prompt_floor_fails_when_one_prompt_is_below(images: ImageSet) -> None:
    per_sample = assert_clip_score_at_least(images, 0.0).per_sample
    per_prompt = {p: per_sample[i:i + 2].mean() for i, p in zip(range(0, 6, 2), ["a red digit 3", "a cat", "a blue square"])}
    floor = float(np.median(list(per_prompt.values())))
    assert_clip_score_at_least(images, min(per_prompt.values()) - 1e-6, per_prompt=True)
    with pytest.raises(AssertionError, match="1 of 3 prompts are outside the bound >= "), raise_at_once():
        assert_clip_score_at_least(images, floor, per_prompt=True)


def test_fid_below(images: ImageSet, tiny_models: dict[str, Path]) -> None:
    features = f"clip:{tiny_models['clip']}"
    with pytest.warns(UserWarning, match="biased upward"):
        assert_fid_below(images, images, 1e-6, features=features)
    shifted = ImageSet(images=(images.images // 4), prompts=images.prompts, seeds=images.seeds, test_id="t::fid")
    with pytest.raises(AssertionError, match=r"(?s)fid \d+\.\d+ \(clip:tiny-clip@\w+\) between 6 images and 6 reference images is not below 0.001.*note: FID on 6"), raise_at_once():
        with pytest.warns(UserWarning):
            assert_fid_below(shifted, images, 1e-3, features=features)


def test_assert_metric_bounds_any_registered_metric(images: ImageSet) -> None:
    from pytest_diffeval import assert_metric
    from pytest_diffeval.metrics import register_metric

    @register_metric("mean_level")
    def mean_level(images):
        return images.images.reshape(len(images), -1).mean(axis=1)

    value = assert_metric(images, "mean_level", at_least=0, at_most=255).value
    with pytest.raises(AssertionError, match=rf"mean_level {value:.4g} over 6 images \(custom\): outside the bound <= 10"), raise_at_once():
        assert_metric(images, "mean_level", at_most=10)
    with pytest.raises(ValueError, match="needs at_least= and/or at_most="):
        assert_metric(images, "mean_level")
