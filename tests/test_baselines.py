"""Baselines end to end, run the way users run them (pytester, in a subprocess):
record -> pass -> regress -> fail -> update, missing / corrupt / mismatched baselines,
and the same under ``-n 2`` with no entry lost."""

from __future__ import annotations

import hashlib
import json
import shutil
import textwrap
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

USER_TEST = """
import pytest
from conftest import PIPE
from pytest_diffeval.metrics import register_metric

@register_metric("brightness", higher_is_better=True, absolute_tolerance=1.0)
def brightness(images):
    return images.images.reshape(len(images), -1).mean(axis=1)

PROMPTS = ["a red digit 3 on a blue background", "a green circle left of a red square", "a photo of a cat"]

@pytest.mark.parametrize("case", range({cases}))
def test_alignment(generate, diffeval_baseline, case):
    images = generate(PIPE, PROMPTS, seeds=range({seeds}), num_inference_steps=2)
    diffeval_baseline.assert_no_regression(images, "clip_score")
    diffeval_baseline.assert_no_regression(images, "brightness")
"""


def darken(model: Path, amount: float = 1.0) -> None:
    """Perturb the pipeline's weights: lower the VAE decoder's output bias, so every image
    gets darker (a regression with a known direction, whatever the random weights)."""
    file = model / "vae" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(str(file))
    tensors["decoder.conv_out.bias"] = tensors["decoder.conv_out.bias"] - amount
    save_file(tensors, str(file), metadata={"format": "pt"})


@pytest.fixture
def project(user_project: pytest.Pytester, tiny_models: dict[str, Path]) -> pytest.Pytester:
    """A user project with its own copy of the tiny model (so tests may perturb it)."""
    model = user_project.path / "model"
    shutil.copytree(tiny_models["pipe"], model)
    user_project.makeconftest(textwrap.dedent(f"""
        PIPE = {str(model)!r}
        CLIP = {str(tiny_models["clip"])!r}
    """))
    return user_project


def write_test(project: pytest.Pytester, cases: int = 1, seeds: int = 2) -> None:
    project.makepyfile(test_user=USER_TEST.format(cases=cases, seeds=seeds))


def baseline_files(project: pytest.Pytester) -> list[Path]:
    return sorted((project.path / "baselines").rglob("*.json"))


def test_record_pass_regress_fail_update(project: pytest.Pytester) -> None:
    write_test(project)
    recorded = project.runpytest_subprocess("--snapshot-update")
    recorded.assert_outcomes(passed=1)
    [file] = baseline_files(project)
    assert file == project.path / "baselines" / "test_user" / "test_alignment[0].json"
    data = json.loads(file.read_text())
    assert data["test"] == "test_user.py::test_alignment[0]"
    assert set(data["checks"]) == {"brightness", "clip_score"}
    clip = data["checks"]["clip_score"]["hardware"]["cpu/float32"]
    assert len(clip["samples"]) == 6  # 3 prompts x 2 seeds, per sample
    assert clip["signature"]["seeds"] == [0, 1]
    assert clip["provenance"]["pipeline_class"] == "StableDiffusionPipeline"
    assert clip["backbone"].startswith("tiny-clip@")

    project.runpytest_subprocess().assert_outcomes(passed=1)

    darken(project.path / "model")
    failed = project.runpytest_subprocess()
    failed.assert_outcomes(failed=1)
    out = failed.stdout.str()
    assert "brightness regressed against the baseline" in out
    assert "one-sided 95% bound" in out and "-tolerance 1.0000" in out
    assert "samples that moved most" in out and "a photo of a cat" in out
    assert "pytest --snapshot-update 'test_user.py::test_alignment[0]'" in out
    images = project.path / "diffeval-results" / "test_user.py__test_alignment[0]"
    assert f"images of this run: {images}" in out
    assert (images / "grid.png").is_file() and len(list(images.glob("0*.png"))) == 6
    assert "diffeval: metric checks" in out and "regressed" in out  # terminal summary row

    project.runpytest_subprocess("--snapshot-update").assert_outcomes(passed=1)
    updated = json.loads(file.read_text())["checks"]["brightness"]["hardware"]["cpu/float32"]
    assert updated["value"] < data["checks"]["brightness"]["hardware"]["cpu/float32"]["value"] - 1.0
    project.runpytest_subprocess().assert_outcomes(passed=1)


