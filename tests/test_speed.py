"""Speed without changing a number: the feature cache, CUDA out-of-memory back-off, the
provenance memo that lets a fully cached rerun skip the pipeline load, and
``diffeval_plan`` batching the generations of per-prompt tests."""

from __future__ import annotations

import json
import re
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from pytest_diffeval import settings
from pytest_diffeval.generation import ImageCache, ImageSet, generate_images
from pytest_diffeval.identity import share_load
from pytest_diffeval.metrics import compute_metric
from pytest_diffeval.pipelines import PipelineCache
from pytest_diffeval.planning import COUNTERS, Plan, _provenance_of


@pytest.fixture
def feature_settings(tmp_path: Path, tiny_models: dict[str, Path]):
    """Settings with a cache dir and the tiny CLIP, the result cache off (so each call reaches
    the backbone); restored afterwards."""
    previous = settings.current()
    settings.configure(cache_dir=tmp_path / "cache", clip_model=str(tiny_models["clip"]),
                       fid_features=f"clip:{tiny_models['clip']}", device_request="cpu", result_cache=False)
    COUNTERS.reset()
    yield tmp_path / "cache" / "features"
    settings.configure(cache_dir=previous.cache_dir, clip_model=previous.clip_model,
                       fid_features=previous.fid_features, device_request=previous.device_request,
                       result_cache=previous.result_cache)
    COUNTERS.reset()


def _random_set(n: int, seed: int) -> ImageSet:
    rng = np.random.default_rng(seed)
    return ImageSet(images=(rng.random((n, 32, 32, 3)) * 255).astype(np.uint8),
                    prompts=[f"a photo of thing {i % 3}" for i in range(n)], seeds=list(range(n)))


def test_feature_cache_serves_a_rerun_and_recomputes_a_corrupt_entry(feature_settings: Path) -> None:
    images, reference = _random_set(6, 0), _random_set(6, 1)
    first = compute_metric("clip_score", images).per_sample
    fid = compute_metric("fid", images, reference=reference).value  # CLIP features (the fixture's setting)
    assert COUNTERS.feature_misses > 0
    files = sorted(feature_settings.rglob("*.safetensors"))
    assert len(files) == 6 + 3 + 6  # image rows of both sets, the three distinct prompts
    COUNTERS.reset()
    again = compute_metric("clip_score", images).per_sample
    assert compute_metric("fid", images, reference=reference).value == fid
    assert np.array_equal(first, again)
    assert COUNTERS.feature_misses == 0 and COUNTERS.feature_hits > 0  # no backbone pass at all
    for file in files:
        file.write_bytes(b"not a safetensors file")
    COUNTERS.reset()
    repaired = compute_metric("clip_score", images).per_sample
    assert COUNTERS.feature_misses == 6 + 3  # corrupt entries are recomputed (and rewritten), never trusted
    assert np.allclose(repaired, first, atol=1e-4)
    COUNTERS.reset()
    compute_metric("clip_score", images)
    assert COUNTERS.feature_misses == 0
    changed = ImageSet(images=images.images.copy(), prompts=images.prompts, seeds=images.seeds)
    changed.images[2] ^= 0xFF
    compute_metric("clip_score", changed)
    assert COUNTERS.feature_misses == 1  # one changed image, one new pass


def test_feature_cache_off_without_a_cache_dir_or_with_no_cache(feature_settings: Path) -> None:
    images = _random_set(3, 2)
    COUNTERS.reset(feature_cache=False)  # what --diffeval-no-cache does
    compute_metric("clip_score", images)
    assert not feature_settings.exists() and COUNTERS.feature_misses == COUNTERS.feature_hits == 0
    COUNTERS.reset()
    settings.configure(cache_dir=None)
    compute_metric("clip_score", images)
    assert COUNTERS.feature_misses == COUNTERS.feature_hits == 0


# --------------------------------------------------------------------------- OOM back-off


class OomPipe:
    """The tiny pipeline, except that batches larger than ``fits`` run out of CUDA memory
    (after drawing from their generators, as a real run does before it fails)."""

    def __init__(self, pipe: Any, fits: int) -> None:
        self.pipe, self.fits, self.sizes = pipe, fits, []
        share_load(self, pipe)  # identified (and cached) as the pipeline it wraps

    def __getattr__(self, name: str) -> Any:
        return getattr(self.pipe, name)

    def __call__(self, *, prompt: list[str], generator: list[torch.Generator], **kwargs: Any) -> Any:
        self.sizes.append(len(prompt))
        if len(prompt) > self.fits:
            for g in generator:
                torch.randn(4, generator=g)
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return self.pipe(prompt=prompt, generator=generator, **kwargs)


