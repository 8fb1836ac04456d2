"""One session spread over torch.distributed ranks (torchrun): the pure share/merge/statistics
functions, the launch detection and the -n refusal, the collectives on two real gloo ranks, a
dead rank named within the timeout, and (marker ``torchrun``, its own .ci/run step) a small
suite under ``torchrun --nproc_per_node=2`` against a single-process run."""

from __future__ import annotations

import json
import os
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

# --------------------------------------------------------------------------- pure functions


def test_shares_cover_every_sample_once_in_rank_order() -> None:
    for world in range(1, 6):
        for count in range(0, 14):
            blocks = [distributed.share(count, rank, world) for rank in range(world)]
            assert [i for block in blocks for i in block] == list(range(count))
            assert max(map(len, blocks)) - min(map(len, blocks)) <= 1
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


def _torchrun(*args: str, cwd: Path, timeout: float = 600, env: dict[str, str] | None = None,
              ) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "--tee", "3",
               *args]
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

SUITE_INI = """[pytest]
diffeval_clip_model = diffeval/tiny-clip
diffeval_fid_features = clip:diffeval/tiny-clip
filterwarnings =
    ignore::FutureWarning
    ignore::UserWarning
"""


def _values(results: Path) -> dict[tuple[str, str], tuple[Any, ...]]:
    """Each check's value, per-sample values and verdict, from metrics.json."""
    checks = json.loads((results / "metrics.json").read_text())["checks"]
    return {(c["test"], c["metric"]): (c["value"], c.get("samples"), c["verdict"]) for c in checks}


def _without_times(data: Any) -> Any:
    """A baseline's JSON without its ``recorded`` timestamps."""
    if isinstance(data, dict):
        return {k: _without_times(v) for k, v in data.items() if k != "recorded"}
    return [_without_times(v) for v in data] if isinstance(data, list) else data


def _rank_lines(output: str, rank: int) -> list[str]:
    prefix = f"[default{rank}]:"
    return [line[len(prefix):] for line in output.splitlines() if line.startswith(prefix)]


@pytest.mark.slow
@pytest.mark.torchrun
def test_a_suite_under_torchrun_equals_one_process_and_a_regression_fails_on_every_rank(tmp_path: Path) -> None:
    (tmp_path / "test_suite.py").write_text(SUITE)
    (tmp_path / "pytest.ini").write_text(SUITE_INI)
    pytest_args = ["-p", "no:cacheprovider", "-p", "no:randomly", "--diffeval-no-cache"]

    single = subprocess.run([sys.executable, "-m", "pytest", *pytest_args, "--snapshot-update",
                             "-o", "diffeval_baselines_dir=baselines-single", "--diffeval-results=results-single"],
                            cwd=tmp_path, env=_environment(), capture_output=True, text=True, timeout=600)
    assert single.returncode == 0, single.stdout[-3000:]

    summary = tmp_path / "step-summary.md"
    ranked = _torchrun("-m", "pytest", *pytest_args, "--snapshot-update", "-o", "diffeval_baselines_dir=baselines-dist",
                       "--diffeval-results=results-dist", "--junitxml=junit.xml", cwd=tmp_path,
                       env=_environment(GITHUB_STEP_SUMMARY=str(summary)))
    assert ranked.returncode == 0, ranked.stdout[-4000:] + ranked.stderr[-2000:]
    for rank in (0, 1):
        assert any("2 passed" in line for line in _rank_lines(ranked.stdout, rank)), ranked.stdout[-3000:]
        assert f"pytest-diffeval: rank {rank} of 2: exit status 0 (rank 0's)" in _rank_lines(ranked.stdout, rank)
    # The same values (every sample keeps its seed; pixels are gathered) and the same baselines.
    single_values, ranked_values = _values(tmp_path / "results-single"), _values(tmp_path / "results-dist")
    assert single_values.keys() == ranked_values.keys() and len(single_values) == 5
    for key, measured in single_values.items():
        assert ranked_values[key] == measured, key
    single_files = sorted(p.relative_to(tmp_path / "baselines-single") for p in (tmp_path / "baselines-single").rglob("*")
                          if p.is_file())
    dist_files = sorted(p.relative_to(tmp_path / "baselines-dist") for p in (tmp_path / "baselines-dist").rglob("*")
                        if p.is_file())
    assert single_files == dist_files and single_files
    for name in single_files:
        one, two = (tmp_path / "baselines-single" / name), (tmp_path / "baselines-dist" / name)
        if name.suffix == ".json":
            assert _without_times(json.loads(one.read_text())) == _without_times(json.loads(two.read_text())), name
        else:
            assert one.read_bytes() == two.read_bytes(), name
    # Only rank 0 wrote: one step summary appended (not two), rank 1 names no output file.
    assert summary.read_text().count("### pytest-diffeval:") == 1
    assert any("diffeval metrics:" in line for line in _rank_lines(ranked.stdout, 0))
    assert not any("diffeval metrics:" in line for line in _rank_lines(ranked.stdout, 1))
    assert (tmp_path / "junit.xml").is_file()

    # A planted regression (the embedded model's early checkpoint) fails on every rank.
    regressed = _torchrun("-m", "pytest", *pytest_args, "-o", "diffeval_baselines_dir=baselines-dist",
                          "--diffeval-results=results-regressed", "--diffeval-model=diffeval/tiny-t2i-undertrained",
                          cwd=tmp_path)
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
