"""What ``model_tests/test_embedded_t2i.py`` does, written by hand without pytest-diffeval:
the same generations (same model, prompts, seeds, sampling, batch size 8, one CPU
generator per image) and the same torchmetrics calls (CLIP score through
``_clip_score_update``, ``FrechetInceptionDistance`` / ``KernelInceptionDistance`` on CLIP
features, CMMD on CLIP embeddings, the embedded checker), in one process.  It computes
every metric of every test, as if every check passed (pytest stops a failing test early,
so the suite never does more metric work than this).  The baseline comparison itself
(reading JSON, a subtraction) is left out.

    /work/venv/bin/python benchmarks/handwritten_suite.py

Used by ``benchmarks/suite_vs_script.py``; prints a line per test and its wall time.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

BATCH = 8
SAMPLING = {"num_inference_steps": 20, "guidance_scale": 5.0}


def main() -> None:
    start = time.perf_counter()
    from torchmetrics.functional.multimodal.clip_score import _clip_score_update
    from torchmetrics.image.fid import FrechetInceptionDistance, _compute_fid
    from torchmetrics.image.kid import KernelInceptionDistance
    from transformers import CLIPModel, CLIPProcessor

    from pytest_diffeval.embedded import resolve_embedded
    from pytest_diffeval.embedded.checker import DigitChecker
    from pytest_diffeval.embedded.data import HELDOUT_PROMPTS, make_images
    from pytest_diffeval.pixel_pipeline import PixelTextToImagePipeline

    pipe = PixelTextToImagePipeline.from_pretrained(str(resolve_embedded("diffeval/tiny-t2i")),
                                                    torch_dtype=torch.float32, use_safetensors=True).to("cpu")
    for module in (pipe.unet, pipe.text_encoder):
        module.eval()
    pipe.set_progress_bar_config(disable=True)
    clip_dir = str(resolve_embedded("diffeval/tiny-clip"))
    clip = CLIPModel.from_pretrained(clip_dir, use_safetensors=True).eval()
    processor = CLIPProcessor.from_pretrained(clip_dir)
    checker = DigitChecker.from_pretrained(resolve_embedded("diffeval/tiny-checker"))
    max_length = clip.config.text_config.max_position_embeddings

    class Adapter(torch.nn.Module):  # transformers 5 returns output objects; torchmetrics wants tensors
        def __init__(self) -> None:
            super().__init__()
            self.config = clip.config

        def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
            out = clip.get_image_features(pixel_values=pixel_values)
            return out if isinstance(out, torch.Tensor) else out.pooler_output

        def get_text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            out = clip.get_text_features(input_ids=input_ids, attention_mask=attention_mask)
            return out if isinstance(out, torch.Tensor) else out.pooler_output

    def truncating(text=None, images=None, **kwargs):
        if text is not None:
            kwargs.update(truncation=True, max_length=max_length)
        return processor(text=text, images=images, **kwargs)

    adapter = Adapter()
    print(f"setup {time.perf_counter() - start:.2f}s", flush=True)

    def generate(prompts: list[str], seeds: list[int], **kwargs) -> tuple[np.ndarray, list[str]]:
        jobs = [(p, s) for p in prompts for s in seeds]
        out = []
        with torch.no_grad():
            for b in range(0, len(jobs), BATCH):
                batch = jobs[b : b + BATCH]
                gens = [torch.Generator("cpu").manual_seed(s) for _, s in batch]
                raw = np.asarray(pipe(prompt=[p for p, _ in batch], generator=gens, output_type="np", **kwargs).images,
                                 dtype=np.float32)
                out.append((np.nan_to_num(raw, nan=0.0, posinf=1.0, neginf=0.0).clip(0, 1) * 255).round().astype(np.uint8))
        return np.concatenate(out), [p for p, _ in jobs]

    def clip_scores(images: np.ndarray, prompts: list[str]) -> np.ndarray:
        tensor = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
        scores = []
        with torch.no_grad():
            for b in range(0, len(images), 64):
                score, _ = _clip_score_update(list(tensor[b : b + 64]), prompts[b : b + 64], adapter, truncating)
                scores.append(score.double())
        return torch.cat(scores).numpy()

    def digits(images: np.ndarray, prompts: list[str]) -> tuple[float, float]:
        verdict = checker.check(images, prompts)
        return float(verdict["digit"].mean()), float((verdict["fg"] & verdict["bg"]).mean())

    def embed(images: np.ndarray) -> torch.Tensor:
        out = []
        with torch.no_grad():
            for b in range(0, len(images), 64):
                pixels = processor(images=list(torch.from_numpy(images[b : b + 64]).permute(0, 3, 1, 2)),
                                   return_tensors="pt")["pixel_values"]
                out.append(adapter.get_image_features(pixels).float())
        return torch.cat(out)

    class ClipFeatures(torch.nn.Module):
        num_features = clip.config.projection_dim

        def forward(self, images: torch.Tensor) -> torch.Tensor:
            return embed(images.permute(0, 2, 3, 1).numpy()).double()

    def stream(metric, images: np.ndarray, real: bool) -> None:
        for b in range(0, len(images), 64):
            metric.update(torch.from_numpy(images[b : b + 64]).permute(0, 3, 1, 2).contiguous(), real=real)

    def mmd(x: torch.Tensor, y: torch.Tensor) -> float:
        x, y = x.double(), y.double()
        gamma = 1.0 / (2 * 10.0**2)
        xx, yy, xy = x @ x.T, y @ y.T, x @ y.T
        xs, ys = xx.diagonal(), yy.diagonal()
        return float(1000 * (torch.exp(-gamma * (-2 * xx + xs[:, None] + xs[None, :])).mean()
                             + torch.exp(-gamma * (-2 * yy + ys[:, None] + ys[None, :])).mean()
                             - 2 * torch.exp(-gamma * (-2 * xy + xs[:, None] + ys[None, :])).mean()))

    real, _ = make_images(128, seed=0, split="heldout")
    real = np.ascontiguousarray(real)
    tick = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal tick
        now = time.perf_counter()
        print(f"{name} {now - tick:.2f}s", flush=True)
        tick = now

    # test_prompt_is_followed (8 prompts x 4 seeds, generated together as the plan does)
    prompts = HELDOUT_PROMPTS[::4]
    images, labels = generate(prompts, list(range(4)), **SAMPLING)
    for i in range(len(prompts)):
        part = slice(4 * i, 4 * i + 4)
        clip_scores(images[part], labels[part])
        digits(images[part], labels[part])
    lap("test_prompt_is_followed (8 tests)")

    # test_heldout_prompts_against_baseline
    images, labels = generate(HELDOUT_PROMPTS, [0, 1], **SAMPLING)
    clip_scores(images, labels)
    digits(images, labels)
    digits(images, labels)  # the floors after the baseline check
    lap("test_heldout_prompts_against_baseline")

    # test_distribution_matches_heldout_real_images: FID, KID, CMMD, then the FID ceiling
    images, labels = generate(HELDOUT_PROMPTS, [0, 1, 2, 3], **SAMPLING)
    fid = FrechetInceptionDistance(feature=ClipFeatures(), reset_real_features=False, normalize=False)
    fid.set_dtype(torch.float64)
    stream(fid, real, True)
    captured: list[torch.Tensor] = []
    hook = fid.inception.register_forward_hook(lambda m, i, out: captured.append(out.detach().double()))
    stream(fid, images, False)
    hook.remove()
    float(fid.compute())
    n = fid.real_features_num_samples.double()
    mean_real = fid.real_features_sum.double() / n
    cov_real = (fid.real_features_cov_sum.double() - n * torch.outer(mean_real, mean_real)) / (n - 1)
    fake = torch.cat(captured)
    generator = torch.Generator().manual_seed(0)
    for _ in range(20):  # bootstrap spread
        sample = fake[torch.randint(len(fake), (len(fake),), generator=generator)]
        _compute_fid(mean_real, cov_real, sample.mean(0), torch.cov(sample.T))
    kid = KernelInceptionDistance(feature=fid.inception, subsets=100, subset_size=64, reset_real_features=False,
                                  normalize=False)
    stream(kid, real, True)
    stream(kid, images, False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        kid.compute()
    x = torch.nn.functional.normalize(embed(images), dim=-1)
    y = torch.nn.functional.normalize(embed(real), dim=-1)
    mmd(x, y)
    generator = torch.Generator().manual_seed(0)
    for _ in range(50):
        mmd(x[torch.randint(len(x), (len(x),), generator=generator)], y)
    fid.reset()  # the ceiling check: real statistics kept, generated features again
    stream(fid, images, False)
    float(fid.compute())
    lap("test_distribution_matches_heldout_real_images")

    # test_guidance_sweep_improves_alignment
    scores = {}
    for scale in (1.0, 3.0, 5.0):
        images, labels = generate(HELDOUT_PROMPTS[::2], [0], num_inference_steps=20, guidance_scale=scale)
        scores[scale] = clip_scores(images, labels)
    clip_scores(images, labels)  # the baseline check of the last set
    lap("test_guidance_sweep_improves_alignment")
    print(f"total {time.perf_counter() - start:.2f}s", flush=True)


if __name__ == "__main__":
    main()
