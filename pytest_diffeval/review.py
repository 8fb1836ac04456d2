"""Reviewing baselines: list what is stored, and diff two sets of numbers (two baseline
files or folders, or a baseline folder and a results directory's ``metrics.json``), so a
reviewer of a baseline update sees which numbers moved and which samples moved most.

``python -m pytest_diffeval baselines list [DIR]`` and ``... baselines diff A B`` (see
``__main__``); ``... results merge DIR... --out DIR`` merges the results directories of
several runners (shards) into one.  Nothing here imports torch.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, TextIO

import numpy as np

from ._io import atomic_path
from .baselines import read_baseline_file
from .exceptions import ReviewError  # noqa: F401 - re-exported
from .hardware import hardware_key
from .report import (
    FORMAT_VERSION,
    SAMPLES_FIX,
    UnsafePath,
    atomic_write_text,
    inside,
    is_test_failed,
    ordered_tests,
    render_html,
)


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


# --------------------------------------------------------------------------- reading


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
            out[f"{sample['seed']}|{sample['prompt']}"] = {"prompt": str(sample["prompt"]), "seed": sample["seed"],
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


RESULTS_FIX = ("metrics.json is written by a pytest-diffeval run: merge the results directories as the runs wrote "
               "them, from runs you trust, or rerun that shard to write it again")
_NUMBER_FIELDS = ("value", "threshold", "baseline", "tolerance", "delta")  # finite numbers or null
_TEXT_FIELDS = ("backbone", "verdict", "baseline_file")  # strings or null ("images": _image_folder_name)
_META_TEXT = ("created", "shard", "pytest_diffeval", "rootdir", "results_dir", "report")


def _number(value: Any) -> bool:
    """A finite JSON number (not a bool, not a string such as ``"NaN"``)."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an integer too large for a float
        return False


def _samples_ok(samples: list[Any]) -> bool:
    """Whether every sample is well formed, checked in bulk (a large merge holds hundreds of
    thousands); when not, the loop of :func:`validate_results` names the first bad one."""
    if not all(type(s) is dict for s in samples):
        return False
    if not ({type(s.get("prompt")) for s in samples} <= {str, type(None)}
            and {type(s.get("seed")) for s in samples} <= {int, type(None)}):
        return False
    numbers = [s.get("value") for s in samples]
    numbers += [s[k] for s in samples for k in ("baseline", "change") if s.get(k) is not None]
    if not {type(v) for v in numbers} <= {int, float}:  # type(): a bool or a string is refused
        return False
    try:
        return bool(np.isfinite(np.asarray(numbers, dtype=np.float64)).all())
    except OverflowError:  # an integer too large for a float
        return False


