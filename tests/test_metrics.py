"""Metrics against torchmetrics, scipy and direct model calls: CLIP score on local and hub
backbones (identified by content or commit), FID with cached reference statistics, metrics
per class, the registry of user metrics, and how metric errors and NaN results surface."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torchmetrics.functional.multimodal import clip_score

from pytest_diffeval import compute_per_class, settings
from pytest_diffeval.generation import ImageSet
from pytest_diffeval.metrics import (MetricError, MetricInputError, NonFiniteMetricError, compute_metric, get_metric,
                                     register_metric)
from pytest_diffeval.metrics.backbones import BackboneNotFoundError, load_clip
from pytest_diffeval.exceptions import ReferenceSetError

from conftest import FAKE_COMMIT


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
    assert result.backbone == (f"{name}@{FAKE_COMMIT}" if source == "hub" else backbone.id)


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


@pytest.mark.parametrize("error", [ValueError("bad threshold"), KeyError("missing"), TypeError("not a number"),
                                   FileNotFoundError("weights.bin")])
def test_every_exception_type_inside_a_metric_names_the_metric_and_keeps_its_type(error: Exception) -> None:
    @register_metric("fragile")
    def fragile(images):
        raise error

    with pytest.raises(MetricError, match=f"metric 'fragile' failed: {type(error).__name__}: ") as failure:
        compute_metric("fragile", random_images(2, 0))
    assert isinstance(failure.value, type(error))  # `except ValueError` around a check still catches it
    assert failure.value.__cause__ is error and failure.value.metric == "fragile"


def test_own_input_errors_pass_unchanged_and_an_inner_metric_is_named_once() -> None:
    with pytest.raises(MetricInputError) as failure:
        compute_metric("clip_score", random_images(2, 0), prompts=["only one"])
    assert type(failure.value) is MetricInputError and "failed:" not in str(failure.value)

    @register_metric("inner_lookup")
    def inner_lookup(images):
        return {}["score"]

    with pytest.raises(KeyError) as failure:  # good_image_rate computes inner_lookup: named once, not re-wrapped
        compute_metric("good_image_rate", random_images(2, 0), of="inner_lookup", threshold=0.5)
    assert str(failure.value).startswith("pytest-diffeval: metric 'inner_lookup' failed: KeyError: 'score'")


def test_a_metric_exception_in_a_user_test_names_the_metric_in_the_summary(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_user="""
        import numpy as np
        from pytest_diffeval import ImageSet, assert_metric
        from pytest_diffeval.metrics import register_metric

        @register_metric("lookup_score")
        def lookup_score(images):
            return [{"a": 1.0}[prompt] for prompt in images.prompts]

        def test_it():
            pixels = np.random.default_rng(0).integers(0, 255, (2, 8, 8, 3), np.uint8)
            images = ImageSet(images=pixels, prompts=["a", "b"], seeds=[0, 0])
            assert_metric(images, "lookup_score", at_least=0.5)
    """)
    result = pytester.runpytest("-rf", "-vv", "-p", "no:cacheprovider")  # -vv: the summary line uncut
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["FAILED test_user.py::test_it - *metric 'lookup_score' failed: KeyError: 'b'*"])


def test_nan_per_sample_value_gives_no_verdict_and_names_the_samples() -> None:
    @register_metric("sometimes_nan")
    def sometimes_nan(images):
        values = np.arange(len(images), dtype=float)
        values[1] = np.nan
        values[3] = np.inf
        return values

    with pytest.raises(NonFiniteMetricError, match=r"(?s)metric 'sometimes_nan' gave a non-finite result: 2 of 4 "
                       r"per-sample values are NaN/inf: \(prompt 'prompt number 1', seed 1\) = nan, "
                       r"\(prompt 'prompt number 0', seed 3\) = inf.*No verdict.*fix:"):
        compute_metric("sometimes_nan", random_images(4, 0))


def test_nan_set_level_value_is_refused_and_never_cached(tmp_path: Path) -> None:
    from pytest_diffeval.metrics import Metric, MetricResult

    class Broken(Metric):
        name = "broken_set_metric"
        per_sample = False
        cacheable = True

        def compute(self, images, **options):
            return MetricResult(self.name, float("nan"), "custom", True)

    register_metric(Broken())
    settings.configure(cache_dir=tmp_path / "cache")
    try:
        for _ in range(2):  # the second call computes again: nothing was stored
            with pytest.raises(ValueError, match="metric 'broken_set_metric' gave a non-finite result: its value over "
                                                 "the 3 images is nan"):
                compute_metric("broken_set_metric", random_images(3, 0))
        assert not list((tmp_path / "cache").rglob("*.safetensors"))
    finally:
        settings.configure(cache_dir=None)


def test_nan_metric_in_a_user_test_fails_without_a_verdict(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_user="""
        import numpy as np
        from pytest_diffeval import ImageSet, assert_metric
        from pytest_diffeval.metrics import register_metric

        @register_metric("nan_score")
        def nan_score(images):
            return [np.nan if seed == 7 else 1.0 for seed in images.seeds]

        def test_it():
            pixels = np.random.default_rng(0).integers(0, 255, (2, 8, 8, 3), np.uint8)
            images = ImageSet(images=pixels, prompts=["a cat", "a cat"], seeds=[3, 7])
            assert_metric(images, "nan_score", at_least=0.5)
    """)
    result = pytester.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*NonFiniteMetricError*metric 'nan_score' gave a non-finite result: 1 of 2 per-sample "
                                 "values are NaN/inf: (prompt 'a cat', seed 7) = nan*"])
    assert "out of bounds" not in result.stdout.str()


def test_cmmd_matches_an_independent_rbf_mmd_and_grows_with_a_shift(tiny_models: dict[str, Path]) -> None:
    from scipy.spatial.distance import cdist

    from pytest_diffeval.metrics.distribution import cmmd_mmd2

    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(20, 8)), rng.normal(size=(25, 8)) + 0.5
    gamma = 1 / (2 * 10.0**2)
    k = lambda a, b: np.exp(-gamma * cdist(a, b, "sqeuclidean")).mean()  # noqa: E731
    assert cmmd_mmd2(torch.from_numpy(x), torch.from_numpy(y), unbiased=False) == pytest.approx(
        1000 * (k(x, x) + k(y, y) - 2 * k(x, y)))

    clip = str(tiny_models["clip"])
    base = random_images(40, 10)
    values = [compute_metric("cmmd", random_images(40, 11, shift=s), reference=base, clip_model=clip).value
              for s in (0, 30, 60)]
    assert compute_metric("cmmd", base, reference=base, clip_model=clip, estimator="biased").value == pytest.approx(
        0, abs=1e-9)
    assert values[0] < values[1] < values[2]


def test_kid_is_seeded_adapts_its_subset_and_is_near_zero_within_a_distribution(tiny_models: dict[str, Path]) -> None:
    features = f"clip:{tiny_models['clip']}"
    base, same_dist, shifted = random_images(48, 12), random_images(40, 13), random_images(40, 13, shift=60)
    first = compute_metric("kid", same_dist, reference=base, features=features)
    again = compute_metric("kid", same_dist, reference=base, features=features)
    assert first.value == again.value and first.details == again.details  # seeded: same images, same numbers
    assert first.details["subset_size"] == 20
    assert abs(first.value) < 3 * first.details["spread"] + 1e-6
    far = compute_metric("kid", shifted, reference=base, features=features)
    assert far.value > first.value + 3 * first.details["spread"]


def test_fid_of_one_image_is_the_plugins_input_error_naming_n(tiny_models: dict[str, Path]) -> None:
    """Not torchmetrics' RuntimeError wrapped in a MetricError: the plugin's own input error,
    on either side."""
    features = f"clip:{tiny_models['clip']}"
    with pytest.raises(MetricInputError, match=r"FID needs at least 2 generated images.*got N=1; fix:"):
        compute_metric("fid", random_images(1, 24), reference=random_images(8, 25), features=features)
    with pytest.raises(ReferenceSetError, match=r"FID needs at least 2 reference images.*got N=1 .*fix:"):
        compute_metric("fid", random_images(8, 24), reference=random_images(1, 25), features=features)


def test_clip_score_matches_an_independent_clip_computation(tiny_models: Path) -> None:
    """CLIPModel and CLIPProcessor called directly (no adapter, no torchmetrics): per sample
    100 * cos(image_embeds, text_embeds); the value is torchmetrics' max(mean, 0).  float32
    embeddings agree to ~1e-7 relative; batching/padding differences stay far below 1e-5."""
    from transformers import CLIPModel, CLIPProcessor

    folder = tiny_models["clip"]
    images = random_images(6, 0)
    result = compute_metric("clip_score", images, clip_model=str(folder))
    model, processor = CLIPModel.from_pretrained(folder).eval(), CLIPProcessor.from_pretrained(folder)
    inputs = processor(text=images.prompts, images=images.to_pil(), return_tensors="pt", padding=True)
    with torch.no_grad():
        output = model(**inputs)
    image = torch.nn.functional.normalize(output.image_embeds.double(), dim=-1)
    text = torch.nn.functional.normalize(output.text_embeds.double(), dim=-1)
    expected = (100 * (image * text).sum(-1)).numpy()
    np.testing.assert_allclose(result.per_sample, expected, rtol=1e-5)
    assert result.value == pytest.approx(max(expected.mean(), 0.0), rel=1e-5)


def test_a_hub_backbone_is_identified_by_its_commit(tiny_models: dict[str, Path], tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """A new revision of the same hub name is another backbone (baselines then report a
    backbone mismatch instead of comparing across revisions)."""
    import shutil

    import huggingface_hub.constants as hub_constants

    from pytest_diffeval.fingerprints import resolve_model_dir

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path))
    repo = tmp_path / "models--openai--tiny-clip-revised"
    (repo / "refs").mkdir(parents=True)
    ids = []
    for commit in ("1" * 40, "2" * 40):
        shutil.copytree(tiny_models["clip"], repo / "snapshots" / commit)
        (repo / "refs" / "main").write_text(commit)
        ids.append(resolve_model_dir("openai/tiny-clip-revised")[0])
        result = compute_metric("clip_score", random_images(2, 0), clip_model="openai/tiny-clip-revised")
        assert result.backbone == ids[-1] == f"openai/tiny-clip-revised@{commit}"
    assert resolve_model_dir("openai/not-in-the-cache") == ("openai/not-in-the-cache", None)


def mean_colour_features() -> torch.nn.Module:
    class MeanColour(torch.nn.Module):
        """3-d features: an image's mean colour (float64)."""

        num_features = 3
        id = "mean-colour"

        def forward(self, images: torch.Tensor) -> torch.Tensor:
            return images.double().mean(dim=(2, 3))

    return MeanColour()


