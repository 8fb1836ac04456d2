"""Stored baselines: one JSON file per test under ``baselines/``, built on syrupy.

``baselines/<test file path>/<test name>.json`` holds one entry per metric the test
checks: per-sample values (one per ``(prompt, seed)``), the value, the backbone and the
run's signature and provenance.  Syrupy drives the workflow: ``pytest --snapshot-update``
records or refreshes entries and reports (and with the flag deletes) unused ones,
including those of a deleted or renamed test file.  Each test owns its file (a test name
that must be cleaned to be a file name gets a hash of the original, and the file stores
its test id, checked on read), and every write replaces the file atomically, so parallel
workers (``-n``) never lose entries and a killed run leaves the old or the new file,
never half.  Drift's statistics beside it are content-addressed for the same reason.
Malformed, non-finite or newer-format data is a :class:`BaselineError`, never a verdict.
"""

from __future__ import annotations

import glob
import hashlib
import json
import math
import numbers
import os
import re
import tempfile
import time
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import filelock
import numpy as np
from syrupy.data import Snapshot, SnapshotCollection, SnapshotCollections
from syrupy.extensions.base import AbstractSyrupyExtension

from . import settings
from . import tripwires as wires
from ._io import distinct_name, pid_alive  # noqa: F401 - distinct_name re-exported
from .exceptions import BaselineError, BaselineFormatError  # noqa: F401 - re-exported
from .hardware import compute_capability, hardware_entries, hardware_key, select_entry  # noqa: F401 - re-exported
from .metrics import MetricResult, compute_metric, get_metric
from .metrics.drift import file_sha256, save_statistics
from .recording import fail, record_check
from .report import atomic_write_text, record_baseline_images
from .verdicts import Comparison, compare_paired, compare_values

# 1: drift statistics beside the JSON as ``<test>.<metric>.<hw>.safetensors`` (still read).
# 2: statistics content-addressed (``<test>.<metric>.<hw>.<sha16>.safetensors``) and named in the
#    entry's ``details.statistics_file``; the file records ``test_file`` (the test module,
#    relative to the baselines folder) so baselines of a deleted test file are found.
FORMAT_VERSION = 2
SPREAD_FACTOR = 2.0
NOISE_FACTOR = 3.0
# Benign perturbations for --diffeval-calibrate, cycled: none of them changes the model.
PERTURBATIONS = ({"threads": 1}, {"batch_size": 1}, {"threads": 2}, {"batch_size": 64})
STALE_TMP_SECONDS = 3600  # a temp file this old (or whose writer is dead) was left by a killed run
# A baseline is a handful of nested objects (checks > metric > hardware > entry > details):
# deeper data is not one, and reading it must not hit Python's recursion limit later.
MAX_DEPTH = 32
# No number a baseline stores needs more digits than a float holds (about 1.8e308).
MAX_INT_DIGITS = 309
LOCK_TIMEOUT_SECONDS = 300  # a baseline folder's lock is held for milliseconds per write
_METRIC_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


@dataclass
class Corrupt:
    """What the extension returns for a baseline file that cannot be parsed."""

    path: str
    reason: str


# --------------------------------------------------------------------------- records


def signature(result: MetricResult, images: Any, options: dict[str, Any]) -> dict[str, Any]:
    """What must be equal for two runs' numbers to be comparable."""
    prompts_sha = hashlib.sha256("\n".join(images.prompts).encode()).hexdigest()[:16]
    return {
        "metric": result.metric,
        "backbone": result.backbone,
        "image_size": list(images.image_size),
        "n_samples": len(images),
        "prompts_sha256": prompts_sha,
        "seeds": sorted(set(images.seeds)),
        "call_kwargs": images.call_kwargs,
        "metric_options": {k: v for k, v in options.items() if isinstance(v, (str, int, float, bool))},
    }


