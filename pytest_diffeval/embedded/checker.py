"""An independent (CLIP-free) checker of generated coloured-digit images.

* **Colours** come from plain pixel statistics: every pixel is mapped to its
  nearest :data:`~pytest_diffeval.embedded.data.PALETTE` colour; the background
  is the most common one on the 1-px border; the stroke (foreground) is the
  palette colour whose blend line from the background best fits the pixels
  farthest from the background.
* **Digit** comes from a small CNN that sees a colour-free "ink" map (each pixel's
  distance from the background colour, scaled by the stroke's distance), trained
  on real shifted/coloured digits only (never on generated images).

Usage::

    checker = DigitChecker.from_pretrained(resolve_embedded("diffeval/tiny-checker"))
    ok = checker.check(images_uint8_nhwc, prompts)   # {"digit": bool[n], "fg": ..., "bg": ...}
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .data import ALL_COMBOS, IMAGE_SIZE, PALETTE, make_images, parse_caption

__all__ = ["DigitChecker", "DigitNet", "colour_stats", "train_checker"]

_WEIGHTS = "model.safetensors"
_CONFIG = "config.json"


class DigitNet(nn.Module):
    """Small CNN: 1x16x16 ink map -> 10 digit logits (~90k parameters)."""

    def __init__(self, width: int = 16, hidden: int = 64):
        super().__init__()
        w = width
        self.net = nn.Sequential(
            nn.Conv2d(1, w, 3, padding=1), nn.ReLU(),
            nn.Conv2d(w, 2 * w, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(2 * w, 4 * w, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(4 * w * (IMAGE_SIZE // 4) ** 2, hidden), nn.ReLU(),
            nn.Linear(hidden, 10),
        )  # fmt: skip

    def forward(self, ink: torch.Tensor) -> torch.Tensor:
        return self.net(ink)


def _as_uint8(images) -> np.ndarray:
    """uint8 NHWC array from a uint8/float([0,1]) NHWC array, one HWC image, or a list of PIL images."""
    if isinstance(images, (list, tuple)):
        images = np.stack([np.asarray(im.convert("RGB") if hasattr(im, "convert") else im) for im in images])
    images = np.asarray(images)
    if images.ndim == 3:
        images = images[None]
    if images.dtype != np.uint8:
        images = np.clip(np.rint(images.astype(np.float32) * 255.0), 0, 255).astype(np.uint8)
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected NHWC RGB images, got shape {images.shape}")
    return images


def colour_stats(images, palette: dict[str, tuple[int, int, int]] = PALETTE) -> dict[str, np.ndarray]:
    """Background / stroke colour of each image plus its colour-free ink map.

    Returns ``{"bg": int[n], "fg": int[n]}`` (indices into ``list(palette)``) and
    ``"ink": float32[n, H, W]`` in [0, 1].
    """
    x = _as_uint8(images).astype(np.float32)
    n, h, w, _ = x.shape
    pal = np.asarray(list(palette.values()), np.float32)
    dist = np.linalg.norm(x[..., None, :] - pal, axis=-1)  # (n, h, w, k)
    nearest = dist.argmin(-1)
    border = np.zeros((h, w), bool)
    border[[0, -1], :] = border[:, [0, -1]] = True
    k = len(pal)
    bg = np.array([np.bincount(nearest[i][border], minlength=k).argmax() for i in range(n)])
    fg = np.empty(n, np.int64)
    ink = np.empty((n, h, w), np.float32)
    for i in range(n):
        on_border = border & (nearest[i] == bg[i])
        bg_rgb = x[i][on_border].mean(0) if on_border.any() else pal[bg[i]]
        d = np.linalg.norm(x[i] - bg_rgb, axis=-1)
        strong = d >= 0.5 * d.max()
        # Stroke colour: the palette colour c whose bg->c line best explains the strong pixels
        # (anti-aliased stroke pixels are blends bg + a * (c - bg), e.g. grey for black on white).
        v = pal - bg_rgb  # (k, 3)
        rel = x[i][strong] - bg_rgb  # (m, 3)
        a = np.clip(rel @ v.T / np.maximum((v * v).sum(-1), 1e-6), 0.0, 1.0)  # (m, k)
        resid = np.linalg.norm(rel[:, None, :] - a[..., None] * v, axis=-1).mean(0)  # (k,)
        resid[bg[i]] = np.inf
        fg[i] = resid.argmin()
        ink[i] = np.clip(d / max(float(np.median(d[strong])), 1e-3), 0.0, 1.0)
    return {"bg": bg, "fg": fg, "ink": ink}


class DigitChecker:
    """Digit classifier + colour statistics for images of :mod:`~pytest_diffeval.embedded.data`."""

    def __init__(self, net: DigitNet, config: dict):
        self.net = net.eval()
        self.config = dict(config)
        self.palette = {k: tuple(v) for k, v in self.config["palette"].items()}
        self.colour_names = np.array(list(self.palette))

    @classmethod
    def from_pretrained(cls, path: str | Path) -> "DigitChecker":
        """Load from a directory written by :meth:`save_pretrained`."""
        from safetensors.torch import load_file

        path = Path(path)
        config = json.loads((path / _CONFIG).read_text())
        net = DigitNet(**config["arch"])
        net.load_state_dict(load_file(str(path / _WEIGHTS)))
        return cls(net, config)

    def save_pretrained(self, path: str | Path) -> None:
        """Write ``model.safetensors`` and ``config.json`` to ``path``."""
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in self.net.state_dict().items()}, str(path / _WEIGHTS))
        (path / _CONFIG).write_text(json.dumps(self.config, indent=2) + "\n")

    @torch.no_grad()
    def predict(self, images) -> dict[str, np.ndarray]:
        """Per image: ``digit`` (int), ``digit_prob`` (its softmax probability), ``fg`` and ``bg`` colour names.

        ``images``: uint8 NHWC array (or float in [0, 1], or a list of PIL images).
        """
        stats = colour_stats(images, self.palette)
        ink = torch.from_numpy(stats["ink"])[:, None]
        probs = torch.softmax(self.net(ink), dim=-1) if len(ink) else torch.zeros(0, 10)
        prob, digit = probs.max(-1)
        return {
            "digit": digit.numpy().astype(np.int64),
            "digit_prob": prob.numpy(),
            "fg": self.colour_names[stats["fg"]],
            "bg": self.colour_names[stats["bg"]],
        }

    def check(self, images, prompts: list[str]) -> dict[str, np.ndarray]:
        """Does each image show what its prompt (``"a red digit 7 on a blue background"``) asks for?

        Returns per-sample boolean arrays ``{"digit": ..., "fg": ..., "bg": ...}``.
        """
        pred = self.predict(images)
        if len(prompts) != len(pred["digit"]):
            raise ValueError(f"{len(prompts)} prompts for {len(pred['digit'])} images")
        want = [parse_caption(p) for p in prompts]
        return {
            "digit": pred["digit"] == np.array([w[0] for w in want], np.int64),
            "fg": pred["fg"] == np.array([w[1] for w in want]),
            "bg": pred["bg"] == np.array([w[2] for w in want]),
        }


def _augment(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Pixel noise and a little colour jitter, so the checker tolerates imperfect generations."""
    x = images.astype(np.float32)
    x += rng.normal(0, rng.uniform(0, 12, size=(len(x), 1, 1, 1)), size=x.shape)
    x += rng.normal(0, 10, size=(len(x), 1, 1, 3))
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def train_checker(steps: int = 1500, batch: int = 128, seed: int = 0, log=print) -> tuple[DigitChecker, dict]:
    """Train a :class:`DigitChecker` on real training-split digits (all colour combinations).

    Returns the checker and ``{"heldout_digit_acc", "heldout_fg_acc", "heldout_bg_acc"}``
    measured on 2000 real images from the held-out digit samples.
    """
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    net = DigitNet()
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps, pct_start=0.1)
    net.train()
    for step in range(steps):
        images, captions = make_images(batch, seed=10_000_000 + seed * 100_000 + step, combos=ALL_COMBOS)
        ink = torch.from_numpy(colour_stats(_augment(images, rng))["ink"])[:, None]
        labels = torch.tensor([parse_caption(c)[0] for c in captions])
        loss = nn.functional.cross_entropy(net(ink), labels, label_smoothing=0.05)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 250 == 0 or step == steps - 1:
            log(f"  checker step {step:5d}/{steps} loss {loss.item():.3f}")
    config = {
        "palette": {k: list(v) for k, v in PALETTE.items()},
        "image_size": IMAGE_SIZE,
        "arch": {"width": 16, "hidden": 64},
    }
    checker = DigitChecker(net, config)
    images, captions = make_images(2000, seed=seed + 99, split="heldout", combos=ALL_COMBOS)
    ok = checker.check(images, captions)
    metrics = {f"heldout_{k}_acc": float(v.mean()) for k, v in ok.items()}
    checker.config["metrics"] = metrics
    return checker, metrics
