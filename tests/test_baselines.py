"""Baselines end to end, run the way users run them (pytester, in a subprocess):
record -> pass -> regress -> fail -> update, missing / corrupt / mismatched baselines,
and the same under ``-n 2`` with no entry lost."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import load_file, save_file

from pytest_diffeval import settings

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


def write_test(project: pytest.Pytester, cases: int = 1, seeds: int = 2) -> None:
    project.makepyfile(test_user=USER_TEST.format(cases=cases, seeds=seeds))


def baseline_files(project: pytest.Pytester) -> list[Path]:
    return sorted((project.path / "baselines").rglob("*.json"))


def test_record_pass_regress_fail_update(project: pytest.Pytester) -> None:
    write_test(project)
    recorded = project.runpytest("--snapshot-update")
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

    project.runpytest().assert_outcomes(passed=1)

    darken(project.path / "model")
    failed = project.runpytest()
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

    project.runpytest("--snapshot-update").assert_outcomes(passed=1)
    updated = json.loads(file.read_text())["checks"]["brightness"]["hardware"]["cpu/float32"]
    assert updated["value"] < data["checks"]["brightness"]["hardware"]["cpu/float32"]["value"] - 1.0
    project.runpytest().assert_outcomes(passed=1)


def test_missing_baseline_fails_with_the_command_that_records_it(project: pytest.Pytester) -> None:
    write_test(project)
    result = project.runpytest()
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
def test_unusable_baseline_is_an_error_and_update_repairs_it(project: pytest.Pytester, content: str,
                                                            message: str) -> None:
    unusable_then_repaired(project, content, message, [])


def test_an_unusable_baseline_reads_the_same_under_xdist(project: pytest.Pytester) -> None:
    """The message is built in the worker and travels in its report: one case under ``-n 2``
    (the serial cases above cover each kind of damage)."""
    unusable_then_repaired(project, '{"format_version": 1, "checks": {"clip_score": ', "not valid JSON", ["-n", "2"])


def unusable_then_repaired(project: pytest.Pytester, content: str, message: str, xdist: list[str]) -> None:
    """Record, damage the file with ``content``: the run fails naming it and saying
    ``message``; an update repairs it (a newer format only once removed by hand).  Only the
    runs that judge the damaged file take ``xdist``."""
    write_test(project)
    project.runpytest("--snapshot-update").assert_outcomes(passed=1)
    [file] = baseline_files(project)
    file.write_text(content)
    result = project.runpytest(*xdist)
    result.assert_outcomes(failed=1)
    out = result.stdout.str()
    assert message in out and str(file) in out and "re-record it with: pytest --snapshot-update" in out
    if "newer" in message:  # an update must not drop what a newer version wrote
        refused = project.runpytest("--snapshot-update", *xdist)
        refused.assert_outcomes(failed=1)
        assert "will not overwrite it" in refused.stdout.str() and file.read_text() == content
        file.write_text("{}")
    project.runpytest("--snapshot-update", *xdist).assert_outcomes(passed=1)
    project.runpytest().assert_outcomes(passed=1)


def test_provenance_mismatch_names_the_difference(project: pytest.Pytester) -> None:
    write_test(project, seeds=2)
    project.runpytest("--snapshot-update").assert_outcomes(passed=1)
    write_test(project, seeds=3)
    result = project.runpytest()
    result.assert_outcomes(failed=1)
    out = result.stdout.str()
    assert "was recorded under other conditions" in out
    assert "seeds: baseline [0, 1], this run [0, 1, 2]" in out
    assert "n_samples: baseline 6, this run 9" in out


def test_other_backbone_is_a_mismatch_not_a_comparison(project: pytest.Pytester, tmp_path: Path) -> None:
    from pytest_diffeval import tiny

    write_test(project)
    project.runpytest("--snapshot-update").assert_outcomes(passed=1)
    other = tiny.build_tiny_clip(tmp_path / "other-clip", seed=1)
    result = project.runpytest(f"--diffeval-clip-model={other}")
    result.assert_outcomes(failed=1)
    assert "backbone: baseline 'tiny-clip@" in result.stdout.str() and "this run 'other-clip@" in result.stdout.str()


def test_unused_baselines_are_reported_and_removed_on_update(project: pytest.Pytester) -> None:
    write_test(project, cases=2)
    project.runpytest("--snapshot-update").assert_outcomes(passed=2)
    assert len(baseline_files(project)) == 2
    write_test(project, cases=1)
    result = project.runpytest()
    assert "unused" in result.stdout.str()
    project.runpytest("--snapshot-update").assert_outcomes(passed=1)
    assert [f.name for f in baseline_files(project)] == ["test_alignment[0].json"]


def test_xdist_records_compares_and_fails_without_losing_entries(project: pytest.Pytester) -> None:
    cases = 8
    write_test(project, cases=cases)
    project.runpytest("--snapshot-update", "-n", "2").assert_outcomes(passed=cases)
    files = baseline_files(project)
    assert len(files) == cases
    for file in files:
        assert set(json.loads(file.read_text())["checks"]) == {"brightness", "clip_score"}
    passed = project.runpytest("-n", "2")
    passed.assert_outcomes(passed=cases)
    assert passed.stdout.str().count("test_user.py::test_alignment[") >= 2 * cases  # summary rows from workers

    darken(project.path / "model")
    failed = project.runpytest("-n", "2")
    failed.assert_outcomes(failed=cases)
    # one failure per test; count the "E" lines only (the short summary repeats the message when the terminal is wide)
    caught = [line for line in failed.outlines if line.startswith("E ") and "brightness regressed against the baseline" in line]
    assert len(caught) == cases
    project.runpytest("--snapshot-update", "-n", "2").assert_outcomes(passed=cases)
    project.runpytest().assert_outcomes(passed=cases)  # every entry the workers rewrote holds
    assert len(baseline_files(project)) == cases


GPU_KEY = "cuda/NVIDIA H100 80GB HBM3 (sm90)/float16"


def test_baselines_are_kept_per_hardware(project: pytest.Pytester) -> None:
    write_test(project)
    project.runpytest("--snapshot-update").assert_outcomes(passed=1)
    [file] = baseline_files(project)
    data = json.loads(file.read_text())
    for check in data["checks"].values():  # pretend the baseline came from a GPU runner
        check["hardware"] = {GPU_KEY: check["hardware"]["cpu/float32"]}
    file.write_text(json.dumps(data))
    result = project.runpytest()
    result.assert_outcomes(failed=1)
    assert f"no baseline for 'clip_score' of this test on this hardware (cpu/float32; stored for: {GPU_KEY})" in result.stdout.str()
    project.runpytest("--snapshot-update").assert_outcomes(passed=1)
    checks = json.loads(file.read_text())["checks"]
    assert sorted(checks["clip_score"]["hardware"]) == sorted(["cpu/float32", GPU_KEY])
    project.runpytest().assert_outcomes(passed=1)


def test_hardware_best_match() -> None:
    from pytest_diffeval.hardware import hardware_key, select_entry

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


A100 = "cuda/NVIDIA A100-SXM4-80GB (sm80)/float16"


def test_hardware_best_match_prefers_the_same_compute_capability() -> None:
    """An H200 (sm90) run uses the H100 (sm90) entry although "A100" sorts first; without the
    same major capability, the nearest one; the dtype still comes first."""
    from pytest_diffeval.hardware import compute_capability, select_entry

    assert compute_capability("NVIDIA H100 80GB HBM3 (sm90)") == (9, 0)
    assert compute_capability("NVIDIA B200 (sm100)") == (10, 0)
    assert compute_capability("NVIDIA L40S (sm89)") == (8, 9)
    assert compute_capability("cpu") is None
    check = {"hardware": {A100: "a100", GPU_KEY: "h100", "cuda/NVIDIA H100 80GB HBM3 (sm90)/float32": "h100-fp32"}}
    assert select_entry(check, "cuda/NVIDIA H200 (sm90)/float16") == (GPU_KEY, "h100")
    assert select_entry(check, "cuda/NVIDIA L40S (sm89)/float16")[1] == "a100"  # same major (8)
    assert select_entry(check, "cuda/Tesla T4 (sm75)/float16")[1] == "a100"  # no sm7x: nearest is sm80
    assert select_entry(check, "cuda/NVIDIA B200 (sm100)/float16")[1] == "h100"  # no sm10x: nearest is sm90
    assert select_entry(check, "cuda/NVIDIA H200 (sm90)/float32")[1] == "h100-fp32"  # dtype first
    assert select_entry(check, "cuda/NVIDIA A100-SXM4-80GB (sm80)/float32")[1] == "h100-fp32"
    # No capability known on either side: the first key alphabetically, deterministically.
    assert select_entry({"hardware": {"cuda/B/float16": "b", "cuda/A/float16": "a"}}, "cuda/C/float16")[1] == "a"


def test_improvement_passes_with_a_hint_and_update_ratchets_the_baseline(project: pytest.Pytester) -> None:
    write_test(project)
    project.runpytest("--snapshot-update").assert_outcomes(passed=1)
    [file] = baseline_files(project)
    before = json.loads(file.read_text())["checks"]["brightness"]["hardware"]["cpu/float32"]["value"]
    darken(project.path / "model", amount=-0.5)  # brighter: better on this metric
    improved = project.runpytest("-W", "always")
    improved.assert_outcomes(passed=1)
    assert "brightness improved beyond its tolerance" in improved.stdout.str() and "improved" in improved.stdout.str()
    project.runpytest("--snapshot-update").assert_outcomes(passed=1)
    after = json.loads(file.read_text())["checks"]["brightness"]["hardware"]["cpu/float32"]["value"]
    assert after > before + 1.0


def test_calibration_stores_benign_noise_and_derives_the_tolerance(project: pytest.Pytester) -> None:
    write_test(project)
    project.runpytest("--snapshot-update").assert_outcomes(passed=1)
    [file] = baseline_files(project)
    assert "noise" not in json.loads(file.read_text())["checks"]["clip_score"]["hardware"]["cpu/float32"]
    # Calibrating a baseline that exists and still passes must store the noise all the same.
    project.runpytest("--snapshot-update", "--diffeval-calibrate=2").assert_outcomes(passed=1)
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
    result = project.runpytest()
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
    project.runpytest("--snapshot-update").assert_outcomes(passed=1)
    [file] = baseline_files(project)
    entry = json.loads(file.read_text())["checks"]["drift"]["hardware"]["cpu/float32"]
    sha = hashlib.sha256((file.parent / entry["details"]["statistics_file"]).read_bytes()).hexdigest()[:16]
    stats = file.with_name(f"test_drift.drift.cpu-float32.{sha}.safetensors")  # named by its content
    assert entry["details"]["statistics_file"] == stats.name and stats.is_file()
    assert entry["value"] == 0.0 and entry["details"]["seed_noise"] > 0
    assert entry["details"]["statistics_sha256"] == sha
    project.runpytest().assert_outcomes(passed=1)  # the same images: distance 0

    # A format-1 baseline (statistics under the old name, not named in the JSON) still reads,
    # and --snapshot-update migrates it to the content-addressed name.
    legacy = file.with_name("test_drift.drift.cpu-float32.safetensors")
    stats.rename(legacy)
    data = json.loads(file.read_text())
    data["format_version"] = 1
    del data["checks"]["drift"]["hardware"]["cpu/float32"]["details"]["statistics_file"]
    file.write_text(json.dumps(data, indent=2))
    project.runpytest().assert_outcomes(passed=1)
    project.runpytest("--snapshot-update").assert_outcomes(passed=1)
    migrated = json.loads(file.read_text())
    assert migrated["format_version"] == 2 and not legacy.exists() and stats.is_file()
    assert migrated["checks"]["drift"]["hardware"]["cpu/float32"]["details"]["statistics_file"] == stats.name

    darken(project.path / "model")
    failed = project.runpytest()
    failed.assert_outcomes(failed=1)
    assert "drift regressed against the baseline" in failed.stdout.str()

    stats.unlink()  # a baseline whose statistics were lost is unusable, never silently passed
    lost = project.runpytest()
    lost.assert_outcomes(failed=1)
    assert "statistics file beside it is missing or was changed" in lost.stdout.str()

    project.runpytest("--snapshot-update").assert_outcomes(passed=1)
    details = json.loads(file.read_text())["checks"]["drift"]["hardware"]["cpu/float32"]["details"]
    recorded = file.parent / details["statistics_file"]  # the darkened model's statistics: a new name
    assert recorded != stats and recorded.is_file() and recorded.name.endswith(f".{details['statistics_sha256']}.safetensors")
    assert [p.name for p in file.parent.glob("*.safetensors")] == [recorded.name]
    project.runpytest().assert_outcomes(passed=1)

    project.makepyfile(test_user=DRIFT_TEST.format(checks='diffeval_baseline.assert_no_regression(images, "clip_score")'))
    project.runpytest("--snapshot-update").assert_outcomes(passed=1)
    assert set(json.loads(file.read_text())["checks"]) == {"clip_score"}
    assert list(file.parent.glob("*.safetensors")) == []


# --------------------------------------------------------------------------- cheap projects
# Tests of the storage itself run a project without a pipeline: metrics of fixed random
# images (seeded by the test id), shifted by the OFFSET environment variable.

CHEAP_CONFTEST = """
import os
from pytest_diffeval.metrics import register_metric

