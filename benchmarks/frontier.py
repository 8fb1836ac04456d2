"""The frontier of the paired set-level rule: which share of bad images each check catches
against how many benign runs it fails, over tolerance multipliers and bound confidences.

The shipped rule (``pytest_diffeval.set_verdicts.compare_sets``) regresses when the
one-sided bound ``effect + z * sd`` is worse than ``-tolerance`` (effect signed so that +
is better; ``z`` 1.645, the one-sided 95% bound; tolerance the recorded noise floor).  Its
inputs per comparison, ``(effect, sd, tolerance)``, do not depend on ``k`` or ``z``, so
``benchmarks/sensitivity.py --frontier`` computes each comparison once and this module
re-decides it for every ``k`` (the tolerance is ``k`` x the floor) and every ``z``: the
curve costs no extra metric computation.  Pure Python, no imports of the package, so a
unit test runs it in milliseconds.  Nothing here changes the shipped rule.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Union

Variant = Union[float, str]  # a share of bad images, or the name of a benign run


@dataclass(frozen=True)
class Observation:
    """One paired set-level comparison: ``check`` on ``variant`` (a share of bad images, a
    float; or a benign run, a name), with the rule's inputs."""

    check: str
    variant: Variant
    effect: float  # change on the full sets, + better
    sd: float  # std of the changes over the joint resamples
    tolerance: float  # the tolerance the shipped rule used (the noise floor)


def regresses(effect: float, sd: float, tolerance: float, k: float, z: float) -> bool:
    """The shipped rule with the tolerance scaled by ``k`` and the bound taken at ``z`` sd:
    ``effect + z * sd < -k * tolerance``."""
    return effect + z * sd < -k * tolerance


def caught_from(caught: dict[float, bool]) -> float | None:
    """The smallest share above 0 from which every larger measured share is caught (a catch
    below a miss is a fluke, not power); None when the largest share is missed."""
    first = None
    for share in sorted(s for s in caught if s > 0):
        if caught[share]:
            first = share if first is None else first
        else:
            first = None
    return first


def frontier(observations: Iterable[Observation], ks: Sequence[float], zs: Sequence[float]) -> list[dict[str, Any]]:
    """One row per ``(k, z)``: benign false alarms (all checks, and per check) out of the
    benign comparisons, the first share each check catches (:func:`caught_from`), and the
    checks that fail at share 0 (the baseline's own images: must be none)."""
    observations = list(observations)
    checks = list(dict.fromkeys(o.check for o in observations))
    rows = []
    for z in zs:
        for k in ks:
            per_check: dict[str, dict[str, Any]] = {}
            for check in checks:
                mine = [o for o in observations if o.check == check]
                decided = [(o, regresses(o.effect, o.sd, o.tolerance, k, z)) for o in mine]
                benign = [hit for o, hit in decided if isinstance(o.variant, str)]
                shares = {float(o.variant): hit for o, hit in decided if not isinstance(o.variant, str)}
                per_check[check] = {"first_caught": caught_from(shares), "false_alarms": sum(benign),
                                    "benign": len(benign), "fails_at_0": bool(shares.get(0.0, False))}
            rows.append({"k": k, "z": z,
                         "false_alarms": sum(c["false_alarms"] for c in per_check.values()),
                         "benign": sum(c["benign"] for c in per_check.values()),
                         "fails_at_0": [c for c, v in per_check.items() if v["fails_at_0"]],
                         "checks": per_check})
    return rows


def format_frontier(rows: Sequence[dict[str, Any]]) -> list[str]:
    """The rows as a text table: ``k x floor``, ``z``, false alarms / benign comparisons, and
    per check the first share caught (``-`` none) with its own false alarms in brackets."""
    if not rows:
        return []
    checks = list(rows[0]["checks"])
    lines = [f"{'k x floor':>9} {'z':>6} {'false alarms':>14}" + "".join(f"{c:>14}" for c in checks)]
    for row in rows:
        cells = []
        for check in checks:
            cell = row["checks"][check]
            share = cell["first_caught"]
            text = "-" if share is None else f"{share:.1%}".replace(".0%", "%")
            cells.append(f"{text} ({cell['false_alarms']}/{cell['benign']})")
        alarms = f"{row['false_alarms']}/{row['benign']}" + ("  0%!" if row["fails_at_0"] else "")
        lines.append(f"{row['k']:>9g} {row['z']:>6.3g} {alarms:>14}" + "".join(f"{c:>14}" for c in cells))
    return lines


def zero_false_alarm_points(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows with no benign false alarm and no failure at share 0: the admissible rules."""
    return [row for row in rows if row["false_alarms"] == 0 and not row["fails_at_0"] and row["benign"] > 0]


def dominates(row: dict[str, Any], reference: dict[str, Any]) -> bool:
    """``row`` catches every check at a share no larger than ``reference`` does, and at least
    one strictly smaller (None, never caught, counts as infinity)."""
    def share(r: dict[str, Any], check: str) -> float:
        value = r["checks"][check]["first_caught"]
        return math.inf if value is None else value

    pairs = [(share(row, c), share(reference, c)) for c in reference["checks"]]
    return all(a <= b for a, b in pairs) and any(a < b for a, b in pairs)
