"""Merging the results directories of several runners (shards) into one: one
``metrics.json`` (its head built by ``report.document_head``, like the plugin's), the image
folders, and the HTML report regenerated from the merged checks.  The parts of a split
generation (``diffeval_split``: one per shard) become one check, measured on the whole set
and judged here (``split.merge_parts``)."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from .._io import atomic_path, atomic_write_text
from ..exceptions import ReviewError, SplitError
from ..report import document_head, ordered_tests, render_html
from ..split import is_part, merge_parts
from .images import copy_images, folder_of, image_source
from .validation import IMAGES_FIX, image_folder_name, validate_results


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
    split_checks: int = 0  # checks combined from the parts of split generations
    split_failed: int = 0  # of which failed: only the merge could judge them


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
    """``raw`` (the bytes of ``path``) as JSON; kept as bytes between the merge's two passes."""
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
    parts: dict[tuple[str, str, int], list[tuple[Path, Path, dict[str, Any]]]] = {}  # split checks, per shard
    for source in sources:
        path, raw, data = _read_shard(source)
        tests = {c["test"] for c in data["checks"]} | {t["test"] for t in data.get("tests") or []}
        split_here = {c["test"] for c in data["checks"] if is_part(c)}  # run on every shard: not an overlap
        seen: dict[tuple[str, str], int] = {}
        for check in data["checks"]:
            if is_part(check):
                key = (check["test"], check["metric"])
                seen[key] = seen.get(key, -1) + 1
                parts.setdefault((*key, seen[key]), []).append((source, path, check))
        for test in sorted(tests):
            if test in owner and owner[test] != source and not allow_duplicates and test not in split_here:
                raise ReviewError(f"{test} is in both {owner[test]} and {source}: overlapping shards? "
                                  "(--allow-duplicates keeps the later directory's results)")
            owner[test] = source
        folders += [(source, path, c["test"], image_folder_name(c, folder_of(source)))
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
        image_source(name, folder_of(source), out)
        other = named.setdefault(name, (source, test))
        if other[0] != source:
            raise ReviewError(f"{path}: the image folder {name!r} of {test!r} has the name of the image folder of "
                              f"{other[1]!r} in {other[0]}: merged, one test would show the other's images. "
                              "Fix: rerun both shards "
                              "with this pytest-diffeval (results folders are unique per test id), or merge them "
                              "into separate --out directories")
    combined: list[dict[str, Any]] = []
    for (test, metric, _), found in parts.items():  # every part read and combined before anything is written
        try:
            combined.append(merge_parts(test, metric, found))
        except SplitError as exc:
            raise ReviewError(str(exc).removeprefix("pytest-diffeval: ")) from None

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
            if owner[check["test"]] != source or is_part(check):
                continue
            if check.get("images"):
                folder = folder_of(source)
                check["images"] = copy_images(image_folder_name(check, folder), folder, out, copied, notes)
            found = _find_baseline(check.get("baseline_file"), Path(root))
            if check.get("baseline_file") and found is None:
                notes.append(f"baseline file {check['baseline_file']} of {check['test']} is not under --root "
                             f"{Path(root).resolve()}: the report shows no per-sample baseline values for it")
            check["baseline_file"] = found
            encoded.setdefault(check["test"], []).append(json.dumps(check))
            passed.append(check.get("passed", False))
            rows.append(_row(check, strings))
        del data
    for check in combined:
        encoded.setdefault(check["test"], []).append(json.dumps(check))
        passed.append(check["passed"])
        rows.append(_row(check, strings))
    split_failed = sum(not check["passed"] for check in combined)
    notes = [note for index in range(len(shards)) for note in shard_notes[index]]
    tests = ordered_tests(rows, outcomes)
    metas = [meta for _, _, _, meta in shards]
    meta = {
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "pytest_diffeval": metas[0].get("pytest_diffeval"),
        "exitstatus": max([m.get("exitstatus") or 0 for m in metas] + [1 if split_failed else 0]),
        "rootdir": metas[0].get("rootdir"),
        "args": ["results", "merge", *[str(s) for s in sources]],
        "workers": sum(m.get("workers") or 0 for m in metas),
        "results_always": any(m.get("results_always") for m in metas),
        "results_dir": str(out),
        "report": str(out / "report.html"),
        "merged_from": [{"path": str(s), **{k: m.get(k) for k in ("created", "shard", "exitstatus", "args", "workers")}}
                        for (s, _, _, _), m in zip(shards, metas)],
    }
    head = document_head(tests, passed, meta, outcomes)  # passed: None for updated, not judged
    with atomic_path(out / "metrics.json") as tmp, open(tmp, "w", encoding="utf-8") as handle:
        handle.write(json.dumps(head, indent=2)[:-1].rstrip() + ',\n  "checks": [')
        lines = (line for test, _ in tests for line in encoded[test])  # failed tests first, as the plugin writes
        for index, line in enumerate(lines):
            handle.write(("\n    " if index == 0 else ",\n    ") + line)
        handle.write("\n  ]\n}\n")
    atomic_write_text(out / "report.html", render_html(rows, meta, outcomes))
    summary = head["summary"]
    return Merged(out, summary["tests"], summary["checks"], summary["failed_tests"], summary["failed_checks"],
                  len(copied), notes, len(combined), split_failed)