OFFSET = float(os.environ.get("OFFSET", "0"))

@register_metric("level", absolute_tolerance=0.5)
def level(images):
    return images.images.reshape(len(images), -1).mean(axis=1) + OFFSET

@register_metric("spread", absolute_tolerance=0.5)
def spread(images):
    return images.images.reshape(len(images), -1).std(axis=1) + OFFSET
"""

CHEAP_TEST = """
import json
import os
import numpy as np
import pytest
from pytest_diffeval import ImageSet

@pytest.mark.parametrize("case", {ids!r})
def test_case(diffeval_baseline, case):
    rng = np.random.default_rng(sum(map(ord, case)))
    images = ImageSet(images=rng.integers(0, 255, (4, 8, 8, 3), dtype=np.uint8), prompts=["a", "b", "c", "d"],
                      seeds=[0] * 4, nonfinite=[False] * 4)
    tolerance = json.loads(os.environ.get("TOLERANCE", "null"))
    diffeval_baseline.assert_no_regression(images, {metrics!r}, tolerance=tolerance)
"""


def cheap_project(pytester: pytest.Pytester, files: dict[str, list[str]],
                  metrics: list[str] | str = "level") -> pytest.Pytester:
    pytester.makeconftest(CHEAP_CONFTEST)
    pytester.makepyfile(**{name: CHEAP_TEST.format(ids=ids, metrics=metrics) for name, ids in files.items()})
    return pytester


def snapshot_of(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_baselines_of_a_deleted_test_file_are_reported_and_removed_on_update(pytester: pytest.Pytester) -> None:
    cheap_project(pytester, {"test_one": ["x", "y"], "test_two": ["z"], "test_three": ["w"]})
    pytester.runpytest("--snapshot-update").assert_outcomes(passed=4)
    root = pytester.path / "baselines"
    assert sorted(p.parent.name for p in root.rglob("*.json")) == ["test_one", "test_one", "test_three", "test_two"]
    [two] = (root / "test_two").glob("*.json")
    assert json.loads(two.read_text())["test_file"] == "../test_two.py"
    kept = {name: snapshot_of(root / name) for name in ("test_one", "test_three")}

    (pytester.path / "test_two.py").unlink()
    reported = pytester.runpytest("--snapshot-details")
    reported.assert_outcomes(passed=3)
    assert reported.ret != 0  # syrupy fails a run that leaves unused baselines (without --snapshot-warn-unused)
    out = reported.stdout.str()
    assert "1 snapshot unused" in out and "test_case[z][level]" in out

    # test_three.py exists but is not collected: its baselines are not unused, only test_two's.
    updated = pytester.runpytest("--snapshot-update", "--ignore=test_three.py")
    updated.assert_outcomes(passed=2)
    assert "1 unused snapshot deleted" in updated.stdout.str()
    assert not (root / "test_two").exists()
    assert {name: snapshot_of(root / name) for name in ("test_one", "test_three")} == kept
    pytester.runpytest().assert_outcomes(passed=3)


def test_ids_that_clean_to_one_file_name_keep_separate_baselines(pytester: pytest.Pytester) -> None:
    """``a/b`` and ``ab`` both clean to ``ab``: the changed one gets a hash of its id, and each
    file stores the id it belongs to, checked on every read."""
    cheap_project(pytester, {"test_ids": ["a/b", "ab"]})
    pytester.runpytest("--snapshot-update").assert_outcomes(passed=2)
    folder = pytester.path / "baselines" / "test_ids"
    hashed = f"test_case[ab]~{hashlib.sha256(b'test_case[a/b]').hexdigest()[:8]}.json"
    assert sorted(p.name for p in folder.glob("*.json")) == sorted(["test_case[ab].json", hashed])
    slash, plain = json.loads((folder / hashed).read_text()), json.loads((folder / "test_case[ab].json").read_text())
    assert slash["test"] == "test_ids.py::test_case[a/b]" and plain["test"] == "test_ids.py::test_case[ab]"
    [slash_entry], [plain_entry] = slash["checks"]["level"]["hardware"].values(), plain["checks"]["level"]["hardware"].values()
    assert slash_entry["value"] != plain_entry["value"]  # different images: neither overwrote the other
    pytester.runpytest().assert_outcomes(passed=2)

    (folder / "test_case[ab].json").write_bytes((folder / hashed).read_bytes())  # the collision of old versions
    result = pytester.runpytest()
    result.assert_outcomes(passed=1, failed=1)
    assert "it was recorded for test 'test_ids.py::test_case[a/b]', not for this test 'test_ids.py::test_case[ab]'" \
        in result.stdout.str()
    pytester.runpytest("--snapshot-update").assert_outcomes(passed=2)
    assert json.loads((folder / "test_case[ab].json").read_text())["test"] == "test_ids.py::test_case[ab]"
    pytester.runpytest().assert_outcomes(passed=2)


def _set(entry: dict, field: str, value: object) -> None:
    target = entry
    *parents, last = field.split(".")
    for part in parents:
        target = target[int(part)] if isinstance(target, list) else target[part]
    if isinstance(target, list):
        target[int(last)] = value
    else:
        target[last] = value


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("value", "abc", ".value is 'abc', expected a finite number"),
        ("signature", "x", ".signature is 'x', expected an object"),
        ("value", float("nan"), ".value is nan, expected a finite number"),
        ("samples.1.value", float("inf"), ".samples[1].value is inf, expected a finite number"),
        ("samples.0", "x", ".samples[0] is 'x', expected"),
        ("details.statistics_file", "../../outside.safetensors", "a path elsewhere is refused"),
        ("noise", {"max_abs_effect": float("nan")}, ".noise.max_abs_effect is nan"),
    ],
    ids=["value-text", "signature-text", "value-nan", "sample-inf", "sample-text", "stats-path", "noise-nan"],
)
def test_a_malformed_entry_is_a_baseline_error_naming_the_field(pytester: pytest.Pytester, field: str,
                                                                value: object, message: str) -> None:
    cheap_project(pytester, {"test_bad": ["c"]})
    pytester.runpytest("--snapshot-update").assert_outcomes(passed=1)
    [file] = (pytester.path / "baselines").rglob("*.json")
    data = json.loads(file.read_text())
    [(key, entry)] = data["checks"]["level"]["hardware"].items()
    _set(entry, field, value)
    file.write_text(json.dumps(data))  # json writes NaN / Infinity literals, which json.loads accepts
    result = pytester.runpytest()
    result.assert_outcomes(failed=1)
    out = result.stdout.str()
    assert "BaselineError" in out and str(file) in out and f"checks.level.hardware[{key!r}]" in out
    assert message in out and "re-record it with: pytest --snapshot-update" in out
    assert "Traceback" not in out and "ValueError" not in out and "AttributeError" not in out
    pytester.runpytest("--snapshot-update").assert_outcomes(passed=1)
    pytester.runpytest().assert_outcomes(passed=1)


def test_a_missing_format_version_is_named_not_called_newer(pytester: pytest.Pytester) -> None:
    cheap_project(pytester, {"test_bad": ["c"]})
    pytester.runpytest("--snapshot-update").assert_outcomes(passed=1)
    [file] = (pytester.path / "baselines").rglob("*.json")
    data = json.loads(file.read_text())
    del data["format_version"]
    file.write_text(json.dumps(data))
    result = pytester.runpytest()
    result.assert_outcomes(failed=1)
    out = result.stdout.str()
    assert "it has no 'format_version'" in out and "is newer" not in out and "format_version None" not in out
    pytester.runpytest("--snapshot-update").assert_outcomes(passed=1)
    assert json.loads(file.read_text())["format_version"] == 2


def test_an_explicit_tolerance_per_metric(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    """Both metrics drop by exactly 0.5: a dict tolerance lets ``level`` pass (1.0) and
    fails ``spread`` (0.1); a float applies to both; an unknown name is an error."""
    cheap_project(pytester, {"test_tol": ["c"]}, metrics=["level", "spread"])
    pytester.runpytest("--snapshot-update").assert_outcomes(passed=1)
    monkeypatch.setenv("OFFSET", "-0.5")
    monkeypatch.setenv("TOLERANCE", json.dumps({"level": 1.0, "spread": 0.1}))
    per_metric = pytester.runpytest()
    per_metric.assert_outcomes(failed=1)
    out = per_metric.stdout.str()
    assert "spread regressed against the baseline" in out and "level regressed" not in out
    assert "-tolerance 0.1000" in out and "tolerance 0.1000 from: explicit" in out
    monkeypatch.setenv("TOLERANCE", "1.0")
    pytester.runpytest().assert_outcomes(passed=1)
    monkeypatch.setenv("TOLERANCE", "0.1")
    both = pytester.runpytest()
    both.assert_outcomes(failed=1)
    assert "spread regressed" in both.stdout.str() and "level regressed" in both.stdout.str()
    monkeypatch.setenv("TOLERANCE", json.dumps({"levle": 1.0}))
    typo = pytester.runpytest()
    typo.assert_outcomes(failed=1)
    assert "tolerance names 'levle', which this call does not check (metrics: 'level', 'spread')" in typo.stdout.str()


def test_resolve_tolerances() -> None:
    from pytest_diffeval.baselines import resolve_tolerances

    assert resolve_tolerances(["a", "b"], None) == {"a": None, "b": None}
    assert resolve_tolerances(["a", "b"], 0.5) == {"a": 0.5, "b": 0.5}
    assert resolve_tolerances(["a", "b"], {"a": 1.0, "b": 0.1}) == {"a": 1.0, "b": 0.1}
    assert resolve_tolerances(["a", "b"], {"b": 2}) == {"a": None, "b": 2.0}  # a keeps the derived one
    with pytest.raises(ValueError, match=r"tolerance names 'c', which this call does not check"):
        resolve_tolerances(["a", "b"], {"a": 1.0, "c": 1.0})
    with pytest.raises(ValueError, match=r"tolerance for 'a' must be a finite number >= 0.*got nan"):
        resolve_tolerances(["a"], float("nan"))


def test_update_refuses_to_overwrite_a_newer_format(pytester: pytest.Pytester) -> None:
    cheap_project(pytester, {"test_new": ["c"]})
    pytester.runpytest("--snapshot-update").assert_outcomes(passed=1)
    [file] = (pytester.path / "baselines").rglob("*.json")
    data = json.loads(file.read_text())
    data["format_version"] = 99
    data["checks"]["future_metric"] = {"something": "this version cannot read"}
    file.write_text(json.dumps(data))
    before = file.read_bytes()
    refused = pytester.runpytest("--snapshot-update")
    refused.assert_outcomes(failed=1)
    out = refused.stdout.str()
    assert "format_version 99 is newer than this pytest-diffeval understands" in out
    assert "will not overwrite it" in out and "upgrade pytest-diffeval" in out
    assert file.read_bytes() == before

    from pytest_diffeval.baselines import BaselineError, DiffevalBaselineExtension

    # The storage layer refuses too, whatever calls it.
    from syrupy.data import Snapshot, SnapshotCollection

    collection = SnapshotCollection(location=str(file))
    collection.add(Snapshot(name=f"{file.stem}[level]", data={"metric": "level", "value": 1.0, "signature": {}}))
    with pytest.raises(BaselineError, match="will not overwrite it"):
        DiffevalBaselineExtension.write_snapshot_collection(snapshot_collection=collection)
    assert file.read_bytes() == before


def test_update_refuses_to_record_a_non_finite_value(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    cheap_project(pytester, {"test_nan": ["c"]})
    monkeypatch.setenv("OFFSET", "nan")
    result = pytester.runpytest("--snapshot-update")
    result.assert_outcomes(failed=1)
    assert "metric 'level' gave a non-finite result" in result.stdout.str()  # compute_metric refuses it first
    assert list((pytester.path / "baselines").rglob("*.json")) == []


# --------------------------------------------------------------------------- judge, unit level


def _judge_inputs(value: float = 10.0, *, samples: list[float] | None = None, **stored_extra: object):
    from pytest_diffeval import ImageSet
    from pytest_diffeval.baselines import build_record
    from pytest_diffeval.metrics import MetricResult

    images = ImageSet(images=np.zeros((2, 8, 8, 3), dtype=np.uint8), prompts=["p", "q"], seeds=[0, 1],
                      call_kwargs={"num_inference_steps": 4, "height": 8, "width": 8})
    per_sample = np.array(samples) if samples is not None else None
    result = MetricResult("setlevel", value, "bb", False, per_sample=per_sample)
    record = build_record(result, images, {})
    entry = {**build_record(MetricResult("setlevel", 10.0, "bb", False,
                                         per_sample=np.array([10.0, 10.0]) if samples is not None else None),
                            images, {}), **stored_extra}
    return record, {"hardware": {"cpu/unknown": entry}}


@pytest.fixture
def setlevel_metric():
    from pytest_diffeval.metrics import _REGISTRY, register_metric

    register_metric("setlevel", higher_is_better=False, absolute_tolerance=0.5)(lambda images: None)
    yield
    _REGISTRY.pop("setlevel", None)


def test_judge_uses_twice_the_resampling_spread_for_set_level_metrics(setlevel_metric: None) -> None:
    from pytest_diffeval.baselines import SPREAD_FACTOR, judge, regression_message

    spread = 2.0
    record, stored = _judge_inputs(10.0 + SPREAD_FACTOR * spread * 0.9, details={"spread": spread})
    comparison = judge(record, stored, None)
    assert comparison.tolerance == SPREAD_FACTOR * spread and comparison.verdict == "pass"
    assert comparison.spread == spread and "resampling spread" in comparison.tolerance_source
    record, stored = _judge_inputs(10.0 + SPREAD_FACTOR * spread * 1.1, details={"spread": spread})
    worse = judge(record, stored, None)
    assert worse.verdict == "regressed"
    message = regression_message(worse, Path("b.json"), "pytest --snapshot-update t")
    band = SPREAD_FACTOR * spread
    assert f"resampling spread of the baseline: {spread:.4f}" in message
    assert f"{10.0 - band:.4f} .. {10.0 + band:.4f}" in message
    assert f"tolerance {band:.4f} from: {SPREAD_FACTOR:g} x the resampling spread" in message
    # A spread below the floor leaves the floor; calibrated noise and an explicit value are named too.
    record, stored = _judge_inputs(10.0, details={"spread": 0.1})
    assert judge(record, stored, None).tolerance_source == "the metric's floor"
    record, stored = _judge_inputs(10.0, noise={"max_abs_effect": 1.0})
    assert "calibrated noise" in judge(record, stored, None).tolerance_source
    assert judge(record, stored, 0.25).tolerance_source.startswith("explicit")


def test_judge_never_passes_a_non_finite_measurement(setlevel_metric: None) -> None:
    from pytest_diffeval.baselines import judge

    for bad in (float("nan"), float("inf")):
        record, stored = _judge_inputs(bad)
        assert judge(record, stored, 1e9).verdict == "regressed"
        record, stored = _judge_inputs(10.0, samples=[10.0, bad])
        assert judge(record, stored, 1e9).verdict == "regressed"


def test_judge_refuses_a_non_finite_baseline(setlevel_metric: None) -> None:
    from pytest_diffeval.baselines import Corrupt, judge

    record, stored = _judge_inputs(10.0)
    stored["hardware"]["cpu/unknown"]["value"] = float("nan")
    outcome = judge(record, stored, None)
    assert isinstance(outcome, Corrupt) and "value is nan, expected a finite number" in outcome.reason
    record, stored = _judge_inputs(10.0, samples=[10.0, 10.0])
    stored["hardware"]["cpu/unknown"]["samples"][1]["value"] = float("-inf")
    outcome = judge(record, stored, None)
    assert isinstance(outcome, Corrupt) and "samples[1].value is -inf" in outcome.reason


def _signature(**changes: object) -> dict:
    from pytest_diffeval import ImageSet
    from pytest_diffeval.baselines import signature
    from pytest_diffeval.metrics import MetricResult

    options = {"size": 8, "prompts": ["a red cube", "a blue ball"], "steps": 4, **changes}
    images = ImageSet(images=np.zeros((2, options["size"], options["size"], 3), dtype=np.uint8),
                      prompts=options["prompts"], seeds=[0, 1],
                      call_kwargs={"num_inference_steps": options["steps"], "height": options["size"],
                                   "width": options["size"]})
    return signature(MetricResult("clip_score", 1.0, "bb", True), images, {})


@pytest.mark.parametrize("change, expected", [
    ({"size": 16}, ["image_size: baseline [8, 8], this run [16, 16]", "call_kwargs: baseline"]),
    ({"steps": 2}, ["call_kwargs: baseline {'num_inference_steps': 4", "this run {'num_inference_steps': 2"]),
    ({"prompts": ["a red cube", "a blue cube"]}, ["prompts: the prompt list differs from the baseline's"]),
], ids=["resolution", "steps", "same-length-prompts"])
def test_provenance_differences_are_named(change: dict, expected: list[str]) -> None:
    from pytest_diffeval.baselines import signature_differences

    stored, current = _signature(), _signature(**change)
    assert signature_differences(stored, stored) == []
    differences = "\n".join(signature_differences(stored, current))
    assert all(text in differences for text in expected), differences


def test_judge_reports_a_provenance_difference_instead_of_comparing() -> None:
    from pytest_diffeval.baselines import judge

    stored_sig, current_sig = _signature(), _signature(prompts=["a red cube", "a blue cube"])
    entry = {"metric": "clip_score", "backbone": "bb", "higher_is_better": True, "value": 1.0,
             "signature": stored_sig}
    record = {**entry, "signature": current_sig, "value": 1.0}
    assert judge(record, {"hardware": {"cpu/unknown": entry}}, None) == \
        ["prompts: the prompt list differs from the baseline's"]


# --------------------------------------------------------------------------- the syrupy channel


def test_the_extension_judges_each_check_from_the_check_alone(setlevel_metric: None) -> None:
    """Tolerance, update mode and test id travel in the asserted BaselineCheck: one extension
    instance judges checks with different tolerances in any order and keeps no state."""
    from pytest_diffeval.baselines import BaselineCheck, DiffevalBaselineExtension, StoredCheck, judge

    record, stored = _judge_inputs(12.0)  # lower is better: 2.0 worse than the stored 10.0
    extension = DiffevalBaselineExtension()
    before = dict(vars(extension))
    recalled = StoredCheck("b.json", "t.py::test_x", stored)
    tolerances = (0.5, 5.0, 0.5)
    matched = [extension.matches(serialized_data=BaselineCheck(record, t, False, "t.py::test_x"), snapshot_data=recalled)
               for t in tolerances]
    assert matched == [judge(record, stored, t).verdict == "pass" for t in tolerances] == [False, True, False]
    # An improvement beyond the tolerance passes a normal run, and is rewritten by an update.
    better, stored = _judge_inputs(5.0)
    recalled = StoredCheck("b.json", "t.py::test_x", stored)
    assert [extension.matches(serialized_data=BaselineCheck(better, 0.5, updating, "t.py::test_x"),
                              snapshot_data=recalled) for updating in (False, True)] == [True, False]
    assert vars(extension) == before


def test_a_check_reads_its_outcome_from_syrupys_assertion_result(tmp_path: Path, setlevel_metric: None) -> None:
    """Through a real SnapshotAssertion: two checks of one test with different tolerances each
    get their own outcome, judged from syrupy's AssertionResult, and the extension instance
    is unchanged by them; a file recorded for another test is Corrupt."""
    from types import SimpleNamespace

    from syrupy.assertion import SnapshotAssertion
    from syrupy.exceptions import SnapshotDoesNotExist

    from pytest_diffeval.baselines import BaselineCheck, Corrupt, DiffevalBaselineExtension, assert_check, judge

    class InTmp(DiffevalBaselineExtension):
        @classmethod
        def dirname(cls, *, test_location: object) -> str:
            return str(tmp_path)

    class Session:  # what SnapshotAssertion asks of syrupy's session when nothing is written
        def register_request(self, assertion: object) -> None:
            pass

        def recall_snapshot(self, extension, test_location, index):  # noqa: ANN001, ANN202
            return extension.read_snapshot(test_location=test_location, index=index, session_id="s")

    record, stored = _judge_inputs(12.0)
    file = tmp_path / "test_x.json"
    file.write_text(json.dumps({"format_version": 2, "test": "t.py::test_x", "checks": {"setlevel": stored}}))
    snapshot = SnapshotAssertion(session=Session(), extension_class=InTmp, update_snapshots=False,
                                 test_location=SimpleNamespace(snapshot_name="test_x", filepath=str(tmp_path / "t.py")))
    before = dict(vars(snapshot.extension))
    strict, strict_outcome, strict_result = assert_check(snapshot, "setlevel",
                                                        BaselineCheck(record, 0.5, False, "t.py::test_x"))
    loose, loose_outcome, loose_result = assert_check(snapshot, "setlevel",
                                                     BaselineCheck(record, 5.0, False, "t.py::test_x"))
    assert (strict, strict_outcome.verdict) == (False, judge(record, stored, 0.5).verdict) == (False, "regressed")
    assert (loose, loose_outcome.verdict) == (True, judge(record, stored, 5.0).verdict) == (True, "pass")
    assert strict_result.recalled_data.check == stored and loose_result.success
    assert vars(snapshot.extension) == before
    other, outcome, _ = assert_check(snapshot, "setlevel", BaselineCheck(record, 5.0, False, "t.py::test_y"))
    assert not other and isinstance(outcome, Corrupt) and "recorded for test 't.py::test_x'" in outcome.reason
    with pytest.raises(SnapshotDoesNotExist):  # nothing stored for a metric: syrupy's "missing", no outcome
        snapshot.extension.read_snapshot(test_location=snapshot.test_location, index="level", session_id="s")
    assert assert_check(snapshot, "level", BaselineCheck({**record, "metric": "level"}, None, False,
                                                          "t.py::test_x"))[:2] == (False, None)


# --------------------------------------------------------------------------- statistics files


STATE_WRITER = """
import json, os, signal, sys
from pathlib import Path
import numpy as np
from syrupy.data import Snapshot, SnapshotCollection
from pytest_diffeval import baselines

