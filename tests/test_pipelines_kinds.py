"""Every pipeline kind end to end on the CPU, through the code a hub checkpoint takes
(tiny random pipelines saved in hub layout, ``load_pipeline`` -> ``generate_images``):
img2img, inpainting, InstructPix2Pix, Paint-by-Example, DiT, SDXL, unconditional DDPM
and LoRA.  Each: deterministic images, its natural metric computed from the inputs the
ImageSet carries, input errors raised before any generation, and (pytester) a baseline
record -> pass -> broken model -> "regressed" cycle for every kind."""

from __future__ import annotations

import functools
import json
import re
import shutil
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pytest_diffeval import tiny
from pytest_diffeval.exceptions import InputError
from pytest_diffeval.generation import ImageCache, generate_images
from pytest_diffeval.metrics import compute_metric
from pytest_diffeval.identity import load_provenance
from pytest_diffeval.pipelines import PipelineCache, load_pipeline
from pytest_diffeval.tiny import perturb_weights

CLIP = "diffeval/tiny-clip"  # the embedded tiny CLIP: no build, no download
FEATURES = f"clip:{CLIP}"
STEPS = {"num_inference_steps": 2}
FAKE_COMMIT = "fedcba9876543210fedcba9876543210fedcba98"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models on a shared 2-core machine: one intra-op thread is ~100x faster than
    two threads fighting other processes for the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("kinds")
    builders = {
        "sd": tiny.build_tiny_text2img, "img2img": tiny.build_tiny_img2img, "inpaint": tiny.build_tiny_inpaint,
        "ip2p": tiny.build_tiny_instruct_pix2pix, "pbe": tiny.build_tiny_paint_by_example, "dit": tiny.build_tiny_dit,
        "sdxl": tiny.build_tiny_sdxl, "ddpm": tiny.build_tiny_unconditional, "lora": tiny.build_tiny_lora,
    }
    return {name: build(root / name) for name, build in builders.items()}


@pytest.fixture(scope="module")
def pipes() -> PipelineCache:
    return PipelineCache()