def test_missing_baseline_fails_with_the_command_that_records_it(project: pytest.Pytester) -> None:
    write_test(project)
    result = project.runpytest_subprocess()
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*no baseline for 'clip_score' of this test in *test_alignment[[]0[]].json*",
                                 "*record it with: pytest --snapshot-update 'test_user.py::test_alignment[[]0[]]'*"])


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"format_version": 1, "checks": {"clip_score": ', "not valid JSON"),
        ("", "not valid JSON"),
        ('{"format_version": 99, "checks": {}}', "format_version 99 is newer than this pytest-diffeval understands"),
        ('{"format_version": 1, "checks": {"clip_score": {"hardware": {"cpu/float32": {"metric": "clip_score"}}}}}',
         "lacks 'value' or 'signature'"),
    ],
    ids=["truncated", "empty", "newer-format", "incomplete-entry"],
)
def test_unusable_baseline_is_an_error_and_update_repairs_it(project: pytest.Pytester, content: str, message: str) -> None:
    write_test(project)
    project.runpytest_subprocess("--snapshot-update").assert_outcomes(passed=1)
    [file] = baseline_files(project)
    file.write_text(content)
    result = project.runpytest_subprocess()
    result.assert_outcomes(failed=1)
    out = result.stdout.str()
    assert message in out and str(file) in out and "re-record it with: pytest --snapshot-update" in out
    project.runpytest_subprocess("--snapshot-update").assert_outcomes(passed=1)
    project.runpytest_subprocess().assert_outcomes(passed=1)


def test_provenance_mismatch_names_the_difference(project: pytest.Pytester) -> None:
    write_test(project, seeds=2)
    project.runpytest_subprocess("--snapshot-update").assert_outcomes(passed=1)
    write_test(project, seeds=3)
    result = project.runpytest_subprocess()
    result.assert_outcomes(failed=1)
    out = result.stdout.str()
    assert "was recorded under other conditions" in out
    assert "seeds: baseline [0, 1], this run [0, 1, 2]" in out
    assert "n_samples: baseline 6, this run 9" in out


def test_other_backbone_is_a_mismatch_not_a_comparison(project: pytest.Pytester, tmp_path: Path) -> None:
    from pytest_diffeval import tiny

    write_test(project)
    project.runpytest_subprocess("--snapshot-update").assert_outcomes(passed=1)
    other = tiny.build_tiny_clip(tmp_path / "other-clip", seed=1)
    result = project.runpytest_subprocess(f"--diffeval-clip-model={other}")
    result.assert_outcomes(failed=1)
    assert "backbone: baseline 'tiny-clip@" in result.stdout.str() and "this run 'other-clip@" in result.stdout.str()


def test_unused_baselines_are_reported_and_removed_on_update(project: pytest.Pytester) -> None:
    write_test(project, cases=2)
    project.runpytest_subprocess("--snapshot-update").assert_outcomes(passed=2)
    assert len(baseline_files(project)) == 2
    write_test(project, cases=1)
    result = project.runpytest_subprocess()
    assert "unused" in result.stdout.str()
    project.runpytest_subprocess("--snapshot-update").assert_outcomes(passed=1)
    assert [f.name for f in baseline_files(project)] == ["test_alignment[0].json"]