path, fill, kill_at = Path(sys.argv[1]), float(sys.argv[2]), sys.argv[3]
if kill_at == "before-json":  # the new statistics file is written, the JSON not yet replaced
    baselines.extension.atomic_write_text = lambda *a: os.kill(os.getpid(), signal.SIGKILL)
if kill_at == "before-cleanup":  # the JSON is replaced, the old statistics file not yet deleted
    baselines.extension.remove_stale_sidecars = lambda *a: os.kill(os.getpid(), signal.SIGKILL)
record = {"metric": "drift", "backbone": "f", "higher_is_better": False, "value": 0.0, "signature": {},
          "details": {}, "provenance": {"device": "cpu", "dtype": "torch.float32"}, "_test": "t.py::test_x",
          "_state": {"tensors": {"real_features_sum": np.full(4, fill), "real_features_num_samples": np.array(8)},
                     "metadata": {"feature_id": "f", "preprocessing": "p"}}}
collection = SnapshotCollection(location=str(path))
collection.add(Snapshot(name="test_x[drift]", data=record))
baselines.DiffevalBaselineExtension.write_snapshot_collection(snapshot_collection=collection)
"""


def _write_state(tmp_path: Path, fill: float, kill_at: str = "") -> int:
    import subprocess
    import sys

    script = tmp_path / "writer.py"
    script.write_text(STATE_WRITER)
    return subprocess.run([sys.executable, str(script), str(tmp_path / "b" / "test_x.json"), str(fill), kill_at],
                          capture_output=True, timeout=300).returncode


def _statistics(file: Path) -> tuple[Path, str]:
    details = json.loads(file.read_text())["checks"]["drift"]["hardware"]["cpu/float32"]["details"]
    return file.parent / details["statistics_file"], details["statistics_sha256"]


def test_statistics_files_survive_a_kill_at_any_step_of_an_update(tmp_path: Path) -> None:
    """Statistics are content-addressed: the new file is written under a new name, the JSON
    replaced atomically, the old file deleted last.  SIGKILL between the steps leaves the
    old or the new baseline, each with the statistics it names."""
    import signal

    file = tmp_path / "b" / "test_x.json"
    assert _write_state(tmp_path, 1.0) == 0
    old, old_sha = _statistics(file)
    assert old.name == f"test_x.drift.cpu-float32.{old_sha}.safetensors"
    assert hashlib.sha256(old.read_bytes()).hexdigest()[:16] == old_sha

    assert _write_state(tmp_path, 2.0, "before-json") == -signal.SIGKILL
    assert _statistics(file) == (old, old_sha) and old.is_file()  # still the old baseline, whole
    assert hashlib.sha256(old.read_bytes()).hexdigest()[:16] == old_sha
    assert len(list(file.parent.glob("*.safetensors"))) == 2  # the new one, not yet named by the JSON

    assert _write_state(tmp_path, 3.0, "before-cleanup") == -signal.SIGKILL
    new, new_sha = _statistics(file)
    assert new_sha != old_sha and new.is_file() and hashlib.sha256(new.read_bytes()).hexdigest()[:16] == new_sha

    assert _write_state(tmp_path, 3.0) == 0  # the next update removes what killed runs left
    assert [p.name for p in file.parent.glob("*.safetensors")] == [new.name]


def test_update_removes_temp_files_of_killed_runs(tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    file = tmp_path / "b" / "test_x.json"
    assert _write_state(tmp_path, 1.0) == 0
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)  # a process that has exited
    left = [file.with_name(f".test_x.json.{pid}.123.tmp"),
            file.with_name(f"..test_x.drift.{pid}.1.tmp.{pid}.tmp")]
    live = file.with_name(f".test_x.json.{os.getpid()}.1.tmp")  # a writer that is still running
    other = file.with_name(f".test_y.json.{pid}.1.tmp")  # another test's: not this update's business
    for tmp in [*left, live, other]:
        tmp.write_text("partial")
    assert _write_state(tmp_path, 2.0) == 0
    assert not any(p.exists() for p in left) and live.exists() and other.exists()


def test_statistics_file_for_reads_both_name_schemes(tmp_path: Path) -> None:
    from pytest_diffeval.baselines import state_path, statistics_file_for

    file = tmp_path / "b" / "test_x.json"
    assert _write_state(tmp_path, 1.0) == 0
    new, _ = _statistics(file)
    assert statistics_file_for(file, "drift", "cpu/float32") == new
    data = json.loads(file.read_text())
    del data["checks"]["drift"]["hardware"]["cpu/float32"]["details"]["statistics_file"]
    file.write_text(json.dumps(data))
    assert statistics_file_for(file, "drift", "cpu/float32") == state_path(file, "drift", "cpu/float32") == \
        file.with_name("test_x.drift.cpu-float32.safetensors")
    data["checks"]["drift"]["hardware"]["cpu/float32"]["details"]["statistics_file"] = "../escape.safetensors"
    file.write_text(json.dumps(data))
    assert statistics_file_for(file, "drift", "cpu/float32") is None


EVERY_CHECK_TEST = """
import os
import numpy as np
from pytest_diffeval import ImageSet, assert_metric

