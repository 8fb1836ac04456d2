"""False alarms and power of the paired verdict on pass/fail metrics (``digit_match``,
``colour_match``, ``good_image_rate``): the exact McNemar test against the paired t-test
it replaced, on simulated samples, through ``verdicts.compare_paired`` itself.

    python benchmarks/pass_fail_power.py [--n 64] [--rate 0.95] [--trials 1000]

Model: each of ``n`` (prompt, seed) samples passes with probability ``rate`` in the
baseline.  A benign rerun redraws every sample independently with the same probability
(harsher than a real rerun, which repeats most samples exactly: the same as comparing two
seed sets); a regression redraws it with ``rate - drop``.  Prints the false-alarm rate
(share of benign trials called "regressed") and, per drop, the detection rate, for both
tests, at tolerance 0 and at the metrics' default tolerance 0.05.  Nothing here is a test.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pytest_diffeval.verdicts import compare_paired  # noqa: E402


def regressed_share(n: int, rate: float, drop: float, tolerance: float, binary: bool, trials: int, seed: int) -> float:
    rng = np.random.default_rng(seed)
    keys = [f"{i % 2}|prompt {i // 2}" for i in range(n)]
    hits = 0
    for _ in range(trials):
        before = (rng.random(n) < rate).astype(np.float64)
        after = (rng.random(n) < rate - drop).astype(np.float64)
        c = compare_paired("digit_match", "sim", True, dict(zip(keys, after)), dict(zip(keys, before)),
                           float(after.mean()), float(before.mean()), tolerance, binary=binary)
        hits += c.verdict == "regressed"
    return hits / trials


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=64)
    parser.add_argument("--rate", type=float, default=0.95, help="baseline pass rate (digit_match measured 0.953)")
    parser.add_argument("--trials", type=int, default=1000)
    parser.add_argument("--drops", type=float, nargs="+", default=[0.05, 0.1, 0.15, 0.2, 0.25, 0.3])
    args = parser.parse_args()
    print(f"== pass/fail verdicts, n={args.n}, baseline pass rate {args.rate}, {args.trials} trials per cell")
    print(f"{'tolerance':>10} {'test':>9} {'false alarms':>13}" + "".join(f"{f'drop {d:g}':>10}" for d in args.drops))
    for tolerance in (0.0, 0.05):
        for name, binary in (("McNemar", True), ("paired t", False)):
            cells = [regressed_share(args.n, args.rate, drop, tolerance, binary, args.trials, seed)
                     for seed, drop in enumerate([0.0, *args.drops])]
            print(f"{tolerance:>10g} {name:>9} {cells[0]:>13.2%}" + "".join(f"{c:>10.1%}" for c in cells[1:]))


if __name__ == "__main__":
    main()
