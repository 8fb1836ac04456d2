"""Baseline records: what one check stores (its value, samples and signature), the typed
check the fixture hands to syrupy, what a file held for it, and what makes a stored entry
unusable."""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .._hashing import digest_text
from ..hardware import hardware_key, select_entry
from ..metrics import MetricResult
from .files import _short
from .sidecars import _plain_sidecar_name


@dataclass(frozen=True)
class BaselineCheck:
    """The data one ``diffeval_baseline`` check asserts through syrupy: the record to store
    (:func:`build_record`, plus the private ``_test``/``_test_file``/``_state`` keys the
    writer consumes), the tolerance the test asked for (None: derived), whether this run
    updates baselines, and the test's node id.  Everything the extension needs to judge or
    write one check travels here, so the extension instance keeps no per-check state."""

    record: Mapping[str, Any]
    tolerance: float | None
    updating: bool
    test_id: str


@dataclass(frozen=True)
class StoredCheck:
    """What a baseline file holds for one metric: the stored check (``{"hardware": {...}}``)
    and the test id the file was recorded for (None in files that do not store one)."""

    path: str
    test: str | None
    check: Any

def signature(result: MetricResult, images: Any, options: dict[str, Any]) -> dict[str, Any]:
    """What must be equal for two runs' numbers to be comparable."""
    prompts_sha = digest_text("\n".join(images.prompts), 16)
    # An estimator (CMMD biased or unbiased, KID's full-set one) defines the number: never compare across them.
    estimator = {"estimator": result.details["estimator"]} if "estimator" in result.details else {}
    # A scorer (VQA: the VLM, template, answer tokens, question file's sha256; an edit metric's captioner)
    # defines the number too: another one is a signature mismatch, not a silent drift.
    scorer = {"scorer": result.details["scorer"]} if "scorer" in result.details else {}
    return {
        **estimator,
        **scorer,
        "metric": result.metric,
        "backbone": result.backbone,
        "image_size": list(images.image_size),
        "n_samples": len(images),
        "prompts_sha256": prompts_sha,
        "seeds": sorted(set(images.seeds)),
        "call_kwargs": images.call_kwargs,
        "metric_options": {k: v for k, v in options.items() if isinstance(v, (str, int, float, bool))},
    }


def build_record(result: MetricResult, images: Any, options: dict[str, Any]) -> dict[str, Any]:
    record: dict[str, Any] = {
        "metric": result.metric,
        "backbone": result.backbone,
        "higher_is_better": result.higher_is_better,
        "value": result.value,
        "signature": signature(result, images, options),
        "details": {k: v for k, v in result.details.items() if isinstance(v, (int, float, str, bool))},
        "provenance": images.provenance,
        "recorded": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if result.per_sample is not None:
        record["samples"] = [
            {"prompt": p, "seed": s, "value": float(v)}
            for p, s, v in zip(images.prompts, images.seeds, result.per_sample)
        ]
    return record


def per_sample_map(record: dict[str, Any]) -> dict[str, float]:
    return {f"{s['seed']}|{s['prompt']}": float(s["value"]) for s in record.get("samples", [])}


def signature_differences(stored: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Human-readable differences between two signatures (empty when comparable)."""
    out = []
    for key in sorted(set(stored) | set(current)):
        if key == "prompts_sha256":
            continue
        if stored.get(key) != current.get(key):
            out.append(f"{key}: baseline {stored.get(key)!r}, this run {current.get(key)!r}")
    if stored.get("prompts_sha256") != current.get("prompts_sha256"):
        out.append("prompts: the prompt list differs from the baseline's")
    return out


def _finite_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def entry_problem(metric: str, key: str, entry: Any) -> str | None:
    """What is wrong with one stored entry (naming the field and its value), or None.  A
    non-finite number is corrupt data: ``nan`` compares false with everything, so it would
    otherwise let any run pass."""
    where = f"checks.{metric}.hardware[{key!r}]"
    if not isinstance(entry, dict):
        return f"the entry {where} is {_short(entry)}, expected an object"
    if "value" not in entry or "signature" not in entry:
        return f"the entry {where} for {metric!r} lacks 'value' or 'signature'"
    if not _finite_number(entry["value"]):
        return f"{where}.value is {_short(entry['value'])}, expected a finite number"
    if not isinstance(entry["signature"], dict):
        return f"{where}.signature is {_short(entry['signature'])}, expected an object"
    samples = entry.get("samples", [])
    if not isinstance(samples, list):
        return f"{where}.samples is {_short(samples)}, expected a list"
    for i, sample in enumerate(samples):
        if not isinstance(sample, dict) or not isinstance(sample.get("prompt"), str) \
                or not isinstance(sample.get("seed"), int) or isinstance(sample.get("seed"), bool):
            return f"{where}.samples[{i}] is {_short(sample)}, expected {{'prompt': str, 'seed': int, 'value': number}}"
        if not _finite_number(sample.get("value")):
            return f"{where}.samples[{i}].value is {_short(sample.get('value'))}, expected a finite number"
    for field_name, names in (("details", ("spread", "seed_noise", "noise_floor")), ("noise", ("max_abs_effect",))):
        block = entry.get(field_name, {})
        if not isinstance(block, dict):
            return f"{where}.{field_name} is {_short(block)}, expected an object"
        for name in names:
            if name in block and not (_finite_number(block[name]) and block[name] >= 0):
                return f"{where}.{field_name}.{name} is {_short(block[name])}, expected a finite number >= 0"
    stats_file = entry.get("details", {}).get("statistics_file")
    if stats_file is not None and not _plain_sidecar_name(stats_file):
        return (f"{where}.details.statistics_file is {_short(stats_file)}, expected the name of a .safetensors "
                "file beside the baseline (a path elsewhere is refused)")
    return None


def needs_migration(record: Mapping[str, Any], check: Any) -> bool:
    """An entry ``--snapshot-update`` rewrites although it passes: a drift entry whose statistics
    file still has its format-1 name, or a set-level entry recorded without per-image features
    (:func:`paired_entry`: compared by value only)."""
    if "_state" not in record or not isinstance(check, dict):
        return False
    _, entry = select_entry(check, hardware_key(record.get("provenance", {})))
    details = entry.get("details") if isinstance(entry, dict) else None
    return isinstance(details, dict) and ("statistics_file" not in details or not paired_entry(entry))


def paired_entry(entry: Mapping[str, Any]) -> bool:
    """A set-level entry recorded with per-image features beside it and a noise floor: compared
    paired (``set_verdicts``).  Older entries compare values."""
    details = entry.get("details", {})
    return isinstance(details, dict) and "noise_floor" in details and "statistics_file" in details
