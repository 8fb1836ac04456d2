"""Hardware keys: which stored baseline entry a run on this device and dtype compares with.

Numbers are not bit-identical across devices and dtypes, so a baseline keeps one entry per
hardware key (``"cpu/float32"``, ``"cuda/NVIDIA H100 (sm90)/float16"``) and a run picks the
best match (:func:`select_entry`).  Standard library only.
"""

from __future__ import annotations

import math
import re
from typing import Any

_CAPABILITY = re.compile(r"\(sm(\d{2,3})\)")


def hardware_key(provenance: dict[str, Any]) -> str:
    """``"cpu/float32"`` or ``"cuda/<GPU name> (sm90)/float16"``: baselines keep one entry per
    hardware, because numbers are not bit-identical across devices and dtypes."""
    device_type = str(provenance.get("device") or "cpu").split(":")[0]
    kind = provenance.get("device_kind") or device_type
    dtype = str(provenance.get("dtype") or "unknown").replace("torch.", "")
    return "/".join([device_type] + ([kind] if kind != device_type else []) + [dtype])


def hardware_entries(check: dict[str, Any]) -> dict[str, Any]:
    if "hardware" in check and isinstance(check["hardware"], dict):
        return dict(check["hardware"])
    return {hardware_key(check.get("provenance", {})): check} if "value" in check else {}


def _split_key(key: str) -> tuple[str, str, str]:
    """``(device type, device kind, dtype)`` of a hardware key."""
    parts = key.split("/")
    return parts[0], "/".join(parts[1:-1]) or parts[0], parts[-1]


def compute_capability(kind: str) -> tuple[int, int] | None:
    """``(major, minor)`` from a device kind like ``"NVIDIA H100 (sm90)"`` (``sm{major}{minor}``,
    the minor is one digit: ``sm100`` is 10.0), or None."""
    match = _CAPABILITY.search(kind)
    if not match:
        return None
    digits = match.group(1)
    return int(digits[:-1]), int(digits[-1])


def select_entry(check: dict[str, Any], key: str) -> tuple[str | None, Any]:
    """The stored entry that best matches this run's hardware, like diffusers'
    ``Expectations``.  Only entries of the same device type qualify (a CPU run never uses a
    GPU entry); among them, in order: the same dtype, the same device kind, the same major
    compute capability, the nearest capability, then the first key alphabetically.  So an
    H200 (sm90) fp16 run uses the H100 (sm90) fp16 entry, not the A100 (sm80) one."""
    entries = hardware_entries(check)
    if key in entries:
        return key, entries[key]
    device_type, kind, dtype = _split_key(key)
    capability = compute_capability(kind)

    def rank(candidate: str) -> tuple[Any, ...]:
        _, other_kind, other_dtype = _split_key(candidate)
        other = compute_capability(other_kind)
        known = capability is not None and other is not None
        distance = abs((other[0] * 10 + other[1]) - (capability[0] * 10 + capability[1])) if known else math.inf
        return (other_dtype != dtype, other_kind != kind, not (known and other[0] == capability[0]), distance,
                candidate)

    candidates = [k for k in entries if _split_key(k)[0] == device_type]
    if not candidates:
        return None, None
    best = min(candidates, key=rank)
    return best, entries[best]
