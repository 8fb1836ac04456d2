"""One session spread over torch.distributed ranks (torchrun): the pure share/merge/statistics
functions, the launch detection and the -n refusal, the collectives on real gloo ranks (an
empty block on a third rank), the metrics of a sharded set (per-sample, VQA, edit, scorers,
Inception score, per class, FID/KID/CMMD/drift) against one process's, a dead rank named
within the timeout, and (marker ``torchrun``, its own .ci/run step) small suites under
``torchrun --nproc_per_node=2`` and ``=3``, accelerate and two "nodes" against a single-process
run."""

from __future__ import annotations

import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from pytest_diffeval import distributed
from pytest_diffeval.exceptions import DistributedError
from pytest_diffeval.generation import ImageSet
from pytest_diffeval.metrics import BLOCK_SAMPLES, get_metric

# Every torchrun launch of this file on one xdist worker, one after another: two launches at once
# on the 2-core machine (each 2 ranks) oversubscribe it and race for the standalone free port.
pytestmark = pytest.mark.xdist_group("torchrun-launches")

# --------------------------------------------------------------------------- pure functions


def test_shares_cover_every_sample_once_in_rank_order_in_whole_batches() -> None:
    for world in range(1, 6):
        for batch in (1, 3, 8):
            for count in range(0, 30):
                blocks = [distributed.share(count, rank, world, batch) for rank in range(world)]
                assert [i for block in blocks for i in block] == list(range(count))
                batches = [-(-len(block) // batch) for block in blocks]  # the batches each rank makes
                assert max(batches) - min(batches) <= 1, (world, batch, count)
                # every block starts a batch of one process's and holds whole ones (but the set's last)
                assert all(block.start % batch == 0 and (block.stop % batch == 0 or block.stop == count)
                           for block in blocks if len(block)), (world, batch, count, blocks)
    assert distributed.share(15, 1, 2, 8) == range(8, 15) and distributed.share(5, 1, 2, 8) == range(5, 5)
    with pytest.raises(ValueError):
        distributed.share(4, 2, 2)


def test_merged_shares_are_the_whole_set_also_with_empty_blocks() -> None:
    whole = np.random.default_rng(0).integers(0, 255, size=(3, 4, 4, 3), dtype=np.uint8)
    world = 5  # more ranks than samples: two blocks are empty
    parts = [whole[list(distributed.share(len(whole), rank, world))] for rank in range(world)]
    parts = [part if len(part) else np.zeros((0,), dtype=np.uint8) for part in parts]
    assert np.array_equal(distributed.merge_shares(parts), whole)
    with pytest.raises(DistributedError, match="different shapes"):
        distributed.merge_shares([whole[:1], np.zeros((1, 8, 8, 3), dtype=np.uint8)])


def test_summed_statistics_of_the_blocks_give_the_whole_sets_mean_and_covariance() -> None:
    features = np.random.default_rng(1).normal(size=(23, 6))
    blocks = [features[list(distributed.share(len(features), rank, 3))] for rank in range(3)]
    stats = [distributed.statistics_of(block) for block in blocks]
    summed = {key: sum(s[key] for s in stats) for key in stats[0]}
    mean, covariance = distributed.moments(summed)
    assert np.allclose(mean, features.mean(axis=0), rtol=1e-12, atol=1e-12)
    assert np.allclose(covariance, np.cov(features, rowvar=False), rtol=1e-12, atol=1e-12)


def test_preservation_details_of_uneven_blocks_combine_to_the_whole_sets() -> None:
    """Three blocks of 7 samples (3, 2, 2): the blocks' PSNR/SSIM details (capped count,
    unmasked share weighted by block size) combine to one computation's on the whole set."""
    rng = np.random.default_rng(7)
    sources = rng.integers(0, 256, size=(7, 16, 16, 3), dtype=np.uint8)
    edited = sources.copy()
    edited[[1, 4, 5]] = rng.integers(0, 256, size=(3, 16, 16, 3), dtype=np.uint8)  # the others: capped at 100 dB
    masks = np.zeros((7, 16, 16), np.uint8)
    for i in range(7):
        masks[i, : i + 2, : 3 * i + 1] = 255  # unmasked shares differ per image
    whole = ImageSet(images=edited, prompts=["p"] * 7, seeds=list(range(7)),
                     inputs={"source_images": sources, "masks": masks})
    for name in ("preservation_psnr", "preservation_ssim"):
        metric = get_metric(name)
        one = metric.compute(whole)
        parts = [metric.compute(whole.subset(list(distributed.share(7, rank, 3)))) for rank in range(3)]
        value, details = metric.combine(np.concatenate([part.per_sample for part in parts]),
                                        [{**part.details, BLOCK_SAMPLES: len(part.per_sample)} for part in parts])
        details.pop(BLOCK_SAMPLES)
        assert value == one.value and details.keys() == one.details.keys(), name
        assert math.isclose(details.pop("unmasked_share"), one.details["unmasked_share"], rel_tol=1e-12), name
        assert details == {k: v for k, v in one.details.items() if k != "unmasked_share"}, name
    assert get_metric("preservation_psnr").compute(whole).details["capped"] == 4


@pytest.mark.parametrize(("device", "backend"), [("cpu", "gloo"), ("cuda", "cpu:gloo,cuda:nccl"),
                                                 ("cuda:0", "cpu:gloo,cuda:nccl")])
def test_the_process_group_is_nccl_on_gpus_and_gloo_on_the_cpu(monkeypatch: pytest.MonkeyPatch, device: str,
                                                                backend: str) -> None:
    """What ``start`` asks torch.distributed for (faked: no GPU here): on a GPU NCCL for CUDA
    tensors and gloo for the CPU tensors the plugin's collectives send; gloo alone on the CPU."""
    import torch.distributed as dist

    joined: dict[str, object] = {}
    monkeypatch.setattr(dist, "TCPStore", lambda *args, **kwargs: object())
    monkeypatch.setattr(dist, "PrefixStore", lambda prefix, store: (prefix, store))
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda backend, **kwargs: joined.update(backend=backend, **kwargs))
    group = distributed.start(distributed.Launch(1, 2, 1, "127.0.0.1", 29511), device=device, timeout=5)
    try:
        assert joined["backend"] == group.backend == backend and joined["rank"] == 1 and joined["world_size"] == 2
    finally:
        distributed._ACTIVE.remove(group)
        group.restore()


def test_a_launch_is_detected_from_torchruns_variables() -> None:
    env = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29511",
           "TORCHELASTIC_USE_AGENT_STORE": "True"}
    launch = distributed.detect_launch(env)
    assert launch == distributed.Launch(1, 2, 1, "127.0.0.1", 29511, agent_store=True)
    assert distributed.detect_launch({}) is None
    assert distributed.detect_launch({**env, "RANK": "0", "WORLD_SIZE": "1"}) is None  # one process: nothing to spread
    with pytest.raises(DistributedError, match=r"RANK='x' is not a whole number.*fix:"):
        distributed.detect_launch({**env, "RANK": "x"})
    with pytest.raises(DistributedError, match=r"MASTER_ADDR is not.*fix:"):
        distributed.detect_launch({k: v for k, v in env.items() if k != "MASTER_ADDR"})


def test_xdist_inside_a_torchrun_launch_is_refused(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    launch = distributed.Launch(0, 2, 0, "127.0.0.1", 29512)
    assert distributed.xdist_refusal(launch, 0) is None and distributed.xdist_refusal(None, 2) is None
    for name, value in {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                        "MASTER_PORT": "29512"}.items():
        monkeypatch.setenv(name, value)
    pytester.makepyfile(test_one="def test_one():\n    pass\n")
    result = pytester.runpytest("-n", "2", "-p", "no:randomly")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*pytest-diffeval: -n 2 (pytest-xdist) cannot be combined with a torchrun / "
                                 "accelerate launch (this is rank 0 of WORLD_SIZE=2)*fix: drop -n*"])


# --------------------------------------------------------------------------- real ranks


def _environment(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PYTEST_", "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_", "TORCHELASTIC"))}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               PYTHONUNBUFFERED="1", CUDA_VISIBLE_DEVICES="", **extra)
    return env


def _torchrun(*args: str, cwd: Path, timeout: float = 600, env: dict[str, str] | None = None, nproc: int = 2,
              ) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "--tee",
               "3", *args]
    return subprocess.run(command, cwd=cwd, env=env or _environment(), capture_output=True, text=True,
                          timeout=timeout)


