"""Tiny random-weight diffusers pipelines and CLIP/VGG19 backbones, built entirely offline and
saved in hub layout, so the real loading code (``from_pretrained``) runs without a
network.  For the plugin's own tests and for users' smoke tests of their suite's
plumbing: their images are noise and their scores mean nothing.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .metrics.style import vgg19_features

_CHARS = [chr(c) for c in range(33, 127)]


def tiny_tokenizer(model_max_length: int = 77):
    """A byte-level CLIP tokenizer over printable ASCII, built in memory (no merges)."""
    from transformers import CLIPTokenizer

    vocab: dict[str, int] = {}
    for token in ["<|startoftext|>", "<|endoftext|>", *_CHARS, *(c + "</w>" for c in _CHARS)]:
        vocab.setdefault(token, len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=model_max_length)


def _text_config(tokenizer, hidden: int = 32, projection_dim: int | None = None) -> dict:
    config = dict(
        hidden_size=hidden, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
        vocab_size=len(tokenizer), max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    if projection_dim is not None:
        config["projection_dim"] = projection_dim
    return config


def build_tiny_text2img(path: str | Path, *, seed: int = 0, image_size: int = 32) -> Path:
    """Save a tiny random ``StableDiffusionPipeline`` (UNet, VAE, CLIP text encoder,
    tokenizer, DDIM scheduler) to ``path`` and return it.  Same seed, same weights."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = tiny_tokenizer()
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(8, 16), layers_per_block=1, sample_size=image_size // 2, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, norm_num_groups=4, attention_head_dim=2,
    )
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(
        block_out_channels=(8, 16), in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=4,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"), up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        sample_size=image_size,
    )
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(CLIPTextConfig(**_text_config(tokenizer)))
    scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                              set_alpha_to_one=False)
    pipe = StableDiffusionPipeline(
        unet=unet.eval(), vae=vae.eval(), text_encoder=text_encoder.eval(), tokenizer=tokenizer, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    path = Path(path)
    pipe.save_pretrained(path, safe_serialization=True)
    return path


def build_tiny_clip(path: str | Path, *, seed: int = 0, image_size: int = 32, projection_dim: int = 16) -> Path:
    """Save a tiny random ``CLIPModel`` and its ``CLIPProcessor`` to ``path``."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    tokenizer = tiny_tokenizer()
    config = CLIPConfig(
        text_config=_text_config(tokenizer, projection_dim=projection_dim),
        vision_config=dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
                           image_size=image_size, patch_size=8, projection_dim=projection_dim),
        projection_dim=projection_dim,
    )
    torch.manual_seed(seed)
    model = CLIPModel(config).eval()
    image_processor = CLIPImageProcessor(size={"shortest_edge": image_size},
                                         crop_size={"height": image_size, "width": image_size})
    path = Path(path)
    model.save_pretrained(path, safe_serialization=True)
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(path)
    return path


def perturb_weights(path: str | Path, component: str = "unet", *, scale: float = 0.3, seed: int = 0) -> Path:
    """Add Gaussian noise of ``scale`` times each tensor's std to one component's weights,
    in place: a regressed copy of a model for tests."""
    from safetensors.torch import load_file, save_file

    generator = torch.Generator().manual_seed(seed)
    for file in sorted((Path(path) / component).glob("*.safetensors")):
        tensors = load_file(str(file))
        for name, tensor in tensors.items():
            if tensor.is_floating_point() and tensor.numel() > 1:
                noise = torch.randn(tensor.shape, generator=generator, dtype=torch.float32)
                tensors[name] = (tensor.float() + scale * tensor.float().std() * noise).to(tensor.dtype)
        save_file(tensors, str(file), metadata={"format": "pt"})
    return Path(path)


# --------------------------------------------------------------------------- every pipeline kind
# Each builder saves a tiny random pipeline of one diffusers class in hub layout, so
# ``load_pipeline`` / ``generate_images`` run the same code a hub checkpoint takes.  The
# VAEs have two blocks (latents are half the image size); weights follow the seed.

TINY_CLASS_NAMES = {0: "tench, Tinca tinca", 1: "goldfish, Carassius auratus", 2: "great white shark, white shark",
                    3: "tiger shark", 4: "hammerhead, hammerhead shark", 5: "electric ray, crampfish",
                    6: "stingray", 7: "cock", 8: "hen", 9: "ostrich, Struthio camelus"}
"""The labels of the tiny DiT (the first ten ImageNet classes; ids 10-999 have no name)."""


def _tiny_unet(seed: int, image_size: int, *, in_channels: int = 4, cross_attention_dim: int = 32, **extra):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    config = dict(
        block_out_channels=(8, 16), layers_per_block=1, sample_size=image_size // 2, in_channels=in_channels,
        out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=cross_attention_dim,
        norm_num_groups=4, attention_head_dim=2,
    )
    return UNet2DConditionModel(**{**config, **extra}).eval()


def _tiny_vae(seed: int, image_size: int):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        block_out_channels=(8, 16), in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=4,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), sample_size=image_size,
    ).eval()


def _tiny_text_encoder(tokenizer, seed: int, *, with_projection: bool = False, projection_dim: int = 32):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    if with_projection:
        return CLIPTextModelWithProjection(CLIPTextConfig(**_text_config(tokenizer, projection_dim=projection_dim))).eval()
    return CLIPTextModel(CLIPTextConfig(**_text_config(tokenizer))).eval()


def _ddim():
    from diffusers import DDIMScheduler

    return DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                         set_alpha_to_one=False)


def _save(pipe, path: str | Path) -> Path:
    path = Path(path)
    pipe.save_pretrained(path, safe_serialization=True)
    return path


def _build_sd_like(cls_name: str, path: str | Path, *, seed: int, image_size: int, in_channels: int,
                   scheduler=None) -> Path:
    import diffusers

    tokenizer = tiny_tokenizer()
    pipe = getattr(diffusers, cls_name)(
        unet=_tiny_unet(seed, image_size, in_channels=in_channels), vae=_tiny_vae(seed + 1, image_size),
        text_encoder=_tiny_text_encoder(tokenizer, seed + 2), tokenizer=tokenizer, scheduler=scheduler or _ddim(),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    return _save(pipe, path)


def build_tiny_img2img(path: str | Path, *, seed: int = 0, image_size: int = 32) -> Path:
    """A tiny random ``StableDiffusionImg2ImgPipeline`` (same weights as
    :func:`build_tiny_text2img` with the same seed)."""
    return _build_sd_like("StableDiffusionImg2ImgPipeline", path, seed=seed, image_size=image_size, in_channels=4)


def build_tiny_inpaint(path: str | Path, *, seed: int = 0, image_size: int = 32) -> Path:
    """A tiny random ``StableDiffusionInpaintPipeline``: its UNet takes 9 channels (4 noisy
    latents, 1 mask, 4 masked-image latents)."""
    return _build_sd_like("StableDiffusionInpaintPipeline", path, seed=seed, image_size=image_size, in_channels=9)


def build_tiny_instruct_pix2pix(path: str | Path, *, seed: int = 0, image_size: int = 32) -> Path:
    """A tiny random ``StableDiffusionInstructPix2PixPipeline``: 8 UNet input channels (noisy
    latents + source-image latents) and, like ``timbrooks/instruct-pix2pix``, the stochastic
    Euler-ancestral sampler (so per-sample generators are exercised)."""
    from diffusers import EulerAncestralDiscreteScheduler

    scheduler = EulerAncestralDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    return _build_sd_like("StableDiffusionInstructPix2PixPipeline", path, seed=seed, image_size=image_size,
                          in_channels=8, scheduler=scheduler)


def build_tiny_paint_by_example(path: str | Path, *, seed: int = 0, image_size: int = 32) -> Path:
    """A tiny random ``PaintByExamplePipeline``: a 9-channel UNet conditioned on a tiny
    ``PaintByExampleImageEncoder`` (CLIP vision tower + mapper) instead of text."""
    from diffusers import PaintByExamplePipeline
    try:
        from diffusers.pipelines.deprecated.paint_by_example import PaintByExampleImageEncoder
    except ImportError:  # older diffusers kept it outside ``deprecated``
        from diffusers.pipelines.paint_by_example import PaintByExampleImageEncoder
    from transformers import CLIPImageProcessor, CLIPVisionConfig

    torch.manual_seed(seed + 2)
    encoder = PaintByExampleImageEncoder(CLIPVisionConfig(
        hidden_size=32, projection_dim=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=5,
        image_size=image_size, patch_size=8, layer_norm_eps=1e-5,
    )).eval()
    processor = CLIPImageProcessor(size={"shortest_edge": image_size},
                                   crop_size={"height": image_size, "width": image_size})
    pipe = PaintByExamplePipeline(
        vae=_tiny_vae(seed + 1, image_size), image_encoder=encoder,
        unet=_tiny_unet(seed, image_size, in_channels=9, cross_attention_dim=32), scheduler=_ddim(),
        safety_checker=None, feature_extractor=processor, requires_safety_checker=False,
    )
    path = _save(pipe, path)
    # Write the components the way the hub checkpoint (Fantasy-Studio/Paint-by-Example) names
    # them; diffusers 0.42 saves the encoder as ["diffusers", ...], which it cannot load back.
    index = json.loads((path / "model_index.json").read_text())
    index["image_encoder"] = ["paint_by_example", "PaintByExampleImageEncoder"]
    index["feature_extractor"] = ["transformers", "CLIPImageProcessor"]
    (path / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return path


def build_tiny_dit(path: str | Path, *, seed: int = 0, image_size: int = 32) -> Path:
    """A tiny random class-conditional ``DiTPipeline`` (1000 classes, like ImageNet DiT,
    whose null class 1000 the pipeline hard-codes; :data:`TINY_CLASS_NAMES` name ten).

    ``save_pretrained`` drops ``id2label``; it is written into ``model_index.json`` the way
    the hub DiT checkpoints carry it, so ``from_pretrained`` restores the names."""
    from diffusers import DiTPipeline, DiTTransformer2DModel

    torch.manual_seed(seed)
    transformer = DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=2,
        sample_size=image_size // 2, patch_size=2, num_embeds_ada_norm=1000, norm_num_groups=4,
    ).eval()  # eval: the label embedding drops labels at random in training mode
    pipe = DiTPipeline(transformer=transformer, vae=_tiny_vae(seed + 1, image_size), scheduler=_ddim())
    path = _save(pipe, path)
    index = json.loads((path / "model_index.json").read_text())
    index["id2label"] = {str(k): v for k, v in TINY_CLASS_NAMES.items()}
    (path / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return path


def build_tiny_sdxl(path: str | Path, *, seed: int = 0, image_size: int = 32) -> Path:
    """A tiny random ``StableDiffusionXLPipeline``: two text encoders (``CLIPTextModel`` and
    ``CLIPTextModelWithProjection``, hidden 32 each, so cross-attention is 64 wide) and a
    UNet with SDXL's ``text_time`` added conditioning (6 size/crop ids x 8 + pooled 32)."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    tokenizer = tiny_tokenizer()
    unet = _tiny_unet(
        seed, image_size, cross_attention_dim=64, addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=6 * 8 + 32, use_linear_projection=True,
    )
    scheduler = EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                       timestep_spacing="leading", steps_offset=1)
    pipe = StableDiffusionXLPipeline(
        vae=_tiny_vae(seed + 1, image_size), text_encoder=_tiny_text_encoder(tokenizer, seed + 2),
        text_encoder_2=_tiny_text_encoder(tokenizer, seed + 3, with_projection=True, projection_dim=32),
        tokenizer=tokenizer, tokenizer_2=tokenizer, unet=unet, scheduler=scheduler, add_watermarker=False,
    )
    return _save(pipe, path)


