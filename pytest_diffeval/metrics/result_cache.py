"""The metric-result cache: a finished :class:`~pytest_diffeval.metrics.MetricResult` on
disk, so a rerun whose images and options did not change computes no metric and, with
its images cached too, imports none of torch, transformers, diffusers or torchmetrics.

A result is keyed by everything that determines it: the metric's name and code, the
versions of pytest-diffeval and the libraries it computes with, the image set's content
(pixels, prompts, seeds, carried inputs) and every option, bound to the metric's
signature with its defaults.  Options are keyed by content: image sets and arrays by
their bytes, files and folders by their files' bytes.  ``clip_model``, ``features`` and
``device`` left to the settings are keyed by the backbone they resolve to: an embedded
or local backbone by its files, a hub backbone by the commit in the local Hugging Face
cache (not cached there: not cached here).  An option without a content identity (an
``nn.Module``, a callable) means that call is not cached.

Only metrics with ``cacheable = True`` are cached: the built-ins, and user metrics that
opt in (``register_metric(..., cacheable=True)``), promising that their result depends
only on their images, their options and the backbone they name.

One safetensors file per result, written with ``safetensors.numpy`` (no pickle, no
torch): per-sample values and ``state`` tensors as arrays, everything else as JSON in the
file's metadata.  One file replaced atomically is whole or absent.  Each entry carries its
key (the sha256 of all the key material above), its metric's name and the name, dtype and
shape of every array in its metadata, and is read back only when all of them match and the
per-sample values are one float per image: an entry under another key (a swapped or stale
file), a corrupt one or one whose arrays were changed is a miss, recomputed and rewritten,
never a result.  What this does not guard against: someone who can write the cache folder
can forge an entry under its right key with any value (a key is computable from public
inputs, there is no secret), so a cache must be shared only among trusted runs (e.g. one
CI cache per trusted branch, never restored from a fork's pull request).  Warnings the
computation raised are stored and raised again on a hit.
"""

from __future__ import annotations

import builtins
import inspect
import json
import os
import sys
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .. import settings
from .._hashing import digest_array, digest_bytes, digest_files, digest_json, digest_text, library_versions
from .._io import atomic_path
from ..counters import COUNTERS
from ..devices import device_kind
from ..embedded import resolve_embedded
from ..fingerprints import hub_snapshot, path_fingerprint, resolve_model_dir
from .result import MetricResult

FORMAT = 2  # 2: entries record their arrays' dtypes and shapes


class Unkeyable(Exception):
    """Something a result depends on has no content identity: that call is not cached."""


# --------------------------------------------------------------------------- key material

_MEMO: dict[str, Any] = {}  # per process: code digests
_PACKAGE = Path(__file__).resolve().parent.parent


def code_digest(metric: Any) -> str:
    """pytest-diffeval's metric code (``metrics/``, ``embedded/``, ``generation/``, ``vqa/``) and the
    file that defines ``metric`` (a user metric's module): editing either invalidates."""
    func = getattr(metric, "func", None)
    try:
        own = inspect.getsourcefile(func if func is not None else type(metric))
    except TypeError:
        own = None
    memo = f"code:{own}"
    if memo not in _MEMO:
        files = sorted({*(_PACKAGE / "metrics").glob("*.py"), *(_PACKAGE / "embedded").glob("*.py"),
                        *(_PACKAGE / "generation").glob("*.py"), *(_PACKAGE / "vqa").glob("*.py"),
                        *([Path(own).resolve()] if own else [])})
        _MEMO[memo] = digest_files(files, 16)
    return _MEMO[memo]


def _is_image_set(value: Any) -> bool:
    # a ShardedImageSet first: reading its ``images`` would gather the whole set's pixels
    return hasattr(value, "sample_keys") and (hasattr(value, "gather_rows") or hasattr(value, "images"))


