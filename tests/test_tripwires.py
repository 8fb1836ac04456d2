"""Tripwires: broken images fail every assertion before any metric judges them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pytest_diffeval import assert_metric, settings, tripwires
from pytest_diffeval.assertions import results_folder
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


def test_constant_grey_images_trip_with_their_level_and_the_vae_fix() -> None:
    images = healthy()
    images.images[1] = 128
    problems = find_problems(images)
    assert problems == [f"1 of 4 images are constant (value 128), first: seed 0 'b'; {tripwires.FIX_CONSTANT}"]
    with pytest.raises(TripwireError, match=r"constant \(value 128\).*fix: check the VAE decode"):
        assert_metric(images, "always_one", at_least=1)


@pytest.mark.parametrize("breakage, fix", [
    ("nonfinite", tripwires.FIX_NONFINITE),
    ("black", tripwires.FIX_BLACK),
    ("identical", tripwires.FIX_IDENTICAL),
])
def test_every_tripwire_says_how_to_fix_it(breakage: str, fix: str) -> None:
    images = healthy()
    if breakage == "nonfinite":
        images.nonfinite[0] = True
    elif breakage == "black":
        images.images[0] = 0
    else:
        images.images[1] = images.images[0]
    with pytest.raises(TripwireError) as raised:
        assert_metric(images, "always_one", at_least=1)
    message = str(raised.value)
    assert fix in message and fix.startswith("fix: ")
    assert "pass tripwires=False to this one assertion" in message
    assert f"images of this run: {results_folder('t::wires')}" in message


BLACKABLE_TEST = """
import os
import numpy as np
from pytest_diffeval import ImageSet
from pytest_diffeval.metrics import register_metric

@register_metric("level", absolute_tolerance=0.5)
def level(images):
    return images.images.reshape(len(images), -1).mean(axis=1)

def test_levels(diffeval_baseline):
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 255, (4, 8, 8, 3), dtype=np.uint8)
    if os.environ.get("BLACK"):
        pixels[:] = 0  # what a safety checker returns
    images = ImageSet(images=pixels, prompts=["a", "b", "c", "d"], seeds=[0] * 4, nonfinite=[False] * 4)
    diffeval_baseline.assert_no_regression(images, "level")
"""


def test_snapshot_update_refuses_to_record_tripwired_images(pytester: pytest.Pytester,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    pytester.makepyfile(test_black=BLACKABLE_TEST)
    baseline = pytester.path / "baselines" / "test_black" / "test_levels.json"
    monkeypatch.setenv("BLACK", "1")
    first = pytester.runpytest("--snapshot-update")
    first.assert_outcomes(failed=1)
    first.stdout.fnmatch_lines(["*TripwireError*4 of 4 images are all black*"])
    assert not baseline.exists()  # nothing recorded from black images

    monkeypatch.delenv("BLACK")
    pytester.runpytest("--snapshot-update").assert_outcomes(passed=1)
    recorded = baseline.read_bytes()
    monkeypatch.setenv("BLACK", "1")
    again = pytester.runpytest("--snapshot-update")
    again.assert_outcomes(failed=1)
    again.stdout.fnmatch_lines(["*TripwireError*all black*"])
    assert baseline.read_bytes() == recorded  # the healthy baseline is not overwritten


def overflowing_copy(model: Path, target: Path) -> Path:
    """A copy of the tiny pipeline whose first UNet convolution is scaled past float range
    (the overflow-nan member of scripts/make_regressions.py): the real pipeline outputs NaN."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(model, target)
    file = target / "unet" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(str(file))
    tensors["conv_in.weight"] = tensors["conv_in.weight"] * 1e38
    save_file(tensors, str(file), metadata={"format": "pt"})
    return target


def test_nan_from_a_real_pipeline_trips_fresh_and_from_the_image_cache(user_project: pytest.Pytester,
                                                                       tiny_models: dict[str, Path]) -> None:
    model = overflowing_copy(tiny_models["pipe"], user_project.path / "overflow")
    user_project.makepyfile(test_nan=f"""
        from pytest_diffeval import assert_metric
        from pytest_diffeval.metrics import register_metric

        @register_metric("anything")
        def anything(images):
            return [1.0] * len(images)

        def test_overflow(generate):
            images = generate({str(model)!r}, ["a", "b"], seeds=[0], num_inference_steps=2)
            assert_metric(images, "anything", at_least=0)
    """)
    expected = ["*TripwireError*2 of 2 images had NaN/inf in the pipeline's output*fix: run in float32*"]
    fresh = user_project.runpytest("-v")
    fresh.assert_outcomes(failed=1)
    fresh.stdout.fnmatch_lines(expected + ["diffeval images in this process: 2 generated, 0 from the cache *"])
    cached = user_project.runpytest("-v")
    cached.assert_outcomes(failed=1)
    cached.stdout.fnmatch_lines(expected + ["diffeval images in this process: 0 generated, 2 from the cache *"])