COLLECTIVES = """
import numpy as np
from pytest_diffeval import distributed as d

group = d.start(d.detect_launch(), timeout=60)
mine = group.share(5)
pixels = np.stack([np.full((2, 2, 3), i, np.uint8) for i in mine])
assert [int(x[0, 0, 0]) for x in group.gather_samples(pixels)] == [0, 1, 2, 3, 4]
flags = group.gather_samples(np.array([i % 2 == 0 for i in mine]))
assert flags.dtype == bool and flags.tolist() == [True, False, True, False, True]
features = np.random.default_rng(0).normal(size=(9, 4))
sums = group.all_reduce_sums(d.statistics_of(features[list(group.share(9))]))
mean, covariance = d.moments(sums)
assert np.allclose(mean, features.mean(0), rtol=1e-12) and np.allclose(covariance, np.cov(features, rowvar=False))
assert group.broadcast_json({"decided_by": group.rank}) == {"decided_by": 0}
assert group.all_gather_json(group.rank * 10) == [0, 10]
assert d.everyone(True) and not d.everyone(group.rank == 0)
# torchmetrics must not sync its states over the group: every rank already holds the whole set
from torchmetrics.aggregation import SumMetric
total = SumMetric()
total.update(float(group.rank + 1))
assert float(total.compute()) == group.rank + 1, float(total.compute())
print(f"COLLECTIVES OK rank {group.rank}")
d.stop(group)
"""


