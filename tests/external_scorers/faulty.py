"""Scorers that break the protocol on purpose (tests/test_metrics_external.py): a crash, a
hang with a grandchild, a NaN, too few values and words instead of numbers."""

import subprocess
import sys
import time


def crash(images, prompts, **options):
    raise RuntimeError("the scorer exploded on purpose")


def hang(images, prompts, pid_file=None, **options):
    """Start a grandchild (which must die with the group), then never answer."""
    grandchild = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    with open(pid_file, "w") as handle:
        handle.write(str(grandchild.pid))
    time.sleep(120)


def nan(images, prompts, **options):
    return [float("nan")] + [1.0] * (len(images) - 1)


def short(images, prompts, **options):
    return [1.0] * (len(images) - 1)


def words(images, prompts, **options):
    return ["high"] * len(images)
