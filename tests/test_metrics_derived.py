"""Good-image rate and seed stability against numpy on the underlying per-sample values,
and the new metrics inside ``diffeval_baseline.assert_no_regression`` end to end."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pytest_diffeval.generation import ImageSet
from pytest_diffeval.metrics import Metric, MetricResult, compute_metric, get_metric, register_metric

PROMPTS = ["a cat", "a dog", "a red cube"]


@register_metric("test_red", higher_is_better=True)
def mean_red(images: ImageSet) -> np.ndarray:
    return images.images[..., 0].reshape(len(images), -1).mean(axis=1)


@register_metric("test_blue", higher_is_better=False)
def mean_blue(images: ImageSet) -> np.ndarray:
    return images.images[..., 2].reshape(len(images), -1).mean(axis=1)


class SetLevel(Metric):
    name = "test_set_level"
    per_sample = False

    def compute(self, images, **options):
        return MetricResult(self.name, 1.0, "none", True)


register_metric(SetLevel())


def image_set(seeds: int = 4, seed: int = 0) -> ImageSet:
    rng = np.random.default_rng(seed)
    n = len(PROMPTS) * seeds
    scale = rng.random((n, 1, 1, 3))  # each image its own brightness per channel
    images = (rng.random((n, 16, 16, 3)) * 255 * scale).astype(np.uint8)
    return ImageSet(images=images, prompts=[p for p in PROMPTS for _ in range(seeds)], seeds=list(range(seeds)) * len(PROMPTS))


def test_good_image_rate_counts_passing_samples_in_the_metrics_direction() -> None:
    images = image_set()
    red = mean_red(images)
    threshold = float(np.median(red))
    result = compute_metric("good_image_rate", images, of="test_red", threshold=threshold)
    np.testing.assert_array_equal(result.per_sample, (red >= threshold).astype(float))
    assert result.value == pytest.approx(np.mean(red >= threshold)) and 0 < result.value < 1
    assert result.details["n_good"] == int((red >= threshold).sum())
    blue = mean_blue(images)  # lower is better: good means at most the threshold
    low = compute_metric("good_image_rate", images, of="test_blue", threshold=float(np.percentile(blue, 25)))
    np.testing.assert_array_equal(low.per_sample, (blue <= np.percentile(blue, 25)).astype(float))
    assert get_metric("good_image_rate").higher_is_better


def test_good_image_rate_of_clip_score_passes_options_through(tiny_models: dict[str, Path]) -> None:
    images = image_set(seeds=2)
    scores = compute_metric("clip_score", images, clip_model=str(tiny_models["clip"])).per_sample
    threshold = float(np.median(scores))
    rate = compute_metric("good_image_rate", images, threshold=threshold, clip_model=str(tiny_models["clip"]))
    np.testing.assert_array_equal(rate.per_sample, (scores >= threshold).astype(float))
    assert rate.backbone.startswith("tiny-clip@") and rate.details["rule"] == f"clip_score >= {threshold}"


def test_seed_stability_is_the_mean_over_prompts_of_the_std_over_seeds() -> None:
    images = image_set(seeds=4)
    red = mean_red(images).reshape(len(PROMPTS), 4)  # prompt-major
    result = compute_metric("seed_stability", images, of="test_red")
    assert result.value == pytest.approx(red.std(axis=1, ddof=1).mean())
    assert result.details["per_prompt_std"] == pytest.approx(dict(zip(PROMPTS, red.std(axis=1, ddof=1))))
    assert result.per_sample is None and not result.higher_is_better
    stds = red.std(axis=1, ddof=1)  # the bootstrap over prompts: same seed, same resamples
    rng = np.random.default_rng(0)
    assert result.details["spread"] == pytest.approx(
        np.std([stds[rng.integers(3, size=3)].mean() for _ in range(50)], ddof=1))
    assert result.details["spread"] > 0
    steady = image_set(seeds=4)
    steady.images[:] = steady.images[::4].repeat(4, axis=0)  # every seed of a prompt alike
    assert compute_metric("seed_stability", steady, of="test_red").value == 0.0


def test_derived_metrics_refuse_what_they_cannot_use() -> None:
    images = image_set(seeds=1)
    with pytest.raises(ValueError, match="needs threshold="):
        compute_metric("good_image_rate", images, of="test_red")
    with pytest.raises(ValueError, match="needs a per-sample metric, but 'test_set_level'"):
        compute_metric("good_image_rate", images, of="test_set_level", threshold=0.0)
    with pytest.raises(ValueError, match="at least 2 seeds per prompt; 3 prompt"):
        compute_metric("seed_stability", images, of="test_red")
    with pytest.raises(KeyError, match="unknown metric 'nope'"):
        compute_metric("seed_stability", image_set(), of="nope")


USER_TEST = """
import numpy as np
from pytest_diffeval.generation import ImageSet
from pytest_diffeval.metrics import register_metric

@register_metric("red", higher_is_better=True)
def red(images):
    return images.images[..., 0].reshape(len(images), -1).mean(axis=1)

def test_edit(diffeval_baseline):
    rng = np.random.default_rng(0)
    source = (rng.random((4, 16, 16, 3)) * 255).astype(np.uint8)
    masks = np.zeros((16, 16), dtype=np.uint8)
    masks[4:12, 4:12] = 255
    edited = source.copy()
    edited[:, 4:12, 4:12] = 0
    edited[:, 0, :, {channel}] = np.clip(edited[:, 0, :, {channel}].astype(int) + {shift}, 0, 255)
    images = ImageSet(images=edited, prompts=["a", "a", "b", "b"], seeds=[0, 1, 0, 1])
    diffeval_baseline.assert_no_regression(images, "good_image_rate", of="red", threshold=60.0)
    diffeval_baseline.assert_no_regression(images, "seed_stability", of="red")
    diffeval_baseline.assert_no_regression(images, "preservation_psnr", source_images=source, masks=masks)
"""


@pytest.mark.slow
def test_new_metrics_work_in_assert_no_regression(user_project: pytest.Pytester) -> None:
    user_project.makepyfile(test_user=USER_TEST.format(channel=1, shift=3))
    user_project.runpytest("--snapshot-update", "-p", "no:randomly").assert_outcomes(passed=1)
    [baseline] = sorted((user_project.path / "baselines").rglob("*.json"))
    text = baseline.read_text()
    assert '"preservation_psnr"' in text and '"good_image_rate"' in text and '"seed_stability"' in text
    assert '"threshold": 60.0' in text  # metric options are part of the signature
    # the unmasked region degrades in green only: the red-based checks pass, PSNR regresses
    user_project.makepyfile(test_user=USER_TEST.format(channel=1, shift=120))
    failed = user_project.runpytest("-p", "no:randomly")
    failed.assert_outcomes(failed=1)
    failed.stdout.fnmatch_lines(["*good_image_rate*pass*", "*seed_stability*pass*", "*preservation_psnr*regressed*"])
    assert baseline.read_text() == text
