"""Copying the image folders of a merge's inputs: only folders inside an input are read,
only ``out/<name>`` is replaced, symbolic links are left out, and a ``samples.json`` that
names a file outside its folder is refused."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from .._io import inside
from ..exceptions import ReviewError, UnsafePath
from ..report import SAMPLES_FIX
from .validation import IMAGES_FIX


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


def copy_images(name: str, source: Path, out: Path, copied: dict[str, Path], notes: list[str]) -> str | None:
    """Copy the image folder ``name`` of the results directory ``source`` into ``out`` (once
    per folder); return its new path.  Only a folder inside ``source`` is read, only
    ``out/<name>`` is ever replaced, and ``samples.json`` in it must name files inside it."""
    key = f"{source.resolve()}|{name}"
    if key in copied:
        return str(copied[key])
    folder = image_source(name, source, out)
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


def folder_of(source: Path) -> Path:
    """The results directory of a source given as the directory or its ``metrics.json``."""
    return source if source.is_dir() else source.parent


def image_source(name: str, source: Path, out: Path) -> Path | None:
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
