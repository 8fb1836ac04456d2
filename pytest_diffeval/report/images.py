"""The images of a results folder as the HTML page embeds them: data URIs, downscaled when
large, listed by the folder's ``samples.json`` (a listed file outside the folder is refused).

Pillow is imported only when an image is embedded.
"""

from __future__ import annotations

import base64
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .._io import inside
from ..exceptions import UnsafePath

THUMBNAIL_MAX = 384  # larger images are embedded downscaled (the PNGs on disk keep full size)


@dataclass
class EmbeddedImage:
    """One image as the page shows it: its sample, its data URI and the size embedded."""

    prompt: str | None
    seed: int | None
    uri: str
    width: int
    height: int
    file: str


@dataclass
class ImageFolder:
    """A results folder's images, the call that made them, and what could not be read."""

    path: Path
    images: list[EmbeddedImage] = field(default_factory=list)
    call_kwargs: dict[str, Any] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)

    @property
    def error(self) -> str | None:
        """What went wrong reading the folder, one line (None: nothing)."""
        return "; ".join(self.errors) or None


def data_uri(file: Path) -> tuple[str, int, int]:
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


def load_image_folder(folder: str | Path) -> ImageFolder:
    """The images ``ImageSet.save`` wrote to ``folder`` (listed by its ``samples.json``).
    A listed file outside the folder is not read: the page says which entry was refused."""
    path = Path(folder)
    result = ImageFolder(path)
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
            uri, width, height = data_uri(file)
        except UnsafePath as exc:
            result.errors.append(f"refused: {exc}")
            continue
        except (OSError, ValueError) as exc:
            result.errors.append(f"{path / str(entry.get('file'))}: {exc}")
            continue
        result.images.append(EmbeddedImage(entry.get("prompt"), entry.get("seed"), uri, width, height, entry["file"]))
    if not entries:
        result.errors.append(f"no images found in {path}")
    return result

