"""``python -m pytest_diffeval``: review stored baselines, merge results of several runners.

    python -m pytest_diffeval baselines list [DIR]        # what is stored (default: ./baselines)
    python -m pytest_diffeval baselines diff A B [--top N] # which numbers moved, and which samples
    python -m pytest_diffeval results merge DIR... --out DIR  # one metrics.json + report.html
    python -m pytest_diffeval shards plan --target 20m    # GitHub Actions matrix size for a wall time
    python -m pytest_diffeval convert-weights IN.pt OUT.safetensors  # a weights pickle to safetensors, once

A and B are baseline files or folders, or results directories of a run (their
``metrics.json``).  ``results merge`` takes the results directories of the shards of one
suite (``--diffeval-splits N --diffeval-group i``, one per CI runner) and combines the parts
of split generations (``diffeval_split``) into one value and verdict per metric; it exits 1
when such a merged verdict fails (no shard could judge it).  ``shards plan`` reads the
durations file (``--diffeval-store-durations``) and prints the fewest runners whose
time-balanced shards meet the target.  Exit status 0; 2 for input that cannot be read (the
message names it).
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from .convert_weights import ConversionError, convert
from .durations import DEFAULT_FILE, matrix_text, parse_wall_time, plan_matrix, read_durations
from .exceptions import DurationsError
from .review import ReviewError, diff, list_entries, load, merge_results


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pytest_diffeval",
                                     description="Review pytest-diffeval baselines and results.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    baselines = commands.add_parser("baselines", help="list or diff stored baselines",
                                    description="List or diff stored baselines.")
    actions = baselines.add_subparsers(dest="action", required=True, metavar="ACTION")
    listing = actions.add_parser("list", help="list stored baselines: test, metric, value, samples, provenance")
    listing.add_argument("dir", nargs="?", default="baselines",
                         help="baseline folder or file (default: ./baselines)")
    compare = actions.add_parser("diff", help="old value, new value and delta per test and metric, "
                                              "with the samples that moved most")
    compare.add_argument("a", help="old: baseline file or folder, or a results directory / metrics.json")
    compare.add_argument("b", help="new: baseline file or folder, or a results directory / metrics.json")
    compare.add_argument("--top", type=int, default=5, help="samples to show per metric (default 5)")
    results = commands.add_parser("results", help="merge the results directories of several runs",
                                  description="Work with results directories (metrics.json, images, report.html).")
    results_actions = results.add_subparsers(dest="action", required=True, metavar="ACTION")
    merge = results_actions.add_parser(
        "merge", help="merge results directories (e.g. one per CI shard) into one, with one HTML report",
        description="Merge results directories (metrics.json and the image folders of the checks) into --out and "
                    "regenerate the HTML report from the merged metrics.json.")
    merge.add_argument("dirs", nargs="+", help="results directories (each holds a metrics.json)")
    merge.add_argument("--out", required=True, help="the merged results directory (created)")
    merge.add_argument("--allow-duplicates", action="store_true",
                       help="a test in several directories: keep the later directory's results (default: an error)")
    merge.add_argument("--root", default=".", help="where to find baseline files recorded under another checkout "
                                                   "path, for the report's per-sample baseline columns (default: .)")
    shards = commands.add_parser("shards", help="plan CI shards from the durations file",
                                 description="Plan CI shards from the durations file.")
    shard_actions = shards.add_subparsers(dest="action", required=True, metavar="ACTION")
    plan = shard_actions.add_parser(
        "plan", help="the GitHub Actions matrix size that meets a target wall time per runner",
        description="Print the fewest runners (--diffeval-splits N) whose time-balanced shards, each model's load "
                    "counted once per runner that loads it, meet --target, and the workflow lines.")
    plan.add_argument("--target", required=True, help="wall time per runner: 20m, 1h30m, 90s or seconds")
    plan.add_argument("--durations", default=DEFAULT_FILE, help=f"the durations file (default: ./{DEFAULT_FILE})")
    plan.add_argument("--overhead", default="0s", help="fixed cost of each runner (checkout, install, imports), "
                                                       "e.g. 2m (default 0s)")
    convert_parser = commands.add_parser(
        "convert-weights", help="convert a weights pickle (.pt/.pth/.bin) to .safetensors, once",
        description="Read IN with torch.load(weights_only=True) (never a full unpickle) and write its tensors to "
                    "OUT (.safetensors), which scorers such as hps_v2 and image_reward then load.")
    convert_parser.add_argument("source", metavar="IN", help="the weights pickle")
    convert_parser.add_argument("out", metavar="OUT", help="the .safetensors file to write")
    convert_parser.add_argument("--allow-global", action="append", default=[], metavar="MODULE.NAME",
                                help="admit this class in the pickle (only for a file you trust), as torch's "
                                     "refusal names it, e.g. argparse.Namespace; repeatable")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit status."""
    args = _parser().parse_args(argv)
    try:
        if args.command == "convert-weights":
            converted = convert(args.source, args.out, args.allow_global)
            left = f"; left out {len(converted.dropped)} non-tensor entries" if converted.dropped else ""
            print(f"wrote {converted.tensors} tensors to {converted.out}{left}")
            return 0
        if args.command == "shards":
            target, overhead = parse_wall_time(args.target), parse_wall_time(args.overhead)
            planned = plan_matrix(read_durations(args.durations), target, overhead)
            print(matrix_text(planned, target, overhead, args.durations))
            return 0 if planned.met else 1
        if args.command == "results":
            merged = merge_results(args.dirs, args.out, allow_duplicates=args.allow_duplicates, root=args.root)
            for note in merged.notes:
                print(f"note: {note}", file=sys.stderr)
            print(f"merged {len(args.dirs)} results directories into {merged.out}: {merged.tests} tests "
                  f"({merged.failed_tests} failed), {merged.checks} metric checks ({merged.failed_checks} failed), "
                  f"{merged.images} image folders; {merged.out / 'metrics.json'}, {merged.out / 'report.html'}")
            if merged.split_checks:
                print(f"combined {merged.split_checks} split checks over their shards' parts ({merged.split_failed} "
                      "failed)")
            return 1 if merged.split_failed else 0
        if args.action == "list":
            source = load(args.dir, keep_going=True)
            list_entries(source, sys.stdout)
            for error in source.errors:
                print(f"error: {error}", file=sys.stderr)
            return 2 if source.errors else 0
        diff(load(args.a), load(args.b), sys.stdout, top=max(0, args.top))
        return 0
    except (ReviewError, DurationsError, ConversionError) as exc:
        message = str(exc).removeprefix("pytest-diffeval: ") if isinstance(exc, DurationsError) else str(exc)
        print(f"error: {message}", file=sys.stderr)
        return 2
    except OSError as exc:  # e.g. --out on a read-only or full disk
        print(f"error: {exc.filename or ''}: cannot write ({exc.strerror or exc}); fix: choose an --out on a "
              "writable disk with free space", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