def image_set_digest(images: Any) -> str:
    """The content of an ImageSet: pixels, prompts, seeds and the inputs it carries."""
    if not (_is_image_set(images) and hasattr(images, "prompts") and hasattr(images, "seeds")):
        raise Unkeyable(f"{type(images).__name__} is not an ImageSet")
    pixels = (digest_json(images.map_samples(digest_array, "digest the samples for the result cache"), 32)
              if hasattr(images, "gather_rows") else digest_array(images.images))  # torchrun: each rank its block
    material = [pixels, [str(p) for p in images.prompts], [int(s) for s in images.seeds],
                canonical(dict(getattr(images, "inputs", None) or {}))]
    return digest_json(material, 32, default=None)


def canonical(value: Any, *, top: bool = False) -> Any:
    """A JSON value that identifies ``value`` by content; ``top``: a string that names an
    existing file, folder or embedded model is identified by its content too."""
    if value is None or isinstance(value, (bool, int, float)):
        return value
    if isinstance(value, str):
        return _string(value) if top else value
    if isinstance(value, os.PathLike):
        return {"path": os.fspath(value), "content": _content(value)}
    if _is_image_set(value):
        return {"image_set": image_set_digest(value)}
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return {"array": digest_array(value)}
    if type(value).__name__ in ("Tensor", "Parameter") and hasattr(value, "detach"):
        return {"array": digest_array(value.detach().cpu().numpy())}
    if hasattr(value, "tobytes") and hasattr(value, "mode") and hasattr(value, "size"):  # PIL image
        return {"image": f"{value.mode}:{tuple(value.size)}:{digest_bytes(value.tobytes(), 24)}"}
    if isinstance(value, range):
        return {"range": [value.start, value.stop, value.step]}
    if isinstance(value, (list, tuple)):
        return [canonical(v) for v in value]
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        return {k: canonical(v) for k, v in value.items()}
    raise Unkeyable(f"an option of type {type(value).__name__}")


def _string(value: str) -> Any:
    embedded = resolve_embedded(value)
    if embedded is not None:
        return {"str": value, "content": path_fingerprint(embedded)}
    if "\n" in value or len(value) > 1024:
        return value
    try:
        exists = Path(value).expanduser().exists()
    except (OSError, ValueError):
        exists = False
    return {"str": value, "content": _content(value)} if exists else value


def _content(path: str | os.PathLike[str]) -> str:
    """A path option's content hash.  The filesystem root, home, the working folder or one
    above it are not hashed (that would read everything beneath): the call is not cached."""
    resolved = Path(path).expanduser().resolve()
    if resolved.is_dir() and (resolved == Path(resolved.anchor) or resolved in (Path.home(), Path.cwd())
                              or resolved in Path.cwd().parents):
        raise Unkeyable(f"the folder {resolved} as an option")
    return path_fingerprint(resolved)


def backbone_identity(name: str) -> str:
    """A backbone's content identity, as the metrics load it: an embedded name or local
    folder by its files (its backbone id), a hub id by the commit the local Hugging Face
    cache holds (Unkeyable when it holds none)."""
    backbone_id, path = resolve_model_dir(name)
    if path is not None:
        return backbone_id
    snapshot = hub_snapshot(name)
    if snapshot is None:
        raise Unkeyable(f"hub backbone {name!r} is not in the local Hugging Face cache")
    return f"{name}@{snapshot.name}"


def _features_identity(features: Any) -> Any:
    if not isinstance(features, str):
        return canonical(features)  # an nn.Module: Unkeyable
    if features.startswith("clip:"):
        return "clip:" + backbone_identity(features[5:])
    if features.startswith("inception-v3-"):
        weights = settings.current().inception_weights
        return {"features": features, "weights": path_fingerprint(weights) if weights else "torch-fidelity default"}
    return features  # unknown: the metric raises, and nothing is stored


def _device_identity(device: Any) -> str:
    device = str(device)
    if device.split(":")[0] == "cpu":
        return "cpu"

    return device_kind(device)


def _setting(value: Any, default: Callable[[], Any]) -> Any:
    """An option the metrics fill from the settings when it is None or empty."""
    return default() if value is None or (isinstance(value, str) and not value) else value