def test_xdist_records_compares_and_fails_without_losing_entries(project: pytest.Pytester) -> None:
    cases = 8
    write_test(project, cases=cases)
    project.runpytest_subprocess("--snapshot-update", "-n", "2").assert_outcomes(passed=cases)
    files = baseline_files(project)
    assert len(files) == cases
    for file in files:
        assert set(json.loads(file.read_text())["checks"]) == {"brightness", "clip_score"}
    passed = project.runpytest_subprocess("-n", "2")
    passed.assert_outcomes(passed=cases)
    assert passed.stdout.str().count("test_user.py::test_alignment[") >= 2 * cases  # summary rows from workers

    darken(project.path / "model")
    failed = project.runpytest_subprocess("-n", "2")
    failed.assert_outcomes(failed=cases)
    # one failure per test; count the "E" lines only (the short summary repeats the message when the terminal is wide)
    caught = [line for line in failed.outlines if line.startswith("E ") and "brightness regressed against the baseline" in line]
    assert len(caught) == cases
    project.runpytest_subprocess("--snapshot-update", "-n", "2").assert_outcomes(passed=cases)
    project.runpytest_subprocess("-n", "2").assert_outcomes(passed=cases)
    assert len(baseline_files(project)) == cases


GPU_KEY = "cuda/NVIDIA H100 80GB HBM3 (sm90)/float16"


def test_baselines_are_kept_per_hardware(project: pytest.Pytester) -> None:
    write_test(project)
    project.runpytest_subprocess("--snapshot-update").assert_outcomes(passed=1)
    [file] = baseline_files(project)
    data = json.loads(file.read_text())
    for check in data["checks"].values():  # pretend the baseline came from a GPU runner
        check["hardware"] = {GPU_KEY: check["hardware"]["cpu/float32"]}
    file.write_text(json.dumps(data))
    result = project.runpytest_subprocess()
    result.assert_outcomes(failed=1)
    assert f"no baseline for 'clip_score' of this test on this hardware (cpu/float32; stored for: {GPU_KEY})" in result.stdout.str()
    project.runpytest_subprocess("--snapshot-update").assert_outcomes(passed=1)
    checks = json.loads(file.read_text())["checks"]
    assert sorted(checks["clip_score"]["hardware"]) == sorted(["cpu/float32", GPU_KEY])
    project.runpytest_subprocess().assert_outcomes(passed=1)


def test_hardware_best_match() -> None:
    from pytest_diffeval.baselines import hardware_key, select_entry

    assert hardware_key({"device": "cpu", "device_kind": "cpu", "dtype": "torch.float32"}) == "cpu/float32"
    assert hardware_key({"device": "cuda:1", "device_kind": "NVIDIA A100 (sm80)", "dtype": "torch.float16"}) == \
        "cuda/NVIDIA A100 (sm80)/float16"
    check = {"hardware": {GPU_KEY: "h100-fp16", "cuda/NVIDIA H100 80GB HBM3 (sm90)/bfloat16": "h100-bf16",
                          "cpu/float32": "cpu"}}
    assert select_entry(check, GPU_KEY) == (GPU_KEY, "h100-fp16")
    assert select_entry(check, "cuda/NVIDIA A100 (sm80)/float16")[1] == "h100-fp16"  # same type and dtype
    assert select_entry(check, "cuda/NVIDIA A100 (sm80)/float32")[1] in {"h100-fp16", "h100-bf16"}  # same type
    assert select_entry(check, "cpu/bfloat16") == ("cpu/float32", "cpu")
    assert select_entry({"hardware": {GPU_KEY: "gpu"}}, "cpu/float32") == (None, None)  # never across types


def test_improvement_passes_with_a_hint_and_update_ratchets_the_baseline(project: pytest.Pytester) -> None:
    write_test(project)
    project.runpytest_subprocess("--snapshot-update").assert_outcomes(passed=1)
    [file] = baseline_files(project)
    before = json.loads(file.read_text())["checks"]["brightness"]["hardware"]["cpu/float32"]["value"]
    darken(project.path / "model", amount=-0.5)  # brighter: better on this metric
    improved = project.runpytest_subprocess("-W", "always")
    improved.assert_outcomes(passed=1)
    assert "brightness improved beyond its tolerance" in improved.stdout.str() and "improved" in improved.stdout.str()
    project.runpytest_subprocess("--snapshot-update").assert_outcomes(passed=1)
    after = json.loads(file.read_text())["checks"]["brightness"]["hardware"]["cpu/float32"]["value"]
    assert after > before + 1.0


