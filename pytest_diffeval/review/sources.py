"""Reading what a review compares: baseline files and folders, and results directories
(their ``metrics.json``, checked by ``validation`` first), as :class:`Entry` lists."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..baselines import read_baseline_file
from ..exceptions import ReviewError
from ..hardware import hardware_key
from ..report import sample_key
from .validation import validate_results


@dataclass
class Entry:
    """One stored number: a metric of a test (on one hardware, for per-hardware baselines)."""

    test: str
    metric: str
    hardware: str
    value: float
    backbone: str | None = None
    higher_is_better: bool = True
    samples: dict[str, dict[str, Any]] = field(default_factory=dict)  # "<seed>|<prompt>" -> prompt, seed, value
    recorded: str | None = None
    provenance: dict[str, Any] = field(default_factory=dict)
    verdict: str | None = None  # results only
    source: str = ""

    @property
    def key(self) -> tuple[str, str, str]:
        return self.test, self.metric, self.hardware


@dataclass
class Source:
    """What a path held: baseline files or a results directory, and their entries."""

    path: Path
    kind: str  # "baselines" or "results"
    entries: list[Entry] = field(default_factory=list)
    files: int = 0
    errors: list[str] = field(default_factory=list)

    def describe(self) -> str:
        what = ("results of a run" if self.kind == "results"
                else f"{self.files} baseline file{'s' if self.files != 1 else ''}")
        return f"{self.path} ({what}, {len(self.entries)} entries)"


def _hardware(provenance: dict[str, Any]) -> str:
    return hardware_key(provenance or {})


def _samples(raw: Any, where: str) -> dict[str, dict[str, Any]]:
    if raw is None:
        return {}
    if not isinstance(raw, list):
        raise ReviewError(f"{where}: 'samples' is not a list")
    out = {}
    for sample in raw:
        try:
            out[sample_key(sample["seed"], sample["prompt"])] = {"prompt": str(sample["prompt"]), "seed": sample["seed"],
                                                          "value": float(sample["value"])}
        except (KeyError, TypeError, ValueError):
            raise ReviewError(f"{where}: a sample lacks prompt, seed or a numeric value: {sample!r}") from None
    return out


def _entry(test: str, metric: str, record: Any, where: str, hardware: str | None = None) -> Entry:
    if not isinstance(record, dict) or "value" not in record:
        raise ReviewError(f"{where}: the entry for {metric!r} has no 'value'")
    try:
        value = float(record["value"])
    except (TypeError, ValueError):
        raise ReviewError(f"{where}: the value of {metric!r} is not a number: {record['value']!r}") from None
    provenance = record.get("provenance") if isinstance(record.get("provenance"), dict) else {}
    return Entry(test=test, metric=metric, hardware=hardware or _hardware(provenance), value=value,
                 backbone=record.get("backbone"), higher_is_better=bool(record.get("higher_is_better", True)),
                 samples=_samples(record.get("samples"), f"{where} ({metric})"), recorded=record.get("recorded"),
                 provenance=provenance, verdict=record.get("verdict"), source=where)


def read_baseline(path: Path) -> list[Entry]:
    """The entries of one baseline file (either layout: one entry per metric, or per hardware)."""
    try:
        data = read_baseline_file(path)
    except OSError as exc:
        raise ReviewError(f"{path}: cannot read ({exc.strerror or exc})") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise ReviewError(f"{path}: {exc}") from None
    test = str(data.get("test") or path.stem)
    entries = []
    for metric, check in sorted(data["checks"].items()):
        if isinstance(check, dict) and isinstance(check.get("hardware"), dict):
            for hardware, record in sorted(check["hardware"].items()):
                entries.append(_entry(test, metric, record, str(path), hardware))
        else:
            entries.append(_entry(test, metric, check, str(path)))
    return entries


def read_json(path: Path) -> Any:
    """A JSON file's content; :class:`ReviewError` naming the file when it cannot be read or parsed."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ReviewError(f"{path}: cannot read ({exc.strerror or exc})") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise ReviewError(f"{path}: not valid JSON ({exc})") from None


def read_results(path: Path) -> list[Entry]:
    """The checks of a results directory's ``metrics.json``."""
    data = read_json(path)
    validate_results(path, data)
    entries, seen = [], set()
    for check in data["checks"]:
        if check.get("value") is None:
            continue
        entry = _entry(str(check["test"]), str(check["metric"]), check, str(path))
        base, n = entry.metric, 1
        while entry.key in seen:  # the same metric checked twice in one test: metric#2, ...
            n += 1
            entry.metric = f"{base}#{n}"
        seen.add(entry.key)
        entries.append(entry)
    return entries


def load(path: str | Path, *, keep_going: bool = False) -> Source:
    """Read a baseline file or folder, a results directory or its ``metrics.json``.
    With ``keep_going`` an unreadable baseline file is an error in ``Source.errors``;
    otherwise it raises :class:`ReviewError`."""
    path = Path(path)
    if not path.exists():
        raise ReviewError(f"{path}: no such file or directory")
    if path.is_dir():
        if (path / "metrics.json").is_file():
            return Source(path, "results", read_results(path / "metrics.json"), 1)
        files = sorted(p for p in path.rglob("*.json") if not p.name.startswith(".")
                       and not any(part.endswith(".images") for part in p.relative_to(path).parts[:-1]))
        if not files:
            raise ReviewError(f"{path}: holds no baseline files (*.json) and no metrics.json")
        source = Source(path, "baselines", files=len(files))
        for file in files:
            try:
                source.entries += read_baseline(file)
            except ReviewError as exc:
                if not keep_going:
                    raise
                source.errors.append(str(exc))
        return source
    head = read_json(path)
    if isinstance(head, dict) and isinstance(head.get("checks"), list):
        return Source(path, "results", read_results(path), 1)
    return Source(path, "baselines", read_baseline(path), 1)

