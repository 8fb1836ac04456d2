"""Drift's statistics files beside a baseline JSON: their content-addressed names, writing and
finding them, and removing those no JSON names (after an update, and killed runs' leftovers).

A statistics file is written under a name carrying the hash of its content before the JSON
that names it, so a new file never overwrites the one the current JSON names.
"""

from __future__ import annotations

import glob
import json
import os
import re
import time
from pathlib import Path
from typing import Any

from .._hashing import digest_file
from ..exceptions import BaselineError
from ..hardware import hardware_entries, select_entry
from ..metrics.drift import save_statistics
from .files import _stale_tmp, folder_lock, folder_refusal, read_baseline_file


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
        return bool(match) and digest_file(path, 16) == match.group(1)
    except OSError:
        return False


def _plain_sidecar_name(name: Any) -> bool:
    """A statistics file name the JSON may name: a file beside it, never a path elsewhere."""
    return (isinstance(name, str) and name.endswith(".safetensors") and not name.startswith(".")
            and "/" not in name and "\\" not in name and name == Path(name).name)


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
        sha = digest_file(staging, 16)
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
