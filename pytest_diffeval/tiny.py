"""Tiny random-weight diffusers pipelines and CLIP backbones, built entirely offline and
saved in hub layout, so the real loading code (``from_pretrained``) runs without a
network.  For the plugin's own tests and for users' smoke tests of their suite's
plumbing: their images are noise and their scores mean nothing.
"""

from __future__ import annotations

from pathlib import Path

import torch

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
