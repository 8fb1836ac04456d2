"""An example scorer for an external metric (tests/test_metrics_external.py, README): the mean
pixel value (0-255) of each image, with numpy and pillow only, so it runs in a light virtual
environment without torch or pytest-diffeval."""

import os

import numpy as np
from PIL import Image

VERSION = "1"


def score(images, prompts, scale=1.0, **options):
    """One value per PNG path, in order: the mean of its RGB pixels times ``scale``."""
    log = os.environ.get("DIFFEVAL_SCORER_LOG")
    if log:  # the tests count the children that scored
        with open(log, "a") as handle:
            handle.write(f"{len(images)}\n")
    print("a scorer that prints to stdout does not corrupt the reply")
    return [float(np.asarray(Image.open(path).convert("RGB"), dtype=np.float64).mean()) * scale for path in images]


def info(**options):
    """Joins the cache key; ``version`` also joins the backbone (the baseline signature)."""
    return {"version": VERSION}
