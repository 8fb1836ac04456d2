"""Turning the session's metric checks into something a person reads.

Every metric check is a row (see ``assertions.record_check``); at the end of the session
the controller turns the rows of all workers into

* the terminal table (:func:`summary_lines`),
* ``metrics.json`` in the results directory (:func:`session_document`),
* a self-contained HTML page (:func:`render_html`): images inlined as data URIs, inline
  CSS and JS, nothing fetched from the network,
* a markdown table for GitHub Actions' ``$GITHUB_STEP_SUMMARY`` (:func:`step_summary`);

and, under ``--snapshot-update --diffeval-baseline-images``, stores small thumbnails beside
each baseline (:func:`store_baseline_images`) that the page shows next to this run's images.
Every file name read from a results or baseline folder is checked by :func:`inside`.

Only the standard library is imported here at module level (the plugin loads this module
in every pytest run); Pillow is imported when a page with images is rendered.
"""

from __future__ import annotations

import base64
import hashlib
import html
import io
import json
import math
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from ._io import atomic_write_bytes, atomic_write_text, inside  # noqa: F401 - re-exported
from .exceptions import UnsafePath  # noqa: F401 - re-exported
from .hardware import hardware_key, select_entry

FORMAT_VERSION = 1
PASSING = frozenset({"pass", "improved", "recorded", "updated"})  # verdicts that do not fail a test
# --snapshot-update wrote the baseline from this run: nothing was judged, and the baseline file
# now holds this run's own numbers (an "updated" row keeps the replaced baseline and change).
REWRITTEN = frozenset({"recorded", "updated"})
THUMBNAIL_MAX = 384  # larger images are embedded downscaled (the PNGs on disk keep full size)
DISPLAY_MIN = 128  # smaller images are shown upscaled by an integer factor (pixelated)
STEP_SUMMARY_MAX_ROWS = 300
BASELINE_THUMBNAIL_MAX = 64  # --diffeval-baseline-images: thumbnails small enough to commit beside the baseline
BASELINE_IMAGES_FORMAT = 1


# --------------------------------------------------------------------------- small helpers


def failed(row: dict[str, Any]) -> bool:
    """Whether a check's verdict fails its test."""
    return row.get("verdict") not in PASSING


def _fmt(value: Any) -> str:
    """Four significant digits, trailing zeros kept (``79.00``, ``0.8532``)."""
    return "-" if value is None else f"{value:#.4g}" if isinstance(value, float) else str(value)


def _signed(value: Any) -> str:
    return "-" if value is None else f"{value:+#.4g}" if isinstance(value, (int, float)) else str(value)


def reference(row: dict[str, Any]) -> str:
    """What the value was judged against: ``baseline ± tolerance`` or the threshold."""
    if row.get("baseline") is not None:
        return f"{_fmt(row['baseline'])} ± {_fmt(row.get('tolerance'))}"
    if row.get("threshold") is not None:
        return (">= " if row.get("higher_is_better", True) else "<= ") + _fmt(row["threshold"])
    return "-"


