"""Deterministic, batched generation and what an ImageSet carries."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from pytest_diffeval._hashing import library_versions
from pytest_diffeval.generation import ImageSet, generate_images
from pytest_diffeval.identity import load_provenance, share_load
from pytest_diffeval.pipelines import PipelineCache

PROMPTS = ["a red digit 3 on a blue background", "a green circle", "a cat"]


@pytest.fixture(scope="module")
def pipe(tiny_models: dict[str, Path]):
    return PipelineCache().get(tiny_models["pipe"])


def test_one_image_per_prompt_and_seed_prompt_major(pipe) -> None:
    images = generate_images(pipe, PROMPTS, seeds=[5, 7], batch_size=4, num_inference_steps=2)
    assert images.images.shape == (6, 32, 32, 3) and images.images.dtype == np.uint8
    assert images.prompts == [p for p in PROMPTS for _ in range(2)]
    assert images.seeds == [5, 7] * 3
    assert images.sample_keys[1] == f"7|{PROMPTS[0]}"
    assert images.call_kwargs == {"num_inference_steps": 2}
    assert images.nonfinite == [False] * 6


def test_same_seeds_give_identical_images_and_other_seeds_do_not(pipe) -> None:
    a = generate_images(pipe, PROMPTS, seeds=range(2), num_inference_steps=2)
    b = generate_images(pipe, PROMPTS, seeds=range(2), num_inference_steps=2)
    c = generate_images(pipe, PROMPTS, seeds=range(2, 4), num_inference_steps=2)
    assert np.array_equal(a.images, b.images)
    assert not np.array_equal(a.images, c.images)


def test_an_image_does_not_depend_on_its_batch(pipe) -> None:
    batched = generate_images(pipe, PROMPTS, seeds=range(2), batch_size=6, num_inference_steps=2)
    single = generate_images(pipe, PROMPTS, seeds=range(2), batch_size=1, num_inference_steps=2)
    # Batched matrix products round differently (~1e-6): at most a few uint8 levels.
    assert np.abs(batched.images.astype(int) - single.images.astype(int)).max() <= 2
    alone = generate_images(pipe, [PROMPTS[2]], seeds=[1], num_inference_steps=2)
    assert np.abs(alone.images[0].astype(int) - batched.images[5].astype(int)).max() <= 2


def test_provenance_records_model_scheduler_dtype_device_versions(pipe, tiny_models: dict[str, Path]) -> None:
    provenance = generate_images(pipe, PROMPTS[:1], num_inference_steps=2).provenance
    assert provenance["model"] == str(tiny_models["pipe"]) and len(provenance["model_hash"]) == 16
    assert provenance["pipeline_class"] == "StableDiffusionPipeline"
    assert provenance["scheduler"] == "DDIMScheduler" and provenance["scheduler_config"]["beta_schedule"] == "scaled_linear"
    assert provenance["dtype"] == "torch.float32" and provenance["device_kind"] == "cpu"
    assert {"torch", "diffusers", "transformers", "torchmetrics", "pytest_diffeval"} <= set(provenance["versions"])
    # one collector for provenance, the image cache, the provenance memo and the result cache
    assert provenance["versions"] == library_versions() and provenance["versions"] is not library_versions()


def test_save_writes_pngs_grid_and_index(pipe, tmp_path: Path) -> None:
    images = generate_images(pipe, PROMPTS, seeds=range(2), num_inference_steps=2)
    folder = images.save(tmp_path / "out")
    index = json.loads((folder / "samples.json").read_text())
    assert [s["prompt"] for s in index["samples"]] == images.prompts
    from PIL import Image

    first = np.asarray(Image.open(folder / index["samples"][0]["file"]))
    assert np.array_equal(first, images.images[0])
    assert Image.open(folder / "grid.png").size[0] > 32


@pytest.mark.parametrize("kwargs, message", [
    ({"prompts": []}, "empty prompt list"),
    ({"prompts": ["x"], "seeds": []}, "empty seed list"),
    ({"prompts": ["x"], "batch_size": 0}, "batch_size must be >= 1"),
])
def test_bad_arguments_are_clear_errors(pipe, kwargs: dict, message: str) -> None:
    prompts = kwargs.pop("prompts")
    with pytest.raises(ValueError, match=message):
        generate_images(pipe, prompts, **kwargs)


def test_imageset_validates_its_shape() -> None:
    with pytest.raises(ValueError, match="uint8 images"):
        ImageSet(images=np.zeros((1, 4, 4, 3), dtype=np.float32), prompts=["a"], seeds=[0])
    with pytest.raises(ValueError, match="must match"):
        ImageSet(images=np.zeros((2, 4, 4, 3), dtype=np.uint8), prompts=["a"], seeds=[0])


class CountingPipe:
    """Wraps a pipeline and counts the images it generates."""

    def __init__(self, pipe) -> None:
        self.pipe, self.generated = pipe, 0
        share_load(self, pipe)  # identified (and cached) as the pipeline it wraps

    def __getattr__(self, name):
        return getattr(self.pipe, name)

    def __call__(self, *, prompt, **kwargs):
        self.generated += len(prompt)
        return self.pipe(prompt=prompt, **kwargs)


def test_image_cache_regenerates_only_what_changed(pipe, tmp_path: Path) -> None:
    from pytest_diffeval.generation import ImageCache

    cache, counting = ImageCache(tmp_path / "images"), CountingPipe(pipe)
    first = generate_images(counting, PROMPTS, seeds=range(2), cache=cache, num_inference_steps=2)
    assert counting.generated == 6 and cache.misses == 6 and cache.hits == 0
    again = generate_images(counting, PROMPTS, seeds=range(2), cache=cache, num_inference_steps=2)
    assert counting.generated == 6 and cache.hits == 6  # nothing regenerated
    assert np.array_equal(first.images, again.images) and again.nonfinite == [False] * 6
    generate_images(counting, PROMPTS + ["a new prompt"], seeds=range(2), cache=cache, num_inference_steps=2)
    assert counting.generated == 8  # only the new prompt's two samples
    generate_images(counting, PROMPTS[:1], seeds=range(2), cache=cache, num_inference_steps=3)
    assert counting.generated == 10  # another call argument: another key
    key = cache.key(first.provenance, {"num_inference_steps": 2}, PROMPTS[1], 1)
    (tmp_path / "images" / key[:2] / f"{key}.png").write_bytes(b"corrupt")
    repaired = generate_images(counting, PROMPTS, seeds=range(2), cache=cache, num_inference_steps=2)
    assert counting.generated == 11  # the corrupt entry is regenerated, never trusted
    assert np.abs(repaired.images.astype(int) - first.images.astype(int)).max() <= 2


def test_an_image_cache_entry_swapped_or_not_ours_is_regenerated(pipe, tmp_path: Path) -> None:
    import shutil

    from PIL import Image

    from pytest_diffeval.generation import ImageCache

    cache, counting = ImageCache(tmp_path / "images"), CountingPipe(pipe)
    first = generate_images(counting, PROMPTS[:2], seeds=[0], cache=cache, num_inference_steps=2)
    keys = [cache.key(first.provenance, {"num_inference_steps": 2}, prompt, 0) for prompt in PROMPTS[:2]]
    shutil.copyfile(cache._path(keys[1]), cache._path(keys[0]))  # the other prompt's image in its place
    again = generate_images(counting, PROMPTS[:2], seeds=[0], cache=cache, num_inference_steps=2)
    assert counting.generated == 3  # a miss, regenerated, never served as this prompt's image
    assert np.abs(again.images.astype(int) - first.images.astype(int)).max() <= 2
    Image.fromarray(first.images[0][..., 0]).save(cache._path(keys[0]))  # a greyscale PNG without our key
    assert cache.get(keys[0]) is None and cache.get(keys[1]) is not None


def test_image_cache_key_follows_model_content(pipe) -> None:
    from pytest_diffeval.generation import ImageCache

    cache = ImageCache("unused")
    provenance = dict(load_provenance(pipe), pipeline_class="X", dtype="torch.float32", device_kind="cpu")
    key = cache.key(provenance, {"num_inference_steps": 2}, "a", 0)
    assert key != cache.key({**provenance, "model_hash": "other"}, {"num_inference_steps": 2}, "a", 0)
    assert key != cache.key(provenance, {"num_inference_steps": 2}, "a", 1)
    assert key != cache.key({**provenance, "dtype": "torch.float16"}, {"num_inference_steps": 2}, "a", 0)
    assert key != cache.key(provenance, {"num_inference_steps": 2, "image": np.zeros((2, 2))}, "a", 0)
    assert cache.key({**provenance, "model_hash": None}, {}, "a", 0) is None  # unidentifiable: never cached


def test_a_prompt_longer_than_the_text_encoder_takes_is_named_once_with_its_length(pipe) -> None:
    import warnings

    from pytest_diffeval.exceptions import PromptTruncatedWarning

    long = "a red digit three on a blue background with a green border " * 2  # > 77 tokens of the tiny tokenizer
    count = len(pipe.tokenizer(long)["input_ids"])  # the pipeline's own tokenizer counts
    assert count > pipe.tokenizer.model_max_length == 77
    with pytest.warns(PromptTruncatedWarning) as record:
        cut = generate_images(pipe, [long, "a cat"], seeds=range(2), num_inference_steps=2)
    messages = [str(w.message) for w in record if issubclass(w.category, PromptTruncatedWarning)]
    assert len(messages) == 1  # once per prompt, not once per seed; the short prompt is not named
    assert repr(long) in messages[0] and f"{count} tokens > tokenizer's limit of 77" in messages[0]
    assert "tail beyond the limit is cut off" in messages[0]
    # ...and the warning tells the truth: words past the limit change nothing
    with pytest.warns(PromptTruncatedWarning):
        longer = generate_images(pipe, [long + " and a yellow sun"], seeds=range(2), num_inference_steps=2)
    assert np.array_equal(longer.images, cut.images[:2])
    with warnings.catch_warnings():
        warnings.simplefilter("error", PromptTruncatedWarning)
        generate_images(pipe, ["a cat"], num_inference_steps=2)  # within the limit: silent


def test_an_image_cache_entry_of_another_size_under_its_own_key_is_regenerated(pipe, tmp_path: Path) -> None:
    """A PNG with the right key but the wrong size (forged, or a corrupt writer) is a miss, in
    a partly and a fully cached call: generated again, never a bare shape error from stacking."""
    from PIL import Image, PngImagePlugin

    from pytest_diffeval.generation import ImageCache
    from pytest_diffeval.planning import images_from_cache

    cache, counting = ImageCache(tmp_path / "images"), CountingPipe(pipe)
    first = generate_images(counting, PROMPTS[:2], seeds=[0], cache=cache, num_inference_steps=2)
    keys = [cache.key(first.provenance, {"num_inference_steps": 2}, prompt, 0) for prompt in PROMPTS[:2]]
    info = PngImagePlugin.PngInfo()
    info.add_text("diffeval_nonfinite", "0")
    info.add_text("diffeval_key", keys[0])
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(cache._path(keys[0]), pnginfo=info)
    assert cache.get(keys[0])[0].shape == (8, 8, 3)  # a valid-looking entry under its own key

    assert images_from_cache(cache, first.provenance, PROMPTS[:2], [0], {"num_inference_steps": 2}, None) is None
    again = generate_images(counting, PROMPTS[:2], seeds=[0], cache=cache, num_inference_steps=2)
    assert counting.generated == 4 and again.images.shape == first.images.shape  # which size is right is
    # unknown when every sample came from the cache: the call's samples are all generated again
    assert np.abs(again.images.astype(int) - first.images.astype(int)).max() <= 2
    assert cache.get(keys[0])[0].shape == first.images[0].shape  # the entry was rewritten


class ToyPipe:
    """A text-to-image pipeline's call signature, without a model: validation needs no more."""

    vae_scale_factor = 8

    def __call__(self, prompt, negative_prompt=None, height=None, width=None, generator=None,
                 num_inference_steps=50, output_type="pil"):
        raise AssertionError("validation must not call the pipeline")