def build_record(result: MetricResult, images: Any, options: dict[str, Any]) -> dict[str, Any]:
    record: dict[str, Any] = {
        "metric": result.metric,
        "backbone": result.backbone,
        "higher_is_better": result.higher_is_better,
        "value": result.value,
        "signature": signature(result, images, options),
        "details": {k: v for k, v in result.details.items() if isinstance(v, (int, float, str, bool))},
        "provenance": images.provenance,
        "recorded": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if result.per_sample is not None:
        record["samples"] = [
            {"prompt": p, "seed": s, "value": float(v)}
            for p, s, v in zip(images.prompts, images.seeds, result.per_sample)
        ]
    return record


def _slug(key: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", key).strip("-").lower()


def state_path(baseline_file: Path, metric: str, key: str, sha: str | None = None) -> Path:
    """Where a metric's stored state (drift's feature statistics) lives: beside the baseline
    JSON, one safetensors file per metric and hardware.  Named by its content
    (``test_x.drift.cpu-float32.<sha16>.safetensors``) so a new file never overwrites the one
    the current JSON names; without ``sha`` the format-1 name (``test_x.drift.cpu-float32.safetensors``)."""
    middle = f".{sha}" if sha else ""
    return baseline_file.with_name(f"{baseline_file.stem}.{metric}.{_slug(key)}{middle}.safetensors")


def _sidecar_pattern(stem: str, metric: str, *, escape: bool = True) -> re.Pattern[str]:
    """Every statistics file of ``metric`` of one baseline, old-style or content-addressed
    (``escape=False``: ``metric`` is a regular expression)."""
    metric = re.escape(metric) if escape else metric
    return re.compile(rf"^{re.escape(stem)}\.{metric}\.[a-z0-9-]+(\.[0-9a-f]{{16}})?\.safetensors$")


def _content_addressed(path: Path) -> bool:
    """A statistics file named by its content (``<...>.<sha16>.safetensors``) and holding it."""
    match = re.search(r"\.([0-9a-f]{16})\.safetensors$", path.name)
    try:
        return bool(match) and hashlib.sha256(path.read_bytes()).hexdigest()[:16] == match.group(1)
    except OSError:
        return False


def _plain_sidecar_name(name: Any) -> bool:
    """A statistics file name the JSON may name: a file beside it, never a path elsewhere."""
    return (isinstance(name, str) and name.endswith(".safetensors") and not name.startswith(".")
            and "/" not in name and "\\" not in name and name == Path(name).name)


def per_sample_map(record: dict[str, Any]) -> dict[str, float]:
    return {f"{s['seed']}|{s['prompt']}": float(s["value"]) for s in record.get("samples", [])}


def signature_differences(stored: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Human-readable differences between two signatures (empty when comparable)."""
    out = []
    for key in sorted(set(stored) | set(current)):
        if key == "prompts_sha256":
            continue
        if stored.get(key) != current.get(key):
            out.append(f"{key}: baseline {stored.get(key)!r}, this run {current.get(key)!r}")
    if stored.get("prompts_sha256") != current.get("prompts_sha256"):
        out.append("prompts: the prompt list differs from the baseline's")
    return out


def _finite_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def entry_problem(metric: str, key: str, entry: Any) -> str | None:
    """What is wrong with one stored entry (naming the field and its value), or None.  A
    non-finite number is corrupt data: ``nan`` compares false with everything, so it would
    otherwise let any run pass."""
    where = f"checks.{metric}.hardware[{key!r}]"
    if not isinstance(entry, dict):
        return f"the entry {where} is {_short(entry)}, expected an object"
    if "value" not in entry or "signature" not in entry:
        return f"the entry {where} for {metric!r} lacks 'value' or 'signature'"
    if not _finite_number(entry["value"]):
        return f"{where}.value is {_short(entry['value'])}, expected a finite number"
    if not isinstance(entry["signature"], dict):
        return f"{where}.signature is {_short(entry['signature'])}, expected an object"
    samples = entry.get("samples", [])
    if not isinstance(samples, list):
        return f"{where}.samples is {_short(samples)}, expected a list"
    for i, sample in enumerate(samples):
        if not isinstance(sample, dict) or not isinstance(sample.get("prompt"), str) \
                or not isinstance(sample.get("seed"), int) or isinstance(sample.get("seed"), bool):
            return f"{where}.samples[{i}] is {_short(sample)}, expected {{'prompt': str, 'seed': int, 'value': number}}"
        if not _finite_number(sample.get("value")):
            return f"{where}.samples[{i}].value is {_short(sample.get('value'))}, expected a finite number"
    for field_name, names in (("details", ("spread", "seed_noise")), ("noise", ("max_abs_effect",))):
        block = entry.get(field_name, {})
        if not isinstance(block, dict):
            return f"{where}.{field_name} is {_short(block)}, expected an object"
        for name in names:
            if name in block and not (_finite_number(block[name]) and block[name] >= 0):
                return f"{where}.{field_name}.{name} is {_short(block[name])}, expected a finite number >= 0"
    stats_file = entry.get("details", {}).get("statistics_file")
    if stats_file is not None and not _plain_sidecar_name(stats_file):
        return (f"{where}.details.statistics_file is {_short(stats_file)}, expected the name of a .safetensors "
                "file beside the baseline (a path elsewhere is refused)")
    return None


# --------------------------------------------------------------------------- files


def _atomic_write_text(path: Path, text: str) -> None:
    """Temp file, fsync, rename (report.py's writer; a module attribute so tests can kill a
    run right at the write)."""
    atomic_write_text(path, text)


@contextmanager
def folder_lock(folder: Path) -> Iterator[None]:
    """Hold the lock of one baselines folder (a test module's) across processes: every
    read-modify-write of a baseline JSON, its statistics files and their clean-up runs under
    it, so two concurrent ``--snapshot-update`` runs never leave a JSON naming a statistics
    file the other deleted.  One lock per folder rather than per file, because the clean-up
    of leftovers must see the folder's JSONs and statistics files together (a statistics file
    is written before the JSON that names it).  The lock file lives in the temp folder, keyed
    by the folder's real path, so nothing is added to the committed baselines (``flock``: a
    killed holder releases it)."""
    locks = Path(tempfile.gettempdir()) / f"pytest-diffeval-locks-{getattr(os, 'getuid', lambda: 'user')()}"
    locks.mkdir(mode=0o700, exist_ok=True)
    key = hashlib.sha256(str(folder.resolve()).encode()).hexdigest()[:32]
    lock = filelock.FileLock(locks / f"{key}.lock", timeout=LOCK_TIMEOUT_SECONDS)
    try:
        lock.acquire()
    except filelock.Timeout:
        raise BaselineError(f"pytest-diffeval: another run held the lock of {folder} for {LOCK_TIMEOUT_SECONDS} s "
                            f"({lock.lock_file}); fix: let it finish, or end the stuck pytest process") from None
    try:
        yield
    finally:
        lock.release()


def _bounded_int(text: str) -> int:
    """``json``'s integer parser, refusing integers longer than any baseline number: past a
    float's range they cannot be compared (``OverflowError``), and past Python's digit limit
    ``int()`` itself refuses them."""
    digits = len(text.lstrip("-"))
    if digits > MAX_INT_DIGITS:
        raise BaselineFormatError(f"it holds a {digits}-digit integer ({text[:10]}...), longer than any number a "
                                  f"baseline stores (at most {MAX_INT_DIGITS} digits)")
    return int(text)


def _nesting_depth(data: Any) -> int:
    """How deeply lists and objects nest in parsed JSON (iterative: no recursion limit)."""
    deepest, stack = 0, [(data, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, (dict, list)):
            deepest = max(deepest, depth)
            if depth <= MAX_DEPTH:  # deeper is refused anyway: stop counting there
                stack.extend((v, depth + 1) for v in (value.values() if isinstance(value, dict) else value))
    return deepest


def read_baseline_file(path: Path) -> dict[str, Any]:
    """Parse and validate one baseline file; raise :class:`BaselineFormatError` (a
    ``ValueError``) saying what is wrong."""
    too_deep = f"its lists and objects nest more than {MAX_DEPTH} levels deep, deeper than any baseline"
    try:
        data = json.loads(path.read_text(encoding="utf-8"), parse_int=_bounded_int)
    except json.JSONDecodeError as exc:
        raise BaselineFormatError(f"not valid JSON ({exc})") from None
    except UnicodeDecodeError as exc:
        raise BaselineFormatError(f"not UTF-8 text ({exc})") from None
    except RecursionError:  # nested deeper than the parser's stack allows
        raise BaselineFormatError(too_deep) from None
    if _nesting_depth(data) > MAX_DEPTH:  # parsed, but deep enough to hit the limit in later code
        raise BaselineFormatError(too_deep)
    if not isinstance(data, dict) or not isinstance(data.get("checks"), dict):
        raise BaselineFormatError("not a pytest-diffeval baseline (no 'checks' object)")
    if "format_version" not in data:
        raise BaselineFormatError(f"it has no 'format_version' (this pytest-diffeval writes {FORMAT_VERSION})")
    version = data["format_version"]
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise BaselineFormatError(f"format_version {_short(version)} is not a version pytest-diffeval writes "
                                  f"(a positive integer; this version writes {FORMAT_VERSION})")
    if version > FORMAT_VERSION:
        raise BaselineFormatError(
            f"format_version {version!r} is newer than this pytest-diffeval understands ({FORMAT_VERSION}); "
            "upgrade pytest-diffeval", newer=True)
    return data


def _test_name(test_id: str) -> str:
    """The part of a node id after the file (``test_x[a/b]``, ``TestC::test_y``)."""
    return test_id.split("::", 1)[-1]


def remove_stale_tmp(baseline_file: Path) -> list[Path]:
    """Delete this baseline's temp files left by killed runs: those whose writer (the pid in
    the name) is gone, or older than :data:`STALE_TMP_SECONDS`."""
    removed = []
    prefix = baseline_file.stem + "."
    for tmp in baseline_file.parent.glob(".*.tmp"):
        if not tmp.name.lstrip(".").startswith(prefix):
            continue
        if _stale_tmp(tmp):
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed


def _stale_tmp(tmp: Path) -> bool:
    """A temp file left by a killed run: its writer (the pid in its name) is gone, or it is
    older than :data:`STALE_TMP_SECONDS`."""
    match = re.search(r"\.(\d+)(?:\.\d+)?\.tmp$", tmp.name)
    try:
        old = time.time() - tmp.stat().st_mtime > STALE_TMP_SECONDS
    except OSError:
        return False
    return old or bool(match and not pid_alive(int(match.group(1))))


def _referenced_sidecars(baseline_file: Path, data: dict[str, Any]) -> set[str]:
    """Names of the statistics files the baseline's entries use (format 2 names them, a
    format-1 entry uses its hardware's old-style name)."""
    names = set()
    for metric, check in data.get("checks", {}).items():
        entries = hardware_entries(check) if isinstance(check, dict) else {}
        for key, entry in entries.items():
            details = entry.get("details") if isinstance(entry, dict) else None
            if not isinstance(details, dict) or "statistics_sha256" not in details:
                continue
            name = details.get("statistics_file")
            names.add(name if isinstance(name, str) else state_path(baseline_file, metric, key).name)
    return names


def remove_stale_sidecars(baseline_file: Path, data: dict[str, Any] | None, metrics: set[str]) -> None:
    """After the JSON was replaced: delete statistics files of ``metrics`` it no longer names."""
    keep = _referenced_sidecars(baseline_file, data) if data else set()
    patterns = [_sidecar_pattern(baseline_file.stem, m) for m in metrics]
    for candidate in baseline_file.parent.glob(f"{glob.escape(baseline_file.stem)}.*.safetensors"):
        if candidate.name not in keep and any(p.match(candidate.name) for p in patterns):
            candidate.unlink(missing_ok=True)


def remove_leftovers(root: Path) -> list[Path]:
    """What killed updates left anywhere under ``root``, removed at the start of every
    ``--snapshot-update`` session (not only when that test's baseline is rewritten): temp
    files of dead writers or older than :data:`STALE_TMP_SECONDS`, and statistics files no
    baseline JSON in their folder names.  Each folder is swept under its lock
    (:func:`folder_lock`), so a concurrent run's statistics file, written just before the
    JSON that names it, is never taken for a leftover.  Only files this plugin wrote go:
    statistics files named after a baseline JSON beside them, or (the JSON gone) whose
    name carries the hash of their content; files that may belong to a JSON this version
    cannot read (corrupt, newer format) are kept, and so is any other ``.safetensors``
    (a user's reference statistics)."""
    removed: list[Path] = []
    if not root.is_dir():
        return removed
    folders = {p.parent for pattern in ("*.safetensors", ".*.tmp") for p in root.rglob(pattern)}
    for folder in sorted(folders):
        if folder_refusal(folder):
            continue
        try:
            removed += _remove_leftovers_locked(folder)
        except (OSError, BaselineError):
            continue  # read-only or busy: the update's own write reports a real problem
    return removed


def _remove_leftovers_locked(folder: Path) -> list[Path]:
    """:func:`remove_leftovers` for one folder, under its lock."""
    removed: list[Path] = []
    with folder_lock(folder):
        named: set[str] = set()
        readable: list[str] = []
        unreadable: list[str] = []
        for file in folder.glob("*.json"):
            try:
                named |= _referenced_sidecars(file, read_baseline_file(file))
                readable.append(file.stem)
            except (ValueError, OSError):
                unreadable.append(file.stem + ".")
        for candidate in folder.glob("*.safetensors"):
            name = candidate.name
            if name in named or any(name.startswith(u) for u in unreadable):
                continue
            if any(_sidecar_pattern(stem, "[A-Za-z0-9_.-]+", escape=False).match(name) for stem in readable) \
                    or _content_addressed(candidate):
                candidate.unlink(missing_ok=True)
                removed.append(candidate)
        for tmp in folder.glob(".*.tmp"):
            if _stale_tmp(tmp):
                tmp.unlink(missing_ok=True)
                removed.append(tmp)
    return removed


def _canonical_safetensors(path: Path) -> None:
    """Rewrite a safetensors file's JSON header with sorted keys.  safetensors writes its
    metadata from a Rust HashMap, in an order that changes from process to process, so the
    same statistics would otherwise get a new content-addressed name on every re-record."""
    raw = path.read_bytes()
    size = int.from_bytes(raw[:8], "little")
    header = json.dumps(json.loads(raw[8 : 8 + size]), sort_keys=True, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)  # tensor data stays 8-byte aligned, as safetensors writes it
    path.write_bytes(len(header).to_bytes(8, "little") + header + raw[8 + size :])


def write_statistics(baseline_file: Path, metric: str, key: str, state: dict[str, Any]) -> tuple[Path, str]:
    """Write a metric's state under its content-addressed name (never over the file the
    current JSON names) and return ``(path, sha16)``."""
    staging = baseline_file.with_name(f".{baseline_file.stem}.{metric}.{os.getpid()}.{time.monotonic_ns()}.tmp")
    try:
        save_statistics(state, staging)
        _canonical_safetensors(staging)
        sha = file_sha256(staging)
        target = state_path(baseline_file, metric, key, sha)
        os.replace(staging, target)
    finally:
        staging.unlink(missing_ok=True)
    return target, sha


def statistics_file_for(baseline_file: Path, metric: str, key: str) -> Path | None:
    """The statistics file the stored entry that best matches ``key`` uses, or None."""
    try:
        data = read_baseline_file(baseline_file)
    except (ValueError, OSError):
        return None
    check = data["checks"].get(metric)
    chosen, entry = select_entry(check, key) if isinstance(check, dict) else (None, None)
    details = entry.get("details") if isinstance(entry, dict) else None
    if chosen is None or not isinstance(details, dict):
        return None
    name = details.get("statistics_file")
    if name is None:
        return state_path(baseline_file, metric, chosen)  # format 1
    return baseline_file.with_name(name) if _plain_sidecar_name(name) else None


_DISCOVERY_CACHE: dict[tuple[str, int, int], tuple[str | None, list[str]] | None] = {}


def _discovery_info(path: Path) -> tuple[str | None, list[str]] | None:
    """``(test_file, metrics)`` of a baseline file, parsed once per version of the file."""
    try:
        stat = path.stat()
    except OSError:
        return None
    cache_key = (str(path), stat.st_mtime_ns, stat.st_size)
    if cache_key not in _DISCOVERY_CACHE:
        try:
            data = read_baseline_file(path)
            test_file = data.get("test_file")
            _DISCOVERY_CACHE[cache_key] = (test_file if isinstance(test_file, str) else None, list(data["checks"]))
        except (ValueError, OSError):
            _DISCOVERY_CACHE[cache_key] = None
    return _DISCOVERY_CACHE[cache_key]


def orphaned_baselines(root: Path) -> list[Path]:
    """Baseline files under ``root`` whose test module no longer exists (deleted or renamed).
    Only files that record their ``test_file`` qualify: a format-1 file cannot say which
    module owns it, and a baselines folder shared by two suites must not lose the other's."""
    orphans = []
    if not root.is_dir():
        return orphans
    for path in sorted(root.rglob("*.json")):
        if path.name.startswith("."):
            continue
        info = _discovery_info(path)
        if info and info[0] and info[1] and not (root / info[0]).exists():
            orphans.append(path)
    return orphans


# --------------------------------------------------------------------------- syrupy


def folder_refusal(folder: Path) -> str | None:
    """Why baselines must not be read or written in ``folder``, a folder inside the baselines
    folder that leads out of it through a symbolic link (a write would land elsewhere), or
    None.  A folder outside the baselines folder altogether (direct API use) is not judged."""
    root = settings.current().baselines_dir.resolve()
    if not Path(os.path.abspath(folder)).is_relative_to(root) or folder.resolve().is_relative_to(root):
        return None
    inside = [p for p in (*reversed(folder.parents), folder) if p != root and p.is_relative_to(root)]
    link = next((p for p in inside if p.is_symlink()), folder)
    return (f"pytest-diffeval: baseline folder {link} is a symbolic link to {link.resolve()}, outside the baselines "
            f"folder {root}; baselines are read and written only inside it.\n  fix: replace the link with a real "
            f"folder holding the baselines, or point diffeval_baselines_dir (ini) at the folder the link leads to")


class DiffevalBaselineExtension(AbstractSyrupyExtension):
    """A syrupy extension: one JSON collection per test, one snapshot per metric, compared
    with a tolerance (:meth:`matches` stores the :class:`Comparison` it made)."""

    file_extension = "json"
    write_immediately = True

    def __init__(self) -> None:
        super().__init__()
        self.last_outcome: Any = None
        self.tolerance: float | None = None
        self.updating = False
        self.test_id: str | None = None

    # ---- storage: where
    @classmethod
    def dirname(cls, *, test_location: Any) -> str:
        test_file = Path(test_location.filepath).resolve()
        try:
            relative = test_file.relative_to(settings.current().rootdir.resolve())
        except ValueError:
            relative = Path(test_file.name)
        # Not resolved: a symbolic link inside the baselines folder is refused where it is used
        # (folder_refusal), one test module's failure, instead of breaking syrupy's session.
        return str(settings.current().baselines_dir.resolve() / relative.with_suffix(""))

    @staticmethod
    def _clean(name: str) -> str:
        """A file-name-safe form of a test name.  When cleaning changes the name (``a/b`` and
        ``ab`` both clean to ``ab``), a short hash of the original is appended so two tests
        never share a file; the file also stores its test id, checked on every read."""
        cleaned = "".join(c for c in name if c not in '\\/?*:|"<>' and c.isprintable())
        return distinct_name(cleaned.lstrip(".") or "_", name)

    @classmethod
    def get_file_basename(cls, *, test_location: Any, index: Any) -> str:
        return cls._clean(test_location.snapshot_name)

    @classmethod
    def get_snapshot_name(cls, *, test_location: Any, index: Any = 0) -> str:
        return f"{cls._clean(test_location.snapshot_name)}[{index}]"

    @classmethod
    def matches_test_location(cls, *, test_location: Any, snapshot_location: str) -> bool:
        """A test owns exactly the file :meth:`get_location` gives it (hashed names included)."""
        try:
            return Path(snapshot_location) == Path(cls.get_location(test_location=test_location, index=0))
        except BaselineError:
            return False

    def discover_snapshots(self, *, test_location: Any, ignore_extensions: list[str] | None = None) -> SnapshotCollections:
        """This test module's ``*.json`` files, plus those anywhere under the baselines root
        whose test module was deleted or renamed (syrupy's advice for extensions that keep
        one folder per test file: scan the shared root, so orphans are reported and
        ``--snapshot-update`` removes them).  ``discovery_dirname`` stays per module: a file
        of a module that exists but was not collected (``--ignore``, another suite sharing
        the folder) is never claimed, so never deleted."""
        discovered = SnapshotCollections()
        directory = Path(self.dirname(test_location=test_location))
        own = sorted(directory.glob("*.json")) if directory.is_dir() and not folder_refusal(directory) else []
        others = [p for p in orphaned_baselines(settings.current().baselines_dir.resolve()) if p.parent != directory]
        for path in own + others:
            collection = self.read_snapshot_collection(snapshot_location=str(path))
            if collection.has_snapshots:
                discovered.add(collection)
        return discovered

    # ---- storage: read
    def read_snapshot_collection(self, *, snapshot_location: str) -> SnapshotCollection:
        collection = SnapshotCollection(location=snapshot_location)
        info = _discovery_info(Path(snapshot_location))
        for metric in info[1] if info else []:
            collection.add(Snapshot(name=f"{Path(snapshot_location).stem}[{metric}]"))
        return collection

    def read_snapshot_data_from_location(self, *, snapshot_location: str, snapshot_name: str, session_id: str) -> Any:
        path = Path(snapshot_location)
        if not path.exists():
            return None
        try:
            data = read_baseline_file(path)
        except (ValueError, OSError) as exc:
            return Corrupt(str(path), str(exc))
        stored_test = data.get("test")
        if self.test_id and isinstance(stored_test, str) and _test_name(stored_test) != _test_name(self.test_id):
            return Corrupt(str(path), f"it was recorded for test {stored_test!r}, not for this test {self.test_id!r} "
                                      "(two test ids that clean to one file name?)")
        metric = snapshot_name[len(path.stem) + 1 : -1]
        return data["checks"].get(metric)

    # ---- storage: write (atomic, merging the other metrics of the same test)
    @classmethod
    def write_snapshot_collection(cls, *, snapshot_collection: SnapshotCollection, name_order: Any = None) -> None:
        """Crash-safe: new statistics files first (under new names), then the JSON atomically,
        then the statistics files it no longer names.  A run killed anywhere leaves the old
        or the new baseline, each with its statistics.  Runs under the folder's lock (see
        :func:`folder_lock`); a write the OS refuses (read-only folder, full disk) is a
        :class:`BaselineError` naming the file, the OS error and the fix, never a silent pass."""
        path = Path(snapshot_collection.location)
        records = [dict(snapshot.data) for snapshot in snapshot_collection]
        test = next((r["_test"] for r in records if r.get("_test")), None)
        refusal = folder_refusal(path.parent)
        if refusal:
            raise BaselineError(refusal)
        try:
            with folder_lock(path.parent):
                cls._write_locked(path, records, test)
        except OSError as exc:
            rerun = f"pytest --snapshot-update {_node_for_cli(test)}" if test else "pytest --snapshot-update"
            raise BaselineError(
                f"pytest-diffeval: could not write baseline {path}: {exc}; nothing was recorded (the stored "
                f"baseline, if any, is unchanged).\n  fix: make {path.parent} writable (or free space on its "
                f"disk), then re-record with: {rerun}") from None

    @classmethod
    def _write_locked(cls, path: Path, records: list[dict[str, Any]], test: str | None) -> None:
        """:meth:`write_snapshot_collection`'s steps, with the folder's lock held."""
        data = None
        if path.exists():
            try:
                data = read_baseline_file(path)
            except BaselineFormatError as exc:
                if exc.newer:
                    raise BaselineError(refuse_newer_message(path, exc)) from None
            except (ValueError, OSError):
                pass  # a corrupt file is replaced by the update the user asked for
        if data and test and isinstance(data.get("test"), str) and _test_name(data["test"]) != _test_name(test):
            data = None  # another test's file (a name collision of an older version): replaced, not merged
        data = data or {"format_version": FORMAT_VERSION, "checks": {}}
        data["format_version"] = FORMAT_VERSION
        for record in records:
            data["test"] = record.pop("_test", data.get("test"))
            test_file = record.pop("_test_file", None)
            if test_file:
                data["test_file"] = test_file
            state = record.pop("_state", None)
            key = hardware_key(record.get("provenance", {}))
            if state is not None:  # drift: this run's statistics become the baseline's, so its distance is 0
                target, sha = write_statistics(path, record["metric"], key, state)
                record["details"] = {**record.get("details", {}), "statistics_sha256": sha,
                                     "statistics_file": target.name}
                record["value"] = 0.0
            check = data["checks"].get(record["metric"])
            entries = hardware_entries(check) if isinstance(check, dict) else {}
            entries[key] = record
            data["checks"][record["metric"]] = {"hardware": dict(sorted(entries.items()))}
        data["checks"] = dict(sorted(data["checks"].items()))
        try:
            text = json.dumps(data, indent=2, sort_keys=False, allow_nan=False) + "\n"
        except ValueError:
            raise BaselineError(f"pytest-diffeval: refusing to write {path}: it would hold NaN or infinity, "
                                "which no comparison can use; fix the run's non-finite values first") from None
        _atomic_write_text(path, text)
        try:
            remove_stale_sidecars(path, data, set(data["checks"]))
            remove_stale_tmp(path)
        except OSError:
            pass  # the baseline is written; what is left is removed by the next update's remove_leftovers()

    def delete_snapshots(self, *, snapshot_location: str, snapshot_names: set[str]) -> None:
        """Remove unused entries, under the folder's lock (:func:`folder_lock`); never in a
        folder that leads outside the baselines folder."""
        folder = Path(snapshot_location).parent
        if folder_refusal(folder):
            return
        with folder_lock(folder):
            self._delete_locked(snapshot_location=snapshot_location, snapshot_names=snapshot_names)

    def _delete_locked(self, *, snapshot_location: str, snapshot_names: set[str]) -> None:
        path = Path(snapshot_location)
        try:
            data = read_baseline_file(path)
        except (ValueError, OSError):
            return
        if data.get("test") in settings.current().failed_tests:
            return  # a test that failed before its check (a tripwire, an exception) keeps its baseline
        metrics = {name[len(path.stem) + 1 : -1] for name in snapshot_names}
        for metric in metrics:
            data["checks"].pop(metric, None)
        if data["checks"]:
            _atomic_write_text(path, json.dumps(data, indent=2) + "\n")
        else:
            path.unlink(missing_ok=True)
        remove_stale_sidecars(path, data if data["checks"] else None, metrics)
        remove_stale_tmp(path)
        if path.parent.resolve() != settings.current().baselines_dir.resolve():
            try:
                path.parent.rmdir()  # the folder of a deleted test file, now empty
            except OSError:
                pass

    # ---- serialise / compare
    def serialize(self, data: Any, **kwargs: Any) -> Any:
        return data

    def matches(self, *, serialized_data: Any, snapshot_data: Any) -> bool:
        """Within tolerance.  An improvement beyond it passes a normal run but is rewritten
        by ``--snapshot-update``, so the baseline ratchets up with the model.  Under
        ``--snapshot-update`` an entry is also rewritten when this run calibrated its noise
        (the noise must be stored) or its statistics file has a format-1 name (migrated)."""
        try:
            outcome = judge(serialized_data, snapshot_data, self.tolerance)
        except (TypeError, ValueError, KeyError, AttributeError, IndexError, ArithmeticError, RecursionError) as exc:
            outcome = Corrupt("", f"its entry cannot be compared ({type(exc).__name__}: {exc})")
        self.last_outcome = outcome
        if not isinstance(outcome, Comparison):
            return False
        if self.updating and (serialized_data.get("noise") is not None
                              or _needs_migration(serialized_data, snapshot_data)):
            return False
        return outcome.verdict == "pass" or (outcome.verdict == "improved" and not self.updating)


def refuse_newer_message(path: Path, exc: Exception) -> str:
    return (f"pytest-diffeval: {path}: {exc}.\n  --snapshot-update will not overwrite it: this version would drop "
            "the entries it cannot read.\n  fix: upgrade pytest-diffeval (or, to discard it, delete the file and "
            "re-record)")


def _needs_migration(record: dict[str, Any], check: Any) -> bool:
    """A drift entry whose statistics file still has its format-1 name."""
    if "_state" not in record or not isinstance(check, dict):
        return False
    _, entry = select_entry(check, hardware_key(record.get("provenance", {})))
    details = entry.get("details") if isinstance(entry, dict) else None
    return isinstance(details, dict) and "statistics_file" not in details


@dataclass
class NoEntry:
    """The baseline file has the metric, but for other hardware only."""

    key: str
    available: list[str]


def derive_tolerance(metric: Any, entry: dict[str, Any], tolerance: float | None) -> tuple[float, str]:
    """The tolerance a comparison uses and where it came from: the test's explicit value, else
    the largest of the metric's floor, drift's seed noise, ``NOISE_FACTOR`` x the calibrated
    noise and ``SPREAD_FACTOR`` x a set-level metric's resampling spread."""
    if tolerance is not None:
        return float(tolerance), "explicit (tolerance= in the test)"
    details, noise = entry.get("details", {}), entry.get("noise", {})
    candidates = [(metric.default_tolerance(float(entry["value"])), "the metric's floor")]
    if details.get("seed_noise") is not None:
        # Drift: what re-drawing the seeds alone would cause (metrics/drift.py derives it).
        candidates.append((float(details["seed_noise"]), "the seed noise of its statistics"))
    if noise.get("max_abs_effect") is not None:
        # Calibrated: NOISE_FACTOR times the largest change benign re-runs caused.
        candidates.append((NOISE_FACTOR * float(noise["max_abs_effect"]),
                           f"{NOISE_FACTOR:g} x the calibrated noise {float(noise['max_abs_effect']):.4g}"))
    if details.get("spread") is not None:
        # Set-level metrics: twice the baseline's resampling spread (about 95% of the
        # movement other images of the same model would cause).
        candidates.append((SPREAD_FACTOR * float(details["spread"]),
                           f"{SPREAD_FACTOR:g} x the resampling spread {float(details['spread']):.4g}"))
    return max(candidates, key=lambda c: c[0])  # ties keep the earlier (the floor)


def judge(record: dict[str, Any], stored: Any, tolerance: float | None) -> Any:
    """A :class:`Comparison`, or a :class:`Corrupt` / :class:`NoEntry` / list of signature
    differences.  Malformed or non-finite stored data is :class:`Corrupt`, never compared."""
    if isinstance(stored, Corrupt):
        return stored
    metric_name = record["metric"]
    if not isinstance(stored, dict):
        return Corrupt("", f"checks.{metric_name} is {_short(stored)}, expected an object")
    if "hardware" in stored and not isinstance(stored["hardware"], dict):
        return Corrupt("", f"checks.{metric_name}.hardware is {_short(stored['hardware'])}, expected an object")
    if "hardware" not in stored and "value" not in stored:
        return Corrupt("", f"the entry for {metric_name!r} lacks 'value' or 'signature'")
    key = hardware_key(record.get("provenance", {}))
    chosen, entry = select_entry(stored, key)
    if chosen is None:
        return NoEntry(key, sorted(hardware_entries(stored)))
    problem = entry_problem(metric_name, chosen, entry)
    if problem:
        return Corrupt("", problem)
    differences = signature_differences(entry["signature"], record["signature"])
    if differences:
        return differences
    stored_sha = entry.get("details", {}).get("statistics_sha256")
    if stored_sha is not None and record.get("details", {}).get("statistics_sha256") != stored_sha:
        return Corrupt("", f"the {metric_name} statistics file beside it is missing or was changed after the "
                           f"baseline was recorded (the baseline expects sha256 {stored_sha})")
    tol, source = derive_tolerance(get_metric(metric_name), entry, tolerance)
    if "samples" in entry and "samples" in record:
        comparison = compare_paired(metric_name, record["backbone"], record["higher_is_better"],
                                    per_sample_map(record), per_sample_map(entry), record["value"],
                                    float(entry["value"]), tol)
    else:
        comparison = compare_values(metric_name, record["backbone"], record["higher_is_better"],
                                    record["value"], float(entry["value"]), tol)
    comparison.tolerance_source = source
    spread = entry.get("details", {}).get("spread")
    comparison.spread = float(spread) if spread is not None else None
    return comparison


def calibrate(images: Any, metric: str, result: MetricResult, options: dict[str, Any], runs: int) -> dict[str, Any]:
    """Re-generate and re-measure ``runs`` times under benign perturbations (thread count,
    batch size) and return the noise they caused: the largest |paired mean change| (or
    |value change| for set-level metrics) and the largest per-sample change.  A fresh
    process at the same thread count is bit-identical (measured), so it adds nothing."""
    import torch

    effects, per_sample, used = [], [], []
    for run in range(runs):
        perturbation = PERTURBATIONS[run % len(PERTURBATIONS)]
        threads = torch.get_num_threads()
        try:
            torch.set_num_threads(perturbation.get("threads", threads))
            again = images.regenerate(batch_size=perturbation.get("batch_size", 8))
        finally:
            torch.set_num_threads(threads)
        other = compute_metric(metric, again, **options)
        if result.per_sample is not None and other.per_sample is not None:
            diff = np.asarray(other.per_sample) - np.asarray(result.per_sample)
            effects.append(abs(float(diff.mean())))
            per_sample.append(float(np.abs(diff).max()))
        else:
            effects.append(abs(other.value - result.value))
        used.append(perturbation)
    noise = {"runs": runs, "perturbations": used, "max_abs_effect": max(effects)}
    if per_sample:
        noise["max_abs_sample_change"] = max(per_sample)
    return noise


# --------------------------------------------------------------------------- fixture object


class DiffevalBaseline:
    """What the ``diffeval_baseline`` fixture returns: compares a run with the test's
    stored baseline, or records it under ``--snapshot-update``."""

    def __init__(self, snapshot: Any, test_id: str) -> None:
        self._snapshot = snapshot.use_extension(DiffevalBaselineExtension)
        self.test_id = test_id

    @property
    def path(self) -> Path:
        return Path(self._snapshot.extension.get_location(test_location=self._snapshot.test_location, index=0))

    def assert_no_regression(self, images: Any, metric: str | list[str] | tuple[str, ...], *,
                             tolerance: float | Mapping[str, float | None] | None = None, tripwires: bool = True,
                             **metric_options: Any) -> Any:
        """Measure ``metric`` (or each of a list of metrics) on ``images`` and fail if it
        regressed against the stored baseline by more than ``tolerance`` (default: derived
        per metric, see README "Statistics").  ``tolerance`` is one number for every metric
        or a dict ``{metric: tolerance}`` (metrics it leaves out keep the derived one).  With
        a list every metric is checked before the test fails, and the failure lists each
        one that regressed."""
        __tracebackhide__ = True

        metrics = [metric] if isinstance(metric, str) else list(metric)
        tolerances = resolve_tolerances(metrics, tolerance)
        if tripwires:
            wires.check(images)
        outcomes, failures, error = [], [], AssertionError
        for name in metrics:
            outcome, message, error_class = self._check(images, name, tolerances[name], metric_options)
            outcomes.append(outcome)
            if message:
                failures.append(message)
                error = error_class if error is AssertionError else error

        record_baseline_images(images, self.path, self._snapshot)
        if failures:
            fail(images, ("\n" + "-" * 60 + "\n").join(failures), error=error)
        return outcomes[0] if isinstance(metric, str) else outcomes

    def _refusal(self, updating: bool) -> str | None:
        """Why this check must not use the baseline file: its folder leads outside the baselines
        folder (a symbolic link), or this update would overwrite a file a newer version wrote."""
        outside = folder_refusal(self.path.parent)
        if outside:
            return outside.removeprefix("pytest-diffeval: ")
        if not updating or not self.path.exists():
            return None
        try:
            read_baseline_file(self.path)
        except BaselineFormatError as exc:
            if exc.newer:
                return refuse_newer_message(self.path, exc)
        except (ValueError, OSError):
            pass
        return None

    def _check(self, images: Any, metric: str, tolerance: float | None,
               metric_options: dict[str, Any]) -> tuple[Any, str | None, type[Exception]]:
        """Compare one metric; return ``(comparison or None, failure message or None, error class)``."""

        if not _METRIC_NAME.match(metric):
            raise ValueError(f"pytest-diffeval: metric name {metric!r} may only hold letters, digits, '_', '.', '-'")
        updating = bool(self._snapshot.update_snapshots)
        refusal = self._refusal(updating)
        if refusal:
            return None, refusal, BaselineError
        extra: dict[str, Any] = {}
        if get_metric(metric).keeps_state:  # drift: compare with the statistics stored beside the baseline
            stats = statistics_file_for(self.path, metric, hardware_key(getattr(images, "provenance", {}) or {}))
            if stats is not None and stats.is_file():
                extra["baseline_stats"] = stats
        try:
            result = compute_metric(metric, images, **metric_options, **extra)
        except ValueError:
            if not (updating and extra):
                raise
            result = compute_metric(metric, images, **metric_options)  # unusable statistics: re-record them
        rerun = f"pytest --snapshot-update {_node_for_cli(self.test_id)}"
        location = self.path
        values = [result.value, *(result.per_sample if result.per_sample is not None else [])]
        if updating and not all(math.isfinite(float(v)) for v in values):
            record_check(self.test_id, result, images, verdict="not recorded", baseline_file=str(location))
            return None, (f"refusing to record {metric} = {result.value!r} in {location}: the run measured NaN or "
                          "infinity, and a baseline must hold finite numbers.\n  fix: find why this run's outputs "
                          f"are not finite (NaN images, a diverged model), then re-record with: {rerun}"), BaselineError
        record = build_record(result, images, metric_options)
        record["_test"] = self.test_id
        try:  # the test module, relative to the baselines folder: how orphans are recognised
            record["_test_file"] = Path(os.path.relpath(Path(self._snapshot.test_location.filepath).resolve(),
                                                        settings.current().baselines_dir.resolve())).as_posix()
        except ValueError:  # another drive (Windows): such a file is never treated as an orphan
            pass
        if result.state is not None:
            record["_state"] = result.state
        if settings.current().calibrate and getattr(images, "regenerate", None) is not None:
            record["noise"] = calibrate(images, metric, result, metric_options, settings.current().calibrate)
        assertion = self._snapshot(name=metric)
        extension = assertion.extension
        extension.tolerance = tolerance
        extension.test_id = self.test_id
        extension.last_outcome = None
        extension.updating = updating = bool(assertion.update_snapshots)
        matched = assertion == record
        outcome = extension.last_outcome
        comparison = outcome if isinstance(outcome, Comparison) else None
        execution = assertion.executions.get(assertion.num_executions - 1)
        error = execution.exception if execution is not None else None
        if updating and error is not None:  # syrupy swallows what the write raised: nothing was recorded
            record_check(self.test_id, result, images, verdict="not recorded", baseline_file=str(location),
                         comparison=comparison)
            reason = str(error) if isinstance(error, BaselineError) else (
                f"could not record {metric} in {location}: {type(error).__name__}: {error}.\n  fix: restore the "
                f"file from version control or delete it, then re-record with: {rerun}")
            return None, reason.removeprefix("pytest-diffeval: "), BaselineError
        if updating:
            record_check(self.test_id, result, images, verdict=update_verdict(matched, outcome, execution),
                         baseline_file=str(location), comparison=comparison)
            return comparison, None, AssertionError
        if error is not None and outcome is None:  # the stored entry broke the comparison itself
            outcome = Corrupt("", f"its entry cannot be compared ({type(error).__name__}: {error})")
        if outcome is None or isinstance(outcome, NoEntry):
            hardware = (f" on this hardware ({outcome.key}; stored for: {', '.join(outcome.available)})"
                        if isinstance(outcome, NoEntry) else "")
            verdict, message = "missing baseline", (
                f"no baseline for {metric!r} of this test{hardware} in {location}.\n"
                f"  measured {metric} = {result.value:.4f} ({result.backbone})\n"
                f"  record it with: {rerun}")
        elif isinstance(outcome, Corrupt):
            verdict, message = "corrupt baseline", (
                f"baseline {outcome.path or location} cannot be used: {outcome.reason}.\n"
                f"  fix: restore it from version control, or re-record it with: {rerun}")
        elif isinstance(outcome, list):
            verdict, message = "baseline mismatch", (
                f"baseline {location} for {metric!r} was recorded under other conditions, so the "
                "numbers are not comparable:\n    " + "\n    ".join(outcome) +
                f"\n  fix: if the change is intended, re-record with: {rerun}")
        else:
            record_check(self.test_id, result, images, verdict=outcome.verdict, baseline_file=str(location),
                         comparison=outcome)
            if outcome.verdict == "improved":
                warnings.warn(f"pytest-diffeval: {metric} improved beyond its tolerance ({outcome.value:.4g} vs baseline "
                              f"{outcome.baseline:.4g}); ratchet the baseline with: {rerun}", UserWarning, stacklevel=3)
            return outcome, (None if outcome.passed else regression_message(outcome, location, rerun)), AssertionError
        record_check(self.test_id, result, images, verdict=verdict, baseline_file=str(location))
        return None, message, BaselineError


def update_verdict(matched: bool, outcome: Any, execution: Any) -> str:
    """The verdict of a check under ``--snapshot-update``: ``"pass"`` when the stored entry
    was kept (within tolerance), ``"updated"`` when an existing entry was rewritten (its
    row keeps the replaced baseline and the change), ``"recorded"`` when there was none
    for this hardware.  A rewritten regression is never a pass."""
    if matched and execution is not None and not (execution.updated or execution.created):
        return "pass"
    return "recorded" if outcome is None or isinstance(outcome, NoEntry) else "updated"


def resolve_tolerances(metrics: list[str], tolerance: Any) -> dict[str, float | None]:
    """One tolerance per metric from ``tolerance``: None (derived), a number (every metric)
    or a dict naming some of ``metrics`` (the others derived).  A dict key that is not one
    of the metrics checked is a mistake (a typo would silently keep the derived tolerance)."""
    def check(name: str, value: Any) -> float | None:
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value < 0:
            raise ValueError(f"pytest-diffeval: tolerance for {name!r} must be a finite number >= 0 (or None for "
                             f"the derived one), got {value!r}")
        return float(value)

    if isinstance(tolerance, Mapping):
        unknown = sorted(str(k) for k in tolerance if k not in metrics)
        if unknown:
            raise ValueError(f"pytest-diffeval: tolerance names {', '.join(map(repr, unknown))}, which this call does "
                             f"not check (metrics: {', '.join(map(repr, metrics))}); fix the metric name in the "
                             "tolerance dict")
        return {name: check(name, tolerance.get(name)) for name in metrics}
    return {name: check(name, tolerance) for name in metrics}


def _node_for_cli(test_id: str) -> str:
    return f"'{test_id}'" if any(c in test_id for c in " []") else test_id


def regression_message(c: Comparison, location: Path, rerun: str) -> str:
    direction = "higher" if c.higher_is_better else "lower"
    lines = [
        f"{c.metric} regressed against the baseline ({c.backbone}; {direction} is better)",
        f"  this run: {c.value:.4f}   baseline: {c.baseline:.4f}   change: {c.delta:+.4f}",
    ]
    if c.note:
        lines.append(f"  {c.note}: a non-finite measurement never passes (look for NaN/inf images or a diverged model)")
    elif c.method == "paired-t":
        lo, hi = c.interval or (c.effect, c.effect)
        lines.append(f"  paired over {c.n} (prompt, seed) samples: mean change {c.effect:+.4f} "
                     f"(95% CI {lo:+.4f} .. {hi:+.4f}); one-sided 95% bound {c.bound:+.4f} < -tolerance {c.tolerance:.4f}")
        lines.append("  samples that moved most (baseline -> this run):")
        lines += [f"    {m['change']:+8.3f}  {m['baseline']:.3f} -> {m['value']:.3f}  seed {m['seed']}  {m['prompt']!r}"
                  for m in c.moved]
    else:
        lines.append(f"  change {c.effect:+.4f} (signed, + better) is beyond the tolerance {c.tolerance:.4f}")
        if c.spread is not None:
            band = SPREAD_FACTOR * c.spread
            lines.append(f"  resampling spread of the baseline: {c.spread:.4f}; spread-based band: baseline "
                         f"± {SPREAD_FACTOR:g} x spread = {c.baseline - band:.4f} .. {c.baseline + band:.4f}")
    if c.tolerance_source:
        lines.append(f"  tolerance {c.tolerance:.4f} from: {c.tolerance_source}")
    lines.append(f"  baseline file: {location}")
    lines.append(f"  if the change is intended, update the baseline: {rerun}")
    return "\n".join(lines)
