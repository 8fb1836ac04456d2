"""The image cache: one PNG per generated sample, keyed by everything that determines it,
and the claims that let processes sharing the cache split its samples instead of making
one twice."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .. import claims
from .._hashing import digest_array, digest_bytes, digest_json
from .._io import atomic_path

# A sample another live process claimed is waited for at most this long, then made here.
CLAIM_TIMEOUT_S = 1800.0


def fingerprint_arguments(value: Any) -> Any:
    """Call arguments for a cache key: arrays, tensors and images by content (dtype, shape and
    bytes), the rest as JSON."""
    if isinstance(value, dict):
        return {str(k): fingerprint_arguments(v) for k, v in sorted(value.items())}
    if isinstance(value, (list, tuple)):
        return [fingerprint_arguments(v) for v in value]
    if isinstance(value, np.ndarray) or type(value).__name__ == "Tensor":
        return digest_array(np.ascontiguousarray(value.detach().cpu().numpy() if hasattr(value, "detach") else value))
    if hasattr(value, "tobytes") and hasattr(value, "size"):  # PIL image
        return f"image:{value.size}:{digest_bytes(value.tobytes(), 16)}"
    return value if isinstance(value, (str, int, float, bool, type(None))) else repr(value)


@dataclass(frozen=True)
class Claim:
    """The outcome of claiming a missing entry before generating it: ``state`` is ``"free"``
    (nothing to claim against: no key, or a cache of one process), ``"mine"`` (this process
    holds ``path`` and generates the sample), ``"theirs"`` (another live process holds
    ``path``: wait for it) or ``"done"`` (another process stored ``entry`` just before)."""

    state: str
    path: Path | None = None
    entry: tuple[np.ndarray, bool] | None = None


class ImageCache:
    """Generated images on disk, one PNG per sample, keyed by everything that determines
    it: model content hash (and a fused LoRA's), the pipeline identity (every load option,
    module arguments by content, re-identified after a change; identity.py), the execution
    settings (attention, torch.compile, TF32/cuDNN/determinism flags, watermark), pipeline
    class, scheduler config, every call argument and input image, prompt, seed, dtype, device
    kind and library versions.  Change one input and only the samples
    it affects miss.  Writes are atomic.  Each PNG carries its key in a text chunk
    (``diffeval_key``) and is read back only under that key, as 8-bit RGB: a swapped or
    stale file, a corrupt one or one of another mode is a miss, regenerated, never
    trusted.  A forged PNG written under its right key cannot be told apart: share a cache
    only among trusted runs."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self.hits = 0
        self.misses = 0
        self.unwritable = False  # set (and warned about once) when an entry could not be written

    def key(self, provenance: dict[str, Any], call_kwargs: dict[str, Any], prompt: str, seed: int) -> str | None:
        if not provenance.get("model_hash") or provenance.get("model_hash") == "unknown":
            return None  # a pipeline object we cannot identify by content is never cached
        if "pipeline_id" in provenance and not provenance["pipeline_id"]:
            return None  # changed after loading in a way that cannot be identified by content
        # pipeline_id: the source's content and every load option by content (identity.py);
        # execution: attention processors, torch.compile, TF32/cuDNN/determinism flags, watermark
        material = {k: provenance.get(k) for k in ("model_hash", "revision", "pipeline_class", "scheduler",
                                                    "scheduler_config", "dtype", "device_kind", "versions",
                                                    "pipeline_id", "execution")}
        if provenance.get("lora"):  # fused LoRA weights change the model without changing its files
            material["lora"] = provenance["lora"]
        material.update(call_kwargs=fingerprint_arguments(call_kwargs), prompt=prompt, seed=seed)
        return digest_json(material, 32)

    def _path(self, key: str) -> Path:
        return self.directory / key[:2] / f"{key}.png"

    def claim_path(self, key: str | None) -> Path | None:
        """Where a process marks that it is generating this sample (see claims.py)."""
        return None if key is None else self._path(key).with_suffix(".claim")

    def claim(self, key: str | None) -> Claim:
        """Claim the missing entry ``key`` for this process before generating it (an OS file
        lock, claims.py): processes sharing the cache (xdist workers) split shared samples."""
        path = self.claim_path(key)
        if path is None:
            return Claim("free")
        if not claims.try_claim(path):
            return Claim("theirs", path)
        done = self.get(key)  # finished by another process just before
        if done is not None:
            claims.release([path])
            return Claim("done", path, done)
        return Claim("mine", path)

    @staticmethod
    def release(paths: Any) -> None:
        """Release this process's claims (once their samples are stored, or given up)."""
        claims.release(list(paths))

    def wait_for(self, pending: dict[int, Path], keys: Callable[[int], str | None],
                 timeout: float = CLAIM_TIMEOUT_S) -> dict[int, tuple[np.ndarray, bool] | None]:
        """Wait for the entries other processes claimed (``pending``: index -> claim file,
        ``keys``: index -> key); None for one whose owner gave up or died: make it here."""
        return claims.wait_for(pending, lambda index: self.get(keys(index)), timeout=timeout)

    def get(self, key: str | None) -> tuple[np.ndarray, bool] | None:
        if key is None or not self._path(key).is_file():
            return None
        from PIL import Image

        try:
            with Image.open(self._path(key)) as image:
                image.load()
                if (image.format, image.mode, image.info.get("diffeval_key")) != ("PNG", "RGB", key):
                    return None  # another sample's file (swapped or stale), or not one we wrote
                if image.info.get("diffeval_nonfinite") not in ("0", "1"):
                    return None
                array = np.asarray(image, dtype=np.uint8)
                nonfinite = image.info.get("diffeval_nonfinite") == "1"
        except Exception:  # noqa: BLE001 - a corrupt entry is a miss
            return None
        self.hits += 1
        return array, nonfinite

    def put(self, key: str | None, image: np.ndarray, nonfinite: bool) -> None:
        if key is None:
            return
        from PIL import Image, PngImagePlugin

        path = self._path(key)
        info = PngImagePlugin.PngInfo()
        info.add_text("diffeval_nonfinite", "1" if nonfinite else "0")
        info.add_text("diffeval_key", key)
        try:
            with atomic_path(path) as tmp:
                Image.fromarray(image).save(tmp, format="PNG", pnginfo=info)
        except OSError as exc:  # a read-only or full cache disk: the image is still used, just not kept
            if not self.unwritable:
                self.unwritable = True
                warnings.warn(f"pytest-diffeval: cannot write to the image cache {self.directory}: "
                              f"{type(exc).__name__}: {exc}; running without caching images; fix: free space or "
                              f"make {self.directory} writable, or point --diffeval-cache-dir at a writable folder",
                              UserWarning, stacklevel=2)