def test_collectives_on_two_gloo_ranks(tmp_path: Path) -> None:
    (tmp_path / "collectives.py").write_text(COLLECTIVES)
    done = _torchrun("collectives.py", cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "COLLECTIVES OK rank 0" in done.stdout and "COLLECTIVES OK rank 1" in done.stdout


SHARDED = """
from pathlib import Path

import numpy as np
import torch

from pytest_diffeval import distributed as d
from pytest_diffeval import tripwires
from pytest_diffeval.generation import ImageSet, ShardedImageSet
from pytest_diffeval.exceptions import DistributedError
from pytest_diffeval.metrics import Metric, MetricResult, compute_metric, register_metric
from pytest_diffeval.metrics.drift import save_statistics
from pytest_diffeval.metrics.per_class import compute_per_class


class Features(torch.nn.Module):
    num_features = 6
    id = "test-moments"

    def forward(self, x):
        x = x.double() / 255
        return torch.cat([x.mean((2, 3)), (x ** 2).mean((2, 3))], 1)


@register_metric("brightness")
def brightness(images):
    return images.images.mean(axis=(1, 2, 3))


@register_metric("picky")
def picky(images):
    if "p2" in images.prompts:  # samples 6-8: rank 1's block
        raise ValueError("no p2")
    return np.zeros(len(images))


class Contrast(Metric):  # a set-level metric that knows nothing of ranks: it gets the whole set
    name, per_sample = "contrast", False

    def compute(self, images):
        return MetricResult(self.name, float(images.images.std()), "pixels", True)


register_metric(Contrast())


group = d.start(d.detect_launch(), timeout=60)
rng = np.random.default_rng(0)
pixels = rng.integers(0, 256, size=(9, 8, 8, 3), dtype=np.uint8)
pixels[4] = 7  # a constant image
pixels[3] = pixels[0]  # seed 0 of prompts p0 and p1: identical images
prompts, seeds = [f"p{i // 3}" for i in range(9)], [i % 3 for i in range(9)]
whole = ImageSet(images=pixels, prompts=prompts, seeds=seeds, nonfinite=[False] * 9)
block = group.share(9)
sharded = ShardedImageSet.from_whole(whole, group)
reference = ImageSet(images=rng.integers(0, 256, size=(12, 8, 8, 3), dtype=np.uint8), prompts=["r"] * 12,
                     seeds=list(range(12)))
assert len(sharded) == 9 and sharded.image_size == (8, 8)
assert tripwires.find_problems(sharded) == tripwires.find_problems(whole) and len(tripwires.find_problems(whole)) == 2

one, two = compute_metric("brightness", whole), compute_metric("brightness", sharded)
assert np.array_equal(one.per_sample, two.per_sample) and one.value == two.value, (one, two)
options = {"clip_model": "diffeval/tiny-clip", "prompts": [f"a {i} digit" for i in range(9)]}  # sliced to the block
one, two = compute_metric("clip_score", whole, **options), compute_metric("clip_score", sharded, **options)
assert np.array_equal(one.per_sample, two.per_sample) and one.value == two.value, (one, two)
try:  # it fails in rank 1's block: rank 1 raises the metric's error, rank 0 names rank 1; none waits
    compute_metric("picky", sharded)
    raise AssertionError("no error")
except DistributedError as exc:
    assert group.rank == 0 and "rank 1 failed to gather the per-sample values of picky" in str(exc), exc
except ValueError as exc:
    assert group.rank == 1 and "no p2" in str(exc), exc
stats = Path(f"drift-stats-rank{group.rank}.safetensors")  # a baseline's statistics: the reference set's
save_statistics(compute_metric("drift", reference, features=Features()).state, stats)
for name, options, limit in [("fid", {"reference": reference, "features": Features()}, 1e-9),
                             ("kid", {"reference": reference, "features": Features(), "subsets": 5}, 0.0),
                             ("cmmd", {"reference": reference, "clip_model": "diffeval/tiny-clip"}, 0.0),
                             ("drift", {"features": Features()}, 0.0),
                             ("drift", {"features": Features(), "baseline_stats": stats}, 1e-9)]:
    rows_before = group.gathered.get("rows", 0)
    one, two = compute_metric(name, whole, **options), compute_metric(name, sharded, **options)
    rows = group.gathered.get("rows", 0) - rows_before
    assert abs(one.value - two.value) <= limit * abs(one.value), (name, one.value, two.value)
    assert group.all_gather_json(two.value, "values") == [two.value] * 2, name  # rank 0's, to the last bit
    assert name != "drift" or "baseline_stats" not in options or one.value > 0.1, one.value
    if name in ("fid", "drift"):  # the feature sums all-reduced; the features on rank 0 alone, which decides
        uncached = lambda details: {k: v for k, v in details.items() if k != "reference"}  # its "cached" flag
        assert uncached(two.details) == uncached(one.details), (name, one.details, two.details)  # rank 0's spread...
        assert rows == (9 * Features.num_features * 8 if group.rank == 0 else 0), (name, group.rank, rows)
        if group.rank != 0:
            assert two.state is None, name
            continue
    a, b = one.state["tensors"], two.state["tensors"]  # the per-image features the paired verdicts use, too
    assert a.keys() == b.keys()
    for key in a:
        if name == "drift" and key.startswith("real_features"):  # the statistics file: one process's bytes
            assert np.array_equal(a[key], b[key]) and np.asarray(a[key]).dtype == np.asarray(b[key]).dtype, key
        assert np.allclose(np.asarray(a[key]), np.asarray(b[key]), rtol=1e-12, atol=0), (name, key)
    assert one.details.keys() == two.details.keys(), name
for name, options in [("brightness", {}), ("fid", {"reference": reference, "features": Features()})]:
    one, two = compute_per_class(name, whole, **options), compute_per_class(name, sharded, **options)
    assert list(one) == list(two) == ["p0", "p1", "p2"], name  # p1: samples 3, 4 on rank 0 and 5 on rank 1
    for label in one:
        # 3 images, 6 features: a rank-deficient covariance magnifies the sums' rounding (9e-9 measured)
        assert abs(one[label].value - two[label].value) <= 1e-7 * abs(one[label].value), (name, label)
assert group.gathered.get("pixels", 0) == 0 and group.gathered["rows"] > 0, group.gathered
assert compute_metric("contrast", sharded).value == compute_metric("contrast", whole).value
assert np.array_equal(sharded.images, pixels) and group.gathered["pixels"] >= pixels.nbytes  # the fallback
fresh = ShardedImageSet(local=pixels[list(block)], block=block, group=group, image_size=(8, 8), prompts=prompts,
                        seeds=seeds)
try:  # code on rank 0 only reads the pixels (a collective): both ranks stop, neither hangs in gloo
    fresh.images if group.rank == 0 else group.all_gather_json(group.rank, "something else")
    raise AssertionError("no error")
except DistributedError as exc:
    assert ("the ranks reached different collectives (rank 0: gather the pixels of 9 samples: shapes; rank 1: "
            "something else: shapes)") in str(exc), exc
print(f"SHARDED OK rank {group.rank}")
d.stop(group)
"""


def _on_two_ranks(tmp_path: Path, script: str, marker: str, nproc: int = 2) -> None:
    """Run ``script`` on ``nproc`` (2) gloo ranks; each must print ``<marker> rank <r>`` (its asserts held)."""
    (tmp_path / "script.py").write_text(script)
    done = _torchrun("script.py", cwd=tmp_path, timeout=300, env=_environment(XDG_CACHE_HOME=str(tmp_path)),
                     nproc=nproc)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert all(f"{marker} rank {rank}" in done.stdout for rank in range(nproc)), done.stdout[-3000:]


def test_metrics_of_a_sharded_set_equal_the_whole_sets_without_gathering_its_pixels(tmp_path: Path) -> None:
    """Each rank holds its block of a set's pixels: a per-sample metric's values, FID/KID/CMMD/
    drift (features gathered) and the tripwires equal one process's on the whole set, and no
    pixels travel until code that is not distribution-aware reads ``images``."""
    _on_two_ranks(tmp_path, SHARDED, "SHARDED OK")


SHARDED_VQA = """
import numpy as np

from pytest_diffeval import distributed as d
from pytest_diffeval.embedded.data import make_images
from pytest_diffeval.generation import ImageSet, ShardedImageSet
from pytest_diffeval.metrics import compute_metric

group = d.start(d.detect_launch(), timeout=120)
pixels, prompts = make_images(9, seed=3, split="heldout")
prompts[1], prompts[7] = prompts[7], prompts[1]  # two images with another's prompt: failed questions
seeds = list(range(9))
whole = ImageSet(images=np.ascontiguousarray(pixels), prompts=prompts, seeds=seeds)
block = group.share(9)  # 5 + 4 samples
sharded = ShardedImageSet.from_whole(whole, group)
asked = [prompts[(i + 1) % 9] if i % 4 == 0 else prompts[i] for i in range(9)]  # sliced to the block
vlm = {"vqa_model": "diffeval/tiny-vlm"}
worst = {}
for name, options in [("vqa_score", {**vlm, "prompts": asked}), ("vqa_score", {**vlm, "normalize": "answers"}),
                      ("tifa", vlm), ("soft_tifa", {**vlm, "mean": "geometric"})]:
    two = compute_metric(name, sharded, **options)  # the sharded set first: nothing cached can answer it
    one = compute_metric(name, whole, **options)
    assert abs(one.value - two.value) <= 1e-6 * abs(one.value), (name, one.value, two.value)
    assert np.allclose(one.per_sample, two.per_sample, rtol=1e-6, atol=0), (name, one.per_sample, two.per_sample)
    assert one.backbone == two.backbone and one.details.keys() == two.details.keys(), name
    assert {k: v for k, v in one.details.items() if k != "answers"} == \\
        {k: v for k, v in two.details.items() if k != "answers"}, name
    a, b = one.details["answers"], two.details["answers"]
    strip = lambda answers: [{**x, "questions": [{k: v for k, v in q.items() if k != "p"} for q in x["questions"]]}
                             for x in answers]
    assert strip(a) == strip(b), name  # prompt, seed, questions, passed, blocked_by: per image in sample order
    diffs = [abs(q1["p"] - q2["p"]) for x, y in zip(a, b) for q1, q2 in zip(x["questions"], y["questions"])]
    assert max(diffs) <= 1.5e-6, (name, max(diffs))  # rounded to 6 decimals
    assert any(not q["passed"] for x in a for q in x["questions"]), name  # the details hold failed questions
    worst[name] = max(worst.get(name, 0.0), abs(one.value - two.value) / abs(one.value),
                      float(np.max(np.abs(one.per_sample - two.per_sample))), max(diffs))
assert group.gathered.get("pixels", 0) == 0 and group.gathered["rows"] > 0, group.gathered
print(f"SHARDED VQA OK rank {group.rank} largest differences {worst}")
d.stop(group)
"""


def test_vqa_metrics_of_a_sharded_set_equal_the_whole_sets_without_gathering_its_pixels(tmp_path: Path) -> None:
    """vqa_score (with per-image ``prompts`` sliced to each block), tifa and soft_tifa on the
    embedded tiny VLM: each rank asks about its own block; value, per-sample values and details
    (scorer, per-image answers in sample order) equal one process's on the whole set (float32
    batches of other composition: within 1e-6), and no pixels travel."""
    _on_two_ranks(tmp_path, SHARDED_VQA, "SHARDED VQA OK")


SHARDED_EDIT = """
import numpy as np
import torch
from safetensors.torch import save_file

from pytest_diffeval import distributed as d
from pytest_diffeval.embedded.data import make_images
from pytest_diffeval.generation import ImageSet, ShardedImageSet
from pytest_diffeval.metrics import compute_metric
from pytest_diffeval.metrics.style import vgg19_features

group = d.start(d.detect_launch(), timeout=120)
if group.rank == 0:
    torch.manual_seed(0)
    save_file(vgg19_features((8, 12, 16, 24, 24)).state_dict(), "vgg.safetensors")
group.all_gather_json(0, "the weights are written")
n = 16  # as many samples as the images have rows: one image for all must not be taken for rows of images
pixels, prompts = make_images(n, seed=5, split="heldout")
sources, captions = make_images(n, seed=6, split="heldout")
assert pixels.shape[1:] == (16, 16, 3)
masks = np.zeros((n, 16, 16), np.uint8)
for i in range(n):
    masks[i, i % 12 : i % 12 + 4, 2:9] = 255
inputs = {"source_images": np.ascontiguousarray(sources), "masks": masks}
whole = ImageSet(images=np.ascontiguousarray(pixels), prompts=prompts, seeds=list(range(n)), inputs=inputs)
block = group.share(n)
sharded = ShardedImageSet.from_whole(whole, group)
clip = {"clip_model": "diffeval/tiny-clip"}
vgg = {"vgg_weights": "vgg.safetensors"}
calls = [("clip_directional_similarity", {**clip, "source_captions": captions, "target_captions": prompts[0]}),
         ("clip_directional_similarity", {**clip, "source_images": sources[3]}),  # captioned by CLIP, one source
         ("clip_image_similarity", clip),  # the carried source images
         ("clip_image_similarity", {**clip, "reference_images": list(sources[::-1])}),
         ("preservation_psnr", {}), ("preservation_psnr", {"masks": masks[2], "source_images": pixels[0]}),
         ("preservation_ssim", {}), ("preservation_ssim", {"masks": masks[5] > 0}),
         ("style_loss", {**vgg, "style_images": sources[1]}), ("style_loss", {**vgg, "style_images": sources})]


def largest(a, b, where):
    # the largest relative difference between two details (JSON-like), structure and texts equal
    if isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        return max([largest(a[k], b[k], where) for k in a], default=0.0)
    if isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), where
        return max([largest(x, y, where) for x, y in zip(a, b)], default=0.0)
    if isinstance(a, float) and not isinstance(a, bool):
        return abs(a - b) / max(abs(a), 1e-300)
    assert a == b, (where, a, b)
    return 0.0


worst = {}
for name, options in calls:
    two = compute_metric(name, sharded, **options)
    one = compute_metric(name, whole, **options)
    assert one.backbone == two.backbone, name
    diff = max(abs(one.value - two.value) / abs(one.value), largest(one.details, two.details, name),
               float(np.max(np.abs(one.per_sample - two.per_sample)) / np.max(np.abs(one.per_sample))))
    assert diff <= 1e-6, (name, options.keys(), diff, one, two)
    worst[name] = max(worst.get(name, 0.0), diff)
assert group.gathered.get("pixels", 0) == 0 and group.gathered["rows"] > 0, group.gathered
print(f"SHARDED EDIT OK rank {group.rank} largest relative differences {worst}")
d.stop(group)
"""


def test_edit_metrics_of_a_sharded_set_equal_the_whole_sets_without_gathering_its_pixels(tmp_path: Path) -> None:
    """clip_directional_similarity, clip_image_similarity, preservation_psnr/ssim and style_loss:
    each rank scores its block with its block of the inputs (carried, given one per image, or
    one for all, also when there are as many samples as rows), and value, per-sample values and
    details equal one process's on the whole set (within 1e-6 relative), without pixels."""
    _on_two_ranks(tmp_path, SHARDED_EDIT, "SHARDED EDIT OK")


DEAD_RANK_TEST = """
import os, signal

def test_generation(generate):
    if os.environ["RANK"] == "1":
        os.kill(os.getpid(), signal.SIGKILL)  # a rank that dies in the middle of a test
    generate("diffeval/tiny-t2i", ["a red 3 on blue"], seeds=range(2), num_inference_steps=2)
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _ranks_by_hand(cwd: Path, *args: str) -> list[subprocess.Popen[str]]:
    """Two ranks of ``pytest ARGS`` started with torchrun's variables but without its agent
    (which would stop the survivors as soon as one rank exits)."""
    (cwd / "pytest.ini").write_text("[pytest]\n")
    port = str(_free_port())
    ranks = []
    for rank in ("0", "1"):
        env = _environment(RANK=rank, LOCAL_RANK=rank, WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        ranks.append(subprocess.Popen(
            [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-p", "no:randomly", "--diffeval-no-cache", *args],
            cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    return ranks


def test_ranks_that_collected_different_tests_stop_with_a_usage_error(tmp_path: Path) -> None:
    (tmp_path / "test_uneven.py").write_text(
        "import os\n\ndef test_all():\n    pass\n\nif os.environ['RANK'] == '1':\n"
        "    def test_rank_one_only():\n        pass\n")
    outputs = [(rank.communicate(timeout=300)[0], rank.returncode) for rank in _ranks_by_hand(tmp_path, "test_uneven.py")]
    for out, code in outputs:
        assert code == pytest.ExitCode.USAGE_ERROR, out
        assert "pytest-diffeval: the ranks collected different tests (rank 0: 1 test, rank 1: 2 tests" in out, out


def test_a_dead_rank_is_named_and_the_others_stop_within_the_timeout(tmp_path: Path) -> None:
    """Rank 1 dies inside the test; rank 0 stops at its next collective after the timeout,
    naming rank 1 and the test."""
    (tmp_path / "test_dead.py").write_text(DEAD_RANK_TEST)
    ranks = _ranks_by_hand(tmp_path, "--diffeval-dist-timeout=5", "test_dead.py")
    start = time.monotonic()
    out, _ = ranks[0].communicate(timeout=300)
    ranks[1].communicate(timeout=60)
    assert ranks[1].returncode == -signal.SIGKILL
    assert ranks[0].returncode == pytest.ExitCode.TESTS_FAILED, out
    assert "pytest-diffeval: rank 1 did not reach collective" in out, out
    assert "within 5 s, in test test_dead.py::test_generation (this is rank 0 of 2)" in out, out
    assert time.monotonic() - start < 240


# --------------------------------------------------------------------------- a suite under torchrun

SUITE = """
import os

import numpy as np
import pytest

from pytest_diffeval import ImageSet
from pytest_diffeval.embedded.data import HELDOUT_PROMPTS, make_images

MODEL = "diffeval/tiny-t2i"
SAMPLING = {"num_inference_steps": 8, "guidance_scale": 2.0}


@pytest.fixture(scope="session")
def real():
    images, captions = make_images(48, seed=0, split="heldout")
    return ImageSet(images=np.ascontiguousarray(images), prompts=captions, seeds=[0] * len(captions))


def test_prompts_against_baseline(generate, diffeval_baseline):
    images = generate(MODEL, HELDOUT_PROMPTS[:5], seeds=range(3), **SAMPLING)  # 15 samples: 8 + 7 over 2 ranks
    diffeval_baseline.assert_no_regression(images, "clip_score")


def test_distribution_against_baseline(generate, real, diffeval_baseline):
    images = generate(MODEL, HELDOUT_PROMPTS[:12], seeds=range(4), **SAMPLING)  # 48 samples
    diffeval_baseline.assert_no_regression(images, ["fid", "kid", "cmmd"], reference=real)
    diffeval_baseline.assert_no_regression(images, "drift")
"""

SUITE_CONFTEST = """
import json
import os
from pathlib import Path

import pytest

from pytest_diffeval import distributed


@pytest.fixture(scope="session", autouse=True)
def traffic():
    yield
    group = distributed.current()
    if group is not None and os.environ.get("TRAFFIC"):  # the bytes each rank received from all-gathers, by kind
        Path(f"{os.environ['TRAFFIC']}-rank{group.rank}.json").write_text(json.dumps(group.gathered))
"""

SUITE_INI = """[pytest]
diffeval_clip_model = diffeval/tiny-clip
diffeval_fid_features = clip:diffeval/tiny-clip
filterwarnings =
    ignore::FutureWarning
    ignore::UserWarning
"""


SET_SUMS_TOLERANCE = 1e-7  # FID/drift of all-reduced feature sums vs one process's, relative (measured: 1.1e-9)


def _values(results: Path) -> dict[tuple[str, str], tuple[Any, ...]]:
    """Each check's value, per-sample values and verdict, from metrics.json."""
    checks = json.loads((results / "metrics.json").read_text())["checks"]
    return {(c["test"], c["metric"]): (c["value"], c.get("samples"), c["verdict"]) for c in checks}


def _without(data: Any, keys: set[str]) -> Any:
    """JSON data without the entries named ``keys``, at any depth."""
    if isinstance(data, dict):
        return {k: _without(v, keys) for k, v in data.items() if k not in keys}
    return [_without(v, keys) for v in data] if isinstance(data, list) else data


def _without_times(data: Any) -> Any:
    """A baseline's JSON without its ``recorded`` timestamps."""
    return _without(data, {"recorded"})


def _rank_lines(output: str, rank: int) -> list[str]:
    prefix = f"[default{rank}]:"
    return [line[len(prefix):] for line in output.splitlines() if line.startswith(prefix)]


@pytest.mark.slow
@pytest.mark.torchrun
def test_a_suite_under_torchrun_equals_one_process_and_a_regression_fails_on_every_rank(tmp_path: Path) -> None:
    (tmp_path / "test_suite.py").write_text(SUITE)
    (tmp_path / "pytest.ini").write_text(SUITE_INI)
    (tmp_path / "conftest.py").write_text(SUITE_CONFTEST)
    pytest_args = ["-p", "no:cacheprovider", "-p", "no:randomly", "--diffeval-no-cache"]

    single = subprocess.run([sys.executable, "-m", "pytest", *pytest_args, "--snapshot-update",
                             "-o", "diffeval_baselines_dir=baselines-single", "--diffeval-results=results-single"],
                            cwd=tmp_path, env=_environment(), capture_output=True, text=True, timeout=600)
    assert single.returncode == 0, single.stdout[-3000:]

    summary = tmp_path / "step-summary.md"
    ranked = _torchrun("-m", "pytest", *pytest_args, "--snapshot-update", "-o", "diffeval_baselines_dir=baselines-dist",
                       "--diffeval-results=results-dist", "--junitxml=junit.xml", cwd=tmp_path,
                       env=_environment(GITHUB_STEP_SUMMARY=str(summary), TRAFFIC=str(tmp_path / "passing")))
    assert ranked.returncode == 0, ranked.stdout[-4000:] + ranked.stderr[-2000:]
    for rank in (0, 1):
        assert any("2 passed" in line for line in _rank_lines(ranked.stdout, rank)), ranked.stdout[-3000:]
        assert f"pytest-diffeval: rank {rank} of 2: exit status 0 (rank 0's)" in _rank_lines(ranked.stdout, rank)
    # Metrics ran where the images are: per-sample values and features travelled, no rank
    # received pixels (a passing run saves no images).
    for rank in (0, 1):
        gathered = json.loads((tmp_path / f"passing-rank{rank}.json").read_text())
        assert gathered.get("pixels", 0) == 0 and gathered["rows"] > 0, gathered
    # The same values (every sample keeps its seed) and the same baselines; FID and drift come
    # from all-reduced feature sums (summed in another order: within 1e-7), the rest exactly.
    single_values, ranked_values = _values(tmp_path / "results-single"), _values(tmp_path / "results-dist")
    assert single_values.keys() == ranked_values.keys() and len(single_values) == 5
    for key, expected in single_values.items():
        assert _close(ranked_values[key], expected, SET_SUMS_TOLERANCE if key[1] in ("fid", "drift") else 0.0), key
    single_files = sorted(p.relative_to(tmp_path / "baselines-single") for p in (tmp_path / "baselines-single").rglob("*")
                          if p.is_file())
    dist_files = sorted(p.relative_to(tmp_path / "baselines-dist") for p in (tmp_path / "baselines-dist").rglob("*")
                        if p.is_file())
    assert single_files == dist_files and single_files
    for name in single_files:
        one, two = (tmp_path / "baselines-single" / name), (tmp_path / "baselines-dist" / name)
        if name.suffix == ".json":
            assert _close(_without_times(json.loads(two.read_text())), _without_times(json.loads(one.read_text())),
                          SET_SUMS_TOLERANCE), name
        else:  # thumbnails, the per-image features and drift's statistics file: the same bytes
            assert one.read_bytes() == two.read_bytes(), name
    # Only rank 0 wrote: one step summary appended (not two), rank 1 names no output file.
    assert summary.read_text().count("### pytest-diffeval:") == 1
    assert any("diffeval metrics:" in line for line in _rank_lines(ranked.stdout, 0))
    assert not any("diffeval metrics:" in line for line in _rank_lines(ranked.stdout, 1))
    assert (tmp_path / "junit.xml").is_file()

    # A planted regression (the embedded model's early checkpoint) fails on every rank.
    regressed = _torchrun("-m", "pytest", *pytest_args, "-o", "diffeval_baselines_dir=baselines-dist",
                          "--diffeval-results=results-regressed", "--diffeval-model=diffeval/tiny-t2i-undertrained",
                          cwd=tmp_path, env=_environment(TRAFFIC=str(tmp_path / "failing")))
    assert regressed.returncode != 0
    finals = [[line for line in _rank_lines(regressed.stdout, rank) if " in " in line and "failed" in line]
              for rank in (0, 1)]
    assert finals[0] and finals[1], regressed.stdout[-4000:]
    assert finals[0][-1].split(" in ")[0] == finals[1][-1].split(" in ")[0]  # e.g. "2 failed": the same verdicts
    for rank in (0, 1):  # the status each rank exits with (torchrun's summary may show a killed -15 instead)
        assert f"pytest-diffeval: rank {rank} of 2: exit status 1 (rank 0's)" in _rank_lines(regressed.stdout, rank)
    assert any(line.strip().startswith("exitcode  : 1") for line in regressed.stderr.splitlines())
    verdicts = {v[2] for v in _values(tmp_path / "results-regressed").values()}
    assert verdicts & {"regressed", "fail"}, verdicts
    # ... and the failed checks' images, which the report shows, were gathered to be saved.
    assert json.loads((tmp_path / "failing-rank0.json").read_text())["pixels"] > 0


# --- three ranks (helper B)

def test_statistics_of_an_empty_block_add_nothing_to_the_whole_sets() -> None:
    """A rank with no samples (more ranks than samples) contributes zero sums of the right size."""
    features = np.random.default_rng(2).normal(size=(2, 4)).astype(np.float32)
    blocks = [features[list(distributed.share(2, rank, 3))] for rank in range(3)]  # 1 + 1 + 0
    assert blocks[2].shape == (0, 4)
    sums = [distributed.statistics_of(block) for block in blocks]
    assert sums[2]["outer"].shape == (4, 4) and sums[2]["n"][0] == 0 and not sums[2]["sum"].any()
    mean, covariance = distributed.moments({key: sum(s[key] for s in sums) for key in sums[0]})
    assert np.allclose(mean, features.mean(0)) and np.allclose(covariance, np.cov(features, rowvar=False))


EMPTY_BLOCK = """
import numpy as np
import torch

from pytest_diffeval import distributed as d
from pytest_diffeval.generation import ImageSet, ShardedImageSet
from pytest_diffeval.metrics import compute_metric


class Features(torch.nn.Module):  # float32 rows, as CLIP's and Inception's, computed per image (no batch effects)
    num_features = 6
    id = "test-moments-float32"

    def forward(self, x):
        x = x.double() / 255
        return torch.cat([x.mean((2, 3)), (x ** 2).mean((2, 3))], 1).float()


group = d.start(d.detect_launch(), timeout=60)
assert group.world_size == 3
rng = np.random.default_rng(1)
pixels = rng.integers(0, 256, size=(2, 8, 8, 3), dtype=np.uint8)
prompts, seeds = ["a red circle", "a blue square"], [0, 1]
whole = ImageSet(images=pixels, prompts=prompts, seeds=seeds)
block = group.share(2)  # 1 + 1 + 0: rank 2 holds no sample
assert len(block) == (0 if group.rank == 2 else 1), block
sharded = ShardedImageSet.from_whole(whole, group)
rows = sharded.gather_rows(lambda b: Features()(torch.from_numpy(b.images).permute(0, 3, 1, 2)), "gather features")
assert rows.dtype == np.float32 and rows.shape == (2, 6), (rows.dtype, rows.shape)  # rank 2's empty block too
assert np.array_equal(rows, Features()(torch.from_numpy(pixels).permute(0, 3, 1, 2)).numpy())
two = compute_metric("clip_score", sharded, clip_model="diffeval/tiny-clip")  # rank 2 computes nothing
one = compute_metric("clip_score", whole, clip_model="diffeval/tiny-clip")
# each rank embeds a CLIP batch of one image, one process a batch of two: float32 batch effects
# (measured: 4e-6 on a score of 11, i.e. 4e-8 of a cosine)
assert np.allclose(one.per_sample, two.per_sample, rtol=1e-6, atol=2e-5), (one.per_sample, two.per_sample)
assert np.isclose(one.value, two.value, rtol=1e-6, atol=2e-5) and one.details == two.details, (one, two)
reference = ImageSet(images=rng.integers(0, 256, size=(6, 8, 8, 3), dtype=np.uint8), prompts=["r"] * 6,
                     seeds=list(range(6)))
for name, options, limit in [("fid", {"features": Features()}, 1e-9),
                             ("kid", {"features": Features(), "subsets": 3, "subset_size": 2}, 0.0)]:
    two = compute_metric(name, sharded, reference=reference, **options)
    one = compute_metric(name, whole, reference=reference, **options)
    assert abs(one.value - two.value) <= limit * abs(one.value), (name, one.value, two.value)
assert sharded.map_samples(lambda image: int(image[0, 0, 0])) == [int(p[0, 0, 0]) for p in pixels]
assert group.gathered.get("pixels", 0) == 0 and group.gathered["rows"] > 0, group.gathered
assert np.array_equal(sharded.images, pixels)  # the fallback: rank 2's empty block takes the others' shape
print(f"EMPTY BLOCK OK rank {group.rank}")
d.stop(group)
"""


def test_a_rank_with_an_empty_block_takes_part_in_every_collective(tmp_path: Path) -> None:
    """2 samples over 3 gloo ranks (1 + 1 + 0): the empty rank's float32 feature rows (gather_rows,
    KID), its feature sums (FID) and per-sample values (clip_score) join the others' without a
    dtype or shape mismatch, and the results equal one process's on the whole set."""
    _on_two_ranks(tmp_path, EMPTY_BLOCK, "EMPTY BLOCK OK", nproc=3)


# The suite's fixtures (MODEL, SAMPLING, real) with tests whose sample counts split unevenly over 3 ranks.
# An image's pixels depend on the batch it is made in (float32 rounding: 16 samples in batches of 8
# vs 1 differ in one pixel of sample 10 by one level), so each rank's block is whole batches of one
# process's (distributed.share): 8 + 8 + 0 for 16 in batches of 8; blocks cut at 6 + 5 + 5 changed
# that pixel.
SUITE_THREE = SUITE.partition("\n\ndef test_")[0] + '''
import hashlib
import json
import os
from pathlib import Path


def pixel_digests(images, name):
    """Each sample's pixels by digest (each rank digests its own block), written by rank 0."""
    digests = images.map_samples(lambda pixels: hashlib.sha256(pixels.tobytes()).hexdigest(), "digests")
    if os.environ.get("RANK", "0") == "0":
        Path(f"pixels-{name}.json").write_text(json.dumps(digests))


def test_prompts_on_three_ranks(generate, diffeval_baseline):
    images = generate(MODEL, HELDOUT_PROMPTS[:4], seeds=range(4), **SAMPLING)  # 16 in batches of 8: 8 + 8 + 0
    pixel_digests(images, "prompts")
    diffeval_baseline.assert_no_regression(images, "clip_score")


def test_fewer_samples_than_ranks(generate, diffeval_baseline):
    images = generate(MODEL, HELDOUT_PROMPTS[4:6], seeds=[0], batch_size=3, **SAMPLING)  # 2 samples: 2 + 0 + 0
    pixel_digests(images, "fewer")
    diffeval_baseline.assert_no_regression(images, "clip_score")


def test_distribution_on_three_ranks(generate, real, diffeval_baseline):
    images = generate(MODEL, HELDOUT_PROMPTS[:7], seeds=range(2), batch_size=3, **SAMPLING)  # 14: 6 + 6 + 2
    pixel_digests(images, "distribution")
    diffeval_baseline.assert_no_regression(images, ["fid", "kid"], reference=real)
'''


@pytest.mark.slow
@pytest.mark.torchrun
def test_a_suite_on_three_ranks_with_uneven_and_empty_blocks_equals_one_process(tmp_path: Path) -> None:
    """``torchrun --nproc_per_node=3``: 16, 2 and 14 samples (8 + 8 + 0, 2 + 0 + 0, 6 + 6 + 2) give
    one process's metrics.json and baselines, rank 0 alone writes, every rank exits with rank 0's
    status, and no rank receives pixels."""
    assert "def real():" in SUITE_THREE and SUITE_THREE.count("def test_") == 3
    folders = {}
    for name in ("one", "three"):
        folders[name] = tmp_path / name
        folders[name].mkdir()
        (folders[name] / "test_suite.py").write_text(SUITE_THREE)
        (folders[name] / "pytest.ini").write_text(SUITE_INI)
        (folders[name] / "conftest.py").write_text(SUITE_CONFTEST)
    pytest_args = ["-p", "no:cacheprovider", "-p", "no:randomly", "--diffeval-no-cache", "-o",
                   "diffeval_baselines_dir=baselines", "--diffeval-results=results"]
    single = subprocess.run([sys.executable, "-m", "pytest", *pytest_args, "--snapshot-update"], cwd=folders["one"],
                            env=_environment(), capture_output=True, text=True, timeout=600)
    assert single.returncode == 0, single.stdout[-3000:]

    summary = tmp_path / "step-summary.md"
    ranked = _torchrun("-m", "pytest", *pytest_args, "--snapshot-update", cwd=folders["three"], nproc=3,
                       env=_environment(GITHUB_STEP_SUMMARY=str(summary), TRAFFIC=str(tmp_path / "passing")))
    assert ranked.returncode == 0, ranked.stdout[-4000:] + ranked.stderr[-2000:]
    for rank in range(3):
        assert any("3 passed" in line for line in _rank_lines(ranked.stdout, rank)), ranked.stdout[-3000:]
        assert f"pytest-diffeval: rank {rank} of 3: exit status 0 (rank 0's)" in _rank_lines(ranked.stdout, rank)
        gathered = json.loads((tmp_path / f"passing-rank{rank}.json").read_text())
        assert gathered.get("pixels", 0) == 0 and gathered["rows"] > 0, (rank, gathered)
    # Every image bit for bit (blocks of whole batches). The values within 1e-6, the goal:
    # CLIP embeds each block in its own float32 batch (a score 1.7e-7 relative off, measured), and
    # FID's Σf, Σfᵀf are summed per block, then over ranks (float rounding, which the square root of
    # a rank-deficient covariance, 14 samples of 64-d features, magnifies to 1.15e-9 measured).
    for name in ("prompts", "fewer", "distribution"):
        made = [json.loads((folders[run] / f"pixels-{name}.json").read_text()) for run in ("one", "three")]
        assert made[0] == made[1] and len(made[0]) in (16, 2, 14), name
    single_values = _values(folders["one"] / "results")
    assert len(single_values) == 4 and sorted(len(v[1]) for v in single_values.values() if v[1]) == [2, 16]
    _assert_same_as_one_process(folders["one"], folders["three"], rel_tol=1e-6)  # values, verdicts, baselines
    # Only rank 0 wrote: one step summary, ranks 1 and 2 print no "diffeval metrics:" line.
    assert summary.read_text().count("### pytest-diffeval:") == 1
    assert any("diffeval metrics:" in line for line in _rank_lines(ranked.stdout, 0))
    for rank in (1, 2):
        assert not any("diffeval metrics:" in line for line in _rank_lines(ranked.stdout, rank))


# --------------------------------------------------------------------------- other launchers: accelerate, multi-node

# What accelerate 1.16's "simple" launcher (no --multi_gpu: --cpu, or no GPU found) puts in the
# environment of the ONE process it starts for `accelerate launch --cpu --num_processes 2`.
ACCELERATE_SIMPLE = {"ACCELERATE_USE_CPU": "True", "ACCELERATE_MIXED_PRECISION": "no", "MASTER_ADDR": "127.0.0.1",
                     "MASTER_PORT": "29500"}


def test_accelerate_asked_for_several_processes_but_starting_one_is_refused() -> None:
    message = distributed.accelerate_single_process(ACCELERATE_SIMPLE)
    assert message and message.startswith("pytest-diffeval: accelerate launch started this pytest as a single process")
    assert "ACCELERATE_USE_CPU='True'" in message and "fix: `accelerate launch --multi_gpu --num_processes N" in message
    assert message in (Path(__file__).parents[1] / "README.md").read_text()  # the "Bad input" row quotes it
    with pytest.raises(DistributedError, match=r"single process .*fix:"):
        distributed.detect_launch(ACCELERATE_SIMPLE)
    # One process asked for (accelerate sets no MASTER_ADDR then) and torchrun's ranks (under
    # --multi_gpu accelerate starts torchrun, which sets RANK) are not refused.
    one = {k: v for k, v in ACCELERATE_SIMPLE.items() if not k.startswith("MASTER_")}
    assert distributed.accelerate_single_process(one) is None and distributed.detect_launch(one) is None
    ranked = {**ACCELERATE_SIMPLE, "RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"}
    assert distributed.accelerate_single_process(ranked) is None
    assert distributed.detect_launch(ranked) == distributed.Launch(1, 2, 1, "127.0.0.1", 29500)


LAUNCHED_ARGS = ("-p", "no:cacheprovider", "-p", "no:randomly", "-k", "test_prompts_against_baseline")


def _suite_in(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "test_suite.py").write_text(SUITE)
    (folder / "pytest.ini").write_text(SUITE_INI)
    return folder


@pytest.fixture(scope="module")
def one_process(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The suite's per-prompt test (15 samples, 8 + 7 over two ranks) run in one process, with
    --snapshot-update: the results and baselines the launchers below must reproduce."""
    folder = _suite_in(tmp_path_factory.mktemp("one-process"))
    done = subprocess.run([sys.executable, "-m", "pytest", *LAUNCHED_ARGS, "--diffeval-no-cache", "--snapshot-update",
                           "-o", "diffeval_baselines_dir=baselines", "--diffeval-results=results"],
                          cwd=folder, env=_environment(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:]
    return folder


def _files(folder: Path) -> list[Path]:
    return sorted(p.relative_to(folder) for p in folder.rglob("*") if p.is_file())


def _close(measured: Any, expected: Any, rel_tol: float) -> bool:
    """``measured`` equals ``expected`` (JSON-like data), numbers within ``rel_tol`` relative."""
    if isinstance(expected, float) and isinstance(measured, (int, float)) and rel_tol:
        return math.isclose(measured, expected, rel_tol=rel_tol)
    if isinstance(expected, dict):
        return (isinstance(measured, dict) and measured.keys() == expected.keys()
                and all(_close(measured[k], v, rel_tol) for k, v in expected.items()))
    if isinstance(expected, (list, tuple)):
        return (isinstance(measured, (list, tuple)) and len(measured) == len(expected)
                and all(_close(m, e, rel_tol) for m, e in zip(measured, expected)))
    return measured == expected


def _unhashed(path: Path) -> str:
    """A baseline file's name without the content hash a features/statistics file carries."""
    return re.sub(r"\.[0-9a-f]{16}\.safetensors$", ".safetensors", path.as_posix())


def _assert_same_as_one_process(reference: Path, folder: Path, rel_tol: float = 0.0) -> None:
    """``folder``'s metrics.json values/verdicts and baselines equal the one-process run's
    (exactly, or numbers within ``rel_tol``: then a features file's tensors too, and the
    content hashes that name it are not compared)."""
    from safetensors import safe_open

    expected, measured = _values(reference / "results"), _values(folder / "results")
    assert expected and measured.keys() == expected.keys()
    for key, value in expected.items():
        assert _close(measured[key], value, rel_tol), (key, measured[key], value)
    files, made = _files(reference / "baselines"), _files(folder / "baselines")
    assert files and [_unhashed(f) for f in made] == [_unhashed(f) for f in files] and (rel_tol or made == files)
    ignored = {"recorded", "statistics_sha256", "statistics_file"} if rel_tol else {"recorded"}
    for name, other in zip(files, made):
        one, two = reference / "baselines" / name, folder / "baselines" / other
        if name.suffix == ".json":
            assert _close(_without(json.loads(two.read_text()), ignored), _without(json.loads(one.read_text()), ignored),
                          rel_tol), name
        elif name.suffix == ".safetensors" and rel_tol:
            with safe_open(str(one), "np") as a, safe_open(str(two), "np") as b:
                assert a.metadata() == b.metadata() and sorted(a.keys()) == sorted(b.keys()), name
                for key in a.keys():  # float32 features: relative to the largest (an entry near 0 has no digits)
                    x, y = a.get_tensor(key), b.get_tensor(key)
                    assert np.allclose(y, x, rtol=0, atol=rel_tol * float(np.abs(x).max())), (name, key)
        else:
            assert one.read_bytes() == two.read_bytes(), name


@pytest.mark.slow
@pytest.mark.torchrun
def test_accelerate_launch_gives_the_one_process_results_and_rank_0_alone_writes(one_process: Path, tmp_path: Path,
                                                                                ) -> None:
    folder = _suite_in(tmp_path / "run")
    accelerate = [sys.executable, "-m", "accelerate.commands.accelerate_cli", "launch"]
    # --cpu starts one process whatever --num_processes says: refused, with the fix.
    single = subprocess.run([*accelerate, "--cpu", "--num_processes", "2", "-m", "pytest", *LAUNCHED_ARGS],
                            cwd=folder, env=_environment(), capture_output=True, text=True, timeout=300)
    assert single.returncode != 0
    assert ("ERROR: pytest-diffeval: accelerate launch started this pytest as a single process (ACCELERATE_USE_CPU="
            "'True', MASTER_ADDR='127.0.0.1', no RANK/WORLD_SIZE)") in single.stdout + single.stderr, single.stderr[-3000:]
    assert not (folder / "results").exists()
    # --multi_gpu starts torchrun (2 gloo ranks on this CPU-only machine).
    summary = tmp_path / "step-summary.md"
    done = subprocess.run(
        [*accelerate, "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
         "--dynamo_backend", "no", "--main_process_port", str(_free_port()), "--tee", "3",
         "-m", "pytest", *LAUNCHED_ARGS, "--diffeval-no-cache", "--snapshot-update", "-o",
         "diffeval_baselines_dir=baselines", "--diffeval-results=results", "--junitxml=junit.xml"],
        cwd=folder, env=_environment(GITHUB_STEP_SUMMARY=str(summary)), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    for rank in (0, 1):
        assert f"pytest-diffeval: rank {rank} of 2: exit status 0 (rank 0's)" in _rank_lines(done.stdout, rank), \
            done.stdout[-3000:]
    _assert_same_as_one_process(one_process, folder)
    assert summary.read_text().count("### pytest-diffeval:") == 1
    assert any("diffeval metrics:" in line for line in _rank_lines(done.stdout, 0))
    assert not any("diffeval metrics:" in line for line in _rank_lines(done.stdout, 1))
    assert (folder / "junit.xml").is_file()


def _node_launcher(launcher: str, node: int, port: int) -> list[str]:
    """The command that starts node ``node`` of two (one process each) joined at ``port``."""
    if launcher == "torchrun-c10d":
        return [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",
                f"--node_rank={node}", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}",
                f"--rdzv-id=diffeval-{port}", "--tee", "3"]
    # accelerate: --num_processes counts every machine's; it starts torchrun with a static
    # rendezvous at the main process (node_rank 0 is rank 0).
    return [sys.executable, "-m", "accelerate.commands.accelerate_cli", "launch", "--multi_gpu",
            "--num_machines", "2", "--machine_rank", str(node), "--num_processes", "2", "--main_process_ip",
            "127.0.0.1", "--main_process_port", str(port), "--mixed_precision", "no", "--dynamo_backend", "no",
            "--tee", "3"]


@pytest.mark.slow
@pytest.mark.torchrun
@pytest.mark.parametrize("launcher", ["torchrun-c10d", "accelerate"])
def test_two_nodes_give_the_one_process_results(one_process: Path, tmp_path: Path, launcher: str) -> None:
    """Two launches (torchrun --nnodes=2 with a c10d rendezvous; accelerate launch --num_machines 2)
    on this machine stand for two nodes of one process each: each its own checkout (cwd) and
    TMPDIR, LOCAL_RANK=0 on both, RANK 0/1 given by the rendezvous (c10d ignores node_rank, so
    either node may be rank 0); they share only an image cache folder (as on NFS).  RANK, not
    LOCAL_RANK, picks the writer: one node writes results and baselines (the one-process run's),
    the other no file."""
    port, shared = _free_port(), tmp_path / "shared-cache"
    nodes = []
    for node in (0, 1):
        folder = _suite_in(tmp_path / f"node{node}")
        (tmp_path / f"tmp{node}").mkdir()
        command = [*_node_launcher(launcher, node, port), "-m", "pytest", *LAUNCHED_ARGS,
                   f"--diffeval-cache-dir={shared}", "--snapshot-update", "-o", "diffeval_baselines_dir=baselines",
                   "--diffeval-results=results"]
        env = _environment(TMPDIR=str(tmp_path / f"tmp{node}"), GITHUB_STEP_SUMMARY=str(tmp_path / "summary.md"))
        nodes.append((folder, subprocess.Popen(command, cwd=folder, env=env, stdout=subprocess.PIPE,
                                               stderr=subprocess.STDOUT, text=True)))
    outputs = [process.communicate(timeout=600)[0] for _, process in nodes]
    for (_, process), out in zip(nodes, outputs):
        assert process.returncode == 0, out[-4000:]
    ranks = [next(r for r in (0, 1) if f"pytest-diffeval: rank {r} of 2: exit status 0 (rank 0's)" in _rank_lines(out, 0))
             for out in outputs]  # each agent prefixes its one process [default0]: LOCAL_RANK 0 on both nodes
    assert sorted(ranks) == [0, 1], outputs
    writer, other = nodes[ranks.index(0)][0], nodes[ranks.index(1)][0]
    # With the cache on, CLIP's text features are embedded per rank (each block's own prompts
    # in one batch): float32 batch effects, within the 1e-6 (--diffeval-no-cache: exact).
    _assert_same_as_one_process(one_process, writer, rel_tol=1e-6)
    # (syrupy itself makes the baseline's folder before the plugin's writer declines: empty there)
    assert _files(other) == [Path("pytest.ini"), Path("test_suite.py")] and not (other / "results").exists()
    assert (tmp_path / "summary.md").read_text().count("### pytest-diffeval:") == 1
    # Both nodes stored their share of the samples in the shared cache, one file per sample.
    (samples,) = [value[1] for value in _values(writer / "results").values()]
    assert samples and len(list((shared / "images").rglob("*.png"))) == len(samples)


# --- scorers per block (helper A)


def test_image_rewards_truncated_prompts_combine_in_sample_order_or_stay_unknown() -> None:
    """ImageReward's details from each rank's block: the long prompts of every block once, in
    sample order; None (no tokenizer counted them) when a block's are unknown."""
    metric = get_metric("image_reward")
    values = np.array([1.0, 2.0, 4.0])
    blocks = [{"route": "external", "truncated_prompts": ["b", "a"]}, {"route": "x", "truncated_prompts": ["a", "c"]}]
    assert metric.combine(values, blocks) == (values.mean(), {"route": "external", "truncated_prompts": ["b", "a", "c"]})
    unknown = [{"route": "in-process", "truncated_prompts": None}] * 2
    assert metric.combine(values, unknown)[1] == {"route": "in-process", "truncated_prompts": None}


SHARDED_EXTERNAL = """
import os
import sys
from pathlib import Path

import numpy as np

from pytest_diffeval import distributed as d
from pytest_diffeval import settings
from pytest_diffeval.counters import COUNTERS
from pytest_diffeval.generation import ImageSet, ShardedImageSet
from pytest_diffeval.metrics import compute_metric
from pytest_diffeval.metrics.external import register_external_metric

SCORER = '''
import os

import numpy as np
from PIL import Image


def score(images, prompts, factors=None, **options):
    with open(os.environ["SCORER_LOG"], "a") as handle:
        print(len(images), file=handle)
    factors = factors or [1.0] * len(images)
    return [float(np.asarray(Image.open(path).convert("RGB"), np.float64).mean()) * factor + len(prompt)
            for path, prompt, factor in zip(images, prompts, factors)]


def info(**options):
    return {"version": "3"}
'''

group = d.start(d.detect_launch(), timeout=120)
if group.rank == 0:
    Path("scorer.py").write_text(SCORER)
group.all_gather_json(0, "the scorer is written")
log = Path(f"scored-{group.rank}.log").resolve()
os.environ["SCORER_LOG"] = str(log)
settings.configure(cache_dir=Path("cache").resolve(), result_cache=True)
register_external_metric("ext_block", python=sys.executable, module="scorer.py", per_sample_options=("factors",))
register_external_metric("ext_whole", python=sys.executable, module="scorer.py", sample_wise=False)
rng = np.random.default_rng(1)
pixels = rng.integers(0, 256, size=(9, 8, 8, 3), dtype=np.uint8)
prompts, seeds = ["a" * (i + 1) for i in range(9)], list(range(9))
whole = ImageSet(images=pixels, prompts=prompts, seeds=seeds)
block = group.share(9)  # 5 + 4 samples
sharded = ShardedImageSet.from_whole(whole, group)
factors = [1.0 + i / 10 for i in range(9)]  # one per image: sliced to each block
two = compute_metric("ext_block", sharded, factors=factors)
assert log.read_text().split() == [str(len(block))], log.read_text()  # this rank's child scored its block alone
one = compute_metric("ext_block", whole, factors=factors)
assert np.array_equal(one.per_sample, two.per_sample) and one.value == two.value, (one, two)
assert one.backbone == two.backbone == "external:scorer@3" and one.details == two.details, (one, two)
hits = COUNTERS.result_hits
again = compute_metric("ext_block", sharded, factors=factors)  # stored by every rank: no child runs
assert COUNTERS.result_hits == hits + 1 and log.read_text().split() == [str(len(block)), "9"], log.read_text()
assert np.array_equal(again.per_sample, one.per_sample) and again.details == one.details
assert group.gathered.get("pixels", 0) == 0 and group.gathered["rows"] > 0, group.gathered
# a scorer declared not sample-wise gets the whole set (its pixels gathered) on every rank
assert compute_metric("ext_whole", sharded).value == compute_metric("ext_whole", whole).value
assert log.read_text().split()[-2:] == ["9", "9"] and group.gathered["pixels"] >= pixels.nbytes, group.gathered
print(f"SHARDED EXTERNAL OK rank {group.rank}")
d.stop(group)
"""


def test_external_metrics_of_a_sharded_set_equal_the_whole_sets_without_gathering_its_pixels(tmp_path: Path) -> None:
    """An external metric (a scorer run by another interpreter) under torchrun: each rank's child
    scores only that rank's block (with its slice of a per-image option); values, details and
    backbone equal one process's exactly, the result is cached, and no pixels travel (but for
    a scorer registered ``sample_wise=False``, which gets the whole set)."""
    _on_two_ranks(tmp_path, SHARDED_EXTERNAL, "SHARDED EXTERNAL OK")


SHARDED_IMAGE_REWARD = """
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch

from pytest_diffeval import distributed as d
from pytest_diffeval import settings
from pytest_diffeval.counters import COUNTERS
from pytest_diffeval.embedded.data import make_images
from pytest_diffeval.generation import ImageSet, ShardedImageSet
from pytest_diffeval.metrics import compute_metric, image_reward
from pytest_diffeval.metrics.preference import warn_truncated

packages, weights = Path("packages").resolve(), Path("weights").resolve()
group = d.start(d.detect_launch(), timeout=120)
if group.rank == 0:  # a stand-in ImageReward package (the real one's venv is CI's) and its weights
    (packages / "ImageReward").mkdir(parents=True)
    (packages / "ImageReward" / "__init__.py").write_text("from .ImageReward import ImageReward\\n")
    (packages / "ImageReward" / "ImageReward.py").write_text(FAKE_SOURCE)
    weights.mkdir()
    (weights / "med_config.json").write_text(json.dumps({"hidden_size": 8}))
group.all_gather_json(0, "the package is written")
sys.path.insert(0, str(packages))
os.environ["PYTHONPATH"] = str(packages)  # the child interpreter imports it too
if group.rank == 0:
    from ImageReward import ImageReward

    torch.manual_seed(3)
    torch.save(ImageReward(str(weights / "med_config.json")).state_dict(), weights / "ImageReward.pt")
group.all_gather_json(0, "the weights are written")
settings.configure(cache_dir=Path("cache").resolve(), result_cache=True)
n = 9
pixels, prompts = make_images(n, seed=4, split="heldout")
whole = ImageSet(images=np.ascontiguousarray(pixels), prompts=prompts, seeds=list(range(n)))
sharded = ShardedImageSet.from_whole(whole, group)  # 5 + 4 samples
long = "a red seven on a white ground , drawn very large"  # 10 words; the captions have 8
asked = [long if i in (1, 3, 7) else f"prompt {i} is long enough to be cut by the scorer" if i in (2, 6)
         else prompts[i] for i in range(n)]
options = {"image_reward_weights": str(weights / "ImageReward.pt"), "device": "cpu", "prompts": asked}
calls = [("in-process", {}), ("external", {"image_reward_python": sys.executable, "timeout": 120})]
counted = image_reward.warn_long_prompts
for route, extra in calls:
    for counter in (counted, lambda texts: warn_truncated("image_reward", texts, [len(t.split()) for t in texts], 8)):
        image_reward.warn_long_prompts = counter  # the real one counts with bert-base-uncased when it is cached
        settings.configure(cache_dir=Path(f"cache-{route}-{counter is counted}").resolve(), result_cache=True)
        two = compute_metric("image_reward", sharded, **options, **extra)
        one = compute_metric("image_reward", whole, **options, **extra)
        assert np.array_equal(one.per_sample, two.per_sample) and one.value == two.value, (route, one, two)
        assert one.backbone == two.backbone and one.details == two.details, (route, one.details, two.details)
        assert one.details["route"] == route
        if counter is not counted:  # long prompts in both blocks, one of them in both: once, in sample order
            assert one.details["truncated_prompts"] == list(dict.fromkeys(p for p in asked if len(p.split()) > 8))
            assert len(one.details["truncated_prompts"]) == 3
        hits = COUNTERS.result_hits
        again = compute_metric("image_reward", sharded, **options, **extra)
        assert COUNTERS.result_hits == hits + 1 and np.array_equal(again.per_sample, one.per_sample)
        assert again.details == one.details
assert group.gathered.get("pixels", 0) == 0 and group.gathered["rows"] > 0, group.gathered
print(f"SHARDED IMAGE REWARD OK rank {group.rank}")
d.stop(group)
"""


def test_image_reward_of_a_sharded_set_equals_the_whole_sets_without_gathering_its_pixels(tmp_path: Path) -> None:
    """image_reward in process and in its own interpreter (a stand-in ImageReward package):
    each rank scores its block with its slice of ``prompts``; values, backbone and details (the
    long prompts of both blocks) equal one process's exactly, the result is cached, and no
    pixels travel."""
    from test_metrics_preference import FAKE_IMAGE_REWARD

    _on_two_ranks(tmp_path, SHARDED_IMAGE_REWARD.replace("FAKE_SOURCE", repr(FAKE_IMAGE_REWARD)),
                  "SHARDED IMAGE REWARD OK")


SHARDED_INCEPTION_SCORE = """
from pathlib import Path

import numpy as np
import torch

from pytest_diffeval import distributed as d
from pytest_diffeval import settings
from pytest_diffeval.counters import COUNTERS
from pytest_diffeval.embedded.data import make_images
from pytest_diffeval.generation import ImageSet, ShardedImageSet
from pytest_diffeval.metrics import compute_metric

group = d.start(d.detect_launch(), timeout=120)
settings.configure(cache_dir=Path("cache").resolve(), result_cache=True)
n = 21
pixels, prompts = make_images(n, seed=7, split="heldout")
whole = ImageSet(images=np.ascontiguousarray(pixels), prompts=prompts, seeds=list(range(n)))
sharded = ShardedImageSet.from_whole(whole, group)  # 11 + 10 samples


class Moments(torch.nn.Module):  # float64 logits whose rows do not depend on the batch they are computed in
    id = "test-moments"

    def forward(self, x):
        x = x.double() / 255
        return 8 * torch.cat([x.mean((2, 3)), (x ** 2).mean((2, 3))], 1)


def relative(one, two):
    # the largest relative difference of the values and the float details; the other details equal
    assert one.backbone == two.backbone and one.details.keys() == two.details.keys(), (one, two)
    assert {k: v for k, v in one.details.items() if not isinstance(v, float)} == \\
        {k: v for k, v in two.details.items() if not isinstance(v, float)}, (one, two)
    return max(abs(one.value - two.value) / one.value,
               *(abs(v - two.details[k]) / abs(v) for k, v in one.details.items() if isinstance(v, float)))


checker = {"classifier": "checker:diffeval/tiny-checker", "batch_size": 4}  # batches of other composition per rank
worst = {}
for options, limit in [({"classifier": Moments()}, 0.0), ({"classifier": Moments(), "splits": 3}, 0.0),
                       (checker, 1e-6), ({**checker, "splits": 3}, 1e-6)]:
    two = compute_metric("inception_score", sharded, **options)
    one = compute_metric("inception_score", whole, **options)
    name = f"{one.backbone.split('@')[0]}, {options.get('splits', 1)} splits"
    worst[name] = relative(one, two)
    assert worst[name] <= limit, (name, one, two)
    if "checker" in name:  # a classifier by name is cached (a module is not: it cannot be keyed)
        hits = COUNTERS.result_hits
        again = compute_metric("inception_score", sharded, **options)
        assert COUNTERS.result_hits == hits + 1 and again.value == two.value and again.details == two.details
assert one.details["split_std"] > 0 and one.details["classes"] == 10
assert group.gathered.get("pixels", 0) == 0, group.gathered
# float64 logits of each image (the blocks padded to the longer one, 11), twice per classifier
assert 0 < group.gathered["rows"] <= 2 * 2 * 11 * (6 + 10) * 8 < pixels.nbytes, group.gathered
print(f"SHARDED INCEPTION SCORE OK rank {group.rank} largest relative differences {worst}")
d.stop(group)
"""


def test_inception_score_of_a_sharded_set_equals_the_whole_sets_without_gathering_its_pixels(tmp_path: Path) -> None:
    """inception_score under torchrun: each rank classifies its block, the logits are gathered
    (8 bytes per class and image, not its pixels) and the score, its splits and its bootstrap
    spread are computed from them as one process does: exactly equal with a classifier whose
    logits do not depend on the batch; with the embedded digit checker (float32) within 1e-6,
    as one process at another ``batch_size`` also differs.  A classifier by name is cached."""
    _on_two_ranks(tmp_path, SHARDED_INCEPTION_SCORE, "SHARDED INCEPTION SCORE OK")