# Options every built-in fills from the settings when left out, keyed by what they resolve to.
RESOLVED: dict[str, Callable[[Any], Any]] = {
    "clip_model": lambda v: backbone_identity(_setting(v, lambda: settings.current().clip_model)),
    "features": lambda v: _features_identity(_setting(v, lambda: settings.current().fid_features)),
    "device": lambda v: _device_identity(_setting(v, settings.resolved_device)),
}


def bound_options(func: Callable[..., Any], images: Any, options: dict[str, Any]) -> dict[str, Any]:
    """``options`` bound to ``func(images, **options)``'s signature, defaults filled in, each
    keyed by content (the ``RESOLVED`` ones by the backbone or device they resolve to)."""
    signature = inspect.signature(func)
    try:
        bound = signature.bind(images, **options)
    except TypeError as exc:
        raise Unkeyable(str(exc)) from None  # the metric raises the clear error
    bound.apply_defaults()
    arguments = dict(bound.arguments)
    arguments.pop(next(iter(signature.parameters)))  # the images
    for name, parameter in signature.parameters.items():
        if parameter.kind is parameter.VAR_KEYWORD:
            arguments.update(arguments.pop(name, {}))
        elif parameter.kind is parameter.VAR_POSITIONAL and arguments.pop(name, ()):
            raise Unkeyable("positional options")
    return {name: RESOLVED[name](value) if name in RESOLVED else canonical(value, top=True)
            for name, value in sorted(arguments.items())}


def call_material(metric: Any, images: Any, options: dict[str, Any]) -> dict[str, Any]:
    """What one metric contributes to a key: its name, code and options."""
    return {"metric": metric.name, "code": code_digest(metric), "options": metric.cache_material(images, options)}


# --------------------------------------------------------------------------- storage


def _json_exact(value: Any) -> bool:
    """Whether JSON gives ``value`` back unchanged (no tuples, NaN or numpy objects lost)."""
    try:
        return json.loads(json.dumps(value)) == value
    except (TypeError, ValueError):
        return False


def _numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):
        value = value.detach().cpu().numpy()
    return np.asarray(value, order="C")  # keeps 0-d arrays 0-d


def _category(record: dict[str, Any]) -> type[Warning]:
    """The stored warning's class if it is loaded (never imported for this), else its builtin base."""
    found = getattr(sys.modules.get(record.get("module", ""), None), record.get("category", ""), None)
    if isinstance(found, type) and issubclass(found, Warning):
        return found
    base = getattr(builtins, record.get("base", ""), None)
    return base if isinstance(base, type) and issubclass(base, Warning) else UserWarning


def reemit(records: list[dict[str, Any]]) -> None:
    """Raise stored warnings again, through the warning filters in force now."""
    for record in records:
        warnings.warn_explicit(str(record["message"]), _category(record), str(record.get("filename", "")),
                               int(record.get("lineno", 0)))


def _array_spec(arrays: dict[str, np.ndarray]) -> dict[str, list[Any]]:
    """Each array's dtype and shape, as stored in an entry and checked on read."""
    return {name: [str(value.dtype), list(value.shape)] for name, value in sorted(arrays.items())}


def warning_records(caught: list[warnings.WarningMessage]) -> list[dict[str, Any]]:
    out = []
    for item in caught:
        category = item.category
        base = next(c for c in category.__mro__ if getattr(builtins, c.__name__, None) is c)
        out.append({"message": str(item.message), "category": category.__qualname__, "module": category.__module__,
                    "base": base.__name__, "filename": str(item.filename), "lineno": int(item.lineno or 0)})
    return out


