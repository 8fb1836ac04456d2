"""Train the tiny embedded models of pytest-diffeval, offline, on the CPU.

Writes four directories into ``pytest_diffeval/embedded/weights/`` (or ``--out``):

* ``tiny-t2i/``              ``PixelTextToImagePipeline`` (1.7M-param pixel-space UNet,
                             ~78k-param CLIP text encoder, DDIM scheduler) trained on
                             16x16 coloured digits from ``pytest_diffeval.embedded.data``.
* ``tiny-t2i-undertrained/`` the same pipeline from an early checkpoint (5% of the steps),
                             UNet stored in float16 - a genuinely regressed model.
* ``tiny-clip/``             a ~160k-param ``CLIPModel`` + ``CLIPProcessor`` for 16x16 images.
* ``tiny-checker/``          ``DigitChecker``: CNN digit classifier + colour statistics.

Command (single-threaded on purpose, all seeds fixed)::

    python scripts/train_embedded.py                 # full run: --steps 6000
    python scripts/train_embedded.py --steps 50 --clip-steps 20 --checker-steps 20 --out /tmp/smoke

Measured on a 2-core x86 CPU box with ``torch.set_num_threads(1)`` (torch 2.13,
diffusers 0.42.1, transformers 5.23): see ``MEASURED`` below, filled in from the
run that produced the shipped weights.

Recipe of the text-to-image model: DDPM epsilon objective, cosine
("squaredcos_cap_v2") noise schedule, min-SNR-5 loss weighting, 10% empty captions
(for classifier-free guidance), AdamW with warm-up + cosine decay, batch 32, EMA of
the UNet's weights. The text encoder is tiny-clip's text tower, frozen - as Stable
Diffusion uses a frozen CLIP text encoder. That is decisive here: trained from scratch
through the UNet alone, the text encoder learns the colour words quickly but the digit
token hardly at all (after 2000 steps: digits at chance, 6-9%), while the frozen
contrastive tower already separates digits (62% after 1500 steps, like a UNet given
the digit as an oracle class label: 53% after 1000). The UNet uses
``addition_embed_type="text"``: an attention-pooled text embedding is added to the
timestep embedding of every block. The training captions exclude
``data.HELDOUT_PROMPTS``.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from diffusers import DDIMScheduler, DDPMScheduler, UNet2DConditionModel  # noqa: E402
from transformers import (  # noqa: E402
    CLIPConfig,
    CLIPImageProcessor,
    CLIPModel,
    CLIPProcessor,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTokenizer,
    CLIPVisionConfig,
)

from pytest_diffeval.embedded import WEIGHTS_DIR  # noqa: E402
from pytest_diffeval.embedded.checker import DigitChecker, train_checker  # noqa: E402
from pytest_diffeval.embedded.data import (  # noqa: E402
    ALL_COMBOS,
    COLORS,
    HELDOUT_PROMPTS,
    IMAGE_SIZE,
    make_images,
)
from pytest_diffeval.pixel_pipeline import PixelTextToImagePipeline  # noqa: E402

MEASURED = "t2i: 6000 steps in 33.6 min on one thread (2-core box, the other core busy); see README, The embedded model"

CLIP_MAX_LENGTH = 77  # tiny-clip: like real CLIP
T2I_MAX_LENGTH = 16  # tiny-t2i: captions are 11 tokens; short padding keeps the text signal undiluted
WORDS = ["a", "digit", "on", "background", *COLORS, *[str(d) for d in range(10)]]


# --------------------------------------------------------------------------- tokenizer
def build_tokenizer(max_length: int = CLIP_MAX_LENGTH) -> CLIPTokenizer:
    """An in-memory CLIP (byte-level BPE) tokenizer whose merges turn each caption word into one token."""
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    merges: list[tuple[str, str]] = []
    for word in WORDS:
        symbols = [*word[:-1], word[-1] + "</w>"]
        for s in symbols:
            vocab.setdefault(s, len(vocab))
        cur = symbols[0]
        for s in symbols[1:]:
            if (cur, s) not in merges:
                merges.append((cur, s))
            cur += s
            vocab.setdefault(cur, len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_length)


def save_tokenizer(tokenizer: CLIPTokenizer, path: Path) -> None:
    """``save_pretrained`` plus ``vocab.json``/``merges.txt`` (what slow tokenizers of transformers 4 read)."""
    tokenizer.save_pretrained(path)
    model = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    (path / "vocab.json").write_text(json.dumps(model["vocab"], indent=0) + "\n")
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    (path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")


def text_config(tokenizer: CLIPTokenizer, **overrides) -> CLIPTextConfig:
    kw = dict(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=tokenizer.model_max_length,
        projection_dim=64,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    kw.update(overrides)
    return CLIPTextConfig(**kw)


def tokenize(tokenizer: CLIPTokenizer, captions: list[str], cache: dict) -> torch.Tensor:
    """Padded input ids, memoised per caption (captions repeat a lot)."""
    missing = [c for c in set(captions) if c not in cache]
    if missing:
        ids = tokenizer(missing, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt")
        cache.update(zip(missing, ids.input_ids))
    return torch.stack([cache[c] for c in captions])


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 NHWC -> float NCHW in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0


# --------------------------------------------------------------------------- text-to-image
def make_unet(cross_attention_dim: int, conditioning: str = "both") -> UNet2DConditionModel:
    """``conditioning``: how the text reaches every block besides cross-attention -
    ``text`` (attention-pooled token embeddings, ``addition_embed_type="text"``),
    ``pooled`` (the text encoder's pooled end-of-text embedding as a projected class
    embedding, ``class_embed_type="projection"``) or ``both``."""
    extra = {}
    if conditioning in ("text", "both"):
        extra.update(addition_embed_type="text", addition_embed_type_num_heads=4)
    if conditioning in ("pooled", "both"):
        extra.update(class_embed_type="projection", projection_class_embeddings_input_dim=cross_attention_dim)
    return UNet2DConditionModel(
        sample_size=IMAGE_SIZE,
        in_channels=3,
        out_channels=3,
        block_out_channels=(32, 64, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=4,
        norm_num_groups=8,
        **extra,
    )


class EMA:
    """Exponential moving average of parameters, with the usual warm-up ``min(decay, (1+t)/(10+t))``."""

    def __init__(self, modules, decay: float):
        self.params = [p for m in modules for p in m.parameters()]
        self.shadow = [p.detach().clone() for p in self.params]
        self.decay, self.t = decay, 0

    @torch.no_grad()
    def update(self) -> None:
        self.t += 1
        d = min(self.decay, (1 + self.t) / (10 + self.t))
        torch._foreach_lerp_(self.shadow, [p.detach() for p in self.params], 1.0 - d)

    @torch.no_grad()
    def copy_to(self, modules) -> None:
        for p, s in zip([p for m in modules for p in m.parameters()], self.shadow):
            p.copy_(s)


def init_text_encoder_from_clip(text_encoder: CLIPTextModel, clip_dir: Path) -> None:
    """Start from the contrastively trained tiny-clip text tower (as Stable Diffusion starts from CLIP's).

    Trained from scratch through the UNet alone, the tiny text encoder learns to tell
    colours apart quickly but digits only very slowly; CLIP's text tower already does both.
    """
    clip = CLIPModel.from_pretrained(clip_dir)
    state = getattr(clip.text_model, "text_model", clip.text_model).state_dict()
    n = text_encoder.config.max_position_embeddings
    state["embeddings.position_embedding.weight"] = state["embeddings.position_embedding.weight"][:n]
    state.pop("embeddings.position_ids", None)
    target = getattr(text_encoder, "text_model", text_encoder)  # transformers 4 nests it, 5 does not
    missing, unexpected = target.load_state_dict(state, strict=False)
    if unexpected or [k for k in missing if not k.endswith("position_ids")]:
        raise RuntimeError(f"tiny-clip text tower does not fit: missing {missing}, unexpected {unexpected}")


def make_pipeline(unet, text_encoder, tokenizer, train_scheduler) -> PixelTextToImagePipeline:
    scheduler = DDIMScheduler.from_config(train_scheduler.config, timestep_spacing="trailing")
    pipe = PixelTextToImagePipeline(unet=unet, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_pipeline(pipe: PixelTextToImagePipeline, path: Path) -> None:
    if path.exists():
        shutil.rmtree(path)
    pipe.save_pretrained(path, safe_serialization=True)
    save_tokenizer(pipe.tokenizer, path / "tokenizer")


@torch.no_grad()
def checker_accuracy(pipe: PixelTextToImagePipeline, checker: DigitChecker | None, seeds=(0,), steps: int = 20, guidance: float = 5.0) -> str:
    """Checker agreement on the held-out prompts (one image per prompt and seed)."""
    if checker is None:
        return "no checker"
    prompts = [p for p in HELDOUT_PROMPTS for _ in seeds]
    gens = [torch.Generator("cpu").manual_seed(s) for _ in HELDOUT_PROMPTS for s in seeds]
    imgs = pipe(prompts, generator=gens, num_inference_steps=steps, guidance_scale=guidance, output_type="np").images
    ok = checker.check(np.clip(np.rint(imgs * 255), 0, 255).astype(np.uint8), prompts)
    return f"digit {ok['digit'].mean():4.0%} fg {ok['fg'].mean():4.0%} bg {ok['bg'].mean():4.0%}"


def train_t2i(args, tokenizer: CLIPTokenizer, log, checker: DigitChecker | None = None) -> tuple[PixelTextToImagePipeline, PixelTextToImagePipeline]:
    """Train UNet + text encoder; return the final (EMA) pipeline and the early-checkpoint one."""
    torch.manual_seed(args.seed)
    text_encoder = CLIPTextModel(text_config(tokenizer))
    if args.text_init == "clip":
        init_text_encoder_from_clip(text_encoder, Path(args.out) / "tiny-clip")
        log("t2i: text encoder initialised from tiny-clip's text tower")
    if not args.train_text:
        text_encoder.requires_grad_(False)
        log("t2i: text encoder frozen")
    unet = make_unet(text_encoder.config.hidden_size, args.conditioning)
    sched = DDPMScheduler(
        num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type=args.prediction_type, clip_sample=True
    )
    n_params = sum(p.numel() for p in unet.parameters()), sum(p.numel() for p in text_encoder.parameters())
    log(f"t2i: unet {n_params[0]:,} params, text encoder {n_params[1]:,} params, {args.steps} steps x batch {args.batch}")

    modules = [unet, text_encoder]
    params = [p for m in modules for p in m.parameters() if p.requires_grad]
    groups = [{"params": list(unet.parameters())}]
    if args.train_text:
        groups.append({"params": list(text_encoder.parameters()), "lr": args.lr * args.text_lr_mult})
    opt = torch.optim.AdamW(groups, lr=args.lr, weight_decay=0.01)
    warmup = min(200, args.steps // 10 + 1)
    lr_at = lambda s: min(1.0, (s + 1) / warmup) * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(s / args.steps, 1.0))))
    lr_sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    ema = EMA(modules, decay=args.ema)
    alphas_cumprod = sched.alphas_cumprod
    early_step = max(1, round(args.undertrained_frac * args.steps))
    early_state = None
    cache: dict = {}
    gen = torch.Generator().manual_seed(args.seed)
    for m in modules:
        m.train()

    t0, loss_avg = time.time(), None
    for step in range(args.steps):
        images, captions = make_images(args.batch, seed=args.seed * 1_000_003 + step, split="train", empty_caption_prob=0.1)
        x0 = to_tensor(images)
        ids = tokenize(tokenizer, captions, cache)
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, sched.config.num_train_timesteps, (len(x0),), generator=gen)
        xt = sched.add_noise(x0, noise, t)
        out = text_encoder(ids)
        pooled = out[1] if unet.config.class_embed_type == "projection" else None
        pred = unet(xt, t, encoder_hidden_states=out[0], class_labels=pooled).sample
        snr = alphas_cumprod[t] / (1 - alphas_cumprod[t])
        if args.prediction_type == "v_prediction":
            # x0-space weight min(snr + 1, gamma): like min-SNR, but high-noise steps (where the digit's
            # shape is decided) keep weight 1 instead of ~snr, which would make the digit token irrelevant
            target, weight = sched.get_velocity(x0, noise, t), torch.clamp(snr + 1, max=args.min_snr) / (snr + 1)
        else:
            target, weight = noise, torch.clamp(snr, max=args.min_snr) / snr  # min-SNR-gamma weighting
        loss = (weight * F.mse_loss(pred, target, reduction="none").mean(dim=(1, 2, 3))).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        lr_sched.step()
        ema.update()
        loss_avg = loss.item() if loss_avg is None else 0.98 * loss_avg + 0.02 * loss.item()

        if step + 1 == early_step:
            early_state = copy.deepcopy(ema.shadow)
        if step % 100 == 0 or step == args.steps - 1:
            el = time.time() - t0
            log(f"  t2i step {step:5d}/{args.steps} loss {loss_avg:.4f} lr {lr_sched.get_last_lr()[0]:.2e} {el / 60:5.1f} min")
        if args.eval_every and (step + 1) % args.eval_every == 0:
            probe = [copy.deepcopy(m).eval() for m in modules]
            ema.copy_to(probe)
            log(f"  t2i step {step + 1:5d} EMA on held-out prompts: {checker_accuracy(make_pipeline(*probe, tokenizer, sched), checker)}")
        if args.minutes and time.time() - t0 > args.minutes * 60:
            log(f"  stopping at step {step + 1}: --minutes {args.minutes} reached")
            break
    log(f"t2i trained in {(time.time() - t0) / 60:.1f} min")

    ema.copy_to(modules)
    pipe = make_pipeline(unet.eval(), text_encoder.eval(), tokenizer, sched)
    early_unet, early_text = copy.deepcopy(unet), copy.deepcopy(text_encoder)
    with torch.no_grad():
        for p, s in zip([p for m in (early_unet, early_text) for p in m.parameters()], early_state or ema.shadow):
            p.copy_(s)
    early = make_pipeline(early_unet.eval(), early_text.eval(), tokenizer, sched)
    return pipe, early


# --------------------------------------------------------------------------- CLIP
def make_processor(tokenizer: CLIPTokenizer) -> CLIPProcessor:
    """Processor that leaves 16x16 images untouched apart from scaling to [-1, 1]."""
    image_processor = CLIPImageProcessor(
        do_resize=True,
        size={"shortest_edge": IMAGE_SIZE},
        do_center_crop=True,
        crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
        do_convert_rgb=True,
    )
    return CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)


def clip_image_features(model: CLIPModel, pixel_values: torch.Tensor) -> torch.Tensor:
    out = model.get_image_features(pixel_values=pixel_values)
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def clip_text_features(model: CLIPModel, input_ids: torch.Tensor) -> torch.Tensor:
    out = model.get_text_features(input_ids=input_ids)
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def noisy(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Mild pixel noise so the CLIP also scores slightly imperfect generations sensibly."""
    x = images.astype(np.float32) + rng.normal(0, rng.uniform(0, 10, size=(len(images), 1, 1, 1)), size=images.shape)
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def train_clip(args, tokenizer: CLIPTokenizer, log) -> CLIPModel:
    """Contrastive training on real images of every caption combination (duplicates in a batch count as positives)."""
    torch.manual_seed(args.seed + 1)
    rng = np.random.default_rng(args.seed + 1)
    vision = CLIPVisionConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        image_size=IMAGE_SIZE, patch_size=4, projection_dim=64,
    )  # fmt: skip
    config = CLIPConfig(text_config=text_config(tokenizer).to_dict(), vision_config=vision.to_dict(), projection_dim=64)
    model = CLIPModel(config)
    log(f"clip: {sum(p.numel() for p in model.parameters()):,} params, {args.clip_steps} steps x batch {args.clip_batch}")
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.05)
    lr_sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=args.clip_steps, pct_start=0.1)
    cache: dict = {}
    model.train()
    t0 = time.time()
    for step in range(args.clip_steps):
        images, captions = make_images(args.clip_batch, seed=20_000_000 + args.seed * 100_000 + step, combos=ALL_COMBOS)
        img = F.normalize(clip_image_features(model, to_tensor(noisy(images, rng))), dim=-1)
        txt = F.normalize(clip_text_features(model, tokenize(tokenizer, captions, cache)), dim=-1)
        logits = model.logit_scale.exp().clamp(max=100) * img @ txt.T
        same = torch.tensor([[a == b for b in captions] for a in captions], dtype=torch.float32)
        target = same / same.sum(1, keepdim=True)
        loss = 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        lr_sched.step()
        if step % 100 == 0 or step == args.clip_steps - 1:
            log(f"  clip step {step:5d}/{args.clip_steps} loss {loss.item():.3f} scale {model.logit_scale.exp().item():.1f}")
    log(f"clip trained in {(time.time() - t0) / 60:.1f} min")
    return model.eval()