@pytest.fixture(scope="module")
def pipe(tiny_models: dict[str, Path]) -> Any:
    return PipelineCache().get(tiny_models["pipe"])


def test_cuda_oom_halves_the_batch_keeps_the_images_and_says_which_size_worked(pipe: Any) -> None:
    prompts = [f"prompt {i}" for i in range(4)]
    expected = generate_images(pipe, prompts, seeds=range(2), batch_size=2, num_inference_steps=2)
    oom = OomPipe(pipe, fits=2)
    with pytest.warns(UserWarning, match=r"CUDA out of memory at batch size 8; batch size 2 worked"):
        images = generate_images(oom, prompts, seeds=range(2), batch_size=8, num_inference_steps=2)
    assert oom.sizes == [8, 4, 2, 2, 2, 2]
    assert np.array_equal(images.images, expected.images)  # generators rewound: same pixels as batch size 2
    oom.sizes.clear()
    generate_images(oom, prompts, seeds=range(2), batch_size=8, num_inference_steps=2)
    assert oom.sizes == [2, 2, 2, 2]  # later batches start at the size that worked, no new failure


def test_cuda_oom_at_batch_size_one_is_raised_with_advice(pipe: Any) -> None:
    with pytest.raises(torch.cuda.OutOfMemoryError) as failure:
        generate_images(OomPipe(pipe, fits=0), ["a", "b"], batch_size=2, num_inference_steps=2)
    assert "even at batch size 1" in "\n".join(getattr(failure.value, "__notes__", []))


# --------------------------------------------------------------------------- plans and the memo


def test_memo_provenance_gives_the_same_cache_keys_as_a_loaded_pipeline(pipe: Any) -> None:
    from pytest_diffeval.generation import pipeline_provenance

    cache = ImageCache("unused")
    stored = json.loads(json.dumps(_provenance_of(pipe)))
    live = pipeline_provenance(pipe)
    kwargs = {"num_inference_steps": 2, "guidance_scale": 5.0}
    assert cache.key(stored, kwargs, "a", 3) == cache.key(live, kwargs, "a", 3)


class Mark:
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args, self.kwargs = args, kwargs


def test_plan_marker_reads_its_arguments_and_rejects_bad_ones() -> None:
    plan = Plan.from_marker(Mark("m", ["a", "b", "a"], seeds=range(2), num_inference_steps=3), "t")
    assert plan.prompts == ("a", "b") and plan.seeds == (0, 1) and plan.call_kwargs == {"num_inference_steps": 3}
    assert plan.own_prompts({"prompt": "b", "i": 3}) == ["b"] and plan.own_prompts({"i": 3}) is None
    assert plan.mismatch("m", ["a"], [1], {"num_inference_steps": 3}) is None
    assert "seed 5" in plan.mismatch("m", ["a"], [5], {"num_inference_steps": 3})
    assert "num_inference_steps=4 (plan: 3)" in plan.mismatch("m", ["a"], [0], {"num_inference_steps": 4})
    for mark, message in [(Mark(), "needs the model"), (Mark("m", []), "non-empty list of prompts"),
                          (Mark("m", ["a"], seeds=[]), "empty seed list"), (Mark("m", ["a"], "x"), "positionally")]:
        with pytest.raises(ValueError, match=message):
            Plan.from_marker(mark, "t")


COUNTING_CONFTEST = """
    import functools, json, os
    import diffusers

    PIPE = {pipe!r}
    CALLS = []
    _original = diffusers.StableDiffusionPipeline.__call__

    @functools.wraps(_original)
    def _counting(self, *args, **kwargs):
        CALLS.append(len(kwargs["prompt"]))
        return _original(self, *args, **kwargs)

    WRAPPER = _counting  # what the pipeline's __call__ is during this session

    def pytest_configure(config):  # patched for this session only: the run may be in-process
        diffusers.StableDiffusionPipeline.__call__ = WRAPPER

    def pytest_unconfigure(config):
        diffusers.StableDiffusionPipeline.__call__ = _original

    def pytest_sessionfinish(session):
        with open("calls.jsonl", "a") as handle:
            handle.write(json.dumps({{"worker": os.environ.get("PYTEST_XDIST_WORKER", "main"), "calls": CALLS}}) + "\\n")
"""