class ToyImg2Img(ToyPipe):
    def __call__(self, prompt, image=None, strength=0.8, height=None, width=None, generator=None,
                 num_inference_steps=50, output_type="pil"):
        raise AssertionError("validation must not call the pipeline")


def _request(pipe, prompts, **kwargs):
    from pytest_diffeval.generation import validate_request

    images = {key: kwargs.pop(key, None) for key in ("source_images", "masks", "exemplars")}
    return validate_request(pipe, prompts, seeds=kwargs.pop("seeds", (0,)), batch_size=kwargs.pop("batch_size", 8),
                            images=images, class_labels=kwargs.pop("class_labels", None), captions={},
                            call_kwargs=kwargs)


def test_a_request_is_validated_apart_from_the_batching_loop() -> None:
    """validate_request checks a call without calling the pipeline and returns its cases, the
    samples prompt-major and each batch's pipeline arguments (per-prompt texts per sample)."""
    request = _request(ToyPipe(), ["a", "b"], seeds=[3, 4], negative_prompt=["not a", "not b"],
                       num_inference_steps=2)
    assert request.jobs == [(0, 3), (0, 4), (1, 3), (1, 4)]
    assert request.call_kwargs == {"negative_prompt": ["not a", "not b"], "num_inference_steps": 2}
    assert request.batch_kwargs([1, 0]) == {"num_inference_steps": 2, "prompt": ["b", "a"],
                                            "negative_prompt": ["not b", "not a"]}
    with pytest.raises(ValueError, match="empty seed list"):
        _request(ToyPipe(), ["a"], seeds=[])
    from pytest_diffeval.exceptions import InputError

    with pytest.raises(InputError, match="negative_prompt holds 1 entries for 2 prompts"):
        _request(ToyPipe(), ["a", "b"], negative_prompt=["x"])
    with pytest.raises(InputError, match="takes no source_images"):
        _request(ToyPipe(), ["a"], source_images=np.zeros((8, 8, 3), dtype=np.uint8))


