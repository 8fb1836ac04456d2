"""Deterministic, batched image generation and the :class:`ImageSet` it returns.

One concept per module: :mod:`.imageset` (the result), :mod:`.pixels` (reading input images,
converting pipeline output), :mod:`.request` (validating a call before anything is
generated), :mod:`.provenance` (what identifies the model and run), :mod:`.cache` (the image
cache and its claims) and :mod:`.run` (the batching loop).  Patch a name in the module that
uses it, e.g. ``pytest_diffeval.generation.run.call_with_oom_backoff``.
"""

from .cache import CLAIM_TIMEOUT_S, Claim, ImageCache, fingerprint_arguments
from .imageset import ImageSet, ShardedImageSet, jsonable
from .pixels import IMAGE_INPUTS, IMAGE_SUFFIXES, load_input_images, read_pixels, to_uint8
from .provenance import RUN_FIELDS, GpuMeter, execution_device, loaded_provenance, pipeline_provenance
from .request import SEED_MAX, Request, check_seeds, validate_request, warn_long_prompts
from .run import generate_images, prefetch_images

__all__ = [
    "CLAIM_TIMEOUT_S", "IMAGE_INPUTS", "IMAGE_SUFFIXES", "RUN_FIELDS", "SEED_MAX", "Claim", "GpuMeter", "ImageCache",
    "ImageSet", "Request", "ShardedImageSet", "check_seeds", "execution_device", "fingerprint_arguments", "generate_images", "jsonable",
    "load_input_images", "loaded_provenance", "pipeline_provenance", "prefetch_images", "read_pixels", "to_uint8",
    "validate_request", "warn_long_prompts",
]
