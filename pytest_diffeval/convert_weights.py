"""Converting a weights pickle (``.pt``/``.pth``/``.bin``/``.ckpt``) to ``.safetensors`` once,
so scorers and metrics only ever read safetensors or ``torch.load(weights_only=True)`` files.

``python -m pytest_diffeval convert-weights IN OUT [--allow-global module.Name ...]``: the
pickle is read with ``torch.load(weights_only=True)``, never a full unpickle; a checkpoint
that holds other objects besides its tensors (an ``argparse.Namespace`` of training options,
say) is refused naming the object's class, and ``--allow-global`` admits exactly that class
(``torch.serialization.safe_globals``) when it is one of ``ADMISSIBLE``: plain data holders
whose construction runs no code of the file's choosing.  Names are looked up in that table,
never imported from the command line.  The tensors (a ``state_dict`` wrapper unwrapped,
nested dicts flattened to dotted names) are written atomically with the source's sha256 in
the metadata (the preference scorers identify the converted file by it, so its id stays the
pickle's); everything that is not a tensor is left out and counted.
"""

from __future__ import annotations

import argparse
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ._hashing import digest_file
from ._io import atomic_path
from .exceptions import ConversionError


@dataclass
class Converted:
    """What ``convert`` wrote: the output, its tensor count and the entries left out."""

    out: Path
    tensors: int
    dropped: list[str]


# Classes --allow-global may admit: data holders only (their unpickling sets attributes).
ADMISSIBLE: dict[str, type] = {"argparse.Namespace": argparse.Namespace}


def _allowed(names: list[str]) -> list[Any]:
    unknown = [name for name in names if name not in ADMISSIBLE]
    if unknown:
        raise ConversionError(f"pytest-diffeval: --allow-global {unknown[0]!r} is not one of the classes it may admit "
                              f"({', '.join(sorted(ADMISSIBLE))}); fix: convert the file in an environment you trust "
                              "with the scorer's own loader and save its state_dict with safetensors")
    return [ADMISSIBLE[name] for name in names]


def _tensors(value: Any, prefix: str, found: dict[str, Any], dropped: list[str]) -> None:
    import torch

    if isinstance(value, torch.Tensor):
        found[prefix] = value.detach().to("cpu").contiguous()
    elif isinstance(value, dict):
        for key, item in value.items():
            _tensors(item, f"{prefix}.{key}" if prefix else str(key), found, dropped)
    else:
        dropped.append(prefix or "(top level)")


def convert(source: str | Path, out: str | Path, allow_globals: list[str] | None = None) -> Converted:
    """Write the tensors of the pickle ``source`` to the safetensors file ``out``."""
    import torch
    from safetensors.torch import save_file

    source, out = Path(source).expanduser(), Path(out).expanduser()
    if not source.is_file():
        raise ConversionError(f"pytest-diffeval: convert-weights: {source} does not exist; fix: pass the weights file")
    if out.suffix != ".safetensors":
        raise ConversionError(f"pytest-diffeval: convert-weights: the output {out} must end in .safetensors")
    try:
        with torch.serialization.safe_globals(_allowed(list(allow_globals or []))):
            loaded = torch.load(str(source), map_location="cpu", weights_only=True)
    except ConversionError:
        raise
    except Exception as exc:  # noqa: BLE001 - reported with the refused global and the fix
        refused = re.findall(r"GLOBAL ([\w.]+)", str(exc))
        hint = (f"it holds an object of class {refused[0]}: if you trust this file, admit that class with "
                f"--allow-global {refused[0]}" if refused else "it is not a torch.save file of tensors")
        raise ConversionError(f"pytest-diffeval: convert-weights: torch.load(weights_only=True) refuses {source} "
                              f"({type(exc).__name__}); {hint}") from exc
    if isinstance(loaded, dict) and isinstance(loaded.get("state_dict"), dict):
        loaded = loaded["state_dict"]
    found: dict[str, Any] = {}
    dropped: list[str] = []
    _tensors(loaded, "", found, dropped)
    if not found:
        raise ConversionError(f"pytest-diffeval: convert-weights: {source} holds no tensors; fix: pass a state dict "
                              "or a checkpoint with a 'state_dict'")
    shared = {key: value.clone() for key, value in found.items()}  # safetensors refuses shared storage
    with atomic_path(out) as tmp:
        save_file(shared, str(tmp), metadata={"source": source.name, "source_sha256": digest_file(source)})
    return Converted(out, len(found), dropped)


__all__ = ["ConversionError", "Converted", "convert"]
