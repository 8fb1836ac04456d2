"""The syrupy extension: where a test's baseline file lives, reading, writing (atomic, under
the folder's lock) and deleting its entries, and matching a :class:`BaselineCheck` against
the stored entry through the pure :func:`judge_check`.

Syrupy drives the workflow: ``pytest --snapshot-update`` records or refreshes entries and
reports (and with the flag deletes) unused ones, including those of a deleted or renamed test
file.  The extension instance holds no per-check state: everything a comparison needs travels
in the asserted :class:`BaselineCheck`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from syrupy.data import Snapshot, SnapshotCollection, SnapshotCollections
from syrupy.extensions.base import AbstractSyrupyExtension

from .. import distributed, settings
from .._io import atomic_write_text, distinct_name
from ..exceptions import BaselineError, BaselineFormatError
from ..hardware import hardware_entries, hardware_key
from ..metrics import get_metric
from ..verdicts import Comparison
from .files import (
    FORMAT_VERSION,
    _discovery_info,
    _test_name,
    folder_lock,
    folder_refusal,
    orphaned_baselines,
    read_baseline_file,
    refuse_newer_message,
    remove_stale_tmp,
)
from .judge import Corrupt, _node_for_cli, judge_check
from .records import BaselineCheck, StoredCheck, needs_migration
from .sidecars import remove_stale_sidecars, write_statistics


class DiffevalBaselineExtension(AbstractSyrupyExtension):
    """A syrupy extension: one JSON collection per test, one snapshot per metric.  The
    asserted data is a :class:`BaselineCheck` (record, tolerance, update mode, test id);
    :meth:`matches` judges it with :func:`judge_check` and keeps nothing: the caller reads
    the outcome back from syrupy's assertion result (``executions``)."""

    file_extension = "json"
    write_immediately = True

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
        check = data["checks"].get(snapshot_name[len(path.stem) + 1 : -1])
        if check is None:
            return None  # nothing stored for this metric: syrupy records it as a new snapshot
        stored_test = data.get("test")
        return StoredCheck(str(path), stored_test if isinstance(stored_test, str) else None, check)

    # ---- storage: write (atomic, merging the other metrics of the same test)
    @classmethod
    def write_snapshot_collection(cls, *, snapshot_collection: SnapshotCollection, name_order: Any = None) -> None:
        """Crash-safe: new statistics files first (under new names), then the JSON atomically,
        then the statistics files it no longer names.  A run killed anywhere leaves the old
        or the new baseline, each with its statistics.  Runs under the folder's lock (see
        :func:`folder_lock`); a write the OS refuses (read-only folder, full disk) is a
        :class:`BaselineError` naming the file, the OS error and the fix, never a silent pass."""
        if not distributed.is_writer():
            return  # under torchrun rank 0 alone writes baselines (every rank has the same records)
        path = Path(snapshot_collection.location)
        records = [_stored_record(snapshot.data) for snapshot in snapshot_collection]
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
            if state is not None:  # drift's statistics, a set-level metric's per-image features: beside the JSON
                target, sha = write_statistics(path, record["metric"], key, state)
                record["details"] = {**record.get("details", {}), "statistics_sha256": sha,
                                     "statistics_file": target.name}
                if get_metric(record["metric"]).keeps_state:  # drift: this run's statistics become the baseline's
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
        atomic_write_text(path, text)
        try:
            remove_stale_sidecars(path, data, set(data["checks"]))
            remove_stale_tmp(path)
        except OSError:
            pass  # the baseline is written; what is left is removed by the next update's remove_leftovers()

    def delete_snapshots(self, *, snapshot_location: str, snapshot_names: set[str]) -> None:
        """Remove unused entries, under the folder's lock (:func:`folder_lock`); never in a
        folder that leads outside the baselines folder."""
        folder = Path(snapshot_location).parent
        if folder_refusal(folder) or not distributed.is_writer():  # under torchrun rank 0 alone deletes
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
            atomic_write_text(path, json.dumps(data, indent=2) + "\n")
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
    def serialize(self, data: Any, **kwargs: Any) -> BaselineCheck:
        """The asserted :class:`BaselineCheck`, unchanged: it is what syrupy hands to
        :meth:`matches` and, on an update, to :meth:`write_snapshot_collection`, which stores
        its ``record``."""
        if not isinstance(data, BaselineCheck):
            raise TypeError(f"pytest-diffeval: the baseline extension asserts a BaselineCheck, got "
                            f"{type(data).__name__}; fix: use diffeval_baseline.assert_no_regression()")
        return data

    def matches(self, *, serialized_data: Any, snapshot_data: Any) -> bool:
        """Within tolerance.  An improvement beyond it passes a normal run but is rewritten
        by ``--snapshot-update``, so the baseline ratchets up with the model.  Under
        ``--snapshot-update`` an entry is also rewritten when this run calibrated its noise
        (the noise must be stored) or its statistics file has a format-1 name (migrated)."""
        check: BaselineCheck = serialized_data
        outcome = judge_check(check, snapshot_data)
        if not isinstance(outcome, Comparison):
            return False
        stored = snapshot_data.check if isinstance(snapshot_data, StoredCheck) else snapshot_data
        if check.updating and (check.record.get("noise") is not None or needs_migration(check.record, stored)):
            return False
        return outcome.verdict == "pass" or (outcome.verdict == "improved" and not check.updating)


def _stored_record(data: Any) -> dict[str, Any]:
    """The record to store from what syrupy queued: a :class:`BaselineCheck`'s record (or a
    record itself, when the storage layer is called directly), copied so writing it (which
    pops its private ``_test``/``_test_file``/``_state`` keys) leaves the check intact."""
    return dict(data.record if isinstance(data, BaselineCheck) else data)