def coloured(classes: dict[str, tuple[int, int, int]], per_class: int, seed: int) -> ImageSet:
    """``per_class`` noisy images of each class's colour, prompt = class name, prompt-major."""
    rng = np.random.default_rng(seed)
    images, prompts, seeds = [], [], []
    for name, colour in classes.items():
        for index in range(per_class):
            images.append((np.array(colour) + rng.normal(0, 20, (8, 8, 3))).clip(0, 255).astype(np.uint8))
            prompts.append(name)
            seeds.append(index)
    return ImageSet(images=np.stack(images), prompts=prompts, seeds=seeds)


CLASSES = {"red": (200, 40, 40), "green": (40, 200, 40), "blue": (40, 40, 200)}


@pytest.fixture
def stats_cache(tmp_path: Path):
    settings.configure(cache_dir=tmp_path / "cache")
    yield
    settings.configure(cache_dir=None)


def test_per_class_fid_splits_the_reference_by_the_same_labels(stats_cache: None) -> None:
    features = mean_colour_features()
    images, reference = coloured(CLASSES, 8, 0), coloured(CLASSES, 10, 1)
    results = compute_per_class("fid", images, reference, features=features)
    assert list(results) == list(CLASSES)
    for label, result in results.items():
        own = [i for i, p in enumerate(images.prompts) if p == label]
        ref = [i for i, p in enumerate(reference.prompts) if p == label]
        expected = compute_metric("fid", images.subset(own), reference=reference.subset(ref), features=features)
        assert result.value == expected.value and result.details["n"] == 8 and result.details["n_reference"] == 10
        assert result.details["class"] == label and result.details["reference_split"] == "by label"
    whole = compute_metric("fid", images.subset(range(8)), reference=reference, features=features).value
    assert results["red"].value < whole  # against its own class, not the mixture of all three


