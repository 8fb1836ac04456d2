"""One example test per pipeline kind on real hub checkpoints: img2img, inpainting,
InstructPix2Pix, Paint-by-Example, DiT, SDXL with a LoRA and unconditional DDPM, each with
its natural metric and a stored baseline.  Source images are the embedded digit data (upscaled) and shapes
drawn with PIL, so nothing but the checkpoints is downloaded.

They need a CUDA GPU and the weights (in the Hugging Face cache, or downloadable): on a
machine without a GPU, or on a GPU machine without a model's weights, they skip with a
reason that names what is missing and how to get it (``huggingface-cli download <id>``,
``HF_HOME``, ``--diffeval-model=<id>=PATH``); ``--diffeval-require-gpu`` turns every such
skip into a failure.  The DDPM test also needs the CIFAR-10 test images as a folder of
PNGs (``DIFFEVAL_CIFAR10_DIR``).  On a GPU runner::

    pytest model_tests/test_hub_pipelines.py --diffeval-require-gpu --snapshot-update  # first time
    pytest model_tests/test_hub_pipelines.py --diffeval-require-gpu
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from pytest_diffeval import skip_or_fail
from pytest_diffeval.embedded.data import caption, make_images, parse_caption

CLIP = "openai/clip-vit-large-patch14"  # the backbone the published numbers use
SIZE = 512


def digit_sources(n: int = 4, size: int = SIZE) -> tuple[np.ndarray, list[str]]:
    """``n`` held-out digit images of the embedded data, upscaled to ``size``, and their captions."""
    images, captions = make_images(n, seed=7, split="heldout")
    upscaled = [np.asarray(Image.fromarray(image).resize((size, size), Image.BICUBIC)) for image in images]
    return np.stack(upscaled), captions


def centre_mask(size: int = SIZE, fraction: float = 0.5) -> np.ndarray:
    """White (= repaint) square in the middle, black (= keep) around it."""
    mask = np.zeros((size, size), np.uint8)
    lo, hi = int(size * (1 - fraction) / 2), int(size * (1 + fraction) / 2)
    mask[lo:hi, lo:hi] = 255
    return mask


def drawn_exemplars(size: int = 256) -> list[Image.Image]:
    """Simple objects drawn with PIL: a red apple and a yellow star, on white."""
    apple = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(apple)
    draw.ellipse((40, 60, size - 40, size - 20), fill=(200, 20, 30))
    draw.rectangle((size // 2 - 6, 20, size // 2 + 6, 70), fill=(90, 50, 20))
    draw.ellipse((size // 2 + 5, 25, size // 2 + 60, 55), fill=(40, 150, 40))
    star = Image.new("RGB", (size, size), "white")
    c, outer, inner = size / 2, size * 0.45, size * 0.18
    points = [(c + (outer if i % 2 == 0 else inner) * np.sin(i * np.pi / 5),
               c - (outer if i % 2 == 0 else inner) * np.cos(i * np.pi / 5)) for i in range(10)]
    ImageDraw.Draw(star).polygon(points, fill=(250, 210, 20))
    return [apple, star]


@pytest.mark.gpu
def test_sd15_img2img(diffusion_pipeline, generate, diffeval_baseline):
    pipe = diffusion_pipeline("stable-diffusion-v1-5/stable-diffusion-v1-5",
                              pipeline_class="StableDiffusionImg2ImgPipeline")
    sources, captions = digit_sources()
    prompts = [f"an oil painting of {c}" for c in captions]  # one prompt per source
    images = generate(pipe, prompts, seeds=range(2), source_images=sources, strength=0.6,
                      num_inference_steps=30, guidance_scale=7.5)
    # Prompt alignment, and how much of the source survives (CLIP image similarity to it).
    diffeval_baseline.assert_no_regression(images, ["clip_score", "clip_image_similarity"], clip_model=CLIP)


@pytest.mark.gpu
def test_sd_inpainting(generate, diffeval_baseline):
    sources, captions = digit_sources()
    prompts = [f"a yellow star on a {parse_caption(c)[2]} background" for c in captions]
    images = generate("stable-diffusion-v1-5/stable-diffusion-inpainting", prompts, seeds=range(2),
                      source_images=sources, masks=centre_mask(), num_inference_steps=30, guidance_scale=7.5)
    diffeval_baseline.assert_no_regression(images, "clip_score", clip_model=CLIP)
    # Outside the mask the source must survive (the VAE round trip costs a few dB).
    diffeval_baseline.assert_no_regression(images, ["preservation_psnr", "preservation_ssim"])


@pytest.mark.gpu
def test_instruct_pix2pix(generate, diffeval_baseline):
    sources, captions = digit_sources()
    parts = [parse_caption(c) for c in captions]
    new = ["green" if bg != "green" else "yellow" for _, _, bg in parts]
    images = generate(
        "timbrooks/instruct-pix2pix", [f"make the background {colour}" for colour in new], seeds=range(2),
        source_images=sources, source_captions=captions,
        target_captions=[caption(d, fg, colour) for (d, fg, _), colour in zip(parts, new)],
        num_inference_steps=20, guidance_scale=7.5, image_guidance_scale=1.5,
    )
    # Does the edit go the way the instruction says, and does it keep the rest of the image?
    diffeval_baseline.assert_no_regression(images, ["clip_directional_similarity", "clip_image_similarity"],
                                           clip_model=CLIP)


@pytest.mark.gpu
def test_paint_by_example(generate, diffeval_baseline):
    sources, _ = digit_sources(2)
    images = generate("Fantasy-Studio/Paint-by-Example", ["apple", "star"], seeds=range(2),  # labels of the cases
                      source_images=sources, masks=centre_mask(), exemplars=drawn_exemplars(),
                      num_inference_steps=30, guidance_scale=5.0)
    # Similarity to the exemplar (clip_image_similarity reads the carried exemplars), and
    # preservation of everything outside the mask.
    diffeval_baseline.assert_no_regression(images, ["clip_image_similarity", "preservation_psnr"], clip_model=CLIP)


DIT_CLASSES = ["golden retriever", "tabby cat", "goldfish", "umbrella"]


@pytest.mark.gpu
def test_dit_class_conditional(diffusion_pipeline, generate, diffeval_baseline):
    # DiTPipeline does not hand its generators to the scheduler: sample deterministically.
    pipe = diffusion_pipeline("facebook/DiT-XL-2-256", scheduler="DPMSolverMultistepScheduler")
    images = generate(pipe, DIT_CLASSES, seeds=range(8), num_inference_steps=25, guidance_scale=4.0)
    # Per class: does the image show the class (zero-shot CLIP score against its name)?
    diffeval_baseline.assert_no_regression(images, "clip_score", clip_model=CLIP,
                                           prompts=[f"a photo of a {name}" for name in images.prompts])
    # Per-class distance: each class's images are closer (KID on CLIP features) to more
    # samples of the same class than to the other classes' samples.
    others = generate(pipe, DIT_CLASSES, seeds=range(8, 16), num_inference_steps=25, guidance_scale=4.0).by_prompt()
    for name, samples in images.by_prompt().items():
        from pytest_diffeval import compute_metric

        same = compute_metric("kid", samples, reference=others[name], features=f"clip:{CLIP}").value
        other = min(compute_metric("kid", samples, reference=others[o], features=f"clip:{CLIP}").value
                    for o in others if o != name)
        assert same < other, f"class {name!r}: KID to its own class {same:.4f} >= to another class {other:.4f}"


@pytest.mark.gpu
def test_sdxl_with_lora(diffusion_pipeline, generate, diffeval_baseline):
    pipe = diffusion_pipeline("stabilityai/stable-diffusion-xl-base-1.0", lora="nerijs/pixel-art-xl",
                              lora_weight_name="pixel-art-xl.safetensors", lora_scale=0.8)
    prompts = ["pixel art, a red apple on a wooden table", "pixel art, a castle on a hill at sunset"]
    images = generate(pipe, prompts, seeds=range(4), batch_size=4, num_inference_steps=30, guidance_scale=5.0,
                      negative_prompt="blurry, photo")
    assert images.provenance["lora"]["scale"] == 0.8  # the LoRA and its content hash are in the baseline
    diffeval_baseline.assert_no_regression(images, "clip_score", clip_model=CLIP)


@pytest.fixture
def cifar10_test_images(request: pytest.FixtureRequest) -> str:
    """The CIFAR-10 test split (10,000 PNGs) as a folder: the reference distribution of
    ``google/ddpm-cifar10-32``.  Missing: a skip that says how to get it, a failure under
    ``--diffeval-require-gpu``."""
    folder = os.environ.get("DIFFEVAL_CIFAR10_DIR", "")
    if folder and Path(folder).is_dir():
        return folder
    reason = ("needs the CIFAR-10 test images: set DIFFEVAL_CIFAR10_DIR to a folder of them as PNGs (e.g. exported "
              "from `huggingface-cli download uoft-cs/cifar10 --repo-type dataset`, split 'test')")
    skip_or_fail(request.config, reason)


@pytest.mark.gpu
def test_ddpm_cifar10_unconditional(cifar10_test_images, diffusion_pipeline, generate, diffeval_baseline):
    # Unconditional: no prompts, the seeds are the samples.  DDIM (eta 0) at 100 steps
    # instead of the 1000 DDPM steps; every sample still has its own generator.
    pipe = diffusion_pipeline("google/ddpm-cifar10-32", scheduler="DDIMScheduler")
    images = generate(pipe, None, seeds=range(2048), batch_size=512, num_inference_steps=100)
    # KID (unbiased at this size, unlike FID) in Inception features against the real test
    # images; its tolerance is at least twice the subset spread the baseline records.
    diffeval_baseline.assert_no_regression(images, "kid", reference=cifar10_test_images,
                                           features="inception-v3-2048")