def test_calibration_stores_benign_noise_and_derives_the_tolerance(project: pytest.Pytester) -> None:
    write_test(project)
    project.runpytest_subprocess("--snapshot-update", "--diffeval-calibrate=2").assert_outcomes(passed=1)
    [file] = baseline_files(project)
    entry = json.loads(file.read_text())["checks"]["clip_score"]["hardware"]["cpu/float32"]
    noise = entry["noise"]
    assert noise["runs"] == 2 and noise["perturbations"] == [{"threads": 1}, {"batch_size": 1}]
    assert 0 <= noise["max_abs_effect"] < 0.5  # benign: far below the 1-point floor
    # A baseline whose stored noise is large gets a wide tolerance when none is given.
    entry["noise"]["max_abs_effect"] = 50.0
    data = json.loads(file.read_text())
    data["checks"]["brightness"]["hardware"]["cpu/float32"]["noise"] = {"runs": 2, "max_abs_effect": 50.0}
    file.write_text(json.dumps(data))
    darken(project.path / "model", amount=0.2)
    result = project.runpytest_subprocess()
    result.assert_outcomes(passed=1)  # a drop smaller than 3 x 50 is within the calibrated noise
    assert "150" in result.stdout.str()  # the terminal table shows the derived tolerance


DRIFT_TEST = """
from conftest import PIPE, CLIP

PROMPTS = ["a red digit 3 on a blue background", "a green circle left of a red square", "a photo of a cat"]

def test_drift(generate, diffeval_baseline):
    images = generate(PIPE, PROMPTS, seeds=range(4), num_inference_steps=2)
    {checks}
"""


def test_drift_keeps_statistics_beside_the_baseline_and_catches_a_change(project: pytest.Pytester) -> None:
    check = ('diffeval_baseline.assert_no_regression(images, "clip_score")\n    '
             'diffeval_baseline.assert_no_regression(images, "drift", features="clip:" + CLIP)')
    project.makepyfile(test_user=DRIFT_TEST.format(checks=check))
    project.runpytest_subprocess("--snapshot-update").assert_outcomes(passed=1)
    [file] = baseline_files(project)
    stats = file.with_name("test_drift.drift.cpu-float32.safetensors")
    assert stats.is_file()
    entry = json.loads(file.read_text())["checks"]["drift"]["hardware"]["cpu/float32"]
    assert entry["value"] == 0.0 and entry["details"]["seed_noise"] > 0
    assert entry["details"]["statistics_sha256"] == hashlib.sha256(stats.read_bytes()).hexdigest()[:16]
    project.runpytest_subprocess().assert_outcomes(passed=1)  # the same images: distance 0

    darken(project.path / "model")
    failed = project.runpytest_subprocess()
    failed.assert_outcomes(failed=1)
    assert "drift regressed against the baseline" in failed.stdout.str()

    stats.unlink()  # a baseline whose statistics were lost is unusable, never silently passed
    lost = project.runpytest_subprocess()
    lost.assert_outcomes(failed=1)
    assert "statistics file beside it is missing or was changed" in lost.stdout.str()

    project.runpytest_subprocess("--snapshot-update").assert_outcomes(passed=1)
    assert stats.is_file()
    project.runpytest_subprocess().assert_outcomes(passed=1)

    project.makepyfile(test_user=DRIFT_TEST.format(checks='diffeval_baseline.assert_no_regression(images, "clip_score")'))
    project.runpytest_subprocess("--snapshot-update").assert_outcomes(passed=1)
    assert not stats.exists() and set(json.loads(file.read_text())["checks"]) == {"clip_score"}