def test_per_class_uses_an_unlabelled_reference_whole_and_refuses_a_partial_one(stats_cache: None) -> None:
    features = mean_colour_features()
    images = coloured(CLASSES, 6, 0)
    unlabelled = coloured({"photo": (120, 120, 120)}, 12, 2)
    results = compute_per_class("kid", images, unlabelled, features=features)
    for label, result in results.items():
        own = [i for i, p in enumerate(images.prompts) if p == label]
        assert result.value == compute_metric("kid", images.subset(own), reference=unlabelled, features=features).value
        assert result.details["reference_split"] == "whole"
    partial = coloured({"red": CLASSES["red"], "green": CLASSES["green"]}, 6, 3)
    with pytest.raises(MetricInputError, match=r"has images of the classes \['green', 'red'\] but none of \['blue'\]"):
        compute_per_class("fid", images, partial, features=features)
    with pytest.raises(MetricInputError, match=r"no entry for the classes \['green', 'blue'\]"):
        compute_per_class("fid", images, {"red": partial}, features=features)


def test_per_class_inception_score_needs_no_reference() -> None:
    from pytest_diffeval.embedded.data import ALL_COMBOS, make_images

    pixels, prompts = [], []
    for digit in (1, 7):  # a DiT-like set: the class name is the prompt
        combos = [combo for combo in ALL_COMBOS if combo[0] == digit]
        pixels.append(make_images(12, seed=digit, split="heldout", combos=combos)[0])
        prompts += [f"digit {digit}"] * 12
    images = ImageSet(images=np.concatenate(pixels), prompts=prompts, seeds=list(range(24)))
    results = compute_per_class("inception_score", images, classifier="checker:diffeval/tiny-checker")
    overall = compute_metric("inception_score", images, classifier="checker:diffeval/tiny-checker").value
    assert list(results) == ["digit 1", "digit 7"] and "reference_split" not in results["digit 1"].details
    # one class each: p(y) ~ p(y|x), so IS ~ 1; the two classes together come near 2
    assert all(1.0 <= r.value < 1.3 for r in results.values()) and overall > 1.6
