"""The metric-result cache (metrics/result_cache.py): a rerun with nothing changed computes
no metric and imports no torch; a changed option, image or backbone weights file
recomputes exactly the results it affects; a corrupt entry is recomputed; user metrics
are cached only when they opt in; ``--diffeval-no-cache`` bypasses it."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from pytest_diffeval import settings
from pytest_diffeval.generation import ImageSet
from pytest_diffeval.metrics import _BUILTINS, compute_metric, get_metric, register_metric
from pytest_diffeval.metrics.result_cache import ResultCache
from pytest_diffeval.planning import COUNTERS

HEAVY = ("diffusers", "torch", "torchmetrics", "transformers")  # sorted
CALLS: list[str] = []


@register_metric("rc_brightness", cacheable=True)
def rc_brightness(images: Any, scale: float = 1.0) -> np.ndarray:
    CALLS.append("rc_brightness")
    return images.images.reshape(len(images), -1).mean(axis=1) * scale


@register_metric("rc_uncached")  # a user metric that did not opt in
def rc_uncached(images: Any) -> np.ndarray:
    CALLS.append("rc_uncached")
    return images.images.reshape(len(images), -1).std(axis=1)


@pytest.fixture
def cache(tmp_path: Path):
    """Settings with a result cache under ``tmp_path``; restored afterwards."""
    previous = settings.current()
    settings.configure(cache_dir=tmp_path / "cache", result_cache=True)
    COUNTERS.reset()
    CALLS.clear()
    yield tmp_path / "cache" / "results"
    settings.configure(cache_dir=previous.cache_dir, result_cache=previous.result_cache)
    COUNTERS.reset()


def image_set(seed: int, n: int = 4) -> ImageSet:
    rng = np.random.default_rng(seed)
    return ImageSet(images=rng.integers(0, 256, (n, 8, 8, 3), dtype=np.uint8),
                    prompts=[f"prompt {i}" for i in range(n)], seeds=list(range(n)))


def test_a_rerun_reads_the_result_and_a_changed_option_or_image_recomputes_only_its_own(cache: Path) -> None:
    a, b = image_set(0), image_set(1)
    first = {name: compute_metric("rc_brightness", images) for name, images in (("a", a), ("b", b))}
    assert CALLS == ["rc_brightness"] * 2 and COUNTERS.result_misses == 2
    again = compute_metric("rc_brightness", a)
    assert CALLS == ["rc_brightness"] * 2 and COUNTERS.result_hits == 1  # nothing computed
    assert again.value == first["a"].value and np.array_equal(again.per_sample, first["a"].per_sample)
    assert again.backbone == "custom" and again.higher_is_better

    compute_metric("rc_brightness", a, scale=2.0)  # another option: a miss
    compute_metric("rc_brightness", a, scale=1.0)  # the default, passed explicitly: the same key as before
    assert CALLS == ["rc_brightness"] * 3
    changed = ImageSet(images=a.images.copy(), prompts=a.prompts, seeds=a.seeds)
    changed.images[1] ^= 0xFF
    compute_metric("rc_brightness", changed)  # one changed image: that set misses, the other still hits
    compute_metric("rc_brightness", b)
    assert CALLS == ["rc_brightness"] * 4
    relabelled = ImageSet(images=a.images, prompts=a.prompts, seeds=[9, 1, 2, 3])
    compute_metric("rc_brightness", relabelled)  # seeds are part of the set's identity
    assert CALLS == ["rc_brightness"] * 5


def test_user_metrics_are_cached_only_when_they_opt_in(cache: Path) -> None:
    images = image_set(2)
    for _ in range(2):
        compute_metric("rc_uncached", images)
    assert CALLS == ["rc_uncached"] * 2 and COUNTERS.result_hits == 0 and not cache.exists()
    assert get_metric("rc_uncached").cacheable is False and get_metric("clip_score").cacheable is True


def test_a_corrupt_or_foreign_entry_is_recomputed_and_rewritten(cache: Path) -> None:
    images = image_set(3)
    expected = compute_metric("rc_brightness", images)
    [entry] = cache.rglob("*.safetensors")
    for garbage in (b"not a safetensors file", entry.read_bytes()[:40]):
        entry.write_bytes(garbage)
        result = compute_metric("rc_brightness", images)
        assert np.array_equal(result.per_sample, expected.per_sample)
    assert CALLS == ["rc_brightness"] * 3
    compute_metric("rc_brightness", images)  # rewritten: a hit again
    assert CALLS == ["rc_brightness"] * 3
    other = compute_metric("rc_brightness", image_set(4))
    shutil.copyfile(next(p for p in cache.rglob("*.safetensors") if p != entry), entry)  # another key's entry
    assert compute_metric("rc_brightness", images).value == expected.value != other.value
    assert CALLS == ["rc_brightness"] * 5


def test_an_entry_whose_arrays_were_changed_is_recomputed(cache: Path) -> None:
    """The entry's metadata (its key, metric, value) kept, its arrays replaced: a wrong
    dtype, an array its metadata does not list or a wrong shape is a miss, never a result."""
    from safetensors import safe_open
    from safetensors.numpy import load_file, save_file

    images = image_set(6)
    expected = compute_metric("rc_brightness", images)
    [entry] = cache.rglob("*.safetensors")
    with safe_open(str(entry), "np") as handle:
        metadata = handle.metadata()
    per_sample = load_file(str(entry))["per_sample"]
    for changed in ({"per_sample": per_sample.astype(np.int64)}, {"per_sample": per_sample, "state.extra": np.ones(3)},
                    {"per_sample": per_sample[:2].copy()}):
        save_file(changed, str(entry), metadata=metadata)
        result = compute_metric("rc_brightness", images)
        assert np.array_equal(result.per_sample, expected.per_sample) and result.per_sample.dtype.kind == "f"
    assert CALLS == ["rc_brightness"] * 4  # each recomputed (and rewritten)
    compute_metric("rc_brightness", images)
    assert CALLS == ["rc_brightness"] * 4


def test_no_cache_setting_and_unkeyable_options_bypass_it(cache: Path) -> None:
    images = image_set(5)
    settings.configure(result_cache=False)  # what --diffeval-no-cache sets
    compute_metric("rc_brightness", images)
    compute_metric("rc_brightness", images)
    assert CALLS == ["rc_brightness"] * 2 and not cache.exists()
    settings.configure(result_cache=True)
    compute_metric("rc_brightness", images, scale=np.float64(1.5))
    compute_metric("rc_brightness", images, scale=np.float64(1.5))
    assert CALLS == ["rc_brightness"] * 3

    class Opaque:  # no content identity: never cached
        def __rmul__(self, other: Any) -> Any:
            return other

    compute_metric("rc_brightness", images, scale=Opaque())
    compute_metric("rc_brightness", images, scale=Opaque())
    assert CALLS == ["rc_brightness"] * 5


def test_a_backbone_is_keyed_by_its_files(cache: Path, tmp_path: Path) -> None:
    weights = tmp_path / "checker"
    weights.mkdir()
    (weights / "model.safetensors").write_bytes(b"weights v1")
    register_metric("rc_backbone", backbone=str(weights), cacheable=True)(lambda images: np.zeros(len(images)))
    images = image_set(6)
    cache_ = ResultCache(cache)
    clip = get_metric("clip_score")
    clip_dir = tmp_path / "clip"
    shutil.copytree(weights, clip_dir)
    settings.configure(clip_model=str(clip_dir))
    try:
        keys = [cache_.key(get_metric("rc_backbone"), images, {}), cache_.key(clip, images, {}),
                cache_.key(clip, images, {"clip_model": str(clip_dir)})]
        assert keys[1] == keys[2]  # left to the settings or passed: the same backbone, the same key
        (weights / "model.safetensors").write_bytes(b"weights v2")
        (clip_dir / "model.safetensors").write_bytes(b"weights v2")
        changed = [cache_.key(get_metric("rc_backbone"), images, {}), cache_.key(clip, images, {})]
        assert changed[0] != keys[0] and changed[1] != keys[1]
        assert cache_.key(clip, images, {"clip_model": "no-such/hub-model"}) is None  # not in the HF cache
        assert cache_.key(get_metric("fid"), images, {"reference": images, "features": object()}) is None
    finally:
        settings.configure(clip_model=settings.DEFAULT_CLIP_MODEL)


def test_warnings_of_the_computation_are_raised_again_on_a_hit(cache: Path) -> None:
    @register_metric("rc_warns", cacheable=True)
    def warns(images: Any) -> np.ndarray:
        warnings.warn("pytest-diffeval: few images", UserWarning, stacklevel=2)
        return np.zeros(len(images))

    images = image_set(7)
    for _ in range(2):
        with pytest.warns(UserWarning, match="few images"):
            compute_metric("rc_warns", images)
    assert COUNTERS.result_hits == 1


def test_a_cached_drift_result_rewrites_the_same_statistics(cache: Path, tmp_path: Path,
                                                              tiny_models: dict[str, Path]) -> None:
    from pytest_diffeval.metrics.drift import load_statistics, save_statistics

    images = image_set(8, n=6)
    features = f"clip:{tiny_models['clip']}"
    computed = compute_metric("drift", images, features=features, device="cpu")
    cached = compute_metric("drift", images, features=features, device="cpu")
    assert COUNTERS.result_hits == 1 and isinstance(cached.state["tensors"]["real_features_sum"], np.ndarray)
    assert cached.details == computed.details and cached.state["metadata"] == computed.state["metadata"]
    first, second = tmp_path / "computed.safetensors", tmp_path / "cached.safetensors"
    save_statistics(computed.state, first)  # torch tensors
    save_statistics(cached.state, second)  # numpy arrays, written without torch
    for a, b in zip(load_statistics(first, computed.backbone), load_statistics(second, computed.backbone)):
        assert a.dtype == b.dtype and bool((a == b).all())


def test_metric_modules_and_a_cache_hit_import_no_torch(tmp_path: Path) -> None:
    """The warm path of every built-in: importing its module and keying its call."""
    script = textwrap.dedent(f"""
        import sys, numpy as np
        import pytest_diffeval.plugin, pytest_diffeval.embedded.metrics
        from pytest_diffeval import settings
        from pytest_diffeval.generation import ImageSet
        from pytest_diffeval.metrics import _BUILTINS, get_metric
        from pytest_diffeval.metrics.result_cache import ResultCache
        settings.configure(clip_model="diffeval/tiny-clip", fid_features="clip:diffeval/tiny-clip")
        images = ImageSet(images=np.zeros((2, 8, 8, 3), np.uint8), prompts=["a", "b"], seeds=[0, 1])
        cache = ResultCache({str(tmp_path)!r})
        keys = [cache.key(get_metric(name), images, {{"reference": images}} if name in ("fid", "kid", "cmmd") else {{}})
                for name in [*_BUILTINS, "digit_match"]]
        assert settings.resolved_device() == "cpu"
        print(sum(k is not None for k in keys), sorted(m for m in {HEAVY!r} if m in sys.modules))
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})  # a GPU machine asks torch for its GPUs
    assert done.returncode == 0, done.stderr
    keyed, heavy = done.stdout.split(maxsplit=1)
    assert int(keyed) == len(_BUILTINS) + 1 and heavy.strip() == "[]", done.stdout


