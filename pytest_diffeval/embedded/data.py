"""Offline captioned toy data for the embedded tiny models.

Images are scikit-learn's bundled ``load_digits`` (8x8 grey digits, no download)
upsampled to ``IMAGE_SIZE`` x ``IMAGE_SIZE``, shifted by up to +-2 px, and painted
with a stroke (foreground) colour on a background colour from :data:`PALETTE`.
Each image has a caption of exactly the form ``"a red digit 7 on a blue background"``.

Two things are held out so evaluation is honest:

* *samples*: the 1797 sklearn digit samples are split (seeded) into a train part
  and a held-out part; ``make_images(..., split="heldout")`` only draws from the
  held-out part (use it for FID/KID reference sets).
* *captions*: the 32 (digit, fg, bg) combinations of :data:`HELDOUT_COMBOS` /
  :data:`HELDOUT_PROMPTS` never appear in the training captions
  (:data:`TRAIN_COMBOS`), which still cover every digit and every colour in both roles.

Everything is deterministic given the seed.
"""

from __future__ import annotations

import gzip
import re
from functools import lru_cache
from importlib.util import find_spec
from pathlib import Path

import numpy as np

IMAGE_SIZE = 16
"""Side length in pixels of every image."""

MAX_SHIFT = 2
"""Images are shifted by a random integer in [-MAX_SHIFT, MAX_SHIFT] on each axis."""

PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 60, 220),
    "yellow": (240, 220, 30),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
}
"""Colour name -> RGB (uint8) of the six clearly distinct colours."""

COLORS: tuple[str, ...] = tuple(PALETTE)
DIGITS: tuple[int, ...] = tuple(range(10))

_HELDOUT_SAMPLE_FRACTION = 0.2
_SPLIT_SEED = 1234
_COMBO_SEED = 4321
_N_HELDOUT_COMBOS = 32

_CAPTION_RE = re.compile(r"^a (\w+) digit (\d) on a (\w+) background$")


def caption(digit: int, fg: str, bg: str) -> str:
    """The caption of a ``digit`` drawn in colour ``fg`` on background colour ``bg``."""
    if int(digit) not in DIGITS or fg not in PALETTE or bg not in PALETTE:
        raise ValueError(f"invalid caption parts: {digit!r}, {fg!r}, {bg!r}")
    return f"a {fg} digit {int(digit)} on a {bg} background"


def parse_caption(text: str) -> tuple[int, str, str]:
    """Inverse of :func:`caption`: ``"a red digit 7 on a blue background"`` -> ``(7, "red", "blue")``.

    Raises ``ValueError`` for any text that is not such a caption.
    """
    m = _CAPTION_RE.match(text.strip()) if isinstance(text, str) else None
    if m is None or m.group(1) not in PALETTE or m.group(3) not in PALETTE:
        raise ValueError(f"not a caption of the embedded data set: {text!r}")
    return int(m.group(2)), m.group(1), m.group(3)


def _all_combos() -> list[tuple[int, str, str]]:
    return [(d, fg, bg) for d in DIGITS for fg in COLORS for bg in COLORS if fg != bg]


def _pick_heldout_combos() -> list[tuple[int, str, str]]:
    """32 (digit, fg, bg) combinations: every digit 3-4 times, no (fg, bg) pair twice."""
    rng = np.random.default_rng(_COMBO_SEED)
    pairs = [(fg, bg) for fg in COLORS for bg in COLORS if fg != bg]  # 30 pairs
    order = rng.permutation(len(pairs))
    digits = list(rng.permutation(np.arange(_N_HELDOUT_COMBOS) % 10))
    combos = []
    for i in range(_N_HELDOUT_COMBOS):
        fg, bg = pairs[order[i % len(pairs)]]
        combos.append((int(digits[i]), fg, bg))
    # The last two reuse a colour pair; make sure they differ from the first use.
    assert len(set(combos)) == len(combos)
    return sorted(combos, key=lambda c: (c[0], COLORS.index(c[1]), COLORS.index(c[2])))


HELDOUT_COMBOS: list[tuple[int, str, str]] = _pick_heldout_combos()
"""(digit, fg, bg) combinations that never occur in the training captions."""

HELDOUT_PROMPTS: list[str] = [caption(*c) for c in HELDOUT_COMBOS]
"""Captions of :data:`HELDOUT_COMBOS` - the truly held-out test prompts."""

ALL_COMBOS: list[tuple[int, str, str]] = _all_combos()
"""Every (digit, fg, bg) combination with fg != bg (300)."""

