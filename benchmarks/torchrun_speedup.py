"""``torchrun --nproc_per_node=2 -m pytest`` vs one process, on a generation-heavy suite.

    python benchmarks/torchrun_speedup.py [--repeat 1] [--images 512]

The suite: 512 images of the embedded model (32 held-out prompts x 16 seeds, 20 steps)
checked against a recorded baseline with FID, KID, CMMD (vs 128 real held-out images) and
drift.  The baseline is recorded first (by torchrun, not timed); then, alternating so load
changes hit both, the suite runs cold (``--diffeval-no-cache``) as one process with one
thread and as two torchrun ranks (gloo, CPU) with one thread each.  Printed: the wall ratio
(goal <= 0.6), the largest relative difference of every metric value between the two (goal
<= 1e-6) and whether the 512 images are bit-identical (a digest of every sample's uint8
pixels, each digested on the rank that made it; rank 0 / the single process writes it).
The machine's load average is printed with each run: another process on one of the 2 cores
takes the core the second rank needs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import check_exit, figure, header, load, median, pytest_command, timed  # noqa: E402

SUITE = """
import hashlib
import os
from pathlib import Path

import numpy as np
import pytest

from pytest_diffeval import ImageSet
from pytest_diffeval.embedded.data import HELDOUT_PROMPTS, make_images

SEEDS = range(int(os.environ["BENCH_IMAGES"]) // len(HELDOUT_PROMPTS))


@pytest.fixture(scope="session")
def real():
    images, captions = make_images(128, seed=0, split="heldout")
    return ImageSet(images=np.ascontiguousarray(images), prompts=captions, seeds=[0] * len(captions))


def test_distribution(generate, real, diffeval_baseline):
    images = generate("diffeval/tiny-t2i", HELDOUT_PROMPTS, seeds=SEEDS, num_inference_steps=20, guidance_scale=2.0)
    # Each rank digests its own samples (reading images.images would gather every pixel to every rank).
    digests = images.map_samples(lambda image: hashlib.sha256(np.ascontiguousarray(image).tobytes()).hexdigest())
    if os.environ.get("RANK", "0") == "0":
        digest = hashlib.sha256("".join(digests).encode()).hexdigest()
        Path(os.environ["BENCH_DIGEST"]).write_text(f"{digest} {len(images)} x {images.image_size}")
    diffeval_baseline.assert_no_regression(images, ["fid", "kid", "cmmd"], reference=real)
    diffeval_baseline.assert_no_regression(images, "drift")
"""

INI = """[pytest]
diffeval_clip_model = diffeval/tiny-clip
diffeval_fid_features = clip:diffeval/tiny-clip
filterwarnings =
    ignore::FutureWarning
    ignore::UserWarning
"""


def torchrun_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
            "-m", "pytest", "-p", "no:cacheprovider", *args]


def run(work: Path, ranks: int, name: str, images: int) -> tuple[float, dict[str, float], str]:
    """One cold run of the suite; its wall time, metric values and image digest."""
    results, digest = work / f"results-{name}", work / f"digest-{name}.txt"
    args = ("-p", "no:randomly", "--diffeval-no-cache", f"--diffeval-results={results}", "--diffeval-results-always")
    command = torchrun_command(*args) if ranks > 1 else pytest_command(*args)
    os.environ.update(BENCH_IMAGES=str(images), BENCH_DIGEST=str(digest))  # inherited through _common.environment
    wall, output, code = timed(command, threads=1, cwd=work)
    check_exit(code, output, allowed=(0,))
    checks = json.loads((results / "metrics.json").read_text())["checks"]
    return wall, {check["metric"]: float(check["value"]) for check in checks}, digest.read_text()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--images", type=int, default=512, help="images generated (a multiple of 32)")
    args = parser.parse_args()
    header(f"torchrun --nproc_per_node=2 vs one process, {args.images} images + FID/KID/CMMD/drift (cold, 1 thread "
           "per process)", "wall ratio <= 0.6, metric values within 1e-6 (relative), images bit-identical")
    with tempfile.TemporaryDirectory(prefix="diffeval-torchrun-") as tmp:
        work = Path(tmp)
        (work / "test_suite.py").write_text(SUITE)
        (work / "pytest.ini").write_text(INI)
        os.environ.update(BENCH_IMAGES=str(args.images), BENCH_DIGEST=str(work / "digest-record.txt"))
        wall, output, code = timed(torchrun_command("-p", "no:randomly", "--diffeval-no-cache", "--snapshot-update",
                                                    f"--diffeval-results={work / 'results-record'}"), threads=1, cwd=work)
        check_exit(code, output, allowed=(0,))
        print(f"   baseline recorded (torchrun x2, not timed: {wall:.1f}s)", flush=True)
        single, ranked, differences, identical = [], [], {}, True
        for index in range(args.repeat):
            wall1, values1, digest1 = run(work, 1, f"single-{index}", args.images)
            wall2, values2, digest2 = run(work, 2, f"torchrun-{index}", args.images)
            single.append(wall1)
            ranked.append(wall2)
            identical &= digest1 == digest2
            for metric, value in values1.items():
                other = values2[metric]
                relative = abs(other - value) / max(abs(value), 1e-12) if other != value else 0.0
                differences[metric] = max(differences.get(metric, 0.0), relative)
            print(f"   run {index + 1}: one process {wall1:.1f}s, torchrun x2 {wall2:.1f}s   ({load()})", flush=True)
            print("     values: " + ", ".join(f"{m} {values1[m]:.6g} vs {values2[m]:.6g}" for m in values1), flush=True)
    ratio = median(ranked) / median(single)
    figure("torchrun x2 / one process (median wall)",
           f"{ratio:.2f}  ({median(ranked):.1f}s / {median(single):.1f}s, {args.repeat} run(s) each)", "<= 0.6",
           ratio <= 0.6)
    worst = max(differences.values()) if differences else float("nan")
    figure("largest relative difference of a metric value",
           f"{worst:.2e}  (" + ", ".join(f"{m} {d:.1e}" for m, d in differences.items()) + ")", "<= 1e-6",
           worst <= 1e-6)
    figure(f"{args.images} images bit-identical", str(identical), "True", identical)


if __name__ == "__main__":
    main()