PLANNED_TESTS = """
    import hashlib
    import pytest
    from conftest import PIPE
    from pytest_diffeval import compute_metric

    PROMPTS = [f"prompt number {i}" for i in range(8)]

    @pytest.mark.diffeval_plan(PIPE, PROMPTS, seeds=[0, 1], num_inference_steps=2)
    @pytest.mark.parametrize("prompt", PROMPTS)
    def test_prompt(generate, prompt):
        images = generate(PIPE, [prompt], seeds=[0, 1], num_inference_steps=2)
        assert images.prompts == [prompt, prompt] and images.seeds == [0, 1]
        compute_metric("clip_score", images)
        print("HASH", prompt, hashlib.sha256(images.images.tobytes()).hexdigest())
"""


def counting_project(user_project: pytest.Pytester, tiny_models: dict[str, Path]) -> pytest.Pytester:
    """The user project with a conftest that records the batch size of every pipeline call."""
    user_project.makeconftest(textwrap.dedent(COUNTING_CONFTEST.format(pipe=str(tiny_models["pipe"]))))
    return user_project


def calls(project: pytest.Pytester) -> dict[str, list[int]]:
    """Batch sizes of each process's pipeline calls in the last run (then forgets them)."""
    path = project.path / "calls.jsonl"
    out = {}
    for line in path.read_text().splitlines():
        record = json.loads(line)
        out[record["worker"]] = record["calls"]
    path.unlink()
    return out


def hashes(result: pytest.RunResult) -> dict[str, str]:
    return dict(re.findall(r"HASH (prompt number \d) (\w+)", result.stdout.str()))


def test_per_prompt_tests_with_a_plan_generate_in_full_batches_and_a_warm_rerun_loads_nothing(
        user_project: pytest.Pytester, tiny_models: dict[str, Path]) -> None:
    project = counting_project(user_project, tiny_models)
    project.makepyfile(test_planned=textwrap.dedent(PLANNED_TESTS))
    cold = project.runpytest("-v", "-s", "--diffeval-batch-size=8")
    cold.assert_outcomes(passed=8)
    assert calls(project) == {"main": [8, 8]}  # 16 samples in two full batches, not 8 calls of 2
    cold.stdout.fnmatch_lines(["diffeval features in this process: 24 computed, * from the cache *",
                               "diffeval plans in this process: 8 planned tests; 16 samples generated for them in "
                               "2 batches"])
    warm = project.runpytest("-v", "-s", "--diffeval-batch-size=8")
    warm.assert_outcomes(passed=8)
    assert calls(project) == {"main": []}
    warm.stdout.fnmatch_lines(["diffeval loads in this process: pipelines none",  # and no backbone
                               "diffeval images in this process: 0 generated, 16 from the cache *",
                               "diffeval metrics in this process: 0 computed, 8 from the cache *"])
    assert "diffeval features in this process" not in warm.stdout.str()  # no backbone pass either
    assert hashes(warm) == hashes(cold) and len(hashes(cold)) == 8
    uncached = project.runpytest("-v", "-s", "--diffeval-batch-size=8", "--diffeval-no-cache")
    uncached.assert_outcomes(passed=8)
    assert calls(project) == {"main": [8, 8]}  # batched through the in-memory store
    assert hashes(uncached) == hashes(cold)
    assert "diffeval features in this process" not in uncached.stdout.str()
    uncached.stdout.fnmatch_lines(["diffeval metrics in this process: 8 computed (no result cache)"])


OVERLAPPING_TESTS = """
    import hashlib, os, time
    import pytest
    from conftest import PIPE

    PROMPTS = [f"prompt number {i}" for i in range(4)]

    @pytest.mark.parametrize("seeds", [4, 2])
    def test_overlap(generate, seeds):
        if os.environ.get("PYTEST_XDIST_WORKER"):  # start both workers' generation together
            open(f"ready-{seeds}", "w").close()
            deadline = time.time() + 60
            while not all(os.path.exists(f"ready-{n}") for n in (4, 2)) and time.time() < deadline:
                time.sleep(0.01)
        images = generate(PIPE, PROMPTS, seeds=range(seeds), num_inference_steps=2, batch_size=2)
        with open(f"hashes-{seeds}.txt", "w") as handle:
            for prompt, seed, image in zip(images.prompts, images.seeds, images.images):
                handle.write(f"{prompt}|{seed}|{hashlib.sha256(image.tobytes()).hexdigest()}\\n")
"""