def test_a_request_with_one_source_image_for_all_prompts_sends_it_with_every_sample() -> None:
    source = np.full((16, 24, 3), 7, dtype=np.uint8)
    request = _request(ToyImg2Img(), ["x", "y"], image=source)  # diffusers' name for source_images
    assert list(request.loaded) == ["source_images"] and "image" not in request.call_kwargs
    assert request.pipe_kwargs == {"height": 16, "width": 24}  # the output keeps its source's size
    kwargs = request.batch_kwargs([0, 1])
    assert [np.asarray(image).tolist() for image in kwargs["image"]] == [source.tolist()] * 2
    with pytest.raises(Exception, match="both image= and source_images= were given"):
        _request(ToyImg2Img(), ["x"], image=source, source_images=source)


def test_the_image_cache_owns_the_claims_on_its_entries(tmp_path: Path) -> None:
    """A missing entry is claimed once (a second claim while it is held is another owner's),
    an entry stored meanwhile is reported done, and a key-less sample needs no claim."""
    from pytest_diffeval.generation import ImageCache

    cache, key = ImageCache(tmp_path / "images"), "ab" * 16
    assert cache.claim(None).state == "free"
    mine = cache.claim(key)
    assert mine.state == "mine" and mine.path == cache.claim_path(key)
    assert cache.claim(key).state == "theirs"  # held: another call (or process) is generating it
    image = np.full((4, 4, 3), 9, dtype=np.uint8)
    cache.put(key, image, False)
    ImageCache.release([mine.path])
    done = cache.claim(key)
    assert done.state == "done" and np.array_equal(done.entry[0], image) and done.entry[1] is False
    assert cache.claim(key).state == "done"  # a finished entry's claim was released again


