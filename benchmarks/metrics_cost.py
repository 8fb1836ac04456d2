"""CPU cost of each metric, offline, with the tiny random CLIP and random weights.

    /work/venv/bin/python benchmarks/metrics_cost.py [--sizes 64 256] [--image-size 32] [--threads 1]

For each set size N it times ``compute_metric`` on N random images (after a warm-up call
that loads the backbone and weights, so load time is not counted) and prints a table of
CPU seconds (``time.process_time``, all threads of this process) and wall seconds.
FID/KID/CMMD compare with a second set of N images and extract both sides' features
(FID's reference-statistics cache is emptied first).  Backbones: the tiny CLIP of
``pytest_diffeval.tiny`` (16-d embeddings), the LAION aesthetic MLP layout on those, and
a full-width VGG19 with random weights: the absolute numbers say what the metric code and
VGG19 cost; a real CLIP ViT-L/14 costs far more per image.
"""

from __future__ import annotations

import argparse
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pytest_diffeval import settings, tiny  # noqa: E402
from pytest_diffeval.generation import ImageSet  # noqa: E402
from pytest_diffeval.metrics import compute_metric  # noqa: E402
from pytest_diffeval.metrics.drift import save_statistics  # noqa: E402


def random_set(n: int, size: int, seed: int) -> ImageSet:
    rng = np.random.default_rng(seed)
    images = (rng.random((n, size, size, 3)) * 255).astype(np.uint8)
    return ImageSet(images=images, prompts=[f"a photo of object {i % 8}" for i in range(n)], seeds=[i // 8 for i in range(n)])


def timed(call: Callable[[], Any]) -> tuple[float, float]:
    cpu, wall = time.process_time(), time.perf_counter()
    call()
    return time.process_time() - cpu, time.perf_counter() - wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="diffeval-bench-"))
    try:
        run(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def run(args: argparse.Namespace, work: Path) -> None:
    from safetensors.torch import save_file

    from pytest_diffeval.metrics.aesthetic import laion_aesthetic_mlp
    from pytest_diffeval.metrics.style import vgg19_features

    size = args.image_size
    clip = str(tiny.build_tiny_clip(work / "tiny-clip", image_size=size))
    settings.configure(clip_model=clip, device_request="cpu")
    torch.manual_seed(0)
    save_file({f"layers.{k}": v.contiguous() for k, v in laion_aesthetic_mlp(16).state_dict().items()},
              str(work / "aesthetic.safetensors"))
    save_file({f"features.{k}": v.contiguous() for k, v in vgg19_features().state_dict().items()},
              str(work / "vgg19.safetensors"))

    def cases(n: int) -> dict[str, tuple[ImageSet, dict[str, Any]]]:
        images, other = random_set(n, size, 0), random_set(n, size, 1)
        masks = np.zeros((size, size), dtype=bool)
        masks[size // 4 : 3 * size // 4, size // 4 : 3 * size // 4] = True
        captions = [f"a photo of object {i % 8}" for i in range(n)]
        edit = dict(source_images=other, source_captions=captions, target_captions=[c + ", at night" for c in captions])
        drift_stats = work / f"drift-{n}.safetensors"  # the "baseline": statistics of the other set
        save_statistics(compute_metric("drift", other, features=f"clip:{clip}").state, drift_stats)
        return {
            "clip_score": (images, {}),
            "clip_directional_similarity": (images, edit),
            "clip_image_similarity": (images, dict(reference_images=other)),
            "fid (clip features)": (images, dict(reference=other, features=f"clip:{clip}")),
            "kid (clip features)": (images, dict(reference=other, features=f"clip:{clip}")),
            "drift (clip features)": (images, dict(baseline_stats=drift_stats, features=f"clip:{clip}")),
            "cmmd": (images, dict(reference=other)),
            "aesthetic": (images, dict(aesthetic_weights=work / "aesthetic.safetensors")),
            "preservation_psnr": (images, dict(source_images=other, masks=masks)),
            "preservation_ssim": (images, dict(source_images=other, masks=masks)),
            "style_loss (VGG19 full width)": (images, dict(style_images=other, vgg_weights=work / "vgg19.safetensors")),
        }

    rows: dict[str, list[tuple[float, float]]] = {}
    for n in args.sizes:
        for label, (images, options) in cases(n).items():
            metric = label.split(" ")[0]
            warm = images.subset(range(4))
            warm_options = {k: (v.subset(range(4)) if isinstance(v, ImageSet) else v[:4] if isinstance(v, list) else v)
                            for k, v in options.items()}
            settings.configure(cache_dir=work / f"cache-{n}-{metric}-warm")
            compute_metric(metric, warm, **warm_options)
            settings.configure(cache_dir=work / f"cache-{n}-{metric}")  # FID: reference statistics not cached
            rows.setdefault(label, []).append(timed(lambda: compute_metric(metric, images, **options)))

    print(f"pytest-diffeval metric cost: {args.image_size}x{args.image_size} random images, torch {torch.__version__}, "
          f"{args.threads} thread(s), {platform.processor() or platform.machine()}, warm (backbones loaded)")
    header = "| metric | " + " | ".join(f"N={n} CPU s | N={n} wall s" for n in args.sizes) + " |"
    print(header)
    print("|" + "---|" * (1 + 2 * len(args.sizes)))
    for label, values in rows.items():
        print(f"| {label} | " + " | ".join(f"{cpu:.3f} | {wall:.3f}" for cpu, wall in values) + " |")


if __name__ == "__main__":
    import warnings

    warnings.filterwarnings("ignore")
    main()