# --------------------------------------------------------------------------- end to end

PROJECT_CONFTEST = """
    import json, sys

    PIPE = {pipe!r}

    def pytest_sessionfinish(session):
        with open("heavy.json", "w") as handle:
            json.dump(sorted(m for m in {heavy!r} if m in sys.modules), handle)
"""

PROJECT_TESTS = """
    import os
    from conftest import PIPE
    from pytest_diffeval import compute_metric
    from pytest_diffeval.metrics import register_metric

    @register_metric("brightness", cacheable=True)
    def brightness(images, scale=1.0):
        print("COMPUTED brightness")
        return images.images.mean(axis=(1, 2, 3)) * scale

    @register_metric("darkness")  # did not opt in: computed on every run
    def darkness(images):
        print("COMPUTED darkness")
        return 255 - images.images.mean(axis=(1, 2, 3))

    def test_metrics(generate):
        images = generate(PIPE, ["a red apple", "a blue car"], seeds=[0, 1], num_inference_steps=2)
        compute_metric("clip_score", images)
        compute_metric("brightness", images, scale=float(os.environ.get("DIFFEVAL_TEST_SCALE", "1")))
        compute_metric("darkness", images)
"""


def test_end_to_end_a_warm_rerun_computes_nothing_and_imports_no_torch(
        pytester: pytest.Pytester, tiny_models: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    from pytest_diffeval.tiny import perturb_weights

    clip = pytester.path / "clip"
    shutil.copytree(tiny_models["clip"], clip)
    pytester.makeconftest(textwrap.dedent(PROJECT_CONFTEST.format(pipe=str(tiny_models["pipe"]), heavy=HEAVY)))
    pytester.makeini(f"[pytest]\ndiffeval_clip_model = {clip}\nfilterwarnings = ignore::FutureWarning\n")
    pytester.makepyfile(test_project=textwrap.dedent(PROJECT_TESTS))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")

    def run(*args: str, fresh: bool = False) -> tuple[str, list[str]]:
        """``fresh``: in a new process, where what was imported is the subject."""
        run_pytest = pytester.runpytest_subprocess if fresh else pytester.runpytest
        result = run_pytest("-v", "-s", *args)
        result.assert_outcomes(passed=1)
        out = result.stdout.str()
        metrics = [line for line in out.splitlines() if line.startswith("diffeval metrics in this process")]
        computed = sorted(re.findall(r"COMPUTED (\w+)", out))
        return (metrics[0] if metrics else ""), computed + json.loads((pytester.path / "heavy.json").read_text())

    line, what = run()
    assert line.startswith("diffeval metrics in this process: 3 computed, 0 from the cache ")
    assert what == ["brightness", "darkness", *HEAVY]

    line, what = run(fresh=True)  # nothing changed: only the metric that did not opt in is computed, no torch
    assert line.startswith("diffeval metrics in this process: 1 computed, 2 from the cache ")
    assert what == ["darkness"]

    monkeypatch.setenv("DIFFEVAL_TEST_SCALE", "2")  # one option changed: that result alone
    line, what = run(fresh=True)
    assert line.startswith("diffeval metrics in this process: 2 computed, 1 from the cache ")
    assert what == ["brightness", "darkness"]
    monkeypatch.delenv("DIFFEVAL_TEST_SCALE")

    perturb_weights(clip, ".", scale=0.05)  # the CLIP backbone's weights file changed: clip_score alone
    line, what = run(fresh=True)
    assert line.startswith("diffeval metrics in this process: 2 computed, 1 from the cache ")
    assert what == ["darkness", "torch", "torchmetrics", "transformers"]  # CLIP, but no pipeline

    line, what = run("--diffeval-no-cache")
    assert line == "diffeval metrics in this process: 3 computed (no result cache)"
    assert what == ["brightness", "darkness", *HEAVY]
