"""The plugin as users meet it: options, fixtures, caching, devices and GPU markers."""

from __future__ import annotations

import re

import pytest


def test_help_lists_the_options(pytester: pytest.Pytester) -> None:
    result = pytester.runpytest_subprocess("--help")
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
    result = user_project.runpytest_subprocess("-v")
    result.assert_outcomes(passed=6)
    result.stdout.fnmatch_lines(["diffeval loads in this process: pipelines *tiny-sd: 1*",
                                 "diffeval images in this process: 6 generated, 0 from the cache *"])
    rerun = user_project.runpytest_subprocess("-v")
    rerun.stdout.fnmatch_lines(["diffeval images in this process: 0 generated, 6 from the cache *"])
    uncached = user_project.runpytest_subprocess("-v", "--diffeval-no-cache")
    uncached.assert_outcomes(passed=6)
    assert "diffeval images in this process" not in uncached.stdout.str()
    two = user_project.runpytest_subprocess("-v", "-n", "2")
    two.assert_outcomes(passed=6)


def test_generated_images_are_deterministic_across_processes(user_project: pytest.Pytester) -> None:
    user_project.makepyfile(test_det="""
        import hashlib
        from conftest import PIPE

        def test_hash(generate):
            images = generate(PIPE, ["a", "b"], seeds=range(2), num_inference_steps=2)
            print("HASH", hashlib.sha256(images.images.tobytes()).hexdigest())
    """)
    hashes = [re.search(r"HASH (\w+)", user_project.runpytest_subprocess("-s").stdout.str()).group(1) for _ in range(2)]
    assert hashes[0] == hashes[1]


def test_gpu_marker_skips_with_a_reason_and_require_gpu_fails(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_gpu="""
        import pytest

        @pytest.mark.gpu
        def test_needs_gpu():
            pass
    """)
    skipped = pytester.runpytest_subprocess("-rs")
    skipped.assert_outcomes(skipped=1)
    skipped.stdout.fnmatch_lines(["*needs a CUDA GPU; run on a GPU machine with `pytest --diffeval-require-gpu`*"])
    required = pytester.runpytest_subprocess("--diffeval-require-gpu")
    assert required.ret != 0
    required.stderr.fnmatch_lines(["*--diffeval-require-gpu was given but no CUDA GPU is available*"])


def test_cuda_device_requested_without_cuda_is_a_usage_error(user_project: pytest.Pytester) -> None:
    user_project.makepyfile(test_dev="""
        def test_device(diffeval_device):
            pass
    """)
    result = user_project.runpytest_subprocess("--diffeval-device=cuda")
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
    result = user_project.runpytest_subprocess("-s", f"--diffeval-model={missing}")
    result.assert_outcomes(failed=1)
    assert "cannot load the diffusion model" in result.stdout.str() and str(missing) in result.stdout.str()
