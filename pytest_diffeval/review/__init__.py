"""Reviewing baselines and results: list what is stored, diff two sets of numbers (two
baseline files or folders, or a baseline folder and a results directory's ``metrics.json``)
so a reviewer of a baseline update sees which numbers moved and which samples moved most,
and merge the results directories of several runners (shards) into one.

``python -m pytest_diffeval baselines list [DIR]``, ``... baselines diff A B`` and
``... results merge DIR... --out DIR`` (see ``__main__``).  One concept per module:
``sources`` (reading), ``validation`` (what a results file may hold), ``listing``, ``diff``,
``merge`` and ``images`` (copying a merge's image folders).  Nothing here imports torch.
"""

from __future__ import annotations

from ..exceptions import ReviewError
from .diff import Change, diff, moved_samples, pair
from .listing import list_entries, model_summary
from .merge import RESERVED_NAMES, Merged, merge_results
from .sources import Entry, Source, load, read_baseline, read_results
from .validation import IMAGES_FIX, RESULTS_FIX, validate_results

__all__ = [
    "IMAGES_FIX", "RESERVED_NAMES", "RESULTS_FIX", "Change", "Entry", "Merged", "ReviewError", "Source", "diff",
    "list_entries", "load", "merge_results", "model_summary", "moved_samples", "pair", "read_baseline",
    "read_results", "validate_results",
]
