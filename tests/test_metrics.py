"""Metrics against torchmetrics and scipy: CLIP score on local and hub backbones, FID
with cached reference statistics, the registry of user metrics."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torchmetrics.functional.multimodal import clip_score

from pytest_diffeval import settings
from pytest_diffeval.generation import ImageSet
from pytest_diffeval.metrics import compute_metric, get_metric, register_metric
from pytest_diffeval.metrics.backbones import BackboneNotFoundError, load_clip


def random_images(n: int, seed: int, size: int = 32, shift: float = 0.0) -> ImageSet:
    rng = np.random.default_rng(seed)
    images = (rng.random((n, size, size, 3)) * 200 + shift).clip(0, 255).astype(np.uint8)
    return ImageSet(images=images, prompts=[f"prompt number {i % 3}" for i in range(n)], seeds=list(range(n)))


@pytest.mark.parametrize("source", ["local", "hub"])
def test_clip_score_equals_torchmetrics(source: str, tiny_models: dict[str, Path], request: pytest.FixtureRequest) -> None:
    name = str(tiny_models["clip"]) if source == "local" else "openai/tiny-clip-test"
    if source == "hub":
        request.getfixturevalue("hub_cache")
    images = random_images(6, 0)
    result = compute_metric("clip_score", images, clip_model=name)
    backbone = load_clip(name)
    expected = clip_score(list(images.as_tensor()), images.prompts, model_name_or_path=backbone.as_torchmetrics).detach()
    assert result.value == pytest.approx(float(expected), abs=1e-4)
    assert result.per_sample.shape == (6,) and result.per_sample.mean() == pytest.approx(float(expected), abs=1e-4)
    assert result.backbone == (name if source == "hub" else backbone.id)


def test_clip_score_tracks_the_prompt(tiny_models: dict[str, Path]) -> None:
    images = random_images(3, 1)
    own = compute_metric("clip_score", images, clip_model=str(tiny_models["clip"])).per_sample
    other = compute_metric("clip_score", images, clip_model=str(tiny_models["clip"]),
                           prompts=["something else entirely"] * 3).per_sample
    assert not np.allclose(own, other)


def test_long_prompt_warns_naming_it_and_is_truncated(tiny_models: dict[str, Path]) -> None:
    long_prompt = "a very long prompt " * 20
    images = ImageSet(images=random_images(2, 2).images, prompts=[long_prompt, "short"], seeds=[0, 0])
    with pytest.warns(UserWarning, match="is longer than the 77 tokens") as record:
        result = compute_metric("clip_score", images, clip_model=str(tiny_models["clip"]))
    assert any(long_prompt.strip()[:40] in str(w.message) for w in record)
    assert result.details["truncated_prompts"] == [long_prompt]
    assert np.isfinite(result.per_sample).all()


def test_missing_clip_backbone_says_how_to_fix(hub_cache: Path) -> None:
    with pytest.raises(BackboneNotFoundError, match="(?s)cannot load the CLIP backbone .openai/not-cached.*clip_model="):
        load_clip("openai/not-cached")


def test_fid_of_a_set_with_itself_is_zero_and_grows_with_a_shift(tiny_models: dict[str, Path]) -> None:
    features = f"clip:{tiny_models['clip']}"
    base = random_images(40, 3)
    same = compute_metric("fid", base, reference=base, features=features)
    assert same.value == 0.0
    near = compute_metric("fid", random_images(40, 4), reference=base, features=features).value
    far = compute_metric("fid", random_images(40, 4, shift=60), reference=base, features=features).value
    assert 0 < near < far
    assert same.backbone.startswith("clip:tiny-clip@")


def test_fid_matches_scipy_on_the_same_features(tiny_models: dict[str, Path]) -> None:
    from scipy import linalg

    features = f"clip:{tiny_models['clip']}"
    a, b = random_images(40, 5), random_images(40, 6, shift=30)
    value = compute_metric("fid", a, reference=b, features=features).value
    backbone = load_clip(str(tiny_models["clip"]))
    fa = backbone.image_features(a.as_tensor()).double().numpy()
    fb = backbone.image_features(b.as_tensor()).double().numpy()
    mu1, mu2 = fa.mean(0), fb.mean(0)
    s1, s2 = np.cov(fa, rowvar=False), np.cov(fb, rowvar=False)
    expected = ((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * linalg.sqrtm(s1 @ s2).real)
    assert value == pytest.approx(expected, rel=1e-5)


def test_fid_reference_folder_is_cached_keyed_by_content(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    settings.configure(cache_dir=tmp_path / "cache", result_cache=False)  # each call computes FID
    try:
        folder = tmp_path / "reference"
        random_images(12, 7).save(folder)
        (folder / "grid.png").unlink()
        features = f"clip:{tiny_models['clip']}"
        images = random_images(12, 8)
        with pytest.warns(UserWarning, match="biased upward"):
            first = compute_metric("fid", images, reference=folder, features=features)
        second = compute_metric("fid", images, reference=folder, features=features)
        assert first.details["reference"]["cached"] is False and second.details["reference"]["cached"] is True
        assert first.value == second.value
        assert len(list((tmp_path / "cache" / "reference-stats").glob("*.safetensors"))) == 1
        random_images(1, 9).save(tmp_path / "extra")
        (folder / "extra.png").write_bytes((tmp_path / "extra" / "grid.png").read_bytes())
        third = compute_metric("fid", images, reference=folder, features=features)
        assert third.details["reference"]["cached"] is False and third.details["n_reference"] == 13
    finally:
        settings.configure(cache_dir=None, result_cache=True)


def test_fid_reference_errors(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    features = f"clip:{tiny_models['clip']}"
    with pytest.raises(ValueError, match="holds no images"):
        compute_metric("fid", random_images(4, 0), reference=tmp_path, features=features)
    (tmp_path / "broken.png").write_text("not an image")
    with pytest.raises(ValueError, match="cannot read reference image .*broken.png"):
        compute_metric("fid", random_images(4, 0), reference=tmp_path, features=features)
    with pytest.raises(ModuleNotFoundError, match="torch-fidelity"):
        compute_metric("fid", random_images(4, 0), reference=tmp_path, features="inception-v3-2048")


def test_user_metric_joins_the_registry() -> None:
    @register_metric("mean_red", higher_is_better=False, absolute_tolerance=0.5)
    def mean_red(images):
        return images.images[..., 0].reshape(len(images), -1).mean(axis=1)

    images = random_images(4, 0)
    result = compute_metric("mean_red", images)
    assert result.value == pytest.approx(images.images[..., 0].mean())
    assert get_metric("mean_red").higher_is_better is False
    with pytest.raises(KeyError, match="unknown metric 'nope'.*clip_score"):
        get_metric("nope")


def test_unexpected_metric_failure_names_the_metric() -> None:
    @register_metric("explodes")
    def explodes(images):
        raise ZeroDivisionError("boom")

    with pytest.raises(RuntimeError, match="metric 'explodes' failed: ZeroDivisionError: boom"):
        compute_metric("explodes", random_images(2, 0))


def test_cmmd_matches_an_independent_rbf_mmd_and_grows_with_a_shift(tiny_models: dict[str, Path]) -> None:
    from scipy.spatial.distance import cdist

    from pytest_diffeval.metrics.distribution import mmd_rbf

    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(20, 8)), rng.normal(size=(25, 8)) + 0.5
    gamma = 1 / (2 * 10.0**2)
    k = lambda a, b: np.exp(-gamma * cdist(a, b, "sqeuclidean")).mean()  # noqa: E731
    assert mmd_rbf(torch.from_numpy(x), torch.from_numpy(y)) == pytest.approx(1000 * (k(x, x) + k(y, y) - 2 * k(x, y)))

    clip = str(tiny_models["clip"])
    base = random_images(40, 10)
    values = [compute_metric("cmmd", random_images(40, 11, shift=s), reference=base, clip_model=clip).value
              for s in (0, 30, 60)]
    assert compute_metric("cmmd", base, reference=base, clip_model=clip).value == pytest.approx(0, abs=1e-9)
    assert values[0] < values[1] < values[2]


def test_kid_is_seeded_adapts_its_subset_and_is_near_zero_within_a_distribution(tiny_models: dict[str, Path]) -> None:
    features = f"clip:{tiny_models['clip']}"
    base, same_dist, shifted = random_images(48, 12), random_images(40, 13), random_images(40, 13, shift=60)
    first = compute_metric("kid", same_dist, reference=base, features=features)
    again = compute_metric("kid", same_dist, reference=base, features=features)
    assert first.value == again.value  # seeded subsets: same images, same number
    assert first.details["subset_size"] == 20
    assert abs(first.value) < 3 * first.details["std"] + 1e-6
    far = compute_metric("kid", shifted, reference=base, features=features)
    assert far.value > first.value + 3 * first.details["std"]
