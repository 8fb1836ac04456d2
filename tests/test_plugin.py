"""The plugin as users meet it: options, fixtures, caching, devices and GPU markers."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest


def test_help_lists_the_options(pytester: pytest.Pytester) -> None:
    result = pytester.runpytest("--help")
    result.stdout.fnmatch_lines(["*diffusion model quality tests (pytest-diffeval)*", "*--diffeval-device=*",
                                 "*--diffeval-clip-model=*", "*--diffeval-require-gpu*", "*--snapshot-update*",
                                 "*diffeval_baselines_dir*"])


def test_many_tests_one_model_load_per_worker(user_project: pytest.Pytester) -> None:
    user_project.makepyfile(test_many="""
        import numpy as np
        import pytest
        from conftest import PIPE

        @pytest.mark.parametrize("i", range(6))
        def test_uses_model(generate, diffusion_pipeline, diffeval_device, i):
            images = generate(PIPE, [f"prompt {i}"], seeds=[i], num_inference_steps=2)
            assert images.images.shape == (1, 32, 32, 3)
            assert diffusion_pipeline(PIPE) is diffusion_pipeline(PIPE)
            assert diffeval_device == "cpu"
    """)
    result = user_project.runpytest("-v")
    result.assert_outcomes(passed=6)
    result.stdout.fnmatch_lines(["diffeval loads in this process: pipelines *tiny-sd: 1*",
                                 "diffeval images in this process: 6 generated, 0 from the cache *"])
    rerun = user_project.runpytest("-v")
    rerun.stdout.fnmatch_lines(["diffeval images in this process: 0 generated, 6 from the cache *"])
    uncached = user_project.runpytest("-v", "--diffeval-no-cache")
    uncached.assert_outcomes(passed=6)
    assert "diffeval images in this process" not in uncached.stdout.str()
    two = user_project.runpytest("-v", "-n", "2")
    two.assert_outcomes(passed=6)


def test_generated_images_are_deterministic_across_processes(user_project: pytest.Pytester, tmp_path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """This process (after whatever the suite ran in it) and a fresh one, each with its own
    empty image cache, so both really generate."""
    user_project.makepyfile(test_det="""
        import os
        import numpy as np
        from conftest import PIPE

        def test_pixels(generate):
            images = generate(PIPE, ["a", "b"], seeds=range(2), num_inference_steps=2)
            np.save(os.environ["PIXELS_OUT"], images.images)
    """)
    pixels = []
    for run in range(2):
        out = tmp_path / f"pixels{run}.npy"
        monkeypatch.setenv("PIXELS_OUT", str(out))
        run_pytest = user_project.runpytest_subprocess if run else user_project.runpytest
        result = run_pytest("-v", f"--diffeval-cache-dir={tmp_path / f'cache{run}'}")
        result.assert_outcomes(passed=1)
        result.stdout.fnmatch_lines(["diffeval images in this process: 4 generated, 0 from the cache *"])
        pixels.append(np.load(out))
    assert pixels[0].shape == (4, 32, 32, 3)
    assert len({p.tobytes() for p in pixels[0]}) == 4  # four different images, not one repeated
    np.testing.assert_array_equal(pixels[0], pixels[1])


def test_gpu_marker_skips_with_a_reason_and_require_gpu_fails(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_gpu="""
        import pytest

        @pytest.mark.gpu
        def test_needs_gpu():
            pass
    """)
    skipped = pytester.runpytest("-rs")
    skipped.assert_outcomes(skipped=1)
    skipped.stdout.fnmatch_lines(["*needs a CUDA GPU; run on a GPU machine with `pytest --diffeval-require-gpu`*"])
    required = pytester.runpytest("--diffeval-require-gpu")
    assert required.ret != 0
    required.stderr.fnmatch_lines(["*--diffeval-require-gpu was given but no CUDA GPU is available*"])
    message = required.stderr.str()
    assert "fix: check `nvidia-smi`, CUDA_VISIBLE_DEVICES" in message
    assert "torch.cuda.is_available()" in message and "run without --diffeval-require-gpu" in message


def test_a_gpu_tests_missing_input_skips_or_fails_under_require_gpu() -> None:
    """``skip_or_fail`` (the hooks' and the example model tests' fixtures'): a skip naming what
    is missing; under ``--diffeval-require-gpu`` a failure saying why it is not a skip."""
    from pytest_diffeval import skip_or_fail

    class Config:
        def __init__(self, required: bool) -> None:
            self.required = required

        def getoption(self, name: str) -> bool:
            assert name == "diffeval_require_gpu"
            return self.required

    with pytest.raises(pytest.skip.Exception, match=r"^needs the CIFAR-10 test images$"):
        skip_or_fail(Config(False), "needs the CIFAR-10 test images")
    with pytest.raises(pytest.fail.Exception,
                       match=r"^needs the CIFAR-10 test images \(a failure, not a skip, under --diffeval-require-gpu\)$"):
        skip_or_fail(Config(True), "needs the CIFAR-10 test images")


def test_cuda_device_requested_without_cuda_is_a_usage_error(user_project: pytest.Pytester) -> None:
    user_project.makepyfile(test_dev="""
        def test_device(diffeval_device):
            pass
    """)
    result = user_project.runpytest("--diffeval-device=cuda")
    assert result.ret != 0
    assert "--diffeval-device=cuda but torch" in result.stdout.str() + result.stderr.str()


def test_model_override_points_tests_at_another_model(user_project: pytest.Pytester, tmp_path) -> None:
    user_project.makepyfile(test_override="""
        from conftest import PIPE

        def test_model(generate):
            images = generate(PIPE, ["a"], num_inference_steps=2)
            print("MODEL", images.provenance["model"])
    """)
    missing = tmp_path / "not-a-model"
    result = user_project.runpytest("-s", f"--diffeval-model={missing}")
    result.assert_outcomes(failed=1)
    assert "cannot load the diffusion model" in result.stdout.str() and str(missing) in result.stdout.str()


def test_a_regression_under_a_replacement_model_names_it_before_the_update_hint(user_project: pytest.Pytester,
                                                                               tiny_models: dict[str, Path]) -> None:
    """Recorded with the test's model, run with ``--diffeval-model`` pointing at a copy: the
    failure says the run used the replacement before it suggests ``--snapshot-update``."""
    candidate = user_project.path / "candidate"
    shutil.copytree(tiny_models["pipe"], candidate)
    user_project.makepyfile(test_replaced="""
        from conftest import PIPE
        from pytest_diffeval.metrics import register_metric

        @register_metric("h2_named_model", absolute_tolerance=0.5)
        def h2_named_model(images):  # lower for the candidate: a regression of known cause
            return [1.0 + i if "candidate" in images.provenance["model"] else 5.0 + i for i in range(len(images))]

        def test_model(generate, diffeval_baseline):
            images = generate(PIPE, ["a", "b"], num_inference_steps=2)
            diffeval_baseline.assert_no_regression(images, "h2_named_model")
    """)
    user_project.runpytest("--diffeval-no-cache", "--snapshot-update").assert_outcomes(passed=1)
    result = user_project.runpytest("--diffeval-no-cache", f"--diffeval-model={candidate}")
    result.assert_outcomes(failed=1)
    lines = result.stdout.lines
    said = next(i for i, line in enumerate(lines) if "this run used a replacement model" in line)
    assert str(candidate) in lines[said]
    assert said < next(i for i, line in enumerate(lines) if "--snapshot-update test_replaced.py::test_model" in line)


def add_ini_line(project: pytest.Pytester, line: str) -> None:
    ini = project.path / "tox.ini"  # written by the user_project fixture
    ini.write_text(ini.read_text().rstrip("\n") + f"\n{line}\n")


def test_ini_baselines_dir_moves_the_baselines(user_project: pytest.Pytester) -> None:
    add_ini_line(user_project, "diffeval_baselines_dir = review/stored")
    user_project.makepyfile(test_where="""
        from conftest import PIPE

        def test_recorded(generate, diffeval_baseline):
            images = generate(PIPE, ["a", "b"], num_inference_steps=2)
            diffeval_baseline.assert_no_regression(images, "clip_score")
            print("PATH", diffeval_baseline.path)
    """)
    recorded = user_project.runpytest("-s", "--snapshot-update")
    recorded.assert_outcomes(passed=1)
    expected = user_project.path / "review" / "stored" / "test_where" / "test_recorded.json"
    assert expected.is_file()
    assert not (user_project.path / "baselines").exists()
    recorded.stdout.fnmatch_lines([f"*PATH {expected}"])
    compared = user_project.runpytest()
    compared.assert_outcomes(passed=1)


FID_TEST = """
from conftest import PIPE

def test_fid(generate, diffeval_baseline):
    images = generate(PIPE, ["a", "b"], seeds=range(3), num_inference_steps=2)
    reference = generate(PIPE, ["a", "b"], seeds=range(3, 6), num_inference_steps=2)
    diffeval_baseline.assert_no_regression(images, "fid", reference=reference)
"""


def fid_backbone(project: pytest.Pytester) -> str:
    data = json.loads((project.path / "baselines" / "test_fid" / "test_fid.json").read_text())
    [entry] = data["checks"]["fid"]["hardware"].values()
    return entry["backbone"]


def test_fid_features_follow_the_ini_value_and_the_option(user_project: pytest.Pytester,
                                                          tiny_models: dict[str, Path]) -> None:
    """The recorded FID backbone is the ini's ``diffeval_fid_features``; the command-line
    option overrides it, and a baseline recorded with other features is not compared."""
    add_ini_line(user_project, "diffeval_fid_features = clip:diffeval/tiny-clip")
    user_project.makepyfile(test_fid=FID_TEST)
    user_project.runpytest("--snapshot-update").assert_outcomes(passed=1)
    assert fid_backbone(user_project).startswith("clip:diffeval/tiny-clip@")

    option = f"--diffeval-fid-features=clip:{tiny_models['clip']}"
    mismatch = user_project.runpytest(option)
    mismatch.assert_outcomes(failed=1)
    mismatch.stdout.fnmatch_lines(["*was recorded under other conditions*", "*backbone*clip:diffeval/tiny-clip@*"])
    user_project.runpytest(option, "--snapshot-update").assert_outcomes(passed=1)
    assert fid_backbone(user_project).startswith("clip:tiny-clip@")


def test_batch_size_below_one_is_refused_even_when_cached(user_project: pytest.Pytester) -> None:
    user_project.makepyfile(test_batch="""
        import pytest
        from conftest import PIPE

        def test_batch(generate):
            generate(PIPE, ["a"], num_inference_steps=1)  # now cached
            with pytest.raises(ValueError, match="batch_size must be >= 1, got 0; fix: pass a positive"):
                generate(PIPE, ["a"], num_inference_steps=1, batch_size=0)
    """)
    user_project.runpytest().assert_outcomes(passed=1)
    user_project.runpytest("--diffeval-batch-size=0").assert_outcomes(failed=1)


@pytest.mark.parametrize("choice, expected", [("auto", "1"), ("keep", "None"), ("3", "3")])
def test_worker_threads_one_limiter_that_honours_keep(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch,
                                                      choice: str, expected: str) -> None:
    """``--diffeval-worker-threads``: ``auto`` gives each of 2 workers its share of the CPUs this
    process may use, ``keep`` leaves torch's own choice (no OMP_NUM_THREADS set), a number is used."""
    import os

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    cpus = len(os.sched_getaffinity(0))
    expected = str(max(1, cpus // 2)) if choice == "auto" else expected
    pytester.makepyfile(test_threads="""
        import os
        import pytest

        @pytest.mark.parametrize("i", range(2))
        def test_threads(i, worker_id):
            with open(f"threads-{worker_id}.txt", "w") as handle:
                handle.write(str(os.environ.get("OMP_NUM_THREADS")))
    """)
    result = pytester.runpytest("-n", "2", f"--diffeval-worker-threads={choice}", "-p", "no:randomly")
    result.assert_outcomes(passed=2)
    seen = {path.read_text() for path in pytester.path.glob("threads-gw*.txt")}
    assert seen == {expected}
