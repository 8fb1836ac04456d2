"""A minimal pixel-space text-to-image diffusion pipeline.

diffusers ships no pipeline that denoises *pixels* conditioned on a CLIP text
encoder, so this is one: a ``UNet2DConditionModel`` that predicts the noise of an
RGB image in [-1, 1], a ``CLIPTextModel`` + ``CLIPTokenizer`` for the prompt, any
diffusers scheduler, and classifier-free guidance against the empty prompt.

It is an ordinary ``DiffusionPipeline`` subclass, so ``save_pretrained`` /
``from_pretrained`` / ``.to(device, dtype)`` work as usual::

    pipe = PixelTextToImagePipeline.from_pretrained("path/to/tiny-t2i")
    gens = [torch.Generator("cpu").manual_seed(s) for s in range(4)]
    images = pipe(["a red digit 7 on a blue background"] * 4, generator=gens).images
"""

from __future__ import annotations

import inspect

import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput, UNet2DConditionModel
from diffusers.loaders import StableDiffusionLoraLoaderMixin
from diffusers.schedulers import SchedulerMixin
from diffusers.utils.torch_utils import randn_tensor
from transformers import CLIPTextModel, CLIPTokenizer

__all__ = ["PixelTextToImagePipeline"]


class PixelTextToImagePipeline(DiffusionPipeline, StableDiffusionLoraLoaderMixin):
    """Text-to-image diffusion directly in pixel space (no VAE).

    Components: ``unet`` (``UNet2DConditionModel`` with ``in_channels=out_channels=3``,
    predicting epsilon), ``text_encoder`` (``CLIPTextModel``; its last hidden state
    is the cross-attention context), ``tokenizer`` (``CLIPTokenizer``) and
    ``scheduler`` (any diffusers scheduler).  LoRA weights in diffusers/peft format load
    like Stable Diffusion's (``load_lora_weights``, ``fuse_lora``; ``unet`` and
    ``text_encoder`` are the LoRA-loadable modules), so ``lora=`` works on it.
    """

    model_cpu_offload_seq = "text_encoder->unet"

    def __init__(
        self,
        unet: UNet2DConditionModel,
        text_encoder: CLIPTextModel,
        tokenizer: CLIPTokenizer,
        scheduler: SchedulerMixin,
    ):
        super().__init__()
        self.register_modules(unet=unet, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler)

    def encode_prompt(self, prompts: list[str], return_pooled: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Token-wise text embeddings ``(len(prompts), max_length, hidden)`` on the UNet's device and dtype
        (and, with ``return_pooled``, the text encoder's pooled output ``(len(prompts), hidden)``)."""
        tokens = self.tokenizer(
            prompts,
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        )
        out = self.text_encoder(tokens.input_ids.to(self.text_encoder.device))
        hidden = out[0].to(device=self.device, dtype=self.unet.dtype)
        return (hidden, out[1].to(device=self.device, dtype=self.unet.dtype)) if return_pooled else hidden

    def _extra_step_kwargs(self, generator) -> dict:
        """Pass ``generator`` to ``scheduler.step`` only if that scheduler takes one (like diffusers' pipelines)."""
        params = inspect.signature(self.scheduler.step).parameters
        return {"generator": generator} if "generator" in params else {}

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
        negative_prompt: str | list[str] | None = None,
        num_inference_steps: int = 20,
        guidance_scale: float = 5.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        num_images_per_prompt: int = 1,
        output_type: str = "pil",
        return_dict: bool = True,
    ) -> ImagePipelineOutput | tuple:
        """Generate images for ``prompt``.

        Args:
            prompt: one prompt or a list of prompts.
            negative_prompt: prompt(s) to guide away from; defaults to the empty prompt ``""``.
            num_inference_steps: number of scheduler steps.
            guidance_scale: classifier-free guidance weight; ``<= 1`` disables guidance.
            generator: a ``torch.Generator`` or a list with one per generated image. With a
                list, each image's initial noise (and any sampler noise) comes only from its
                own generator, so an image does not depend on the batch it is generated in.
            num_images_per_prompt: images per prompt; images are ordered prompt-major.
            output_type: ``"pil"`` (list of PIL images), ``"np"`` (float32 NHWC in [0, 1])
                or ``"pt"`` (float NCHW tensor in [0, 1]).
            return_dict: return an ``ImagePipelineOutput`` rather than a 1-tuple.
        """
        if output_type not in ("pil", "np", "pt"):
            raise ValueError(f"output_type must be 'pil', 'np' or 'pt', not {output_type!r}")
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        negatives = "" if negative_prompt is None else negative_prompt
        negatives = [negatives] * len(prompts) if isinstance(negatives, str) else list(negatives)
        if len(negatives) != len(prompts):
            raise ValueError(f"got {len(negatives)} negative prompts for {len(prompts)} prompts")
        prompts = [p for p in prompts for _ in range(num_images_per_prompt)]
        negatives = [n for n in negatives for _ in range(num_images_per_prompt)]
        batch = len(prompts)
        if isinstance(generator, list) and len(generator) != batch:
            raise ValueError(f"got {len(generator)} generators for {batch} images")

        do_cfg = guidance_scale > 1.0
        # A UNet with ``class_embed_type="projection"`` also takes the pooled text embedding
        # (CLIP's end-of-text token) as its class embedding, added to the timestep embedding.
        uses_pooled = self.unet.config.class_embed_type == "projection"
        cond, pooled = self.encode_prompt(prompts, return_pooled=True)
        if do_cfg:
            neg, neg_pooled = self.encode_prompt(negatives, return_pooled=True)
            cond, pooled = torch.cat([neg, cond]), torch.cat([neg_pooled, pooled])
        class_labels = pooled if uses_pooled else None

        size = self.unet.config.sample_size
        shape = (batch, self.unet.config.in_channels, size, size)
        sample = randn_tensor(shape, generator=generator, device=self.device, dtype=self.unet.dtype)
        self.scheduler.set_timesteps(num_inference_steps, device=self.device)
        sample = sample * self.scheduler.init_noise_sigma
        extra = self._extra_step_kwargs(generator)

        for t in self.progress_bar(self.scheduler.timesteps):
            model_in = torch.cat([sample] * 2) if do_cfg else sample
            model_in = self.scheduler.scale_model_input(model_in, t)
            eps = self.unet(model_in, t, encoder_hidden_states=cond, class_labels=class_labels).sample
            if do_cfg:
                eps_uncond, eps_cond = eps.chunk(2)
                eps = eps_uncond + guidance_scale * (eps_cond - eps_uncond)
            sample = self.scheduler.step(eps, t, sample, **extra).prev_sample

        images = (sample.float() / 2 + 0.5).clamp(0, 1)
        if output_type != "pt":
            images = images.cpu().permute(0, 2, 3, 1).numpy()
            if output_type == "pil":
                images = self.numpy_to_pil(images)
        self.maybe_free_model_hooks()
        return ImagePipelineOutput(images=images) if return_dict else (images,)