def images_of(name):
    rng = np.random.default_rng(sum(map(ord, name)))
    return ImageSet(images=rng.integers(0, 255, (4, 8, 8, 3), dtype=np.uint8), prompts=["a", "b", "c", "d"],
                    seeds=[0] * 4, nonfinite=[False] * 4)

def test_three(diffeval_baseline):
    images = images_of("three")
    diffeval_baseline.assert_no_regression(images, "level")                        # fails under OFFSET
    assert_metric(images, "spread", at_least=0)                                    # passes
    assert_metric(images, "level", at_most=float(os.environ.get("MAX", "inf")))    # fails under MAX

def test_one(diffeval_baseline):
    diffeval_baseline.assert_no_regression(images_of("one"), "level")

def test_then_user_assert(diffeval_baseline):
    diffeval_baseline.assert_no_regression(images_of("user"), "level")
    assert os.environ.get("OFFSET") is None, "the user's own assert ran"
"""


def test_every_check_of_a_test_runs_and_the_test_fails_once_listing_each(
        pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 17: a failed check no longer hides the test's later checks.  ``test_three``'s first
    and third checks fail, its second still runs (a passing row in metrics.json and the
    table) and the test fails once listing both; a test whose only check fails says what it
    said before; a user ``assert`` after a failed check runs and both failures are shown."""
    pytester.makeconftest(CHEAP_CONFTEST)
    pytester.makepyfile(test_every=EVERY_CHECK_TEST)
    pytester.runpytest("--snapshot-update").assert_outcomes(passed=3)
    monkeypatch.setenv("OFFSET", "-5")  # level and spread drop by 5: level regresses, spread stays >= 0
    monkeypatch.setenv("MAX", "-1")
    run = pytester.runpytest("-p", "no:randomly")
    run.assert_outcomes(failed=3)
    out = run.stdout.str()

    checks = json.loads((pytester.path / "diffeval-results" / "metrics.json").read_text())["checks"]
    three = [(c["metric"], c["verdict"], c["passed"]) for c in checks if c["test"].endswith("::test_three")]
    assert three == [("level", "regressed", False), ("spread", "pass", True), ("level", "out of bounds", False)]
    table = out[out.index("diffeval: metric checks"):]
    assert len([line for line in table.splitlines() if "test_three" in line or "spread" in line]) >= 1
    assert "spread" in table and "out of bounds" in table and "regressed" in table

    three_failure = out[out.index("_ test_three _"):out.index("_ test_one _")]
    assert "pytest-diffeval: 2 checks of this test failed (every check ran):" in three_failure
    first, third = three_failure.index("[1] level regressed against the baseline"), three_failure.index("[2] level ")
    assert first < third and "outside the bound <= -1.0" in three_failure[third:]
    assert three_failure.count("images of this run:") == 2

    one_failure = out[out.index("_ test_one _"):out.index("_ test_then_user_assert _")]
    assert "AssertionError: pytest-diffeval: level regressed against the baseline" in one_failure
    assert "checks of this test failed" not in one_failure and "[1]" not in one_failure

    user_failure = out[out.index("_ test_then_user_assert _"):]
    assert "the user's own assert ran" in user_failure
    assert "pytest-diffeval: before this error, 1 check(s) of this test failed:" in user_failure
    assert "[1] level regressed against the baseline" in user_failure


