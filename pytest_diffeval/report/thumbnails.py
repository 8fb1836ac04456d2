"""Baseline thumbnails: under ``--snapshot-update --diffeval-baseline-images``, small PNGs
stored beside each baseline file with an index that ties them to the baseline's content, so
the page can show them next to this run's images (and refuses a stale or edited set).
"""

from __future__ import annotations

import io
import json
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import distributed
from .._hashing import digest_bytes
from .._io import atomic_write_bytes, atomic_write_text, inside
from ..exceptions import UnsafePath
from .images import EmbeddedImage, data_uri
from .rows import sample_key

BASELINE_THUMBNAIL_MAX = 64  # --diffeval-baseline-images: thumbnails small enough to commit beside the baseline
BASELINE_IMAGES_FORMAT = 1


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
    if hasattr(images, "gather_rows"):  # torchrun: every rank gathers the pixels (a collective), rank 0 writes
        images.gather()
    if not distributed.is_writer():
        return None
    return store_baseline_images(images, baseline_file)


_RUN_TOKEN = f"{os.getpid()}-{time.time_ns()}"  # thumbnails of several calls in one test and run are merged


def _thumbnail_digest(entries: list[dict[str, Any]]) -> str:
    """One digest over every (seed, prompt, thumbnail hash): what the index vouches for."""
    lines = sorted(f"{sample_key(e['seed'], e['prompt'])}|{e['sha256']}" for e in entries)
    return digest_bytes("\n".join(lines).encode("utf-8"))


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
    baseline_sha = digest_bytes(baseline_file.read_bytes())
    existing = _read_index(folder)
    fresh = existing is not None and existing.get("baseline_sha256") == baseline_sha
    kept: dict[str, dict[str, Any]] = {}
    if existing is not None and (fresh or existing.get("run") == _RUN_TOKEN):
        kept = {sample_key(e.get("seed"), e.get("prompt")): e for e in existing["samples"] if isinstance(e, dict)}
    keys = [sample_key(seed, prompt) for prompt, seed in zip(prompts, seeds)]
    if fresh and all(k in kept for k in keys):
        return folder  # the baseline did not change: its thumbnails stand
    entries = dict(kept)
    for key, prompt, seed, image in zip(keys, prompts, seeds, pixels):
        data = _thumbnail_png(image, max_size)
        sha = digest_bytes(data)
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
class BaselineThumbnails:
    """The thumbnails stored beside one baseline file, or the note saying why none are shown."""

    folder: Path
    images: dict[str, EmbeddedImage] = field(default_factory=dict)  # "<seed>|<prompt>" -> thumbnail
    note: str | None = None


class ThumbnailCache:
    """Baseline thumbnails by baseline file, each folder read once per page."""

    def __init__(self) -> None:
        self._loaded: dict[str, BaselineThumbnails] = {}

    def get(self, baseline_file: str | None) -> BaselineThumbnails | None:
        """The thumbnails of ``baseline_file`` (None when the row has no baseline file)."""
        if not baseline_file:
            return None
        if baseline_file not in self._loaded:
            self._loaded[baseline_file] = load_baseline_images(baseline_file)
        return self._loaded[baseline_file]


def load_baseline_images(baseline_file: str | Path) -> BaselineThumbnails:
    """The thumbnails stored beside ``baseline_file``, checked against their index: none when
    the folder is stale (the baseline changed after they were recorded), a thumbnail does not
    match its sha256, or the index names a file outside its folder (the note says which)."""
    folder = baseline_images_dir(baseline_file)
    out = BaselineThumbnails(folder)
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
        baseline_sha = digest_bytes(Path(baseline_file).read_bytes())
    except OSError as exc:
        out.note = f"cannot read {baseline_file}: {exc}"
        return out
    if index.get("baseline_sha256") != baseline_sha:
        out.note = (f"{folder}: stale, the baseline {Path(baseline_file).name} changed after these thumbnails were "
                    f"recorded (not shown); {THUMBNAILS_FIX}")
        return out
    images: dict[str, EmbeddedImage] = {}
    try:
        entries = [e for e in index["samples"] if isinstance(e, dict)]
        if index.get("digest") != _thumbnail_digest(entries):
            raise ValueError(f"{index_file}: its digest does not match the thumbnails it lists (edited by hand?)")
        for entry in entries:
            file = inside(folder, entry.get("file"), source=index_file, what="thumbnail file", fix=THUMBNAILS_FIX)
            if digest_bytes(file.read_bytes()) != entry.get("sha256"):
                raise ValueError(f"{file}: does not match the sha256 in {index_file}")
            uri, width, height = data_uri(file)
            key = sample_key(entry.get("seed"), entry.get("prompt"))
            images[key] = EmbeddedImage(entry.get("prompt"), entry.get("seed"), uri, width, height, str(entry.get("file")))
    except UnsafePath as exc:
        out.note = f"refused: {exc}"
        return out
    except (OSError, ValueError, KeyError, TypeError) as exc:
        out.note = f"baseline thumbnails not shown: {exc}; {THUMBNAILS_FIX}"
        return out
    out.images = images
    return out

