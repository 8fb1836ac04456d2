"""One metric across CI runners: a ``diffeval_split`` test makes 1/N of its (prompt, seed)
samples on each shard and stores its part's feature statistics (FID/drift: Σf, Σfᵀf, n;
KID/CMMD: features); ``results merge`` combines them into the single run's value and verdict."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import numpy as np
import pytest

from pytest_diffeval.__main__ import main
from pytest_diffeval.exceptions import SplitError
from pytest_diffeval.generation import ImageSet
from pytest_diffeval.metrics import compute_metric
from pytest_diffeval.metrics.distribution import cmmd_mmd2, kid_mmd2
from pytest_diffeval.metrics.drift import save_statistics
from pytest_diffeval.metrics.statistics_files import STAT_KEYS, write_statistics
from pytest_diffeval.split import (
    WRITER,
    Part,
    SplitInfo,
    combine,
    part_file_name,
    read_part,
    record_part,
    sample_calls,
)


def test_sample_calls_cover_a_block_in_sample_order() -> None:
    for prompts, seeds, of in [(3, 3, 2), (1, 10, 4), (5, 1, 3), (4, 2, 8)]:
        total = prompts * seeds
        made = []
        for part in range(of):
            start = part * (total // of) + min(part, total % of)
            block = range(start, start + total // of + (part < total % of))
            calls = sample_calls(prompts, seeds, block)
            assert len(calls) <= 3
            made += [j * seeds + t for prompt_ids, positions in calls for j in prompt_ids for t in positions]
        assert made == list(range(total))  # every sample once, in the single run's order


def _part(metric: str, tmp_path: Path, index: int, block: range, total: int, tensors: dict[str, np.ndarray]) -> Part:
    path = tmp_path / f"{metric}-{index}.safetensors"
    write_statistics(tensors, path, {"feature_id": "f", "written_by": WRITER, "metric": metric, "test": "t",
                                     "part": str(index), "of": "2", "total": str(total),
                                     "sample_indices": json.dumps([block.start, block.stop]),
                                     "estimator": "unbiased"})
    return read_part(path, path)


def test_parts_combine_to_the_single_sets_value(tmp_path: Path) -> None:
    """FID from summed float64 statistics equals torchmetrics' FID of the whole set to ~1e-12;
    KID and CMMD on the same features, joined in sample order, are the same number exactly."""
    import torch
    from torchmetrics.image.fid import _compute_fid

    rng = np.random.default_rng(0)
    fake, real = rng.normal(0.4, 1.0, (37, 16)), rng.normal(0.5, 1.1, (29, 16))
    blocks = [range(0, 19), range(19, 37)]
    f, r = torch.from_numpy(fake), torch.from_numpy(real)
    single = float(_compute_fid(r.mean(0), torch.cov(r.T), f.mean(0), torch.cov(f.T)))
    parts = [_part("fid", tmp_path, i + 1, b, 37, {
        "real_features_sum": fake[b].sum(0), "real_features_cov_sum": fake[b].T @ fake[b],
        "real_features_num_samples": np.array(float(len(b))),
        "reference_mean": real.mean(0), "reference_cov": np.cov(real.T)}) for i, b in enumerate(blocks)]
    value, _ = combine("fid", parts[::-1])  # any order of shards
    assert value == pytest.approx(single, rel=1e-9) and value > 0
    for metric, exact in [("kid", kid_mmd2(f, r)), ("cmmd", cmmd_mmd2(f, r, True))]:
        parts = [_part(metric, tmp_path, i + 1, b, 37, {"features": fake[b], "reference_features": real})
                 for i, b in enumerate(blocks)]
        assert combine(metric, parts[::-1])[0] == exact  # the same features: the same number


SPLIT_TEST = """
    import pytest
    from conftest import PIPE
    from pytest_diffeval import assert_fid_below, assert_metric

    FEATURES = {features!r}

    @pytest.mark.diffeval_split
    def test_whole_set(generate):
        images = generate(PIPE, ["a cat", "a dog", "a red bird"], seeds=range(8), num_inference_steps=2)
        assert_fid_below(images, "ref", 1e9, features=FEATURES)
        assert_metric(images, "kid", reference="ref", features=FEATURES, at_most=1e9)
        assert_metric(images, "cmmd", reference="ref", at_most=-1e9)  # fails: judged on the whole set only
        assert_metric(images, "drift", baseline_stats="stats.safetensors", features=FEATURES, at_most=1e9)

    @pytest.mark.diffeval_model("other")
    def test_other():
        pass