def test_a_check_raises_at_once_outside_a_test_call_and_in_raise_at_once() -> None:
    """Outside a running test's call phase (a script, a fixture) and inside ``raise_at_once``
    a failed check raises; inside the call it is kept for the end of the test."""
    from pytest_diffeval.recording import check_failed, failed_checks_message, raise_at_once

    current = settings.current()
    kept: list[str] = []
    node = os.environ["PYTEST_CURRENT_TEST"].rsplit(" (", 1)[0]
    before, current.deferred_checks = current.deferred_checks, (node, kept)
    try:
        check_failed(None, "first")
        with raise_at_once(), pytest.raises(AssertionError, match="^pytest-diffeval: second$"):
            check_failed(None, "second")
        current.deferred_checks = ("tests/other.py::test_gone", kept)  # a stale list of another test
        with pytest.raises(AssertionError, match="^pytest-diffeval: third$"):
            check_failed(None, "third")
    finally:
        current.deferred_checks = before
    assert kept == ["pytest-diffeval: first"]
    assert failed_checks_message(kept) == "pytest-diffeval: first"
    assert failed_checks_message(["pytest-diffeval: a", "pytest-diffeval: b"]).splitlines() == [
        "pytest-diffeval: 2 checks of this test failed (every check ran):", "[1] a", "-" * 60, "[2] b"]