def _by_test(rows: Iterable[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    tests: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        tests.setdefault(str(row.get("test")), []).append(row)
    return tests


def ordered_tests(rows: list[dict[str, Any]],
                  outcomes: dict[str, str] | None = None) -> list[tuple[str, list[dict[str, Any]]]]:
    """Tests with their checks: failed tests first, then by test id (stable under ``-n``)."""
    outcomes = outcomes or {}
    tests = _by_test(rows)
    return sorted(tests.items(), key=lambda kv: (not is_test_failed(kv[1], outcomes.get(kv[0])), kv[0]))


def is_test_failed(checks: list[dict[str, Any]], outcome: str | None = None) -> bool:
    """A test failed when one of its checks did, or pytest says so (an assert after the check)."""
    return any(failed(r) for r in checks) or outcome in {"failed", "error"}


# --------------------------------------------------------------------------- terminal


def summary_lines(rows: list[dict[str, Any]], *, max_test_width: int = 70) -> list[tuple[str, bool]]:
    """The terminal table, one line per check, as ``(line, is_failure)``; then the image
    folders of failed checks."""
    header = ("test", "metric", "backbone", "value", "baseline ± tol / threshold", "delta", "verdict")
    table: list[tuple[tuple[str, ...], bool]] = [(header, False)]
    for row in rows:
        test = str(row.get("test"))
        if len(test) > max_test_width:  # keep the end: the test name and its parameters
            test = "..." + test[-(max_test_width - 3):]
        table.append(((test, str(row.get("metric")), str(row.get("backbone")), _fmt(row.get("value")),
                       reference(row), _signed(row.get("delta")), str(row.get("verdict"))), failed(row)))
    widths = [min(max_test_width if i == 0 else 40, max(len(cells[i]) for cells, _ in table))
              for i in range(len(header))]
    lines = [("  ".join(c[: widths[i]].ljust(widths[i]) for i, c in enumerate(cells)).rstrip(), bad)
             for cells, bad in table]
    seen: set[str] = set()
    for row in rows:
        folder = row.get("images")
        if folder and failed(row) and folder not in seen:
            seen.add(folder)
            lines.append((f"images of {row['test']}: {folder}", False))
    return lines


# --------------------------------------------------------------------------- metrics.json


def baseline_entry(check: Any, provenance: dict[str, Any]) -> dict[str, Any] | None:
    """The stored entry of one metric that a run with ``provenance`` is compared with: the
    entry itself (one per metric), or the best match of its per-hardware entries."""
    if not isinstance(check, dict):
        return None
    if isinstance(check.get("hardware"), dict):
        _, entry = select_entry(check, hardware_key(provenance))
        return entry if isinstance(entry, dict) else None
    return check if "value" in check else None


class _BaselineSamples:
    """Per-sample values of the stored baselines rows were compared with (read once each)."""

    def __init__(self) -> None:
        self._files: dict[str, dict[str, Any] | None] = {}

    def get(self, row: dict[str, Any]) -> dict[str, float]:
        path = row.get("baseline_file")
        if not path or row.get("baseline") is None or row.get("verdict") in REWRITTEN:
            return {}
        if path not in self._files:
            try:
                self._files[path] = json.loads(Path(path).read_text(encoding="utf-8"))
            except (OSError, ValueError):
                self._files[path] = None
        data = self._files[path]
        checks = data.get("checks") if isinstance(data, dict) else None
        entry = baseline_entry(checks.get(row.get("metric")) if isinstance(checks, dict) else None,
                               row.get("provenance") or {})
        if entry is None:
            return {}
        try:
            return {f"{s['seed']}|{s['prompt']}": float(s["value"]) for s in entry.get("samples", [])}
        except (KeyError, TypeError, ValueError):
            return {}


def samples(row: dict[str, Any], baseline: dict[str, float] | None = None) -> list[dict[str, Any]]:
    """The check's per-sample values with prompt and seed (and the baseline's, when known)."""
    values, prompts, seeds = row.get("per_sample"), row.get("prompts"), row.get("seeds")
    if not values or not prompts or not seeds or not (len(values) == len(prompts) == len(seeds)):
        return []
    out = []
    for prompt, seed, value in zip(prompts, seeds, values):
        sample: dict[str, Any] = {"prompt": prompt, "seed": seed, "value": value}
        old = (baseline or {}).get(f"{seed}|{prompt}")
        if old is not None:
            sample["baseline"] = old
            sample["change"] = value - old
        out.append(sample)
    return out


_CHECK_KEYS = ("test", "metric", "backbone", "value", "higher_is_better", "verdict", "threshold", "baseline",
               "tolerance", "delta", "baseline_file", "images", "details", "provenance")


def check_record(row: dict[str, Any], baselines: _BaselineSamples | None = None) -> dict[str, Any]:
    """One check as ``metrics.json`` stores it."""
    record = {key: row.get(key) for key in _CHECK_KEYS}
    record["passed"] = None if row.get("verdict") == "updated" else not failed(row)  # updated: not judged
    record["samples"] = samples(row, baselines.get(row) if baselines else None)
    return record


def session_document(rows: list[dict[str, Any]], meta: dict[str, Any] | None = None,
                     outcomes: dict[str, str] | None = None) -> dict[str, Any]:
    """What ``metrics.json`` holds: the session, one entry per test and per check."""
    outcomes = outcomes or {}
    baselines = _BaselineSamples()
    tests = ordered_tests(rows, outcomes)
    checks = [check_record(row, baselines) for _, test_rows in tests for row in test_rows]
    return {
        "format_version": FORMAT_VERSION,
        **(meta or {}),
        "summary": {
            "tests": len(tests),
            "failed_tests": sum(is_test_failed(r, outcomes.get(t)) for t, r in tests),
            "checks": len(checks),
            "failed_checks": sum(c["passed"] is False for c in checks),
        },
        "tests": [{"test": t, "failed": is_test_failed(r, outcomes.get(t)), "outcome": outcomes.get(t),
                   "checks": [c["metric"] for c in r]} for t, r in tests],
        "checks": checks,
    }


# --------------------------------------------------------------------------- GitHub step summary


def _md(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def step_summary(rows: list[dict[str, Any]], *, report: Path | None = None, results_dir: Path | None = None,
                 outcomes: dict[str, str] | None = None) -> str:
    """A markdown table of the checks for ``$GITHUB_STEP_SUMMARY``."""
    tests = ordered_tests(rows, outcomes)
    bad_checks = sum(failed(r) for r in rows)
    bad_tests = sum(is_test_failed(r, (outcomes or {}).get(t)) for t, r in tests)
    lines = [f"### pytest-diffeval: {bad_checks} of {len(rows)} metric checks failed "
             f"({bad_tests} of {len(tests)} tests)", "",
             "| | test | metric | backbone | value | baseline ± tol / threshold | delta | verdict |",
             "|---|---|---|---|---:|---|---:|---|"]
    ordered = [row for _, test_rows in tests for row in sorted(test_rows, key=lambda r: not failed(r))]
    for row in ordered[:STEP_SUMMARY_MAX_ROWS]:
        mark = ":x:" if failed(row) else ":white_check_mark:"
        lines.append(f"| {mark} | `{_md(row.get('test'))}` | {_md(row.get('metric'))} | {_md(row.get('backbone'))} | "
                     f"{_md(_fmt(row.get('value')))} | "
                     f"{_md(reference(row))} | {_md(_signed(row.get('delta')))} | {_md(row.get('verdict'))} |")
    if len(ordered) > STEP_SUMMARY_MAX_ROWS:
        lines.append(f"\n... and {len(ordered) - STEP_SUMMARY_MAX_ROWS} more checks (see metrics.json)")
    if report or results_dir:
        lines += ["", f"HTML report: `{report}`; images and `metrics.json`: `{results_dir}` "
                      "(the workflow uploads it as an artifact)."]
    return "\n".join(lines) + "\n\n"


# --------------------------------------------------------------------------- HTML


@dataclass
class _Image:
    prompt: str | None
    seed: int | None
    uri: str
    width: int
    height: int
    file: str


@dataclass
class _ImageFolder:
    path: Path
    images: list[_Image] = field(default_factory=list)
    call_kwargs: dict[str, Any] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)

    @property
    def error(self) -> str | None:
        return "; ".join(self.errors) or None


def _data_uri(file: Path) -> tuple[str, int, int]:
    """The image as a data URI (downscaled when large) and its embedded size."""
    from PIL import Image

    raw = file.read_bytes()
    with Image.open(io.BytesIO(raw)) as image:
        width, height = image.size
        if max(width, height) <= THUMBNAIL_MAX and image.format == "PNG":
            return "data:image/png;base64," + base64.b64encode(raw).decode("ascii"), width, height
        image = image.convert("RGB")
        image.thumbnail((THUMBNAIL_MAX, THUMBNAIL_MAX), Image.LANCZOS)
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=88)
        return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii"), *image.size


SAMPLES_FIX = ("samples.json lists the images beside it by file name (as ImageSet.save writes them); "
               "regenerate the results directory, or take it from a run you trust")


def load_image_folder(folder: str | Path) -> _ImageFolder:
    """The images ``ImageSet.save`` wrote to ``folder`` (listed by its ``samples.json``).
    A listed file outside the folder is not read: the page says which entry was refused."""
    path = Path(folder)
    result = _ImageFolder(path)
    listing_file = path / "samples.json"
    try:
        listing = json.loads(listing_file.read_text(encoding="utf-8"))
        entries = listing.get("samples", [])
        result.call_kwargs = listing.get("call_kwargs") or {}
        if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
            raise ValueError("'samples' is not a list of objects")
    except (OSError, ValueError, AttributeError):
        entries = [{"file": p.name, "prompt": None, "seed": None}
                   for p in sorted(path.glob("[0-9][0-9][0-9][0-9]_*.png"))]
    for entry in entries:
        try:
            file = inside(path, entry.get("file"), source=listing_file, what="sample file", fix=SAMPLES_FIX)
            uri, width, height = _data_uri(file)
        except UnsafePath as exc:
            result.errors.append(f"refused: {exc}")
            continue
        except (OSError, ValueError) as exc:
            result.errors.append(f"{path / str(entry.get('file'))}: {exc}")
            continue
        result.images.append(_Image(entry.get("prompt"), entry.get("seed"), uri, width, height, entry["file"]))
    if not entries:
        result.errors.append(f"no images found in {path}")
    return result


# --------------------------------------------------------------------------- baseline thumbnails


def baseline_images_dir(baseline_file: str | Path) -> Path:
    """Where the thumbnails of a baseline live: ``baselines/<module>/<test>.images/``."""
    path = Path(baseline_file)
    return path.with_name(path.stem + ".images")


def _flag(value: Any, name: str) -> bool:
    text = str(value if value is not None else "").strip().lower()
    if text in {"1", "true", "yes", "on"}:
        return True
    if text in {"", "0", "false", "no", "off"}:
        return False
    raise ValueError(f"pytest-diffeval: {name} = {value!r} is not a boolean; use true or false")


def baseline_images_enabled(config: Any) -> bool:
    """``--diffeval-baseline-images`` or ini ``diffeval_baseline_images = true``."""
    value = config.getoption("diffeval_baseline_images", None)
    if value is None:
        try:
            value = config.getini("diffeval_baseline_images")
        except ValueError:  # an older plugin without the option
            return False
    return _flag(value, "diffeval_baseline_images")


def record_baseline_images(images: Any, baseline_file: Path, snapshot: Any) -> Path | None:
    """Called by ``DiffevalBaseline.assert_no_regression``: under ``--snapshot-update`` with
    ``--diffeval-baseline-images``, store thumbnails of the images beside the baseline file."""
    if not getattr(snapshot, "update_snapshots", False):
        return None
    config = getattr(getattr(getattr(snapshot, "session", None), "pytest_session", None), "config", None)
    if config is None or not baseline_images_enabled(config):
        return None
    return store_baseline_images(images, baseline_file)


_RUN_TOKEN = f"{os.getpid()}-{time.time_ns()}"  # thumbnails of several calls in one test and run are merged


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _thumbnail_digest(entries: list[dict[str, Any]]) -> str:
    """One digest over every (seed, prompt, thumbnail hash): what the index vouches for."""
    lines = sorted(f"{e['seed']}|{e['prompt']}|{e['sha256']}" for e in entries)
    return _sha256("\n".join(lines).encode("utf-8"))


def _thumbnail_png(pixels: Any, max_size: int) -> bytes:
    from PIL import Image

    image = Image.fromarray(pixels).convert("RGB")
    if max(image.size) > max_size:
        image.thumbnail((max_size, max_size), Image.LANCZOS)
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def _read_index(folder: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((folder / "index.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and isinstance(data.get("samples"), list) else None


def store_baseline_images(images: Any, baseline_file: str | Path, *,
                          max_size: int = BASELINE_THUMBNAIL_MAX) -> Path | None:
    """Write thumbnails (at most ``max_size`` px, one PNG per (prompt, seed)) of ``images``
    to :func:`baseline_images_dir` and an ``index.json`` naming each one with its sha256, the
    digest over all of them and the sha256 of the baseline file they were recorded with (a
    baseline re-recorded without them leaves a folder the report detects as stale).

    Atomic: thumbnails are content-addressed files written before the index, which is
    replaced last, so a reader (or a killed run) sees the old set or the new one.  Returns the
    folder, or None when the baseline file does not exist."""
    baseline_file = Path(baseline_file)
    if not baseline_file.is_file():
        return None
    pixels, prompts, seeds = getattr(images, "images", None), getattr(images, "prompts", None), \
        getattr(images, "seeds", None)
    if pixels is None or prompts is None or seeds is None:
        return None
    folder = baseline_images_dir(baseline_file)
    baseline_sha = _sha256(baseline_file.read_bytes())
    existing = _read_index(folder)
    fresh = existing is not None and existing.get("baseline_sha256") == baseline_sha
    kept: dict[str, dict[str, Any]] = {}
    if existing is not None and (fresh or existing.get("run") == _RUN_TOKEN):
        kept = {f"{e.get('seed')}|{e.get('prompt')}": e for e in existing["samples"] if isinstance(e, dict)}
    keys = [f"{seed}|{prompt}" for prompt, seed in zip(prompts, seeds)]
    if fresh and all(k in kept for k in keys):
        return folder  # the baseline did not change: its thumbnails stand
    entries = dict(kept)
    for key, prompt, seed, image in zip(keys, prompts, seeds, pixels):
        data = _thumbnail_png(image, max_size)
        sha = _sha256(data)
        name = f"{sha[:16]}.png"
        if not (folder / name).is_file():
            atomic_write_bytes(folder / name, data)
        width, height = _png_size(data)
        entries[key] = {"prompt": str(prompt), "seed": int(seed), "file": name, "sha256": sha,
                        "width": width, "height": height}
    samples = list(entries.values())
    provenance = getattr(images, "provenance", None) or {}
    index = {
        "format_version": BASELINE_IMAGES_FORMAT,
        "what": "pytest-diffeval baseline thumbnails (--diffeval-baseline-images)",
        "test": getattr(images, "test_id", None),
        "baseline_file": baseline_file.name,
        "baseline_sha256": baseline_sha,
        "recorded": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "run": _RUN_TOKEN,
        "max_size": max_size,
        "model": {k: provenance.get(k) for k in ("model", "model_hash", "pipeline_class", "dtype", "device_kind")
                  if provenance.get(k) is not None},
        "digest": _thumbnail_digest(samples),
        "samples": samples,
    }
    atomic_write_text(folder / "index.json", json.dumps(index, indent=2) + "\n")
    used = {e["file"] for e in samples}
    for stale in folder.glob("*.png"):  # thumbnails of an earlier recording
        if re.fullmatch(r"[0-9a-f]{16}\.png", stale.name) and stale.name not in used:
            stale.unlink(missing_ok=True)
    return folder


def _png_size(data: bytes) -> tuple[int, int]:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        return image.size


THUMBNAILS_FIX = "re-record them: pytest --snapshot-update --diffeval-baseline-images <test>"


@dataclass
class _BaselineThumbnails:
    folder: Path
    images: dict[str, _Image] = field(default_factory=dict)  # "<seed>|<prompt>" -> thumbnail
    note: str | None = None


class _ThumbnailCache:
    """Baseline thumbnails by baseline file, each folder read once per page."""

    def __init__(self) -> None:
        self._loaded: dict[str, _BaselineThumbnails] = {}

    def get(self, baseline_file: str | None) -> _BaselineThumbnails | None:
        if not baseline_file:
            return None
        if baseline_file not in self._loaded:
            self._loaded[baseline_file] = load_baseline_images(baseline_file)
        return self._loaded[baseline_file]


def load_baseline_images(baseline_file: str | Path) -> _BaselineThumbnails:
    """The thumbnails stored beside ``baseline_file``, checked against their index: none when
    the folder is stale (the baseline changed after they were recorded), a thumbnail does not
    match its sha256, or the index names a file outside its folder (the note says which)."""
    folder = baseline_images_dir(baseline_file)
    out = _BaselineThumbnails(folder)
    index_file = folder / "index.json"
    if not folder.is_dir():
        return out
    index = _read_index(folder)
    if index is None:
        out.note = f"{index_file}: missing or not a thumbnail index; {THUMBNAILS_FIX}"
        return out
    version = index.get("format_version")
    if not isinstance(version, int) or version > BASELINE_IMAGES_FORMAT:
        out.note = f"{index_file}: format_version {version!r} is newer than this pytest-diffeval reads; upgrade it"
        return out
    try:
        baseline_sha = _sha256(Path(baseline_file).read_bytes())
    except OSError as exc:
        out.note = f"cannot read {baseline_file}: {exc}"
        return out
    if index.get("baseline_sha256") != baseline_sha:
        out.note = (f"{folder}: stale, the baseline {Path(baseline_file).name} changed after these thumbnails were "
                    f"recorded (not shown); {THUMBNAILS_FIX}")
        return out
    images: dict[str, _Image] = {}
    try:
        entries = [e for e in index["samples"] if isinstance(e, dict)]
        if index.get("digest") != _thumbnail_digest(entries):
            raise ValueError(f"{index_file}: its digest does not match the thumbnails it lists (edited by hand?)")
        for entry in entries:
            file = inside(folder, entry.get("file"), source=index_file, what="thumbnail file", fix=THUMBNAILS_FIX)
            if _sha256(file.read_bytes()) != entry.get("sha256"):
                raise ValueError(f"{file}: does not match the sha256 in {index_file}")
            uri, width, height = _data_uri(file)
            key = f"{entry.get('seed')}|{entry.get('prompt')}"
            images[key] = _Image(entry.get("prompt"), entry.get("seed"), uri, width, height, str(entry.get("file")))
    except UnsafePath as exc:
        out.note = f"refused: {exc}"
        return out
    except (OSError, ValueError, KeyError, TypeError) as exc:
        out.note = f"baseline thumbnails not shown: {exc}; {THUMBNAILS_FIX}"
        return out
    out.images = images
    return out


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _verdict_class(verdict: str) -> str:
    if verdict not in PASSING:
        return "bad"
    return {"improved": "better", "recorded": "recorded", "updated": "recorded"}.get(verdict, "ok")


def _badge(verdict: str) -> str:
    return f'<span class="badge {_verdict_class(verdict)}">{_e(verdict)}</span>'


def _anchor(test: str) -> str:
    digest = hashlib.sha1(test.encode()).hexdigest()[:8]
    return "t-" + re.sub(r"[^A-Za-z0-9_-]+", "-", test).strip("-")[:80] + "-" + digest


def per_prompt(row: dict[str, Any], baseline: dict[str, float] | None = None) -> list[dict[str, Any]]:
    """Mean over seeds per prompt (and the baseline's), worst first: by the change against
    the baseline when there is one, else by the value."""
    groups: dict[str, dict[str, list[float]]] = {}
    for sample in samples(row, baseline):
        group = groups.setdefault(sample["prompt"], {"value": [], "baseline": [], "seeds": []})
        group["value"].append(sample["value"])
        group["seeds"].append(sample["seed"])
        if "baseline" in sample:
            group["baseline"].append(sample["baseline"])
    higher = bool(row.get("higher_is_better", True))
    out = []
    for prompt, g in groups.items():
        entry: dict[str, Any] = {"prompt": prompt, "n": len(g["value"]), "seeds": g["seeds"],
                                 "value": sum(g["value"]) / len(g["value"])}
        if len(g["baseline"]) == len(g["value"]):
            entry["baseline"] = sum(g["baseline"]) / len(g["baseline"])
            entry["change"] = entry["value"] - entry["baseline"]
        out.append(entry)
    by_change = all("change" in e for e in out) and bool(out)
    sign = 1.0 if higher else -1.0
    out.sort(key=lambda e: sign * (e["change"] if by_change else e["value"]))
    return out


def _check_card(row: dict[str, Any], baselines: _BaselineSamples) -> str:
    verdict = str(row.get("verdict"))
    direction = "higher is better" if row.get("higher_is_better", True) else "lower is better"
    facts = [("value", _fmt(row.get("value"))), ("baseline ± tol / threshold", reference(row))]
    if row.get("delta") is not None:
        facts.append(("delta", _signed(row.get("delta"))))
    facts.append(("backbone", row.get("backbone")))
    prompts = per_prompt(row, baselines.get(row))
    parts = [f'<div class="check {_verdict_class(verdict)}" data-metric="{_e(row.get("metric"))}" '
             f'data-verdict="{_e(verdict)}">',
             f'<div class="check-head"><span class="metric">{_e(row.get("metric"))}</span> {_badge(verdict)}'
             f'<span class="muted"> {direction}</span></div>',
             '<dl class="facts">' + "".join(f"<div><dt>{_e(k)}</dt><dd>{_e(v)}</dd></div>" for k, v in facts) + "</dl>"]
    if row.get("baseline_file"):
        parts.append(f'<div class="muted small">baseline file: <code>{_e(row["baseline_file"])}</code></div>')
    if prompts:
        has_base = all("baseline" in p for p in prompts)
        order = "change against the baseline" if has_base else "value"
        head = "<tr><th>prompt</th><th>seeds</th><th>this run</th>" + \
               ("<th>baseline</th><th>change</th>" if has_base else "") + "</tr>"
        body = []
        for p in prompts:
            cells = [f'<td class="prompt">{_e(p["prompt"])}</td>', f'<td class="num">{p["n"]}</td>',
                     f'<td class="num">{_e(_fmt(p["value"]))}</td>']
            if has_base:
                worse = (p["change"] < 0) == bool(row.get("higher_is_better", True)) and p["change"] != 0
                cells += [f'<td class="num">{_e(_fmt(p["baseline"]))}</td>',
                          f'<td class="num {"neg" if worse else "pos"}">{_e(_signed(p["change"]))}</td>']
            body.append("<tr>" + "".join(cells) + "</tr>")
        parts.append(f'<table class="per-prompt"><caption>per prompt, mean over seeds, worst {_e(order)} first'
                     f'</caption><thead>{head}</thead><tbody>{"".join(body)}</tbody></table>')
    parts.append("</div>")
    return "\n".join(parts)


def _display_width(width: int) -> int:
    if width >= DISPLAY_MIN:
        return min(width, 256)
    return width * math.ceil(DISPLAY_MIN / max(width, 1))


def _baseline_file_of(checks: list[dict[str, Any]]) -> str | None:
    """The baseline file the checks were compared with (None when recorded in this run)."""
    return next((str(r["baseline_file"]) for r in checks if r.get("baseline_file") and r.get("baseline") is not None
                 and r.get("verdict") not in REWRITTEN), None)


def _image_grid(folder: _ImageFolder, checks: list[dict[str, Any]], baselines: _BaselineSamples,
                thumbnails: _BaselineThumbnails | None = None) -> str:
    """The folder's images, one row per prompt (worst prompt first), one column per seed;
    each beside the baseline's thumbnail of the same (prompt, seed) where one is stored."""
    per_sample: list[tuple[dict[str, Any], dict[tuple[int | None, str | None], dict[str, Any]]]] = []
    for row in checks:
        values = {(s["seed"], s["prompt"]): s for s in samples(row, baselines.get(row))}
        if values:
            per_sample.append((row, values))
    prompt_order: list[str | None] = []
    primary = next((r for r, _ in per_sample if failed(r)), per_sample[0][0] if per_sample else None)
    if primary is not None:
        prompt_order = [p["prompt"] for p in per_prompt(primary, baselines.get(primary))]
    for image in folder.images:
        if image.prompt not in prompt_order:
            prompt_order.append(image.prompt)
    stored = thumbnails.images if thumbnails else {}
    rows = []
    for prompt in prompt_order:
        figures = []
        for image in (i for i in folder.images if i.prompt == prompt):
            values = []
            for row, by_key in per_sample:
                sample = by_key.get((image.seed, image.prompt))
                if sample is None:
                    continue
                change = f" ({_signed(sample['change'])})" if "change" in sample else ""
                cls = " bad" if failed(row) else ""
                values.append(f'<span class="v{cls}">{_e(row["metric"])} {_e(_fmt(sample["value"]))}{_e(change)}</span>')
            label = f"seed {image.seed}" if image.seed is not None else image.file
            shown = _display_width(image.width)
            picture = (f'<img class="sample" src="{image.uri}" width="{shown}" '
                       f'alt="{_e(prompt)} (seed {_e(image.seed)})" '
                       f'title="{_e(prompt)} | seed {_e(image.seed)} | {_e(image.file)}">')
            old = stored.get(f"{image.seed}|{image.prompt}")
            width = max(shown, 160)
            if old is not None:
                width = max(2 * shown + 6, 160)
                picture = (f'<div class="pair"><div>{picture}<span class="tag">this run</span></div><div>'
                           f'<img class="baseline" src="{old.uri}" width="{shown}" '
                           f'alt="baseline: {_e(prompt)} (seed {_e(image.seed)})" '
                           f'title="baseline thumbnail ({old.width}x{old.height}) | {_e(prompt)} | seed {_e(image.seed)}">'
                           f'<span class="tag">baseline</span></div></div>')
            figures.append(
                f'<figure data-prompt="{_e(image.prompt)}" data-seed="{_e(image.seed)}" style="width:{width}px">'
                f'{picture}<figcaption><b>{_e(label)}</b>{"".join(values)}</figcaption></figure>')
        rows.append(f'<div class="prompt-row"><div class="prompt-label">{_e(prompt if prompt is not None else "")}'
                    f'</div><div class="figures">{"".join(figures)}</div></div>')
    notes = [folder.error] if folder.error else []
    if thumbnails and thumbnails.note:
        notes.append(thumbnails.note)
    note = "".join(f'<div class="muted small note">{_e(n)}</div>' for n in notes)
    where = (f'; baseline thumbnails: <code>{_e(thumbnails.folder)}</code>' if thumbnails and thumbnails.images
             else "")
    return (f'<div class="grid"><div class="muted small">images: <code>{_e(folder.path)}</code> '
            f"(full-size PNGs and grid.png){where}</div>{''.join(rows)}{note}</div>")


def _shows(row: dict[str, Any], folder: _ImageFolder) -> bool:
    """Whether ``row`` measured the images in ``folder`` (its own, or unsaved ones of the same samples)."""
    if row.get("images"):
        return Path(row["images"]) == folder.path
    return [(i.prompt, i.seed) for i in folder.images] == list(zip(row.get("prompts") or [], row.get("seeds") or []))


def _provenance(rows: list[dict[str, Any]], call_kwargs: dict[str, Any]) -> str:
    provenance = next((r["provenance"] for r in rows if r.get("provenance")), None)
    if not provenance and not call_kwargs:
        return ""
    items = []
    for key in ("model", "model_hash", "revision", "pipeline_id", "load_options", "pipeline_class", "scheduler",
                "dtype", "device_kind", "execution",
                "gpu_peak_memory_mb", "gpu_s_per_image"):  # the GPU figures: None (not shown) on the CPU
        if provenance and provenance.get(key) not in (None, {}):
            value = provenance[key]
            items.append((key, json.dumps(value, sort_keys=True) if isinstance(value, dict) else value))
    if call_kwargs:
        items.append(("call kwargs", json.dumps(call_kwargs, sort_keys=True)))
    versions = (provenance or {}).get("versions") or {}
    if versions:
        items.append(("versions", ", ".join(f"{k} {v}" for k, v in versions.items())))
    body = "".join(f"<div><dt>{_e(k)}</dt><dd><code>{_e(v)}</code></dd></div>" for k, v in items)
    return f'<details class="provenance"><summary>provenance</summary><dl>{body}</dl></details>'


_CSS = """
:root{--bad:#c0392b;--bad-bg:#fdecea;--ok:#1e8449;--ok-bg:#e8f6ee;--better:#1f618d;--better-bg:#e8f1fa;
--rec:#6c5b7b;--rec-bg:#f1edf5;--ink:#1c2331;--muted:#6b7280;--line:#e3e6eb;--card:#fff;--bg:#f4f5f7}
*{box-sizing:border-box}
body{margin:0;background:var(--bg);color:var(--ink);font:14px/1.45 "DejaVu Sans","Liberation Sans",system-ui,sans-serif}
header{background:var(--ink);color:#fff;padding:14px 24px;display:flex;flex-wrap:wrap;align-items:center;gap:8px 24px}
header h1{font-size:18px;margin:0;font-weight:600}
header .stats{display:flex;gap:10px;flex-wrap:wrap}
header .stat{background:rgba(255,255,255,.1);border-radius:6px;padding:2px 10px}
header .stat.bad{background:var(--bad)}
header label{margin-left:auto;cursor:pointer;user-select:none;background:rgba(255,255,255,.12);padding:4px 10px;border-radius:6px}
main{padding:16px 24px 40px;max-width:1400px}
.meta{color:var(--muted);font-size:12px;margin-bottom:12px}
table{border-collapse:collapse}
table.summary{width:100%;background:var(--card);border:1px solid var(--line);border-radius:8px;margin-bottom:20px}
table.summary th,table.summary td{padding:5px 10px;border-bottom:1px solid var(--line);text-align:left;vertical-align:top}
table.summary th{font-size:12px;color:var(--muted);font-weight:600;background:#fafbfc}
td.num,th.num{text-align:right;font-variant-numeric:tabular-nums}
td.test a{color:var(--ink);text-decoration:none;font-family:"DejaVu Sans Mono",monospace;font-size:12px}
section.test{background:var(--card);border:1px solid var(--line);border-left:5px solid var(--ok);border-radius:8px;
padding:12px 16px;margin:0 0 18px}
section.test.failed{border-left-color:var(--bad)}
section.test h2{font-size:15px;margin:0 0 10px;font-family:"DejaVu Sans Mono",monospace;word-break:break-all}
.checks{display:flex;flex-wrap:wrap;gap:12px;margin-bottom:12px}
.check{border:1px solid var(--line);border-radius:6px;padding:8px 12px;min-width:280px;flex:1 1 320px;max-width:640px}
.check.bad{background:#fffafa;border-color:#f3c1bb}
.check-head{margin-bottom:6px}.metric{font-weight:700;font-size:15px;margin-right:6px}
dl.facts{display:flex;flex-wrap:wrap;gap:4px 18px;margin:0 0 6px}
dl.facts dt{font-size:11px;color:var(--muted)}dl.facts dd{margin:0;font-weight:600;font-variant-numeric:tabular-nums}
.badge{display:inline-block;border-radius:10px;padding:0 8px;font-size:12px;font-weight:600}
.badge.bad{background:var(--bad-bg);color:var(--bad)}.badge.ok{background:var(--ok-bg);color:var(--ok)}
.badge.better{background:var(--better-bg);color:var(--better)}.badge.recorded{background:var(--rec-bg);color:var(--rec)}
table.per-prompt{margin-top:6px;font-size:12px;width:100%}
table.per-prompt caption{text-align:left;color:var(--muted);font-size:11px;padding-bottom:2px}
table.per-prompt th{color:var(--muted);font-weight:600;text-align:left;border-bottom:1px solid var(--line);padding:2px 6px}
table.per-prompt td{padding:2px 6px;border-bottom:1px solid #f0f1f3}
td.prompt{max-width:320px}.neg{color:var(--bad);font-weight:600}.pos{color:var(--ok)}
.grid{border-top:1px solid var(--line);padding-top:8px}
.prompt-row{display:flex;gap:12px;align-items:flex-start;padding:6px 0;border-bottom:1px dashed var(--line)}
.prompt-label{width:200px;flex:none;font-size:12px;font-style:italic}
.figures{display:flex;flex-wrap:wrap;gap:10px}
figure{margin:0;font-size:11px;color:var(--muted)}
figure b{color:var(--ink);display:block}
figcaption{overflow-wrap:anywhere}figcaption .v{display:block;font-variant-numeric:tabular-nums}figcaption .v.bad{color:var(--bad)}
img.sample,img.baseline{display:block;height:auto;image-rendering:pixelated;border:1px solid var(--line);border-radius:3px;background:#ddd}
img.baseline{border-style:dashed}
.pair{display:flex;gap:6px}.pair .tag{display:block;font-size:10px;color:var(--muted)}
.grid .note{color:var(--bad)}
details.provenance{margin-top:8px;font-size:12px}details.provenance summary{cursor:pointer;color:var(--muted)}
details.provenance dl{margin:6px 0 0}details.provenance dt{float:left;clear:left;width:110px;color:var(--muted)}
details.provenance dd{margin:0 0 2px 120px;word-break:break-all}
.muted{color:var(--muted)}.small{font-size:11px;margin:2px 0}.small code{word-break:break-all}
body.failed-only .passed{display:none}
"""

# The page writes what it rendered into attributes of <html>, so a headless browser's
# --dump-dom shows it (tests/test_report.py): images decoded with their natural sizes,
# the tests the filter leaves visible, the visible text of each grid's labels and the
# failing metrics shown.  "#failed-only" in the URL turns the filter on.
_JS = """
(function () {
  var root = document.documentElement, box = document.getElementById('failed-only');
  function shown(element) { return element.getClientRects().length > 0; }
  function text(element) { return element ? element.innerText.trim() : null; }
  function visible() {
    var out = [], failing = [], labels = [];
    document.querySelectorAll('section.test').forEach(function (s) {
      if (!shown(s)) return;
      var test = s.getAttribute('data-test');
      out.push(test);
      s.querySelectorAll('.check.bad[data-metric]').forEach(function (c) {
        if (shown(c)) failing.push([test, text(c.querySelector('.metric'))]);
      });
      s.querySelectorAll('.prompt-row').forEach(function (r) {
        labels.push([test, text(r.querySelector('.prompt-label')),
                     Array.prototype.map.call(r.querySelectorAll('figure'), function (f) {
                       return [text(f.querySelector('figcaption b')), f.querySelectorAll('img.baseline').length];
                     })]);
      });
    });
    root.setAttribute('data-visible-tests', JSON.stringify(out));
    root.setAttribute('data-failing-metrics', JSON.stringify(failing));
    root.setAttribute('data-grid-labels', JSON.stringify(labels));
  }
  function apply() {
    document.body.classList.toggle('failed-only', box.checked);
    root.setAttribute('data-filter', box.checked ? 'failed-only' : 'all');
    visible();
  }
  box.addEventListener('change', function () {
    history.replaceState(null, '', box.checked ? '#failed-only' : '#');
    apply();
  });
  if (location.hash === '#failed-only') box.checked = true;
  apply();
  function measure() {
    var images = Array.prototype.slice.call(document.images);
    var ok = images.filter(function (i) { return i.complete && i.naturalWidth > 0 && i.naturalHeight > 0; });
    root.setAttribute('data-images-total', images.length);
    root.setAttribute('data-images-rendered', ok.length);
    root.setAttribute('data-baseline-images-rendered', ok.filter(function (i) {
      return i.classList.contains('baseline'); }).length);
    root.setAttribute('data-images-min-natural', ok.length ? Math.min.apply(null, ok.map(function (i) {
      return Math.min(i.naturalWidth, i.naturalHeight); })) : 0);
    root.setAttribute('data-render-check', 'done');
  }
  Promise.all(Array.prototype.map.call(document.images, function (i) {
    return i.decode ? i.decode().catch(function () {}) : null;
  })).then(measure);
  window.addEventListener('load', measure);
})();
"""


def render_html(rows: list[dict[str, Any]], meta: dict[str, Any] | None = None,
                outcomes: dict[str, str] | None = None) -> str:
    """The self-contained HTML page for the session's checks."""
    meta = meta or {}
    outcomes = outcomes or {}
    baselines = _BaselineSamples()
    thumbnails = _ThumbnailCache()
    tests = ordered_tests(rows, outcomes)
    n_failed_tests = sum(is_test_failed(r, outcomes.get(t)) for t, r in tests)
    n_failed_checks = sum(failed(r) for r in rows)

    summary = ["<table class='summary'><thead><tr><th>test</th><th>metric</th><th>backbone</th>"
               "<th class='num'>value</th><th>baseline ± tol / threshold</th><th class='num'>delta</th>"
               "<th>verdict</th></tr></thead><tbody>"]
    sections = []
    for test, checks in tests:
        status = "failed" if is_test_failed(checks, outcomes.get(test)) else "passed"
        anchor = _anchor(test)
        for row in checks:
            summary.append(f"<tr class='{status}' data-test='{_e(test)}'><td class='test'>"
                           f"<a href='#{anchor}'>{_e(test)}</a></td><td>{_e(row.get('metric'))}</td>"
                           f"<td class='muted'>{_e(row.get('backbone'))}</td>"
                           f"<td class='num'>{_e(_fmt(row.get('value')))}</td><td>{_e(reference(row))}</td>"
                           f"<td class='num'>{_e(_signed(row.get('delta')))}</td>"
                           f"<td>{_badge(str(row.get('verdict')))}</td></tr>")
        folders: list[_ImageFolder] = []
        for folder in dict.fromkeys(r["images"] for r in checks if r.get("images")):
            folders.append(load_image_folder(folder))
        grids = "".join(_image_grid(f, shown, baselines, thumbnails.get(_baseline_file_of(shown)))
                        for f in folders for shown in [[r for r in checks if _shows(r, f)]])
        if not folders:
            grids = ('<div class="muted small">images of passing checks are not kept; run with '
                     '<code>--diffeval-results-always</code> to see them</div>')
        cards = "".join(_check_card(r, baselines) for r in sorted(checks, key=lambda r: not failed(r)))
        outcome = outcomes.get(test)
        note = f' <span class="muted small">pytest: {_e(outcome)}</span>' if outcome else ""
        sections.append(
            f'<section class="test {status}" id="{anchor}" data-test="{_e(test)}" data-status="{status}">'
            f'<h2>{_badge("failed" if status == "failed" else "pass")} {_e(test)}{note}</h2>'
            f'<div class="checks">{cards}</div>{grids}'
            f'{_provenance(checks, folders[0].call_kwargs if folders else {})}</section>')
    summary.append("</tbody></table>")

    info = " · ".join(_e(f"{k}: {v}") for k, v in (
        ("created", meta.get("created")), ("pytest exit status", meta.get("exitstatus")),
        ("rootdir", meta.get("rootdir")), ("args", " ".join(meta.get("args") or [])),
        ("workers", meta.get("workers")), ("pytest-diffeval", meta.get("pytest_diffeval"))) if v not in (None, ""))
    bad = " bad" if n_failed_checks else ""
    return f"""<!DOCTYPE html>
<html lang="en" data-render-check="pending">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>pytest-diffeval report: {n_failed_tests} of {len(tests)} tests failed</title>
<style>{_CSS}</style>
</head>
<body>
<header>
<h1>pytest-diffeval report</h1>
<div class="stats"><span class="stat{bad}">{n_failed_tests} of {len(tests)} tests failed</span>
<span class="stat{bad}">{n_failed_checks} of {len(rows)} metric checks failed</span></div>
<label><input type="checkbox" id="failed-only"> show only failed tests</label>
</header>
<main>
<div class="meta">{info}</div>
{"".join(summary)}
{"".join(sections)}
</main>
<script>{_JS}</script>
</body>
</html>
"""


# --------------------------------------------------------------------------- session outputs


@dataclass
class Outputs:
    """What :func:`write_outputs` wrote (and what it could not)."""

    metrics: Path | None = None
    report: Path | None = None
    step_summary: Path | None = None
    errors: list[str] = field(default_factory=list)


def write_outputs(rows: list[dict[str, Any]], *, results_dir: Path, report: Path, meta: dict[str, Any],
                  outcomes: dict[str, str] | None = None, step_summary_file: str | None = None) -> Outputs:
    """Write ``metrics.json``, the HTML report and the step summary (when asked); a file that
    cannot be written is an error message, not an exception (the test results stand)."""
    out = Outputs()
    meta = {**meta, "results_dir": str(results_dir), "report": str(report)}
    try:
        document = session_document(rows, meta, outcomes)
        out.metrics = results_dir / "metrics.json"
        atomic_write_text(out.metrics, json.dumps(document, indent=2) + "\n")
    except OSError as exc:
        out.errors.append(f"could not write {results_dir / 'metrics.json'}: {exc}")
        out.metrics = None
    try:
        atomic_write_text(report, render_html(rows, meta, outcomes))
        out.report = report
    except OSError as exc:
        out.errors.append(f"could not write the HTML report {report}: {exc}")
    if step_summary_file:
        try:
            with open(step_summary_file, "a", encoding="utf-8") as handle:
                handle.write(step_summary(rows, report=out.report, results_dir=results_dir, outcomes=outcomes))
            out.step_summary = Path(step_summary_file)
        except OSError as exc:
            out.errors.append(f"could not append to GITHUB_STEP_SUMMARY {step_summary_file}: {exc}")
    return out