class ResultCache:
    """Metric results on disk, one safetensors file per result (see the module doc)."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)

    def key(self, metric: Any, images: Any, options: dict[str, Any]) -> str | None:
        """The result's key, or None when the call cannot be keyed (then it is not cached)."""
        try:
            material = {"format": FORMAT, "versions": library_versions(), "images": image_set_digest(images),
                        **call_material(metric, images, options)}
            if getattr(metric, "state_on_root", False) and hasattr(images, "group") and images.group.rank != 0:
                material["state"] = "on rank 0"  # this rank's result lacks the per-image state: never served as whole
            text = json.dumps(material, sort_keys=True)
        except Unkeyable:
            return None
        return digest_text(text, 32)

    def _path(self, key: str) -> Path:
        return self.directory / key[:2] / f"{key}.safetensors"

    def get(self, key: str, metric: str, n_images: int) -> tuple[Any, list[dict[str, Any]]] | None:
        """``(result, warnings it raised)``, or None when absent, corrupt or not this entry."""

        path = self._path(key)
        if not path.is_file():
            return None
        try:
            from safetensors import safe_open

            with safe_open(str(path), "np") as handle:
                meta = json.loads((handle.metadata() or {})["result"])
                arrays = {name: handle.get_tensor(name) for name in handle.keys()}
            if (meta["format"], meta["key"], meta["metric"]) != (FORMAT, key, metric):
                return None  # another entry's file (swapped or stale), or another format
            if _array_spec(arrays) != meta["arrays"]:
                return None  # arrays replaced inside the file
            per_sample = arrays.pop("per_sample", None)
            if per_sample is not None and (per_sample.shape != (n_images,) or per_sample.dtype.kind != "f"):
                return None
            state = None
            if meta["state"] is not None:
                state = {**meta["state"], "tensors": {k[len("state."):]: v for k, v in arrays.items()
                                                      if k.startswith("state.")}}
            result = MetricResult(metric, float(meta["value"]), str(meta["backbone"]), bool(meta["higher_is_better"]),
                                  per_sample=per_sample, details=dict(meta["details"]), state=state)
            return result, list(meta["warnings"])
        except Exception:  # noqa: BLE001 - a corrupt entry is a miss, recomputed and rewritten
            return None

    def put(self, key: str, result: Any, caught: list[dict[str, Any]]) -> None:
        """Store ``result``; one that JSON and arrays cannot hold exactly is not stored."""
        arrays: dict[str, np.ndarray] = {}
        state_meta = None
        try:
            if result.per_sample is not None:
                arrays["per_sample"] = _numpy(result.per_sample)
            if result.state is not None:
                tensors = result.state.get("tensors")
                if not isinstance(tensors, dict):
                    return
                arrays.update({f"state.{name}": _numpy(value) for name, value in tensors.items()})
                state_meta = {k: v for k, v in result.state.items() if k != "tensors"}
        except (TypeError, ValueError, AttributeError, RuntimeError):
            return
        meta = {"format": FORMAT, "key": key, "metric": result.metric, "value": float(result.value),
                "arrays": _array_spec(arrays),
                "backbone": result.backbone, "higher_is_better": bool(result.higher_is_better),
                "details": result.details, "state": state_meta, "warnings": caught}
        if not (_json_exact(result.details) and _json_exact(state_meta)):
            return
        try:
            from safetensors.numpy import save_file

            with atomic_path(self._path(key)) as tmp:
                save_file(arrays, str(tmp), metadata={"result": json.dumps(meta)})
        except Exception:  # noqa: BLE001 - an unwritable cache or an odd dtype costs a recomputation
            pass


_CACHE: ResultCache | None = None


def result_cache() -> ResultCache | None:
    """The cache under ``settings.current().cache_dir`` (None without a cache dir or with
    ``--diffeval-no-cache``)."""
    global _CACHE

    current = settings.current()
    if current.cache_dir is None or not current.result_cache:
        return None
    path = Path(current.cache_dir) / "results"
    if _CACHE is None or _CACHE.directory != path:
        _CACHE = ResultCache(path)
    COUNTERS.result_dir = str(path)
    return _CACHE


__all__ = ["ResultCache", "Unkeyable", "backbone_identity", "bound_options", "canonical", "result_cache"]