def build_tiny_unconditional(path: str | Path, *, seed: int = 0, image_size: int = 32) -> Path:
    """A tiny random unconditional ``DDPMPipeline`` (pixel-space ``UNet2DModel``, DDPM
    scheduler: its sampling noise comes from the per-sample generators too)."""
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    torch.manual_seed(seed)
    unet = UNet2DModel(
        sample_size=image_size, in_channels=3, out_channels=3, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=4, attention_head_dim=8,
    ).eval()
    return _save(DDPMPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=1000)), path)


def build_tiny_lora(path: str | Path, *, seed: int = 0, rank: int = 4, image_size: int = 32, strength: float = 1.0) -> Path:
    """Save a random LoRA for the UNet of :func:`build_tiny_text2img` (attention q/k/v/out)
    in diffusers' peft format, ``path/pytorch_lora_weights.safetensors``, and return the
    folder.  Needs ``peft``.  Unlike a freshly initialised LoRA (B = 0, a no-op) both
    factors are random, scaled by ``strength``, so it visibly changes the images."""
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    unet = _tiny_unet(seed, image_size)
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                                init_lora_weights=False))
    generator = torch.Generator().manual_seed(seed + 100)
    state = get_peft_model_state_dict(unet)
    for name, tensor in state.items():
        state[name] = strength * torch.randn(tensor.shape, generator=generator) / rank**0.5
    path = Path(path)
    StableDiffusionPipeline.save_lora_weights(path, unet_lora_layers=state, safe_serialization=True)
    return path


def build_random_vgg19(path: str | Path, *, seed: int = 0, widths: tuple[int, ...] = (16, 32, 64, 64, 64)) -> Path:
    """Save a narrow VGG19 ``features`` stack with seeded random weights (He-normal convs,
    zero biases; torchvision's keys, ``features.<i>.weight``) as ``path`` (.safetensors) and
    return it: the ``vgg_weights=`` of ``style_loss`` where ImageNet VGG19 weights are not
    available.  Gram matrices of random convolutions still measure texture and colour
    statistics (Ustyuzhaninov et al. 2017, "What does it take to generate natural
    textures?"), so it can tell styles apart; its values are not comparable with the
    ImageNet VGG19's.  The weights come from their own ``torch.Generator``: the same file
    for the same seed and widths."""
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name, tensor in vgg19_features(tuple(widths)).state_dict().items():
        if name.endswith("weight"):
            fan_in = tensor.shape[1] * tensor.shape[2] * tensor.shape[3]
            tensor = torch.randn(tensor.shape, generator=generator) * (2.0 / fan_in) ** 0.5
        else:
            tensor = torch.zeros(tensor.shape)
        state[f"features.{name}"] = tensor.contiguous()
    path = Path(path)
    save_file(state, str(path))
    return path
