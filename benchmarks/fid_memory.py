"""Figure 6: peak memory of a 256-image FID check: features are streamed batch by batch,
the images are never all converted to float tensors at once.

    /work/venv/bin/python benchmarks/fid_memory.py [--size 512] [--n 256]

A child process holds N uint8 images of SIZE x SIZE (random; the FID value does not
matter), loads the backbone and runs a warm-up FID on 4 images, notes its peak RSS
(``ru_maxrss``), then runs ``compute_metric("fid", images, reference=...)`` on all N
against N reference images (CLIP features, the embedded tiny CLIP, no caches) and notes
the peak again, plus tracemalloc's peak of Python/numpy allocations during the check
(torch's allocator is not traced, ru_maxrss covers it).  The growth of the peak is
compared with the size of the N images as float32 (what holding them all as float
tensors would add).  Goal: growth well below that (< 1/4 of it).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import ROOT, environment, figure, header  # noqa: E402

CHILD = """
import json, resource, sys, tracemalloc
import numpy as np
sys.path.insert(0, {root!r})
from pytest_diffeval import settings
from pytest_diffeval.generation import ImageSet
from pytest_diffeval.metrics import compute_metric

n, size = {n}, {size}
settings.configure(clip_model="diffeval/tiny-clip", fid_features="clip:diffeval/tiny-clip", device_request="cpu",
                   cache_dir=None)
rng = np.random.default_rng(0)
def random_set(seed):
    r = np.random.default_rng(seed)
    return ImageSet(images=r.integers(0, 256, (n, size, size, 3), dtype=np.uint8), prompts=["x"] * n, seeds=list(range(n)))
images, reference = random_set(0), random_set(1)
compute_metric("fid", images.subset(range(4)), reference=reference.subset(range(4)))
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
tracemalloc.start()
value = compute_metric("fid", images, reference=reference).value
traced = tracemalloc.get_traced_memory()[1]
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({{"before": before, "after": after, "traced_peak": traced, "value": value}}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--n", type=int, default=256)
    args = parser.parse_args()
    header(f"peak memory of a {args.n}-image FID check ({args.size}x{args.size} images)",
           "growth of the peak << the images as float32")
    code = CHILD.format(root=str(ROOT), n=args.n, size=args.size)
    done = subprocess.run([sys.executable, "-W", "ignore", "-c", code], env=environment(1), capture_output=True,
                          text=True, timeout=1800)
    if done.returncode:
        sys.stderr.write(done.stderr[-4000:])
        raise SystemExit(done.returncode)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    mib = 1 << 20
    as_uint8 = args.n * args.size * args.size * 3
    as_float = as_uint8 * 4
    growth = result["after"] - result["before"]
    print(f"   the {args.n} generated images: {as_uint8 / mib:.0f} MiB as uint8 (held by the ImageSet), "
          f"{as_float / mib:.0f} MiB as float32\n"
          f"   peak RSS before the check {result['before'] / mib:.0f} MiB, after {result['after'] / mib:.0f} MiB; "
          f"tracemalloc peak during the check {result['traced_peak'] / mib:.1f} MiB")
    if abs(result["traced_peak"] - as_uint8) < 0.05 * as_uint8:
        print("   tracemalloc's peak is one uint8 copy of a set: metrics/fid.py hashes the reference set with "
              "images.tobytes(); the features themselves are streamed 64 images at a time")
    figure("growth of the peak RSS during the FID check", f"{growth / mib:.0f} MiB = {growth / as_float:.1%} of the "
           f"images as float32", "< 25% of it", growth < as_float / 4)


if __name__ == "__main__":
    main()