def validate_results(path: Path, data: Any) -> None:
    """Check every field of a results ``metrics.json`` that a merge or a diff reads, writes
    or shows: :class:`ReviewError` naming the file, the field, the value and the fix.  A
    shard's file may come from anywhere, so nothing but finite numbers, strings, booleans and
    the documented structure gets into the merged ``metrics.json`` and ``report.html``."""
    def bad(where: str, value: Any, expected: str) -> ReviewError:
        shown = repr(value)
        shown = shown if len(shown) <= 80 else shown[:77] + "..."
        return ReviewError(f"{path}: {where} is {shown}, not {expected}. Fix: {RESULTS_FIX}")

    if not isinstance(data, dict) or not isinstance(data.get("checks"), list):
        raise ReviewError(f"{path}: not a pytest-diffeval metrics.json (no 'checks' list)")
    version = data.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version > FORMAT_VERSION:
        raise ReviewError(f"{path}: format_version {version!r} is not one this "
                          f"pytest-diffeval reads ({FORMAT_VERSION}); upgrade pytest-diffeval")
    for key in ("exitstatus", "workers"):
        if data.get(key) is not None and (not isinstance(data[key], int) or isinstance(data[key], bool)):
            raise bad(f"{key!r}", data[key], "an integer")
    for key in _META_TEXT:
        if data.get(key) is not None and not isinstance(data[key], str):
            raise bad(f"{key!r}", data[key], "a string")
    if data.get("args") is not None and not (isinstance(data["args"], list)
                                              and all(isinstance(a, str) for a in data["args"])):
        raise bad("'args'", data["args"], "a list of strings")
    if data.get("results_always") is not None and not isinstance(data["results_always"], bool):
        raise bad("'results_always'", data["results_always"], "true or false")
    tests = data.get("tests")
    if tests is not None and not isinstance(tests, list):
        raise bad("'tests'", tests, "a list")
    for index, test in enumerate(tests or []):
        where = f"tests[{index}]"
        if not isinstance(test, dict) or not isinstance(test.get("test"), str) or not test["test"]:
            raise bad(f"{where}", test, "an object with a 'test' id")
        if test.get("outcome") is not None and not isinstance(test["outcome"], str):
            raise bad(f"{where} 'outcome'", test["outcome"], "a string")
        if test.get("failed") is not None and not isinstance(test["failed"], bool):
            raise bad(f"{where} 'failed'", test["failed"], "true or false")
        if test.get("checks") is not None and not (isinstance(test["checks"], list)
                                                   and all(isinstance(c, str) for c in test["checks"])):
            raise bad(f"{where} 'checks'", test["checks"], "a list of metric names")
    for index, check in enumerate(data["checks"]):
        if not isinstance(check, dict) or "test" not in check or "metric" not in check:
            raise ReviewError(f"{path}: checks[{index}] lacks 'test' or 'metric'. Fix: {RESULTS_FIX}")
        for key in ("test", "metric"):
            if not isinstance(check[key], str) or not check[key]:
                raise bad(f"checks[{index}] {key!r}", check[key], "a non-empty string")
        where = f"checks[{index}] ({check['test']}, {check['metric']})"
        for key in _NUMBER_FIELDS:
            if check.get(key) is not None and not _number(check[key]):
                raise bad(f"{where} {key!r}", check[key], "a finite number")
        for key in _TEXT_FIELDS:
            if check.get(key) is not None and not isinstance(check[key], str):
                raise bad(f"{where} {key!r}", check[key], "a string")
        if check.get("images") is not None:
            _image_folder_name(check, path.parent)
        for key in ("higher_is_better", "passed"):
            if check.get(key) is not None and not isinstance(check[key], bool):
                raise bad(f"{where} {key!r}", check[key], "true or false")
        for key in ("details", "provenance"):
            if check.get(key) is not None and not isinstance(check[key], dict):
                raise bad(f"{where} {key!r}", check[key], "an object")
        samples = check.get("samples")
        if samples is not None and not isinstance(samples, list):
            raise bad(f"{where} 'samples'", samples, "a list")
        if samples and _samples_ok(samples):
            continue
        for number, sample in enumerate(samples or []):
            at = f"{where} samples[{number}]"
            if not isinstance(sample, dict):
                raise bad(at, sample, "an object with prompt, seed and value")
            if sample.get("prompt") is not None and not isinstance(sample["prompt"], str):
                raise bad(f"{at} 'prompt'", sample["prompt"], "a string")
            seed = sample.get("seed")
            if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
                raise bad(f"{at} 'seed'", seed, "an integer")
            if not _number(sample.get("value")):
                raise bad(f"{at} 'value'", sample.get("value"), "a finite number")
            for key in ("baseline", "change"):
                if sample.get(key) is not None and not _number(sample[key]):
                    raise bad(f"{at} {key!r}", sample[key], "a finite number")


