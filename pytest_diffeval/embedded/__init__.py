"""Tiny models shipped inside the package, trained offline by ``scripts/train_embedded.py``.

=================================  ==================================================
name                               what
=================================  ==================================================
``diffeval/tiny-t2i``              ``PixelTextToImagePipeline`` (16x16 coloured digits)
``diffeval/tiny-t2i-undertrained`` the same pipeline from an early checkpoint (regressed)
``diffeval/tiny-clip``             ``CLIPModel`` + ``CLIPProcessor`` for 16x16 images
``diffeval/tiny-checker``          ``DigitChecker``: digit classifier + colour statistics
``diffeval/tiny-vlm``              ``LlavaForConditionalGeneration`` + ``LlavaProcessor``: yes/no
                                   questions about digit and colours (``scripts/train_tiny_vlm.py``)
=================================  ==================================================

All load offline from local directories, e.g.
``PixelTextToImagePipeline.from_pretrained(resolve_embedded("diffeval/tiny-t2i"))``.
"""

from __future__ import annotations

from pathlib import Path

WEIGHTS_DIR = Path(__file__).parent / "weights"

EMBEDDED: dict[str, Path] = {
    "diffeval/tiny-t2i": WEIGHTS_DIR / "tiny-t2i",
    "diffeval/tiny-t2i-undertrained": WEIGHTS_DIR / "tiny-t2i-undertrained",
    "diffeval/tiny-clip": WEIGHTS_DIR / "tiny-clip",
    "diffeval/tiny-checker": WEIGHTS_DIR / "tiny-checker",
    "diffeval/tiny-vlm": WEIGHTS_DIR / "tiny-vlm",
}


def resolve_embedded(name: str) -> Path | None:
    """Local directory of the embedded model ``name`` (e.g. ``"diffeval/tiny-t2i"``), else ``None``.

    Returns ``None`` for names that are not embedded models and for embedded models
    whose weights are missing (not trained yet).
    """
    path = EMBEDDED.get(str(name).strip().rstrip("/"))
    return path if path is not None and path.is_dir() and any(path.iterdir()) else None


__all__ = ["EMBEDDED", "WEIGHTS_DIR", "resolve_embedded"]