# --------------------------------------------------------------------------- torchrun: rank 0 decides


def test_outcomes_travel_as_json_and_come_back_equal() -> None:
    from pytest_diffeval.baselines.judge import Corrupt, NoEntry, outcome_from_json, outcome_json
    from pytest_diffeval.verdicts import Comparison, compare_paired

    paired = compare_paired("clip_score", "tiny", True, {"0|a": 30.0, "1|a": 31.5, "0|b": 29.0},
                            {"0|a": 31.0, "1|a": 32.0, "0|b": 30.5}, 30.17, 31.17, 0.1)
    assert isinstance(paired, Comparison) and paired.interval is not None and paired.moved
    paired.moved[0]["value"] = np.float32(1.5)  # numpy numbers, as metrics leave them
    paired.discordant = (np.int64(2), 1)
    for outcome in (paired, Corrupt("b.json", "bad"), NoEntry("cpu-float32", ["cuda-float16"]), ["seed differs"],
                    None):
        data = json.loads(json.dumps(outcome_json(outcome)))  # what a broadcast carries
        back = outcome_from_json(data)
        assert type(back) is type(outcome) and back == outcome, (outcome, back)
    assert outcome_from_json(outcome_json(paired)).interval == paired.interval  # a tuple again


def test_under_torchrun_every_rank_takes_rank_0s_verdict(monkeypatch: pytest.MonkeyPatch) -> None:
    """Rank 1 (which holds no per-image features of a set-level check) measured a pass; rank 0
    decided a regression: rank 1 reports rank 0's comparison, message and error class."""
    from pytest_diffeval import distributed
    from pytest_diffeval.baselines import fixture
    from pytest_diffeval.exceptions import BaselineError
    from pytest_diffeval.verdicts import compare_values

    decided = compare_values("fid", "clip", False, 30.0, 20.0, 2.0)
    assert decided.verdict == "regressed"
    sent: list[object] = []

    class Rank:
        def __init__(self, rank: int) -> None:
            self.rank = rank

        def broadcast_json(self, value: object, what: str) -> object:
            sent.append((self.rank, value, what))
            return sent[0][1]  # rank 0's, broadcast first

    monkeypatch.setattr(distributed, "current", lambda: Rank(0))
    zero = fixture.agreed("fid", decided, "fid regressed", AssertionError)
    monkeypatch.setattr(distributed, "current", lambda: Rank(1))
    one = fixture.agreed("fid", compare_values("fid", "clip", False, 20.5, 20.0, 2.0), None, BaselineError)
    assert one == zero == (decided, "fid regressed", AssertionError)
    assert sent[1][1] is None and sent[1][2] == "agree on the verdict of fid"  # rank 1 sends nothing
    monkeypatch.setattr(distributed, "current", lambda: None)
    assert fixture.agreed("fid", None, "no baseline", BaselineError) == (None, "no baseline", BaselineError)