def test_cache_keys_and_recorded_inputs_keep_their_stored_digests() -> None:
    """Moving to _hashing kept each digest that is stored (image-cache file names, baseline
    signatures): computed here with the recipe they were written with."""
    import hashlib

    from pytest_diffeval.generation import fingerprint_arguments
    from pytest_diffeval.generation.run import _describe_images

    arrays = [np.arange(12, dtype=np.uint8).reshape(2, 2, 3), np.ones((2, 2, 3), dtype=np.uint8)]
    reference = hashlib.sha256()
    for array in arrays:
        reference.update(str(array.shape).encode())
        reference.update(array.tobytes())
    assert _describe_images(arrays) == f"2 x 2x2 sha256:{reference.hexdigest()[:16]}"
    assert fingerprint_arguments({"image": arrays[0]}) == {
        "image": f"array:uint8:(2, 2, 3):{hashlib.sha256(arrays[0].tobytes()).hexdigest()[:16]}"}


def test_the_provenance_memo_follows_every_module_of_the_generation_code(tmp_path: Path) -> None:
    """The memo's code digest covers each of generation/, pipelines/ ... whether a package of
    modules or a single module: editing any of their files invalidates the memo."""
    from pytest_diffeval.planning import _code_digest, generation_code_files

    package = tmp_path / "pkg"
    (package / "generation").mkdir(parents=True)
    (package / "generation" / "run.py").write_text("A = 1\n")
    (package / "pipelines.py").write_text("B = 1\n")
    files = generation_code_files(package)
    assert package / "generation" / "run.py" in files and package / "pipelines.py" in files
    before = _code_digest(package)
    (package / "generation" / "run.py").write_text("A = 2\n")
    assert _code_digest(package) != before
    edited = _code_digest(package)
    (package / "pipelines.py").unlink()
    (package / "pipelines").mkdir()
    (package / "pipelines" / "loading.py").write_text("B = 1\n")
    assert package / "pipelines" / "loading.py" in generation_code_files(package)
    assert _code_digest(package) != edited
    real = generation_code_files()
    assert {path.name for path in real if path.parent.name == "generation"} >= {"run.py", "request.py", "cache.py"}
