"""Stored baselines: one JSON file per test under ``baselines/``, built on syrupy.

``baselines/<test file path>/<test name>.json`` holds one entry per metric the test checks:
per-sample values (one per ``(prompt, seed)``), the value, the backbone and the run's
signature and provenance; drift's statistics and set-level metrics' per-image features lie
beside it, content-addressed.  One concept
per module:

- :mod:`.files`: reading and validating a baseline JSON, the folder lock, folder safety,
  killed runs' temp files, baselines whose test module is gone;
- :mod:`.sidecars`: drift's statistics files beside the JSON;
- :mod:`.records`: what a check stores and the typed :class:`BaselineCheck` given to syrupy;
- :mod:`.tolerance`: explicit, derived and calibrated tolerances;
- :mod:`.judge`: comparing a check with its stored entry, verdicts and messages (pure);
- :mod:`.extension`: the syrupy extension (storage, and ``matches`` through the judge);
- :mod:`.fixture`: :class:`DiffevalBaseline`, what the ``diffeval_baseline`` fixture returns.

Malformed, non-finite or newer-format data is a :class:`BaselineError`, never a verdict.
"""

from __future__ import annotations

from ..exceptions import BaselineError, BaselineFormatError
from .extension import DiffevalBaselineExtension
from .files import FORMAT_VERSION, folder_lock, folder_refusal, orphaned_baselines, read_baseline_file
from .fixture import DiffevalBaseline, assert_check
from .judge import Corrupt, NoEntry, judge, judge_check, regression_message, update_verdict
from .records import (
                      BaselineCheck,
                      StoredCheck,
                      build_record,
                      entry_problem,
                      per_sample_map,
                      signature,
                      signature_differences,
)
from .sidecars import remove_leftovers, remove_stale_sidecars, state_path, statistics_file_for, write_statistics
from .tolerance import NOISE_FACTOR, SPREAD_FACTOR, calibrate, derive_tolerance, resolve_tolerances

__all__ = [
    "FORMAT_VERSION", "NOISE_FACTOR", "SPREAD_FACTOR",
    "BaselineCheck", "BaselineError", "BaselineFormatError", "Corrupt", "DiffevalBaseline",
    "DiffevalBaselineExtension", "NoEntry", "StoredCheck",
    "assert_check", "build_record", "calibrate", "derive_tolerance", "entry_problem", "folder_lock",
    "folder_refusal", "judge", "judge_check", "orphaned_baselines", "per_sample_map", "read_baseline_file",
    "regression_message", "remove_leftovers", "remove_stale_sidecars", "resolve_tolerances", "signature",
    "signature_differences", "state_path", "statistics_file_for", "update_verdict", "write_statistics",
]
