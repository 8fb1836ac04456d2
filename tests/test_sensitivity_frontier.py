"""The frontier builder of ``benchmarks/sensitivity.py --frontier`` (``benchmarks/frontier.py``):
the paired set-level rule re-decided over tolerance multipliers and bound confidences."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

from pytest_diffeval.set_verdicts import Z_ONE_SIDED, SetFeatures, compare_sets, noise_floor

ROOT = Path(__file__).resolve().parents[1]


def _load_frontier():
    """``benchmarks/frontier.py`` (benchmarks/ is not a package)."""
    name = "_benchmarks_frontier"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / "frontier.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    return module


frontier_module = _load_frontier()
Observation = frontier_module.Observation


def _observations() -> list:
    """Two checks.  ``a``: effect -share*10 with sd 1 at shares .05/.1/.2, tolerance 1; benign
    runs at effect -1.5 and -0.2 (sd 1).  ``b``: a fluke catch at .05 below a miss at .1."""
    obs = [Observation("a", 0.0, 0.0, 0.0, 1.0)]
    obs += [Observation("a", s, -10 * s, 1.0, 1.0) for s in (0.05, 0.1, 0.2)]
    obs += [Observation("a", "benign 0", -1.5, 1.0, 1.0), Observation("a", "benign 1", -0.2, 1.0, 1.0)]
    obs += [Observation("b", 0.0, 0.0, 0.0, 1.0), Observation("b", 0.05, -9.0, 0.0, 1.0),
            Observation("b", 0.1, 0.0, 0.0, 1.0), Observation("b", 0.2, -9.0, 0.0, 1.0),
            Observation("b", "benign 0", 0.0, 0.0, 1.0), Observation("b", "benign 1", 0.0, 0.0, 1.0)]
    return obs


def test_the_frontier_trades_false_alarms_for_power_per_k_and_z() -> None:
    rows = frontier_module.frontier(_observations(), ks=[0.0, 1.0], zs=[1.0, 0.0])
    by = {(r["k"], r["z"]): r for r in rows}
    assert len(rows) == 4 and all(r["benign"] == 4 for r in rows)
    # z=1, k=1: a at .2 is -2+1=-1, not < -1; nothing caught, no false alarm (-1.5+1 = -0.5)
    assert by[(1.0, 1.0)]["checks"]["a"]["first_caught"] is None and by[(1.0, 1.0)]["false_alarms"] == 0
    # z=0, k=1: a caught from .2 (-2 < -1), benign 0 (-1.5) is a false alarm
    assert by[(1.0, 0.0)]["checks"]["a"]["first_caught"] == 0.2 and by[(1.0, 0.0)]["false_alarms"] == 1
    # z=0, k=0: everything negative is caught: a from .05, both of a's benign runs false alarms
    assert by[(0.0, 0.0)]["checks"]["a"]["first_caught"] == 0.05 and by[(0.0, 0.0)]["false_alarms"] == 2
    # b's catch at .05 sits below a miss at .1: it counts from .2 only
    assert all(r["checks"]["b"]["first_caught"] == 0.2 for r in rows)
    assert all(r["fails_at_0"] == [] for r in rows)
    admissible = frontier_module.zero_false_alarm_points(rows)
    # z=1, k=0: benign 0 (-1.5 + 1 < 0) is a false alarm, so only k=1, z=1 has none
    assert by[(0.0, 1.0)]["false_alarms"] == 1 and by[(0.0, 1.0)]["checks"]["a"]["first_caught"] == 0.2
    assert [(r["k"], r["z"]) for r in admissible] == [(1.0, 1.0)]
    assert frontier_module.dominates(by[(1.0, 0.0)], by[(1.0, 1.0)])
    assert not frontier_module.dominates(by[(1.0, 1.0)], by[(1.0, 0.0)])
    lines = frontier_module.format_frontier(rows)
    assert len(lines) == 5 and "-" in lines[1 + rows.index(by[(1.0, 1.0)])].split()


def test_a_failure_at_share_zero_is_reported() -> None:
    obs = [Observation("a", 0.0, -1.0, 0.0, 0.5), Observation("a", "benign", 0.0, 0.0, 0.5)]
    (row,) = frontier_module.frontier(obs, ks=[1.0], zs=[0.0])
    assert row["fails_at_0"] == ["a"] and row["false_alarms"] == 0
    assert frontier_module.zero_false_alarm_points([row]) == []
    assert "0%!" in frontier_module.format_frontier([row])[1]


@pytest.mark.parametrize("metric", ["fid", "drift"])
def test_the_shipped_row_re_decides_like_compare_sets(metric: str) -> None:
    """k=1, z=1.645 is the shipped rule: re-deciding compare_sets' own (effect, sd, tolerance)
    gives its verdict, for shifts on both sides of the floor."""
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(16, 6)) * 2.0
    keys = [f"{s}|p{p}" for p in range(16) for s in range(4)]
    base = np.repeat(centres, 4, 0) + rng.normal(size=(64, 6))
    ref = np.repeat(centres, 4, 0) + rng.normal(size=(64, 6))
    reference = {"mean": ref.mean(0), "cov": np.cov(ref, rowvar=False), "features": ref}
    floor = noise_floor(metric, SetFeatures(base, keys), reference)
    verdicts = []
    for by in (0.0, 0.3, 3.0):
        cur = base.copy()
        cur[rng.permutation(64)[:16]] += by
        c = compare_sets(metric, "f", False, 0.0, 0.0, SetFeatures(cur, keys), SetFeatures(base, keys), reference, floor)
        again = frontier_module.regresses(c.effect, c.spread, c.tolerance, 1.0, Z_ONE_SIDED)
        assert again == (c.verdict == "regressed")
        verdicts.append(c.verdict)
    assert verdicts[0] == "pass" and verdicts[-1] == "regressed"