TRAIN_COMBOS: list[tuple[int, str, str]] = [c for c in _all_combos() if c not in set(HELDOUT_COMBOS)]
"""All other (digit, fg, bg) combinations (268): the ones used in training captions."""

assert {c[0] for c in TRAIN_COMBOS} == set(DIGITS)
assert {c[1] for c in TRAIN_COMBOS} == set(COLORS) == {c[2] for c in TRAIN_COMBOS}


def _load_digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits ``(images (1797, 8, 8), target)``, the numbers ``load_digits``
    returns, read from the file it reads without importing scikit-learn (a fraction of a
    second that every run building a reference set paid, warm reruns included)."""
    spec = find_spec("sklearn")  # finds the package without importing it
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    file = Path(folders[0]) / "datasets" / "data" / "digits.csv.gz" if folders else None
    if file is None or not file.is_file():
        from sklearn.datasets import load_digits

        dataset = load_digits()
        return dataset.images, dataset.target
    with gzip.open(file, "rt", encoding="utf-8") as handle:
        data = np.loadtxt(handle, delimiter=",")
    return data[:, :-1].reshape(-1, 8, 8), data[:, -1].astype(int)


@lru_cache(maxsize=1)
def _digit_samples() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(ink, labels) for the train and held-out sklearn samples; ink is float32 in [0, 1] at IMAGE_SIZE."""
    from scipy.ndimage import zoom

    images, target = _load_digits()
    ink = images.astype(np.float32) / 16.0  # (1797, 8, 8)
    ink = zoom(ink, (1, IMAGE_SIZE / 8, IMAGE_SIZE / 8), order=1, mode="nearest", grid_mode=True)
    ink = np.clip(ink, 0.0, 1.0).astype(np.float32)
    labels = target.astype(np.int64)
    perm = np.random.default_rng(_SPLIT_SEED).permutation(len(labels))
    n_held = int(round(_HELDOUT_SAMPLE_FRACTION * len(labels)))
    held, train = np.sort(perm[:n_held]), np.sort(perm[n_held:])
    return ink[train], labels[train], ink[held], labels[held]


def render(ink: np.ndarray, fg: str, bg: str, shift: tuple[int, int] = (0, 0)) -> np.ndarray:
    """Paint one ``IMAGE_SIZE``x``IMAGE_SIZE`` ink map (values in [0, 1]) -> uint8 HWC image."""
    s, m = IMAGE_SIZE, MAX_SHIFT
    padded = np.zeros((s + 2 * m, s + 2 * m), np.float32)
    padded[m : m + s, m : m + s] = ink
    dy, dx = shift
    a = padded[m - dy : m - dy + s, m - dx : m - dx + s][..., None]
    img = (1.0 - a) * np.asarray(PALETTE[bg], np.float32) + a * np.asarray(PALETTE[fg], np.float32)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def make_images(
    n: int,
    seed: int = 0,
    split: str = "train",
    combos: list[tuple[int, str, str]] | None = None,
    empty_caption_prob: float = 0.0,
) -> tuple[np.ndarray, list[str]]:
    """``n`` random captioned images: ``(uint8 array (n, 16, 16, 3), list of n captions)``.

    ``split="train"`` draws digit samples from the training part and, by default,
    captions from :data:`TRAIN_COMBOS`; ``split="heldout"`` draws from the held-out
    samples and, by default, :data:`HELDOUT_COMBOS` (so it is the real-image
    reference distribution for :data:`HELDOUT_PROMPTS`). Pass ``combos`` to choose
    the (digit, fg, bg) combinations yourself. ``empty_caption_prob`` replaces that
    fraction of captions by ``""`` (classifier-free guidance training).
    """
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', not {split!r}")
    tr_ink, tr_lab, ho_ink, ho_lab = _digit_samples()
    ink, labels = (tr_ink, tr_lab) if split == "train" else (ho_ink, ho_lab)
    if combos is None:
        combos = TRAIN_COMBOS if split == "train" else HELDOUT_COMBOS
    by_digit = {d: np.flatnonzero(labels == d) for d in DIGITS}
    rng = np.random.default_rng(seed)
    images = np.empty((n, IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
    captions = []
    for i in range(n):
        d, fg, bg = combos[rng.integers(len(combos))]
        k = by_digit[d][rng.integers(len(by_digit[d]))]
        shift = tuple(int(v) for v in rng.integers(-MAX_SHIFT, MAX_SHIFT + 1, size=2))
        images[i] = render(ink[k], fg, bg, shift)
        captions.append("" if rng.random() < empty_caption_prob else caption(d, fg, bg))
    return images, captions