def sources(n: int = 2, size: tuple[int, int] = (32, 32), seed: int = 0) -> np.ndarray:
    """Smooth colourful source images (gradients plus a coloured square)."""
    rng = np.random.default_rng(seed)
    h, w = size
    images = []
    for _ in range(n):
        y, x = np.mgrid[0:h, 0:w] / max(h, w)
        base = np.stack([x, y, 1 - x], axis=-1) * rng.uniform(100, 255, 3)
        top, left = rng.integers(0, h // 2), rng.integers(0, w // 2)
        base[top : top + h // 3, left : left + w // 3] = rng.uniform(0, 255, 3)
        images.append(base.clip(0, 255).astype(np.uint8))
    return np.stack(images)


def centre_mask(size: tuple[int, int] = (32, 32)) -> np.ndarray:
    h, w = size
    mask = np.zeros((h, w), np.uint8)
    mask[h // 4 : 3 * h // 4, w // 4 : 3 * w // 4] = 255
    return mask


def assert_deterministic(pipe, prompts, **kwargs):
    """Generate twice with the same seeds (identical) and once with others (different)."""
    a = generate_images(pipe, prompts, seeds=[0, 1], **kwargs)
    b = generate_images(pipe, prompts, seeds=[0, 1], **kwargs)
    c = generate_images(pipe, prompts, seeds=[2, 3], **kwargs)
    assert np.array_equal(a.images, b.images)
    assert not np.array_equal(a.images, c.images)
    return a


# --------------------------------------------------------------------------- each pipeline


def test_img2img_carries_its_sources_and_strength_decides_how_far_it_moves(models, pipes) -> None:
    pipe = pipes.get(models["img2img"])
    src = sources()
    images = assert_deterministic(pipe, ["a red square", "a blue square"], source_images=src, strength=0.75,
                                  num_inference_steps=4)
    assert type(pipe).__name__ == "StableDiffusionImg2ImgPipeline"
    assert images.prompts == ["a red square"] * 2 + ["a blue square"] * 2  # prompt-major, paired with its source
    assert np.array_equal(images.inputs["source_images"], np.repeat(src, 2, axis=0))
    assert images.call_kwargs["strength"] == 0.75 and images.call_kwargs["inputs"]["source_images"].startswith("2 x 32x32")

    carried = compute_metric("clip_image_similarity", images, clip_model=CLIP)
    explicit = compute_metric("clip_image_similarity", images, clip_model=CLIP, reference_images=np.repeat(src, 2, axis=0))
    assert carried.value == pytest.approx(explicit.value) and carried.details["reference"] == "source_images"
    assert compute_metric("clip_score", images, clip_model=CLIP).per_sample.shape == (4,)

    # the source and the strength are inputs: changing either changes the images
    weak = generate_images(pipe, ["a red square", "a blue square"], seeds=[0, 1], source_images=src, strength=0.25,
                           num_inference_steps=4)
    other = generate_images(pipe, ["a red square", "a blue square"], seeds=[0, 1], source_images=src[::-1], strength=0.75,
                            num_inference_steps=4)
    assert not np.array_equal(other.images, images.images)
    assert not np.array_equal(weak.images, images.images) and weak.call_kwargs["strength"] == 0.25
    with pytest.raises(InputError, match=r"strength=0.2 x num_inference_steps=2 leaves no denoising step"):
        generate_images(pipe, ["a red square"], source_images=src[0], strength=0.2, **STEPS)


def test_inpainting_output_follows_the_source_size_and_preservation_reads_the_carried_mask(models, pipes) -> None:
    pipe = pipes.get(models["inpaint"])
    size = (24, 40)  # not the UNet's default 32x32: the output must still align with its source
    src, mask = sources(size=size), centre_mask(size)
    images = assert_deterministic(pipe, ["a cat", "a dog"], source_images=list(src), masks=mask, **STEPS)
    assert images.image_size == size
    assert images.inputs["masks"].shape == (4, *size) and images.inputs["masks"].strides[0] == 0  # one mask for all
    psnr = compute_metric("preservation_psnr", images)
    assert psnr.value == pytest.approx(compute_metric("preservation_psnr", images, source_images=images.inputs["source_images"],
                                                      masks=mask).value)
    assert compute_metric("preservation_ssim", images).per_sample.shape == (4,)
    assert compute_metric("clip_score", images, clip_model=CLIP).value >= 0
    # a smaller mask is another input: another cache key, other images
    small = np.zeros_like(mask)
    small[8:12, 8:12] = 255
    assert not np.array_equal(generate_images(pipe, ["a cat", "a dog"], seeds=[0, 1], source_images=list(src),
                                              masks=small, **STEPS).images, images.images)


def test_instruct_pix2pix_directional_similarity_from_carried_captions(models, pipes) -> None:
    pipe = pipes.get(models["ip2p"])
    src = sources()
    kwargs = dict(source_images=src, source_captions=["a red square", "a green square"],
                  target_captions=["a blue square", "a yellow square"], guidance_scale=7.5, image_guidance_scale=1.5)
    images = assert_deterministic(pipe, ["make it blue", "make it yellow"], **kwargs, **STEPS)
    assert type(pipe.scheduler).__name__ == "EulerAncestralDiscreteScheduler"  # stochastic: per-sample generators
    assert images.inputs["target_captions"] == ["a blue square"] * 2 + ["a yellow square"] * 2
    carried = compute_metric("clip_directional_similarity", images, clip_model=CLIP)
    explicit = compute_metric("clip_directional_similarity", images, clip_model=CLIP,
                              source_images=images.inputs["source_images"],
                              source_captions=images.inputs["source_captions"],
                              target_captions=images.inputs["target_captions"])
    assert carried.value == pytest.approx(explicit.value) and -1 <= carried.value <= 1
    # image_guidance_scale is a call argument: it changes the images
    other = generate_images(pipe, ["make it blue", "make it yellow"], seeds=[0, 1], **{**kwargs, "image_guidance_scale": 3.0},
                            **STEPS)
    assert not np.array_equal(other.images, images.images)


def test_paint_by_example_compares_with_its_exemplars_and_labels_its_cases(models, pipes) -> None:
    pipe = pipes.get(models["pbe"])
    src, exemplars = sources(), sources(seed=5)
    images = assert_deterministic(pipe, None, source_images=src, masks=centre_mask(), exemplars=list(exemplars), **STEPS)
    assert type(pipe).__name__ == "PaintByExamplePipeline"
    assert images.prompts == ["example 0", "example 0", "example 1", "example 1"]
    similarity = compute_metric("clip_image_similarity", images, clip_model=CLIP)
    assert similarity.details["reference"] == "exemplars"
    assert similarity.value == pytest.approx(compute_metric("clip_image_similarity", images, clip_model=CLIP,
                                                            reference_images=np.repeat(exemplars, 2, axis=0)).value)
    assert compute_metric("preservation_psnr", images).value > 0
    swapped = generate_images(pipe, None, seeds=[0, 1], source_images=src, masks=centre_mask(),
                              exemplars=list(exemplars[::-1]), **STEPS)
    assert not np.array_equal(swapped.images, images.images)  # the exemplar conditions the edit


def test_dit_takes_class_names_or_ids_and_gives_per_class_distances(models, pipes) -> None:
    pipe = pipes.get(models["dit"])
    assert pipe.labels["goldfish"] == 1  # id2label restored by from_pretrained
    images = assert_deterministic(pipe, ["goldfish", 8], **STEPS)
    assert images.prompts == ["goldfish"] * 2 + ["hen"] * 2 and images.inputs["class_labels"] == [1, 1, 8, 8]
    by_id = generate_images(pipe, None, class_labels=[1, 8], seeds=[0, 1], **STEPS)
    assert np.array_equal(by_id.images[:2], images.images[:2])  # a name and its id: the same class
    assert images.call_kwargs["inputs"]["class_labels"] == [1, 8]

    per_class = generate_images(pipe, ["goldfish", "hen"], seeds=range(4), **STEPS).by_prompt()
    assert list(per_class) == ["goldfish", "hen"] and all(len(s) == 4 for s in per_class.values())
    reference = generate_images(pipe, ["goldfish"], seeds=range(4, 8), **STEPS)  # other samples of one class
    kid_same = compute_metric("kid", per_class["goldfish"], reference=reference, features=FEATURES, subsets=10)
    kid_other = compute_metric("kid", per_class["hen"], reference=reference, features=FEATURES, subsets=10)
    assert kid_same.value < kid_other.value

    with pytest.raises(InputError, match=r"'goldfsh' is not a class name of DiTPipeline .*did you mean 'goldfish'"):
        generate_images(pipe, ["goldfsh"], **STEPS)
    with pytest.raises(InputError, match="class label 1000 is out of range"):
        generate_images(pipe, [1000], **STEPS)


def test_dit_refuses_a_sampler_that_would_ignore_the_generators(models) -> None:
    pipe = load_pipeline(models["dit"], scheduler="DDPMScheduler")
    with pytest.raises(InputError, match="DDPMScheduler would draw noise from the global RNG"):
        generate_images(pipe, ["goldfish"], **STEPS)


def test_sdxl_text_to_image_with_negative_prompts(models, pipes) -> None:
    pipe = pipes.get(models["sdxl"])
    prompts = ["a red square", "a blue circle"]
    images = assert_deterministic(pipe, prompts, guidance_scale=5.0, **STEPS)
    assert type(pipe).__name__ == "StableDiffusionXLPipeline" and images.image_size == (32, 32)
    assert compute_metric("clip_score", images, clip_model=CLIP).per_sample.shape == (4,)
    negative = generate_images(pipe, prompts, seeds=[0, 1], guidance_scale=5.0, negative_prompt="blurry", **STEPS)
    per_prompt = generate_images(pipe, prompts, seeds=[0, 1], guidance_scale=5.0, negative_prompt=["blurry", "dark"],
                                 **STEPS)
    assert not np.array_equal(negative.images, images.images)
    assert np.array_equal(per_prompt.images[:2], negative.images[:2]) and not np.array_equal(per_prompt.images[2:],
                                                                                             negative.images[2:])


def test_unconditional_ddpm_samples_by_seed_and_measures_kid(models, pipes) -> None:
    pipe = pipes.get(models["ddpm"])
    images = assert_deterministic(pipe, None, **STEPS)
    assert images.prompts == ["", ""] and images.inputs == {}
    more = generate_images(pipe, None, seeds=range(4), **STEPS)
    assert compute_metric("kid", more, reference=generate_images(pipe, None, seeds=range(4, 8), **STEPS),
                          features=FEATURES, subsets=10).details["n"] == 4
    with pytest.raises(InputError, match="DDPMPipeline is unconditional"):
        generate_images(pipe, ["a", "b"], **STEPS)


# --------------------------------------------------------------------------- inputs


def spy(pipe: object, monkeypatch: pytest.MonkeyPatch) -> list[dict]:
    """The keyword arguments of each call of ``pipe``'s class, recorded in the returned list."""
    calls: list[dict] = []
    original = type(pipe).__call__

    @functools.wraps(original)
    def call(self, *args, **kwargs):
        calls.append(kwargs)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(type(pipe), "__call__", call)
    return calls


@pytest.fixture
def counted(models, pipes, monkeypatch: pytest.MonkeyPatch):
    """The inpainting pipeline, counting how often it is called."""
    pipe = pipes.get(models["inpaint"])
    return pipe, spy(pipe, monkeypatch)


@pytest.mark.parametrize("kwargs, message", [
    (dict(source_images=sources(3), masks=centre_mask()),
     r"source_images holds 3 images for 2 prompts; give one per prompt \(same order\) or one for all"),
    (dict(source_images=sources(2), masks=np.stack([centre_mask()] * 3)), "masks holds 3 images for 2 prompts"),
    (dict(source_images=sources(2), masks=centre_mask((16, 16))),
     r"masks are 16x16 \(HxW\) but source_images are 32x32; give masks of the source images' size"),
    (dict(source_images=[sources(1)[0], sources(1, size=(24, 32))[0]], masks=centre_mask()),
     r"source_images: item 1 is 24x32 \(HxW\) but item 0 is 32x32; give images of one size"),
    (dict(source_images=sources(2, size=(32, 33)), masks=centre_mask((32, 33))),
     r"source_images are 32x33 \(HxW\) but StableDiffusionInpaintPipeline works at multiples of 2 pixels"),
    (dict(source_images=sources(2)), r"StableDiffusionInpaintPipeline needs masks= \(mask_image= of the pipeline\)"),
    (dict(source_images=sources(2).astype(np.float32) / 255, masks=centre_mask()), "images must be uint8"),
    (dict(source_images=sources(2), masks=centre_mask(), exemplars=sources(2)),
     r"takes no exemplars \(its __call__ has no example_image=\)"),
    (dict(source_images=sources(2), masks=centre_mask(), class_labels=[1, 2]), "class_labels= is for class-conditional"),
    (dict(source_images=sources(2), masks=centre_mask(), num_images_per_prompt=2), "num_images_per_prompt is not supported"),
], ids=["too-many-sources", "too-many-masks", "mask-size", "mixed-sizes", "not-multiple-of-vae-factor", "missing-mask",
        "float-images", "exemplars-not-taken", "class-labels-not-taken", "num-images-per-prompt"])
def test_input_errors_name_what_and_how_many_before_any_generation(counted, kwargs, message) -> None:
    pipe, calls = counted
    with pytest.raises(InputError, match=message):
        generate_images(pipe, ["a cat", "a dog"], **kwargs, **STEPS)
    assert calls == []


def test_inputs_from_a_folder_paths_and_pil_images_are_the_same_inputs(counted, tmp_path: Path) -> None:
    pipe, calls = counted
    src = sources()
    folder = tmp_path / "sources"
    folder.mkdir()
    for index, image in enumerate(src):
        Image.fromarray(image).save(folder / f"{index:02d}.png")
    Image.fromarray(centre_mask()).save(tmp_path / "mask.png")
    cache = ImageCache(tmp_path / "cache")
    from_arrays = generate_images(pipe, ["a cat", "a dog"], source_images=src, masks=centre_mask(), cache=cache, **STEPS)
    from_folder = generate_images(pipe, ["a cat", "a dog"], source_images=folder, masks=tmp_path / "mask.png", cache=cache,
                                  **STEPS)
    from_pil = generate_images(pipe, ["a cat", "a dog"], image=[Image.fromarray(s) for s in src],  # diffusers' name
                               mask_image=Image.fromarray(centre_mask()).convert("RGB"), cache=cache, **STEPS)
    assert len(calls) == 1 and cache.hits == 4  # same content, same cache keys: generated once
    assert np.array_equal(from_folder.images, from_arrays.images) and np.array_equal(from_pil.images, from_arrays.images)
    assert from_folder.call_kwargs == from_arrays.call_kwargs  # the inputs' digests, not where they came from
    other_mask = generate_images(pipe, ["a cat", "a dog"], source_images=src, masks=_corner(),
                                 cache=cache, **STEPS)
    assert len(calls) == 2 and cache.misses == 4  # another mask's content: other keys, generated again
    assert not np.array_equal(other_mask.images, from_arrays.images)
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="the folder .*empty holds no images"):
        generate_images(pipe, ["a cat"], source_images=tmp_path / "empty", masks=centre_mask(), **STEPS)
    with pytest.raises(InputError, match="prompt 'a cat' appears twice"):
        generate_images(pipe, ["a cat", "a cat"], source_images=src, masks=centre_mask(), **STEPS)

    saved = from_arrays.save(tmp_path / "saved")
    index = json.loads((saved / "samples.json").read_text())
    assert index["samples"][1]["source_images"] == "inputs/0001_source.png"
    assert np.array_equal(np.asarray(Image.open(saved / "inputs" / "0001_source.png")), src[1])
    assert np.array_equal(from_arrays.subset([1]).inputs["source_images"], src[1:])


def _corner() -> np.ndarray:
    mask = np.zeros((32, 32), np.uint8)
    mask[:12, :12] = 255
    return mask


# --------------------------------------------------------------------------- LoRA, scheduler, steps


def test_lora_changes_the_images_scale_zero_is_the_base_and_provenance_records_it(models) -> None:
    cache = PipelineCache()
    base = generate_images(cache.get(models["sd"]), ["a red square", "a cat"], seeds=[0, 1], **STEPS)
    with_lora = cache.get(models["sd"], lora=models["lora"], lora_scale=1.0)
    loaded = generate_images(with_lora, ["a red square", "a cat"], seeds=[0, 1], **STEPS)
    zero = generate_images(cache.get(models["sd"], lora=models["lora"] / "pytorch_lora_weights.safetensors", lora_scale=0.0),
                           ["a red square", "a cat"], seeds=[0, 1], **STEPS)
    assert np.abs(loaded.images.astype(int) - base.images.astype(int)).mean() > 5
    assert np.abs(zero.images.astype(int) - base.images.astype(int)).max() <= 2
    lora = loaded.provenance["lora"]
    assert lora["source"] == str(models["lora"]) and lora["scale"] == 1.0 and len(lora["hash"]) == 16
    assert lora["weight_name"] == "pytorch_lora_weights.safetensors"
    assert zero.provenance["lora"]["hash"] == lora["hash"] and zero.provenance["lora"]["scale"] == 0.0  # same file
    assert cache.loads[str(models["sd"])] == 3  # lora and lora_scale are part of the pipeline cache key
    assert cache.get(models["sd"], lora=models["lora"], lora_scale=1.0) is with_lora
    image_cache = ImageCache("unused")
    assert image_cache.key(loaded.provenance, STEPS, "a cat", 0) != image_cache.key(base.provenance, STEPS, "a cat", 0)
    assert image_cache.key(loaded.provenance, STEPS, "a cat", 0) != image_cache.key(zero.provenance, STEPS, "a cat", 0)
    with pytest.raises(ValueError, match="lora_scale=/lora_weight_name= were given without lora="):
        load_pipeline(models["sd"], lora_scale=0.5)


def test_lora_from_a_hub_id_and_dit_labels_through_the_hub_cache(models, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants as hub_constants

    for repo_id, source in [("diffeval-test/tiny-lora", models["lora"]), ("diffeval-test/tiny-dit", models["dit"])]:
        repo = tmp_path / f"models--{repo_id.replace('/', '--')}"
        shutil.copytree(source, repo / "snapshots" / FAKE_COMMIT)
        (repo / "refs").mkdir(parents=True)
        (repo / "refs" / "main").write_text(FAKE_COMMIT)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path))
    pipe = load_pipeline(models["sd"], lora="diffeval-test/tiny-lora", lora_scale=0.5)
    assert load_provenance(pipe)["lora"]["kind"] == "hub" and load_provenance(pipe)["lora"]["hash"] != "unknown"
    dit = load_pipeline("diffeval-test/tiny-dit")
    assert generate_images(dit, [2], **STEPS).prompts == ["great white shark, white shark"]  # id2label from the hub copy
    with pytest.raises(FileNotFoundError, match="cannot load the LoRA 'nobody/no-lora'"):
        load_pipeline(models["sd"], lora="nobody/no-lora")


def test_scheduler_override_and_steps_are_in_provenance_and_the_cache_key(models) -> None:
    ddim = load_pipeline(models["sd"])
    dpm = load_pipeline(models["sd"], scheduler="DPMSolverMultistepScheduler")
    a, b = (generate_images(p, ["a cat"], **STEPS) for p in (ddim, dpm))
    assert a.provenance["scheduler"] == "DDIMScheduler" and b.provenance["scheduler"] == "DPMSolverMultistepScheduler"
    cache = ImageCache("unused")
    assert cache.key(a.provenance, STEPS, "a cat", 0) != cache.key(b.provenance, STEPS, "a cat", 0)
    assert cache.key(a.provenance, STEPS, "a cat", 0) != cache.key(a.provenance, {"num_inference_steps": 3}, "a cat", 0)
    assert a.call_kwargs == STEPS  # in the baseline signature


# --------------------------------------------------------------------------- baselines (pytester)

# Every row of the table as a user would write it.  The metrics that decide are the
# ones with signal on random tiny models: pixel preservation (PSNR/SSIM outside the mask,
# or of the whole image against its source for img2img / InstructPix2Pix, where the mask
# is all black: nothing edited) and KID against a fixed reference set, per class for DiT.
# The CLIP metrics the issue names are recorded too; with a random tiny CLIP their
# per-sample values spread over tens of points, so they cannot catch anything here.
#
# Tolerances are derived, not chosen: the recording run uses --diffeval-calibrate=2, so
# each one is max(the metric's floor, 3 x the largest change benign re-runs (other batch
# size, other thread count) caused), and KID's is at least twice its resampling spread.  The
# second run proves them wide enough (it passes); the broken models prove them narrow
# enough (measured paired 95% bounds: PSNR -0.9 dB (img2img) to -2.3 dB (InstructPix2Pix)
# against a 0.5 dB floor; KID rises 3x-10x over its 2-spread tolerance).
USER_TEST = """
import numpy as np
import pytest
from conftest import INPAINT, IP2P, PBE, IMG2IMG, DIT, SDXL, DDPM, SOURCES, MASK, EXEMPLARS, REFERENCES

STEPS = dict(num_inference_steps=2)
FEATURES = "clip:diffeval/tiny-clip"
KEEP_ALL = np.zeros((32, 32), np.uint8)  # nothing edited: preservation of the whole image against its source


def test_inpainting(generate, diffeval_baseline):
    images = generate(INPAINT, ["a red cat", "a blue dog"], seeds=range(4), source_images=SOURCES, masks=MASK, **STEPS)
    diffeval_baseline.assert_no_regression(images, ["preservation_psnr", "preservation_ssim", "clip_score"])


def test_instruct_pix2pix(generate, diffeval_baseline):
    images = generate(IP2P, ["make it blue", "make it yellow"], seeds=range(4), source_images=SOURCES,
                      source_captions="a square", target_captions=["a blue square", "a yellow square"],
                      image_guidance_scale=1.5, **STEPS)
    diffeval_baseline.assert_no_regression(images, "preservation_psnr", masks=KEEP_ALL)
    diffeval_baseline.assert_no_regression(images, ["clip_directional_similarity", "clip_image_similarity"])


def test_paint_by_example(generate, diffeval_baseline):
    images = generate(PBE, None, seeds=range(4), source_images=SOURCES, masks=MASK, exemplars=EXEMPLARS, **STEPS)
    diffeval_baseline.assert_no_regression(images, ["preservation_psnr", "preservation_ssim", "clip_image_similarity"])


def test_img2img(generate, diffeval_baseline):
    images = generate(IMG2IMG, ["a red cat", "a blue dog"], seeds=range(4), source_images=SOURCES, strength=0.5,
                      num_inference_steps=4)
    diffeval_baseline.assert_no_regression(images, "preservation_psnr", masks=KEEP_ALL)
    diffeval_baseline.assert_no_regression(images, ["clip_score", "clip_image_similarity"])


@pytest.mark.parametrize("name", ["goldfish", "hen"])
def test_dit(generate, diffeval_baseline, name):
    images = generate(DIT, [name], seeds=range(8), **STEPS)  # per class: KID against that class's reference
    diffeval_baseline.assert_no_regression(images, "kid", reference=f"{REFERENCES}/dit-{name}", features=FEATURES)


def test_sdxl(generate, diffeval_baseline):
    images = generate(SDXL, ["a red cat", "a blue dog"], seeds=range(4), negative_prompt="blurry", **STEPS)
    diffeval_baseline.assert_no_regression(images, "kid", reference=f"{REFERENCES}/sdxl", features=FEATURES)


def test_unconditional(generate, diffeval_baseline):
    images = generate(DDPM, None, seeds=range(16), **STEPS)
    diffeval_baseline.assert_no_regression(images, "kid", reference=f"{REFERENCES}/ddpm", features=FEATURES)
"""

# (test, the metric that must catch the broken model): one per row of the table.
CAUGHT_BY = {"test_inpainting": "preservation_psnr", "test_instruct_pix2pix": "preservation_psnr",
             "test_paint_by_example": "preservation_psnr", "test_img2img": "preservation_psnr",
             "test_dit[goldfish]": "kid", "test_dit[hen]": "kid", "test_sdxl": "kid", "test_unconditional": "kid"}
# How each model is broken: the VAE's weights (or the pixel UNet's, for DDPM) get Gaussian
# noise of 3x each tensor's std, the kind of damage a bad conversion or merge does.
BREAK = {"inpaint": "vae", "ip2p": "vae", "pbe": "vae", "img2img": "vae", "sdxl": "vae", "dit": "vae", "ddpm": "unet"}


def _save_pngs(folder: Path, images: np.ndarray) -> None:
    folder.mkdir(parents=True)
    for index, image in enumerate(images):
        Image.fromarray(image).save(folder / f"{index:03d}.png")


def _references(root: Path, models: dict[str, Path]) -> Path:
    """Reference sets for KID: samples of the healthy models at seeds the tests do not use
    (standing in for real data, which a tiny random model has none of)."""
    cache = PipelineCache()
    for name in ("goldfish", "hen"):
        _save_pngs(root / f"dit-{name}", generate_images(cache.get(models["dit"]), [name], seeds=range(100, 108),
                                                         **STEPS).images)
    _save_pngs(root / "sdxl", generate_images(cache.get(models["sdxl"]), ["a red cat", "a blue dog"],
                                              seeds=range(100, 104), negative_prompt="blurry", **STEPS).images)
    _save_pngs(root / "ddpm", generate_images(cache.get(models["ddpm"]), None, seeds=range(100, 116), **STEPS).images)
    return root


def _failures(output: str) -> dict[str, str]:
    """Each failed test's section of pytest's output, by test name."""
    parts = re.split(r"\n_{3,} (test_\S+) _{3,}\n", output)
    return dict(zip(parts[1::2], parts[2::2]))


def test_every_pipeline_records_passes_and_catches_a_broken_model(user_project: pytest.Pytester, models,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    root = user_project.path
    mine = {name: Path(shutil.copytree(models[name], root / "models" / name)) for name in BREAK}  # broken below
    src, exemplars = root / "sources", root / "exemplars"
    _save_pngs(src, sources())
    _save_pngs(exemplars, sources(seed=5))
    Image.fromarray(centre_mask()).save(root / "mask.png")
    user_project.makeconftest(textwrap.dedent(f"""
        INPAINT, IP2P, PBE = {str(mine['inpaint'])!r}, {str(mine['ip2p'])!r}, {str(mine['pbe'])!r}
        IMG2IMG, DIT, SDXL, DDPM = {str(mine['img2img'])!r}, {str(mine['dit'])!r}, {str(mine['sdxl'])!r}, {str(mine['ddpm'])!r}
        SOURCES, EXEMPLARS = {str(src)!r}, {str(exemplars)!r}
        MASK = {str(root / 'mask.png')!r}
        REFERENCES = {str(_references(root / 'references', mine))!r}
    """))
    user_project.makepyfile(test_edits=USER_TEST)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    user_project.runpytest("--snapshot-update", "--diffeval-calibrate=2").assert_outcomes(passed=8)
    files = sorted((root / "baselines" / "test_edits").glob("*.json"))
    assert [f.name for f in files] == ["test_dit[goldfish].json", "test_dit[hen].json", "test_img2img.json",
                                       "test_inpainting.json", "test_instruct_pix2pix.json",
                                       "test_paint_by_example.json", "test_sdxl.json", "test_unconditional.json"]
    inpaint = json.loads((root / "baselines" / "test_edits" / "test_inpainting.json").read_text())["checks"]
    assert set(inpaint) == {"clip_score", "preservation_psnr", "preservation_ssim"}
    entry = inpaint["preservation_psnr"]["hardware"]["cpu/float32"]
    assert entry["provenance"]["pipeline_class"] == "StableDiffusionInpaintPipeline" and len(entry["samples"]) == 8
    assert entry["signature"]["call_kwargs"]["inputs"]["masks"].startswith("1 x 32x32 sha256:")
    assert entry["noise"]["runs"] == 2  # the tolerance was calibrated
    ip2p = json.loads((root / "baselines" / "test_edits" / "test_instruct_pix2pix.json").read_text())["checks"]
    assert {"clip_directional_similarity", "clip_image_similarity", "preservation_psnr"} == set(ip2p)

    user_project.runpytest().assert_outcomes(passed=8)

    mask = centre_mask()
    mask[:4] = 255  # another mask: the numbers are not comparable, and the run says why
    Image.fromarray(mask).save(root / "mask.png")
    changed = user_project.runpytest("-k", "inpainting")
    changed.assert_outcomes(failed=1)
    assert "was recorded under other conditions" in changed.stdout.str() and "call_kwargs" in changed.stdout.str()
    Image.fromarray(centre_mask()).save(root / "mask.png")

    for name, component in BREAK.items():
        perturb_weights(mine[name], component, scale=3.0)
    broken = user_project.runpytest()
    broken.assert_outcomes(failed=8)
    failures = _failures(broken.stdout.str())
    assert set(failures) == set(CAUGHT_BY)
    for test, metric in CAUGHT_BY.items():
        assert f"{metric} regressed against the baseline" in failures[test], (test, failures[test][-3000:])


# --------------------------------------------------------------------------- SDXL's second prompts, PbE counts, LoRA fixture


@pytest.fixture
def sdxl_calls(models, pipes, monkeypatch: pytest.MonkeyPatch):
    """The SDXL pipeline, recording the keyword arguments of each call."""
    pipe = pipes.get(models["sdxl"])
    return pipe, spy(pipe, monkeypatch)


def test_sdxl_prompt_2_and_negative_prompt_2_reach_the_pipeline_and_the_cache_key(sdxl_calls, tmp_path: Path) -> None:
    pipe, calls = sdxl_calls
    cache, prompts = ImageCache(tmp_path / "cache"), ["a red square", "a blue circle"]
    plain = generate_images(pipe, prompts, seeds=[0], cache=cache, **STEPS)
    # diffusers reads negative_prompt_2 only when negative_prompt is given (else zeros): give both
    second = generate_images(pipe, prompts, seeds=[0], cache=cache, prompt_2=["in the snow", "at night"],
                             negative_prompt="ugly", negative_prompt_2="blurry", **STEPS)
    assert calls[-1]["prompt_2"] == ["in the snow", "at night"] and calls[-1]["negative_prompt_2"] == ["blurry"] * 2
    assert cache.misses == 4 and not np.array_equal(second.images, plain.images)  # other keys, other images
    assert second.call_kwargs["prompt_2"] == ["in the snow", "at night"] and "prompt_2" not in plain.call_kwargs
    other_negative = generate_images(pipe, prompts, seeds=[0], cache=cache, prompt_2=["in the snow", "at night"],
                                     negative_prompt="ugly", negative_prompt_2="dark", **STEPS)
    assert cache.misses == 6 and len(calls) == 3  # negative_prompt_2 alone changes the key
    assert not np.array_equal(other_negative.images, second.images)
    generate_images(pipe, prompts, seeds=[0], cache=cache, prompt_2=["in the snow", "at night"],
                    negative_prompt="ugly", negative_prompt_2="blurry", **STEPS)
    assert len(calls) == 3 and cache.hits == 2  # the same second prompts: read from the cache


def test_sdxl_warns_when_its_second_encoder_cuts_a_prompt(models, pipes) -> None:
    from pytest_diffeval.exceptions import PromptTruncatedWarning

    pipe = pipes.get(models["sdxl"])
    long = "a red square on a blue table next to a green circle " * 2
    count = len(pipe.tokenizer_2(long)["input_ids"])
    with pytest.warns(PromptTruncatedWarning) as record:
        generate_images(pipe, ["a cat"], prompt_2=long, **STEPS)
    message = " ".join(str(w.message) for w in record if issubclass(w.category, PromptTruncatedWarning))
    assert repr(long) in message and f"{count} tokens > tokenizer_2's limit of 77" in message
    assert "tokenizer's limit" not in message  # the first encoder reads the short prompt


def test_paint_by_example_without_prompts_needs_matching_input_counts(models, pipes, monkeypatch) -> None:
    pipe = pipes.get(models["pbe"])
    calls: list[int] = []
    original = type(pipe).__call__

    @functools.wraps(original)  # keeps the signature generate_images reads
    def call(self, *args, **kwargs):
        calls.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(type(pipe), "__call__", call)
    with pytest.raises(InputError, match=r"PaintByExamplePipeline got no prompts, so the cases come from the input "
                                         r"images, but they disagree: source_images holds 2, exemplars holds 3"):
        generate_images(pipe, None, source_images=sources(2), masks=centre_mask(), exemplars=list(sources(3, seed=5)),
                        **STEPS)
    assert calls == []  # before any generation


LORA_TEST = """
import json
import numpy as np
from conftest import SD, LORA


def test_lora(diffusion_pipeline, generate, diffeval_baseline):
    base = diffusion_pipeline(SD)
    with_lora = diffusion_pipeline(SD, lora=LORA, lora_scale=0.7)
    assert diffusion_pipeline(SD, lora=LORA, lora_scale=0.7) is with_lora  # loaded once per worker
    assert diffusion_pipeline(SD, lora=LORA, lora_scale=0.3) is not with_lora  # the scale is in the key
    plain = generate(base, ["a red square", "a cat"], seeds=range(2), num_inference_steps=2)
    images = generate(with_lora, ["a red square", "a cat"], seeds=range(2), num_inference_steps=2)
    assert "lora" not in plain.provenance
    assert not np.array_equal(images.images, plain.images)  # not read from the base model's cache entries
    print("LORA", json.dumps(images.provenance["lora"], sort_keys=True))
    diffeval_baseline.assert_no_regression(images, "preservation_psnr", source_images=plain.images,
                                           masks=np.zeros((32, 32), np.uint8))
"""


def test_lora_through_the_pipeline_fixture_is_cached_keyed_and_recorded(user_project: pytest.Pytester, models,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    user_project.makeconftest(f"SD, LORA = {str(models['sd'])!r}, {str(models['lora'])!r}\n")
    user_project.makepyfile(test_lora=LORA_TEST)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    first = user_project.runpytest("-s", "--snapshot-update")
    first.assert_outcomes(passed=1)
    line = next(l for l in first.stdout.lines if "LORA {" in l).split("LORA ", 1)[1]
    lora = json.loads(line)
    assert lora["source"] == str(models["lora"]) and lora["scale"] == 0.7 and len(lora["hash"]) == 16
    stored = json.loads((user_project.path / "baselines" / "test_lora" / "test_lora.json").read_text())
    entry = stored["checks"]["preservation_psnr"]["hardware"]["cpu/float32"]
    assert entry["provenance"]["lora"] == lora  # the baseline says which LoRA, at which scale
    again = user_project.runpytest("-s")  # images now come from the on-disk cache
    again.assert_outcomes(passed=1)
    assert f"LORA {line}" in again.stdout.str()