def read_results(path: Path) -> list[Entry]:
    """The checks of a results directory's ``metrics.json``."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ReviewError(f"{path}: cannot read ({exc.strerror or exc})") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise ReviewError(f"{path}: not valid JSON ({exc})") from None
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
    try:
        head = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ReviewError(f"{path}: cannot read ({exc.strerror or exc})") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise ReviewError(f"{path}: not valid JSON ({exc})") from None
    if isinstance(head, dict) and isinstance(head.get("checks"), list):
        return Source(path, "results", read_results(path), 1)
    return Source(path, "baselines", read_baseline(path), 1)


# --------------------------------------------------------------------------- formatting


def _fmt(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:#.4g}"


def _signed(value: float) -> str:
    return f"{value:+#.4g}"


def _table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return ["  ".join(c.ljust(widths[i]) for i, c in enumerate(r)).rstrip() for r in [header, *rows]]


def model_summary(provenance: dict[str, Any]) -> str:
    """``tiny-sd (hash 1a2b3c4d5e) StableDiffusionPipeline float32 cpu``: which model and how."""
    if not provenance:
        return "-"
    model = str(provenance.get("model") or "?")
    if "/" in model and (model.startswith(("/", ".", "~")) or provenance.get("model_kind") in {"local", "path"}):
        model = Path(model).name or model  # a local folder: its name says enough
    parts = [model]
    identity = provenance.get("model_hash") or provenance.get("revision")
    if identity and identity != "unknown":
        parts.append(f"({str(identity)[:10]})")
    parts += [str(provenance[k]).replace("torch.", "") for k in ("pipeline_class", "dtype", "device_kind")
              if provenance.get(k)]
    return " ".join(parts)


def list_entries(source: Source, out: TextIO) -> None:
    """Print the stored baselines, one line per entry."""
    out.write(f"baselines in {source.describe()}\n")
    rows = [(e.test, e.metric, e.hardware, str(e.backbone or "-"), _fmt(e.value), str(len(e.samples) or "-"),
             e.recorded or "-", model_summary(e.provenance))
            for e in sorted(source.entries, key=lambda e: e.key)]
    for line in _table(("test", "metric", "hardware", "backbone", "value", "n", "recorded", "model"), rows):
        out.write(line + "\n")


# --------------------------------------------------------------------------- diff


@dataclass
class Change:
    """One number in A and B (or in one of them)."""

    old: Entry | None
    new: Entry | None

    @property
    def entry(self) -> Entry:
        return self.new or self.old  # type: ignore[return-value]

    @property
    def delta(self) -> float | None:
        return None if self.old is None or self.new is None else self.new.value - self.old.value

    @property
    def direction(self) -> str:
        delta = self.delta
        if delta is None:
            return "added" if self.old is None else "removed"
        if abs(delta) <= 1e-12 * max(1.0, abs(self.old.value)):  # type: ignore[union-attr]
            return "unchanged"
        return "better" if (delta > 0) == self.entry.higher_is_better else "worse"


def pair(a: Iterable[Entry], b: Iterable[Entry]) -> list[Change]:
    """Match entries by (test, metric, hardware); an entry left alone on each side of the same
    (test, metric) is paired too (a run on other hardware than the baseline's)."""
    old = {e.key: e for e in a}
    new = {e.key: e for e in b}
    changes = [Change(old.pop(k), new.pop(k)) for k in list(old) if k in new]
    by_metric_old: dict[tuple[str, str], list[Entry]] = {}
    by_metric_new: dict[tuple[str, str], list[Entry]] = {}
    for e in old.values():
        by_metric_old.setdefault((e.test, e.metric), []).append(e)
    for e in new.values():
        by_metric_new.setdefault((e.test, e.metric), []).append(e)
    for key, olds in by_metric_old.items():
        news = by_metric_new.get(key, [])
        if len(olds) == 1 and len(news) == 1:
            changes.append(Change(olds[0], news[0]))
            old.pop(olds[0].key)
            new.pop(news[0].key)
    changes += [Change(e, None) for e in old.values()] + [Change(None, e) for e in new.values()]
    return sorted(changes, key=lambda c: (c.entry.test, c.entry.metric, c.entry.hardware))


_PROVENANCE_KEYS = ("model", "model_hash", "revision", "pipeline_class", "scheduler", "dtype", "device_kind")


def _notes(old: Entry, new: Entry) -> list[str]:
    notes = []
    if old.hardware != new.hardware:
        notes.append(f"hardware: {old.hardware} -> {new.hardware}")
    if old.backbone != new.backbone:
        notes.append(f"backbone: {old.backbone} -> {new.backbone} (values are not comparable)")
    for key in _PROVENANCE_KEYS:
        a, b = old.provenance.get(key), new.provenance.get(key)
        if a != b and (a is not None or b is not None):
            notes.append(f"{key}: {a} -> {b}")
    va, vb = old.provenance.get("versions") or {}, new.provenance.get("versions") or {}
    moved = [f"{k} {va.get(k)} -> {vb.get(k)}" for k in sorted(set(va) | set(vb)) if va.get(k) != vb.get(k)]
    if moved:
        notes.append("versions: " + ", ".join(moved))
    return notes


def moved_samples(old: Entry, new: Entry, top: int) -> tuple[list[dict[str, Any]], int, int, int]:
    """The ``top`` samples whose value changed most (by size), the number that changed at
    all, and the numbers of samples only in A and only in B."""
    common = [k for k in old.samples if k in new.samples]
    moves = [{**new.samples[k], "old": old.samples[k]["value"],
              "change": new.samples[k]["value"] - old.samples[k]["value"]} for k in common]
    changed = sum(1 for m in moves if m["change"] != 0)
    moves.sort(key=lambda m: (-abs(m["change"]), m["prompt"], str(m["seed"])))
    return ([m for m in moves if m["change"] != 0][:top], changed, len(set(old.samples) - set(new.samples)),
            len(set(new.samples) - set(old.samples)))


def diff(a: Source, b: Source, out: TextIO, *, top: int = 5) -> list[Change]:
    """Print, per test and metric, the old value, the new one, the change and the samples
    that moved most; return the changes."""
    changes = pair(a.entries, b.entries)
    out.write(f"A (old): {a.describe()}\nB (new): {b.describe()}\n")
    test = None
    for change in changes:
        e = change.entry
        if e.test != test:
            test = e.test
            out.write(f"\n{test}\n")
        direction = "higher is better" if e.higher_is_better else "lower is better"
        label = f"  {e.metric} [{e.hardware}] ({e.backbone or '-'}; {direction})"
        if change.old is None or change.new is None:
            only = "B (added)" if change.old is None else "A (removed)"
            out.write(f"{label}: only in {only}, value {_fmt(e.value)}\n")
            continue
        old, new, delta = change.old, change.new, change.delta or 0.0
        ratio = delta / abs(old.value) if old.value else math.nan
        relative = f" ({ratio * 100:+.1f}%)" if math.isfinite(ratio) else ""
        verdict = f"; this run's verdict: {new.verdict}" if new.verdict else ""
        out.write(f"{label}\n    old {_fmt(old.value)}   new {_fmt(new.value)}   delta {_signed(delta)}{relative}"
                  f"   {change.direction}{verdict}\n")
        for note in _notes(old, new):
            out.write(f"    note: {note}\n")
        moves, changed, only_a, only_b = moved_samples(old, new, top)
        if old.samples and new.samples:
            extra = "".join(f", {n} only in {side}" for n, side in ((only_a, "A"), (only_b, "B")) if n)
            common = len(set(old.samples) & set(new.samples))
            out.write(f"    samples: {changed} of {common} paired (prompt, seed) samples changed{extra}\n")
        if moves:
            out.write("    samples that moved most (old -> new):\n")
            for m in moves:
                out.write(f"      {_signed(m['change']):>9}  {_fmt(m['old']):>9} -> {_fmt(m['value']):<9}"
                          f"  seed {str(m['seed']):<4} {m['prompt']!r}\n")
    counts: dict[str, int] = {}
    for change in changes:
        counts[change.direction] = counts.get(change.direction, 0) + 1
    compared = sum(counts.get(k, 0) for k in ("worse", "better", "unchanged"))
    out.write(f"\n{compared} compared ({counts.get('worse', 0)} worse, {counts.get('better', 0)} better, "
              f"{counts.get('unchanged', 0)} unchanged), {counts.get('added', 0)} only in B (added), "
              f"{counts.get('removed', 0)} only in A (removed)\n")
    return changes


# --------------------------------------------------------------------------- merging results


@dataclass
class Merged:
    """What :func:`merge_results` wrote."""

    out: Path
    tests: int
    checks: int
    failed_tests: int
    failed_checks: int
    images: int
    notes: list[str] = field(default_factory=list)


_META_KEYS = ("created", "shard", "exitstatus", "args", "workers", "pytest_diffeval", "rootdir", "results_always")
RESERVED_NAMES = ("metrics.json", "report.html")  # what the merge itself writes in --out


def _read_shard(directory: Path) -> tuple[Path, bytes, dict[str, Any]]:
    """A results directory's ``metrics.json``: its path, its bytes and its checked content."""
    path = directory / "metrics.json" if directory.is_dir() else directory
    if not path.is_file():
        raise ReviewError(f"{directory}: no metrics.json here; pass the results directories of the runs "
                          "(--diffeval-results, default ./diffeval-results)")
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ReviewError(f"{path}: cannot read ({exc.strerror or exc})") from None
    data = _parse(path, raw)
    validate_results(path, data)
    return path, raw, data


def _parse(path: Path, raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ReviewError(f"{path}: not valid JSON ({exc})") from None


def _find_baseline(recorded: str | None, root: Path) -> str | None:
    """A baseline file recorded on another machine: its own path if it exists here inside
    ``root``, else the longest trailing part of that path that exists under ``root``; None
    when there is none (the report then shows no per-sample baseline columns).  A path that
    leads outside ``root`` is never followed: ``metrics.json`` may come from anywhere."""
    if not recorded:
        return recorded
    base = root.resolve()
    path = Path(recorded)
    if path.is_file() and path.resolve().is_relative_to(base):
        return str(path.resolve())
    parts = [p for p in (path.parts[1:] if path.is_absolute() else path.parts) if p not in ("", ".")]
    if ".." in parts:
        return None
    for start in range(len(parts)):
        candidate = (root.joinpath(*parts[start:])).resolve()
        if candidate.is_file() and candidate.is_relative_to(base):
            return str(candidate)
    return None


def _row(check: dict[str, Any], strings: dict[str, str] | None = None) -> dict[str, Any]:
    """A ``metrics.json`` check as the report functions take it (per-sample lists); equal
    prompt strings are kept once (``strings``), since a large merge holds every sample."""
    row = {k: v for k, v in check.items() if k not in ("samples", "passed")}
    samples = check.get("samples") or []
    if samples:
        strings = {} if strings is None else strings
        row["per_sample"] = [s.get("value") for s in samples]
        row["prompts"] = [strings.setdefault(p, p) if isinstance(p, str) else p for p in (s.get("prompt") for s in samples)]
        row["seeds"] = [s.get("seed") for s in samples]
    return row


def merge_results(sources: Iterable[str | Path], out: str | Path, *, allow_duplicates: bool = False,
                  root: str | Path = ".") -> Merged:
    """Merge results directories (one per shard or runner) into ``out``: one ``metrics.json``
    with every check, the image folders of the checks, and the HTML report regenerated from
    the merged checks.  A test found in two directories is an error (overlapping shards)
    unless ``allow_duplicates``, when the later directory wins.

    Every input is read and checked (:func:`validate_results`, image folder names) before
    anything is written; a bad one is :class:`ReviewError` naming the file, the field and the
    fix.  One parsed ``metrics.json`` is held at a time (the inputs' bytes and the merged
    checks, encoded, are kept), and ``metrics.json`` is streamed out one check per line with
    the C JSON encoder: an 80 MB input merges in seconds, not minutes."""
    sources = [Path(s) for s in sources]
    out = Path(out)
    if not sources:
        raise ReviewError("nothing to merge: pass two or more results directories")
    for source in sources:
        if source.resolve() == out.resolve():
            raise ReviewError(f"{out}: the output directory is one of the inputs; choose a new --out")

    # 1. Read and check every input; nothing is written until all of them pass.
    shards: list[tuple[Path, Path, bytes, dict[str, Any]]] = []
    last: Any = None
    owner: dict[str, Path] = {}
    folders: list[tuple[Path, Path, str, str]] = []  # source, its metrics.json, test, image folder name
    for source in sources:
        path, raw, data = _read_shard(source)
        tests = {c["test"] for c in data["checks"]} | {t["test"] for t in data.get("tests") or []}
        for test in sorted(tests):
            if test in owner and owner[test] != source and not allow_duplicates:
                raise ReviewError(f"{test} is in both {owner[test]} and {source}: overlapping shards? "
                                  "(--allow-duplicates keeps the later directory's results)")
            owner[test] = source
        folders += [(source, path, c["test"], _image_folder_name(c, _folder_of(source)))
                    for c in data["checks"] if c.get("images")]
        shards.append((source, path, raw, {k: data.get(k) for k in _META_KEYS}))
        last = data  # the last input is not parsed again
        del raw, data
    shards[-1] = (*shards[-1][:2], b"", shards[-1][3])  # nor are its bytes needed
    named: dict[str, tuple[Path, str]] = {}
    for source, path, test, name in dict.fromkeys(folders):  # a test's checks share its folder: once each
        if owner[test] != source:
            continue
        if name.casefold() in RESERVED_NAMES:
            raise ReviewError(f"{path}: the image folder of {test!r} is named {name!r}, a file the merge writes in "
                              f"{out}. Fix: {IMAGES_FIX}")
        _image_source(name, _folder_of(source), out)
        other = named.setdefault(name, (source, test))
        if other[0] != source:
            raise ReviewError(f"{path}: the image folder {name!r} of {test!r} has the name of the image folder of "
                              f"{other[1]!r} in {other[0]}: merged, one test would show the other's images. "
                              "Fix: rerun both shards "
                              "with this pytest-diffeval (results folders are unique per test id), or merge them "
                              "into separate --out directories")

    # 2. Copy the images and collect the checks, one input at a time.
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    encoded: dict[str, list[str]] = {}  # test -> its checks as JSON, in their order
    passed: list[Any] = []
    outcomes: dict[str, str] = {}
    copied: dict[str, Path] = {}
    strings: dict[str, str] = {}
    shard_notes: dict[int, list[str]] = {}
    for index in reversed(range(len(shards))):  # last first: its parsed document is still here
        source, path, raw, _ = shards[index]
        data, last = (last, None) if last is not None else (_parse(path, raw), None)
        notes = shard_notes.setdefault(index, [])
        for test in data.get("tests") or []:
            if owner.get(test["test"]) == source and test.get("outcome"):
                outcomes[test["test"]] = test["outcome"]
        for check in data["checks"]:
            if owner[check["test"]] != source:
                continue
            if check.get("images"):
                folder = _folder_of(source)
                check["images"] = _copy_images(_image_folder_name(check, folder), folder, out, copied, notes)
            found = _find_baseline(check.get("baseline_file"), Path(root))
            if check.get("baseline_file") and found is None:
                notes.append(f"baseline file {check['baseline_file']} of {check['test']} is not under --root "
                             f"{Path(root).resolve()}: the report shows no per-sample baseline values for it")
            check["baseline_file"] = found
            encoded.setdefault(check["test"], []).append(json.dumps(check))
            passed.append(check.get("passed", False))
            rows.append(_row(check, strings))
        del data
    notes = [note for index in range(len(shards)) for note in shard_notes[index]]
    tests = ordered_tests(rows, outcomes)
    metas = [meta for _, _, _, meta in shards]
    meta = {
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "pytest_diffeval": metas[0].get("pytest_diffeval"),
        "exitstatus": max(m.get("exitstatus") or 0 for m in metas),
        "rootdir": metas[0].get("rootdir"),
        "args": ["results", "merge", *[str(s) for s in sources]],
        "workers": sum(m.get("workers") or 0 for m in metas),
        "results_always": any(m.get("results_always") for m in metas),
        "results_dir": str(out),
        "report": str(out / "report.html"),
        "merged_from": [{"path": str(s), **{k: m.get(k) for k in ("created", "shard", "exitstatus", "args", "workers")}}
                        for (s, _, _, _), m in zip(shards, metas)],
    }
    head = {
        "format_version": FORMAT_VERSION,
        **meta,
        "summary": {
            "tests": len(tests),
            "failed_tests": sum(is_test_failed(r, outcomes.get(t)) for t, r in tests),
            "checks": len(rows),
            "failed_checks": sum(p is False for p in passed),  # None: updated, not judged
        },
        "tests": [{"test": t, "failed": is_test_failed(r, outcomes.get(t)), "outcome": outcomes.get(t),
                   "checks": [c["metric"] for c in r]} for t, r in tests],
    }
    with atomic_path(out / "metrics.json") as tmp, open(tmp, "w", encoding="utf-8") as handle:
        handle.write(json.dumps(head, indent=2)[:-1].rstrip() + ',\n  "checks": [')
        lines = (line for test, _ in tests for line in encoded[test])  # failed tests first, as the plugin writes
        for index, line in enumerate(lines):
            handle.write(("\n    " if index == 0 else ",\n    ") + line)
        handle.write("\n  ]\n}\n")
    atomic_write_text(out / "report.html", render_html(rows, meta, outcomes))
    summary = head["summary"]
    return Merged(out, summary["tests"], summary["checks"], summary["failed_tests"], summary["failed_checks"],
                  len(copied), notes)


IMAGES_FIX = ("'images' names the check's image folder, which the run wrote inside its results directory "
              "(beside metrics.json); merge results directories as the runs wrote them, from runs you trust")


def _image_folder_name(check: dict[str, Any], source: Path) -> str:
    """The name of a check's image folder inside ``source``: the last part of the path the run
    recorded (an absolute path on the runner; the artifact may live elsewhere now).  A value
    that is not a path, holds ``..`` or ends in no folder name (``/``, ``.``) is refused."""
    value = check.get("images")
    where = f"{source / 'metrics.json'}: the 'images' of {check.get('test')!r} is {value!r}"
    if not isinstance(value, str) or not value.strip() or "\x00" in value:
        raise ReviewError(f"{where}, not a folder path. Fix: {IMAGES_FIX}")
    path = Path(value)
    if ".." in path.parts:
        raise ReviewError(f"{where}, which contains '..' and could lead outside the results directory {source}. "
                          f"Fix: {IMAGES_FIX}")
    if path.name in ("", "."):
        raise ReviewError(f"{where}, which names no folder inside the results directory {source}. Fix: {IMAGES_FIX}")
    return path.name


def _copy_tree(folder: Path, target: Path, notes: list[str]) -> None:
    """Copy the regular files and folders under ``folder`` to ``target``; symbolic links are
    left out (one could point anywhere on the machine that merges)."""
    target.mkdir(parents=True)
    for entry in sorted(folder.iterdir()):
        if entry.is_symlink():
            notes.append(f"left out the symbolic link {entry} (only regular files are merged)")
        elif entry.is_dir():
            _copy_tree(entry, target / entry.name, notes)
        elif entry.is_file():
            shutil.copy2(entry, target / entry.name)


def _copy_images(name: str, source: Path, out: Path, copied: dict[str, Path], notes: list[str]) -> str | None:
    """Copy the image folder ``name`` of the results directory ``source`` into ``out`` (once
    per folder); return its new path.  Only a folder inside ``source`` is read, only
    ``out/<name>`` is ever replaced, and ``samples.json`` in it must name files inside it."""
    key = f"{source.resolve()}|{name}"
    if key in copied:
        return str(copied[key])
    folder = _image_source(name, source, out)
    if folder is None:
        notes.append(f"images of a check are missing: no folder {name!r} in {source}")
        return None
    target = out / name  # one plain name: directly in out
    tmp = out / f".{name}.{os.getpid()}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    _copy_tree(folder, tmp, notes)
    if target.is_symlink() or target.is_file():
        target.unlink()
    elif target.is_dir():
        shutil.rmtree(target)
    os.replace(tmp, target)
    copied[key] = target.resolve()
    return str(copied[key])


def _folder_of(source: Path) -> Path:
    """The results directory of a source given as the directory or its ``metrics.json``."""
    return source if source.is_dir() else source.parent


def _image_source(name: str, source: Path, out: Path) -> Path | None:
    """``source/<name>`` when it is a folder inside ``source`` whose ``samples.json`` names
    files inside it, None when there is no such folder; :class:`ReviewError` for a name that
    would read from, or write to, anywhere outside ``source`` and ``out``."""
    document = source / "metrics.json"
    try:
        folder = inside(source, name, source=document, what="image folder", fix=IMAGES_FIX)
        inside(out, name, source=document, what="image folder", fix=IMAGES_FIX)
    except UnsafePath as exc:
        raise ReviewError(str(exc)) from None
    if not folder.is_dir():
        return None
    _check_samples_listing(folder)
    return folder


def _check_samples_listing(folder: Path) -> None:
    """Refuse an image folder whose ``samples.json`` names an image outside it."""
    listing = folder / "samples.json"
    try:
        entries = json.loads(listing.read_text(encoding="utf-8")).get("samples", [])
    except (OSError, ValueError, AttributeError):
        return  # no listing: the report lists the folder's PNGs itself
    for entry in entries if isinstance(entries, list) else []:
        try:
            inside(folder, entry.get("file") if isinstance(entry, dict) else entry, source=listing,
                   what="sample file", fix=SAMPLES_FIX)
        except UnsafePath as exc:
            raise ReviewError(str(exc)) from None