def test_workers_sharing_a_cache_never_generate_a_sample_twice(user_project: pytest.Pytester,
                                                               tiny_models: dict[str, Path]) -> None:
    """Two tests on two workers need 16 and 8 samples, the 8 among the 16: with claims on
    cache entries the workers split the 16 between them (without: 24 generated)."""
    project = counting_project(user_project, tiny_models)
    project.makepyfile(test_overlap=textwrap.dedent(OVERLAPPING_TESTS))
    result = project.runpytest("-n", "2", "-s", "-v")
    result.assert_outcomes(passed=2)
    per_worker = calls(project)
    assert sorted(per_worker) == ["gw0", "gw1", "main"] and per_worker["main"] == []
    assert sum(sum(batches) for batches in per_worker.values()) == 16, per_worker
    assert all(per_worker[w] for w in ("gw0", "gw1")), per_worker  # claimed batch by batch: both worked
    seen: dict[tuple[str, str], set[str]] = {}
    for name in ("hashes-4.txt", "hashes-2.txt"):
        for line in (project.path / name).read_text().splitlines():
            prompt, seed, digest = line.split("|")
            seen.setdefault((prompt, seed), set()).add(digest)
    assert len(seen) == 16 and all(len(digests) == 1 for digests in seen.values())  # both tests saw the same images
    assert not list((project.path / ".pytest_cache").rglob("*.claim")) and not list(project.path.rglob("*.claim"))


HELPED_TESTS = """
    import hashlib, os, time
    import pytest
    from conftest import PIPE

    PROMPTS = [f"prompt number {i}" for i in range(8)]

    @pytest.mark.diffeval_plan(PIPE, PROMPTS, seeds=range(4), num_inference_steps=2, batch_size=2)
    def test_big(generate):
        images = generate(PIPE, PROMPTS, seeds=range(4), num_inference_steps=2, batch_size=2)
        with open("hashes-big.txt", "w") as handle:
            for prompt, seed, image in zip(images.prompts, images.seeds, images.images):
                handle.write(f"{prompt}|{seed}|{hashlib.sha256(image.tobytes()).hexdigest()}\\n")

    def test_small(generate):
        generate(PIPE, ["something else"], seeds=[0, 1], num_inference_steps=2)
"""

SLOW_BATCHES = """
    def _slow(self, *args, **kwargs):  # a model whose batches take a while, as real ones do
        time.sleep(0.4)
        return _counting(self, *args, **kwargs)

    WRAPPER = _slow
"""


def test_an_idle_worker_helps_generate_another_workers_planned_samples(user_project: pytest.Pytester,
                                                                      tiny_models: dict[str, Path],
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """One planned test needs 32 samples (16 slow batches), the other 2: under ``-n 2`` the
    worker that finishes first takes batches of the big test's plan that its owner has not
    reached, so both workers generate and no sample is made twice; the big test's images
    are those of a serial run."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the serial run and each worker compute with one thread alike
    project = counting_project(user_project, tiny_models)
    conftest = project.path / "conftest.py"
    conftest.write_text("import time\n" + conftest.read_text() + textwrap.dedent(SLOW_BATCHES))
    project.makepyfile(test_helped=textwrap.dedent(HELPED_TESTS))

    serial = project.runpytest("-p", "no:cacheprovider", "--diffeval-no-cache")
    serial.assert_outcomes(passed=2)
    calls(project)
    expected = (project.path / "hashes-big.txt").read_text()
    assert not [p for p in project.path.rglob("*") if "memory" in p.name]  # no cache: no claim folder either

    result = project.runpytest("-n", "2", "-v")
    result.assert_outcomes(passed=2)
    per_worker = calls(project)
    assert sum(sum(batches) for batches in per_worker.values()) == 34, per_worker  # 32 + 2, none twice
    helped = {int(n): w for w, n in re.findall(r"diffeval help in (gw\d): (\d+) samples generated", result.stdout.str())}
    assert len(helped) == 1 and next(iter(helped)) > 0, result.stdout.str()
    helper = next(iter(helped.values()))
    assert sum(per_worker[helper]) == 2 + next(iter(helped)), per_worker  # its own test's 2, and the help
    assert (project.path / "hashes-big.txt").read_text() == expected
    assert not list(project.path.rglob("*.claim"))
