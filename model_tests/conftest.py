"""Shared setup of the release suite: which model, how it is sampled, and the reference
images.  Point the whole suite at another checkpoint with ``--diffeval-model=PATH``."""

from __future__ import annotations

import numpy as np
import pytest

import pytest_diffeval.embedded.metrics  # noqa: F401  registers digit_match / colour_match
from pytest_diffeval import ImageSet
from pytest_diffeval.embedded.data import make_images

MODEL = "diffeval/tiny-t2i"  # the embedded 16x16 text-to-image model
SAMPLING = {"num_inference_steps": 20, "guidance_scale": 2.0}


@pytest.fixture(scope="session")
def heldout_real() -> ImageSet:
    """128 real images (held-out digit samples) captioned with the held-out prompts:
    the reference distribution for FID, KID and CMMD."""
    images, captions = make_images(128, seed=0, split="heldout")
    return ImageSet(images=np.ascontiguousarray(images), prompts=captions, seeds=[0] * len(captions))