@torch.no_grad()
def clip_scores(model: CLIPModel, processor: CLIPProcessor, images: np.ndarray, captions: list[str]) -> np.ndarray:
    """100 * cos(image, caption) per pair, through the saved processor (as a test would)."""
    inputs = processor(text=captions, images=list(images), return_tensors="pt", padding=True, truncation=True)
    img = F.normalize(clip_image_features(model, inputs["pixel_values"]), dim=-1)
    txt = F.normalize(clip_text_features(model, inputs["input_ids"]), dim=-1)
    return (100 * (img * txt).sum(-1)).numpy()


# --------------------------------------------------------------------------- main
def dir_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=WEIGHTS_DIR, help="output directory (default: the package's weights dir)")
    ap.add_argument("--steps", type=int, default=6000, help="text-to-image training steps")
    ap.add_argument("--minutes", type=float, default=None, help="optional wall-clock cap for text-to-image training")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--ema", type=float, default=0.999)
    ap.add_argument("--prediction-type", choices=["epsilon", "v_prediction"], default="epsilon")
    ap.add_argument("--min-snr", type=float, default=5.0)
    ap.add_argument("--undertrained-frac", type=float, default=0.05, help="checkpoint fraction for tiny-t2i-undertrained")
    ap.add_argument("--clip-steps", type=int, default=1500)
    ap.add_argument("--clip-batch", type=int, default=128)
    ap.add_argument("--checker-steps", type=int, default=1500)
    ap.add_argument("--text-init", choices=["clip", "scratch"], default="clip", help="initialise the t2i text encoder from tiny-clip's text tower (default) or from scratch")
    ap.add_argument("--conditioning", choices=["text", "pooled", "both"], default="both", help="global text conditioning of the UNet (see make_unet)")
    ap.add_argument("--train-text", action="store_true", help="also train the text encoder (default: frozen, as Stable Diffusion's CLIP text encoder is)")
    ap.add_argument("--text-lr-mult", type=float, default=1.0, help="text encoder lr = lr * this")
    ap.add_argument("--max-length", type=int, default=T2I_MAX_LENGTH, help="tokenizer padding length of tiny-t2i")
    ap.add_argument("--eval-every", type=int, default=500, help="log checker accuracy of the EMA model every N steps (0: never)")
    ap.add_argument("--parts", default="checker,clip,t2i", help="comma-separated subset of checker,clip,t2i to (re)train")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 leaves the other cores free)")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    start = time.time()
    log = lambda msg: print(f"[{time.time() - start:7.1f}s] {msg}", flush=True)
    timings = {}

    parts = set(args.parts.split(","))

    # 1. checker (also used below to sanity-check the generator)
    if "checker" in parts:
        t = time.time()
        checker, metrics = train_checker(steps=args.checker_steps, seed=args.seed, log=log)
        if (out / "tiny-checker").exists():
            shutil.rmtree(out / "tiny-checker")
        checker.save_pretrained(out / "tiny-checker")
        timings["checker"] = time.time() - t
        log(f"checker on held-out real digits: {metrics}")
    checker = DigitChecker.from_pretrained(out / "tiny-checker") if (out / "tiny-checker").is_dir() else None

    # 2. CLIP
    if "clip" in parts:
        tokenizer = build_tokenizer(CLIP_MAX_LENGTH)
        t = time.time()
        clip = train_clip(args, tokenizer, log)
        processor = make_processor(tokenizer)
        if (out / "tiny-clip").exists():
            shutil.rmtree(out / "tiny-clip")
        clip.save_pretrained(out / "tiny-clip", safe_serialization=True)
        processor.save_pretrained(out / "tiny-clip")
        save_tokenizer(tokenizer, out / "tiny-clip")
        timings["clip"] = time.time() - t
    clip = processor = None
    if (out / "tiny-clip").is_dir():
        clip = CLIPModel.from_pretrained(out / "tiny-clip").eval()
        processor = CLIPProcessor.from_pretrained(out / "tiny-clip")
        images, captions = make_images(512, seed=7, split="heldout", combos=ALL_COMBOS)
        own = clip_scores(clip, processor, images, captions)
        shuffled = clip_scores(clip, processor, images, list(np.random.default_rng(0).permutation(captions)))
        log(f"clip score on held-out real images: own captions {own.mean():.1f}, shuffled {shuffled.mean():.1f}")

    # 3. text-to-image
    if "t2i" in parts:
        t = time.time()
        pipe, early = train_t2i(args, build_tokenizer(args.max_length), log, checker)
        timings["t2i"] = time.time() - t
        save_pipeline(pipe, out / "tiny-t2i")
        early.unet.to(torch.float16)  # halves its size; from_pretrained loads it back as float32
        save_pipeline(early, out / "tiny-t2i-undertrained")

    # 4. sanity check through from_pretrained: 2 images per held-out prompt
    for name in ("tiny-t2i", "tiny-t2i-undertrained"):
        if not (out / name).is_dir():
            continue
        p = PixelTextToImagePipeline.from_pretrained(out / name)  # float16 UNet loads as float32
        p.set_progress_bar_config(disable=True)
        tg = time.time()
        acc = checker_accuracy(p, checker, seeds=(0, 1))
        tg = time.time() - tg
        log(f"{name}: held-out prompts x 2 seeds (guidance 5, 20 steps): checker {acc} ({2 * len(HELDOUT_PROMPTS)} images in {tg:.1f}s)")

    sizes = {d.name: dir_size(d) / 1e6 for d in sorted(out.iterdir()) if d.is_dir()}
    log("sizes (MB): " + ", ".join(f"{k} {v:.2f}" for k, v in sizes.items()) + f", total {sum(sizes.values()):.2f}")
    log("timings (min): " + ", ".join(f"{k} {v / 60:.1f}" for k, v in timings.items()) + f", total {(time.time() - start) / 60:.1f}")


if __name__ == "__main__":
    main()