"""


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_two_shards_merged_give_the_single_runs_values_and_verdicts(
        user_project: pytest.Pytester, tiny_models: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    project = user_project
    features = f"clip:{tiny_models['clip']}"
    rng = np.random.default_rng(1)
    # more samples than the tiny CLIP's 16 features on each side: full-rank covariances (with fewer, the
    # Fréchet distance's matrix square root turns float rounding of ~1e-17 into differences of ~1e-9)
    reference = ImageSet(images=rng.integers(0, 256, (24, 32, 32, 3), dtype=np.uint8), prompts=["r"] * 24,
                         seeds=list(range(24)))
    reference.save(project.path / "ref")
    for name in [p.name for p in (project.path / "ref").iterdir() if p.suffix != ".png" or p.stem == "grid"]:
        (project.path / "ref" / name).unlink()  # the reference folder: the 24 images only
    save_statistics(compute_metric("drift", reference, features=features).state, project.path / "stats.safetensors")
    project.makepyfile(test_split=textwrap.dedent(SPLIT_TEST.format(features=features)))

    single = project.runpytest("--diffeval-results", "single", "--diffeval-store-durations", "-p", "no:randomly")
    single.assert_outcomes(passed=1, failed=1)  # the CMMD bound fails on the whole set
    durations = json.loads((project.path / ".diffeval-durations.json").read_text())
    assert set(durations["tests"]) == {"test_split.py::test_whole_set", "test_split.py::test_other"}
    assert durations["tests"]["test_split.py::test_whole_set"]["group"] == "split"  # runs on every shard

    for group in (1, 2):
        shard = project.runpytest("--diffeval-splits", "2", "--diffeval-group", str(group),
                                  "--diffeval-results", f"shard{group}", "-p", "no:randomly")
        shard.assert_outcomes(passed=2 if group == 1 else 1)  # a part passes: no shard can judge the set
    parts = {}
    for group in (1, 2):
        checks = json.loads((project.path / f"shard{group}" / "metrics.json").read_text())["checks"]
        assert {c["verdict"] for c in checks} == {"partial"}
        assert all(c["images"] is None for c in checks)  # a part's images are not saved: it passes
        parts[group] = {c["metric"]: c["details"]["split_samples"] for c in checks}
    assert parts == {group: dict.fromkeys(["fid", "kid", "cmmd", "drift"], 12) for group in (1, 2)}

    out = project.path / "merged"
    code = main(["results", "merge", str(project.path / "shard1"), str(project.path / "shard2"), "--out", str(out)])
    assert code == 1  # the merged CMMD check fails, as in the single run
    assert "combined 4 split checks over their shards' parts (1 failed)" in capsys.readouterr().out
    merged = {c["metric"]: c for c in json.loads((out / "metrics.json").read_text())["checks"]}
    whole = {c["metric"]: c for c in json.loads((project.path / "single" / "metrics.json").read_text())["checks"]}
    assert set(merged) == set(whole) == {"fid", "kid", "cmmd", "drift"}
    for metric in whole:
        assert merged[metric]["value"] == pytest.approx(whole[metric]["value"], rel=1e-9, abs=1e-12), metric
        assert merged[metric]["verdict"] == whole[metric]["verdict"] and merged[metric]["details"]["n"] == 24
    assert merged["drift"]["value"] > 0 and merged["fid"]["value"] > 0

    # A missing shard is refused, naming the split and the fix; so is a forged part file name.
    assert main(["results", "merge", str(project.path / "shard1"), "--out", str(project.path / "m2")]) == 2
    assert "is split over 2 shards, and the merge has parts [1] (missing [2])" in capsys.readouterr().err
    metrics = json.loads((project.path / "shard2" / "metrics.json").read_text())
    metrics["checks"][0]["details"]["split_file"] = "../../stats.safetensors"
    (project.path / "shard2" / "metrics.json").write_text(json.dumps(metrics))
    assert main(["results", "merge", str(project.path / "shard1"), str(project.path / "shard2"),
                 "--out", str(project.path / "m3")]) == 2
    assert "contains '..'" in capsys.readouterr().err and not (project.path / "m3").exists()


def test_a_split_test_refuses_checks_it_cannot_combine() -> None:
    images = ImageSet(images=np.zeros((2, 8, 8, 3), np.uint8), prompts=["a", "b"], seeds=[0, 0], test_id="t.py::x")
    images.diffeval_split = SplitInfo(1, 2, range(0, 2), 4)
    with pytest.raises(SplitError, match="'clip_score' cannot be combined across shards"):
        record_part(images, "clip_score", {})
    with pytest.raises(SplitError, match="subset_size= is not supported"):
        record_part(images, "kid", {"reference": "ref", "subset_size": 4})
    assert STAT_KEYS[0] == "real_features_sum"
    # a second check of one metric in a test gets its own part file
    names = {part_file_name("t.py::x", "fid", 1, 2, k) for k in range(2)} | {part_file_name("t.py::y", "fid", 1, 2)}
    assert len(names) == 3
