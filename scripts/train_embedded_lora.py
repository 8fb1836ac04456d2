"""Train the example style LoRA of the embedded model and make its showcase images, offline,
on the CPU.  Never run in CI: its outputs are committed in ``model_tests/lora/``.

The LoRA (diffusers/peft format, ``pytorch_lora_weights.safetensors``) is a "scanlines"
style for ``diffeval/tiny-t2i``: every second row of the image darkened to SCANLINE_GAIN of its
colour, like a CRT filter.  It is trained on the shipped model's own training images with
that filter applied (same captions, same epsilon objective and min-SNR-5 weighting as
``scripts/train_embedded.py``), the base model frozen; LoRA rank RANK on the UNet's
attention projections and ResNet convolutions.  Then, like a LoRA's page on a model hub,
showcase images are generated with the LoRA on the shipped model through the plugin's
normal loading path (``load_pipeline(..., lora=...)``) and saved as PNGs, with the
generation settings in ``showcase.json``.  ``model_tests/test_preference_checks.py`` checks
that the LoRA on the model under test still reproduces that style.

Command (single-threaded, every seed fixed)::

    python scripts/train_embedded_lora.py                  # --steps 600, then the showcase
    python scripts/train_embedded_lora.py --showcase-only  # the showcase of the LoRA in --out
    python scripts/train_embedded_lora.py --steps 20 --out /tmp/lora-smoke

The weights are stored in float16 (rank 8: 175k parameters, 0.36 MB); the showcase is made
from the stored file.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from diffusers import DDPMScheduler  # noqa: E402
from peft import LoraConfig  # noqa: E402
from peft.utils import get_peft_model_state_dict  # noqa: E402
from PIL import Image  # noqa: E402

from pytest_diffeval.embedded import resolve_embedded  # noqa: E402
from pytest_diffeval.embedded.data import make_images  # noqa: E402
from pytest_diffeval.generation import generate_images  # noqa: E402
from pytest_diffeval.pipelines import load_pipeline  # noqa: E402
from pytest_diffeval.pixel_pipeline import PixelTextToImagePipeline  # noqa: E402

MODEL = "diffeval/tiny-t2i"
OUT = ROOT / "model_tests" / "lora" / "tiny-t2i-scanlines"
RANK = 8
SCANLINE_GAIN = 0.35
TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2"]
# The showcase: prompts of the training distribution, seed 0, the release suite's sampling.
SHOWCASE_PROMPTS = ["a red digit 3 on a white background", "a yellow digit 7 on a blue background",
                    "a white digit 0 on a green background", "a blue digit 5 on a yellow background"]
SHOWCASE = {"seed": 0, "num_inference_steps": 20, "guidance_scale": 2.0, "lora_scale": 1.0}
MEASURED = "600 steps x batch 32 in 18 min on one thread (2-core box shared with other jobs); loss 0.176 -> 0.012"


def scanlines(images: np.ndarray) -> np.ndarray:
    """The style: rows 1, 3, 5 ... darkened to SCANLINE_GAIN of their colour (uint8 NHWC)."""
    out = images.astype(np.float32)
    out[:, 1::2] *= SCANLINE_GAIN
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def to_tensor(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def train(args: argparse.Namespace) -> dict[str, torch.Tensor]:
    torch.manual_seed(args.seed)
    pipe = PixelTextToImagePipeline.from_pretrained(resolve_embedded(MODEL))
    unet, text_encoder, tokenizer = pipe.unet, pipe.text_encoder, pipe.tokenizer
    unet.requires_grad_(False)
    text_encoder.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=RANK, lora_alpha=RANK, target_modules=TARGETS, init_lora_weights="gaussian"))
    params = [p for p in unet.parameters() if p.requires_grad]
    print(f"LoRA: {sum(p.numel() for p in params):,} params on {TARGETS}, {args.steps} steps x batch {args.batch}")
    sched = DDPMScheduler.from_config(pipe.scheduler.config)
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    lr_at = lambda s: min(1.0, (s + 1) / 50) * 0.5 * (1 + math.cos(math.pi * s / args.steps))  # noqa: E731
    lr_sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    gen = torch.Generator().manual_seed(args.seed)
    cache: dict[str, torch.Tensor] = {}
    unet.train()
    t0, avg = time.time(), None
    for step in range(args.steps):
        images, captions = make_images(args.batch, seed=77_000 + step, split="train", empty_caption_prob=0.1)
        x0 = to_tensor(scanlines(images))
        for c in set(captions) - set(cache):
            cache[c] = tokenizer([c], padding="max_length", max_length=tokenizer.model_max_length,
                                 truncation=True, return_tensors="pt").input_ids[0]
        with torch.no_grad():
            out = text_encoder(torch.stack([cache[c] for c in captions]))
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, sched.config.num_train_timesteps, (len(x0),), generator=gen)
        pred = unet(sched.add_noise(x0, noise, t), t, encoder_hidden_states=out[0], class_labels=out[1]).sample
        snr = sched.alphas_cumprod[t] / (1 - sched.alphas_cumprod[t])
        loss = (torch.clamp(snr, max=5.0) / snr * F.mse_loss(pred, noise, reduction="none").mean(dim=(1, 2, 3))).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        lr_sched.step()
        avg = loss.item() if avg is None else 0.98 * avg + 0.02 * loss.item()
        if step % 100 == 0 or step == args.steps - 1:
            print(f"  step {step:5d} loss {avg:.4f} {(time.time() - t0) / 60:5.1f} min", flush=True)
    return {k: v.detach().half().contiguous() for k, v in get_peft_model_state_dict(unet).items()}


def showcase(out: Path) -> None:
    """Showcase images: the LoRA on the shipped model, loaded the way the tests load it."""
    pipe = load_pipeline(MODEL, lora=out, lora_scale=SHOWCASE["lora_scale"])
    settings = {k: v for k, v in SHOWCASE.items() if k not in ("seed", "lora_scale")}
    images = generate_images(pipe, SHOWCASE_PROMPTS, seeds=[SHOWCASE["seed"]], **settings)
    files = []
    for index, image in enumerate(images.images):
        name = f"showcase-{index}.png"
        Image.fromarray(image).save(out / name)
        files.append({"file": name, "prompt": SHOWCASE_PROMPTS[index]})
    (out / "showcase.json").write_text(json.dumps({"base_model": MODEL, **SHOWCASE, "images": files}, indent=2) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--showcase-only", action="store_true", help="only remake the showcase of the LoRA in --out")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if not args.showcase_only:
        state = train(args)
        args.out.mkdir(parents=True, exist_ok=True)
        PixelTextToImagePipeline.save_lora_weights(args.out, unet_lora_layers=state, safe_serialization=True)
    showcase(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
