"""Public prompt benchmarks, loaded from a file the user gives or from the Hugging Face hub.

* PartiPrompts (P2, Yu et al. 2022; google-research/parti, Apache-2.0): 1632 prompts,
  tab-separated columns ``Prompt, Category, Challenge, Note``.
* DrawBench (Saharia et al. 2022): 200 prompts, comma-separated ``Prompt, Category``.

The package ships neither file: pass ``path=`` (a local copy), or leave it ``None`` to
fetch ``nateraw/parti-prompts`` / ``sayakpaul/drawbench`` from the hub (cached by
``huggingface_hub``; offline only when already cached).

    from pytest_diffeval.prompts import load_parti_prompts, prompts

    records = load_parti_prompts("PartiPrompts.tsv", challenges=["Quantity"], sample=20)
    images = generate(PIPE, prompts(records), seeds=range(4))
"""

from __future__ import annotations

import csv
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from .exceptions import PromptSetNotFoundError  # noqa: F401 - re-exported

PARTI_REPO = "nateraw/parti-prompts"
PARTI_FILENAME = "PartiPrompts.tsv"
DRAWBENCH_REPO = "sayakpaul/drawbench"
PARTI_COLUMNS = ["Prompt", "Category", "Challenge", "Note"]


@dataclass(frozen=True)
class PromptRecord:
    """One benchmark prompt with its labels (``challenge``/``note``: PartiPrompts only)."""

    prompt: str
    category: str
    challenge: str | None = None
    note: str | None = None


def prompts(records: Iterable[PromptRecord]) -> list[str]:
    """The prompt strings of ``records``, in order."""
    return [record.prompt for record in records]


def _hub_file(repo_id: str, filename: str | None, suffix: str, loader: str) -> Path:
    """Download (or find cached) ``filename`` of dataset ``repo_id``; with ``filename=None``
    the repository's single ``*<suffix>`` file.  Failing, say to pass a local path."""
    try:
        if filename is not None:
            from huggingface_hub import hf_hub_download

            return Path(hf_hub_download(repo_id, filename, repo_type="dataset"))
        from huggingface_hub import snapshot_download

        folder = Path(snapshot_download(repo_id, repo_type="dataset", allow_patterns=[f"*{suffix}"]))
        found = sorted(folder.rglob(f"*{suffix}"))
        if len(found) != 1:
            raise FileNotFoundError(f"expected one {suffix} file in the dataset, found {[p.name for p in found]}")
        return found[0]
    except Exception as exc:  # noqa: BLE001 - offline, missing repo, hub errors: all mean "give a path"
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise PromptSetNotFoundError(
            f"pytest-diffeval: cannot get the prompt set from the Hugging Face hub (dataset {repo_id!r}): "
            f"{type(exc).__name__}: {detail}\n  fix: pass a local copy, {loader}(path='...'), "
            "or run once online so the hub cache holds it"
        ) from exc


def _local(path: str | Path, what: str) -> Path:
    path = Path(path).expanduser()
    if not path.is_file():
        raise PromptSetNotFoundError(f"pytest-diffeval: {what} file {path} does not exist; fix: pass the path of a "
                                     f"local copy of {what}")
    return path


def _choice(values: str | Iterable[str] | None, valid: Sequence[str], label: str, source: Path) -> set[str] | None:
    """Case-insensitive filter values mapped to their spelling in the file."""
    if values is None:
        return None
    wanted = [values] if isinstance(values, str) else list(values)
    by_key = {v.strip().casefold(): v for v in valid}
    unknown = [w for w in wanted if w.strip().casefold() not in by_key]
    if unknown:
        raise ValueError(f"pytest-diffeval: unknown {label} {unknown} in {source}; valid: {sorted(valid)}")
    return {by_key[w.strip().casefold()] for w in wanted}


def _sample(records: list[PromptRecord], sample: int | None, seed: int, source: Path) -> list[PromptRecord]:
    """``sample`` records drawn without replacement with ``random.Random(seed)``, kept in file order."""
    if sample is None:
        return records
    if not isinstance(sample, int) or sample < 1 or sample > len(records):
        raise ValueError(f"pytest-diffeval: sample={sample!r} but {source} has {len(records)} matching prompts; "
                         f"pass 1 <= sample <= {len(records)} or sample=None for all")
    chosen = sorted(random.Random(seed).sample(range(len(records)), sample))
    return [records[i] for i in chosen]


def load_parti_prompts(path: str | Path | None = None, *, categories: str | Iterable[str] | None = None,
                       challenges: str | Iterable[str] | None = None, sample: int | None = None,
                       seed: int = 0) -> list[PromptRecord]:
    """PartiPrompts as :class:`PromptRecord` s, optionally filtered by category and/or
    challenge (case-insensitive) and sampled (``sample`` prompts, seeded, in file order).

    Parsed with ``quoting=csv.QUOTE_NONE``: one prompt starts with a literal ``"``, which
    default CSV quoting would silently drop.  Prompts are kept verbatim (10 end with a
    space in the original file); labels are stripped."""
    source = _local(path, "PartiPrompts.tsv") if path is not None else _hub_file(
        PARTI_REPO, PARTI_FILENAME, ".tsv", "load_parti_prompts")
    records: list[PromptRecord] = []
    with open(source, encoding="utf-8-sig", newline="") as handle:
        rows = csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = next(rows, None)
        if header is None or [h.strip() for h in header] != PARTI_COLUMNS:
            raise ValueError(f"pytest-diffeval: {source} is not PartiPrompts.tsv: header {header!r}, expected "
                             f"{PARTI_COLUMNS} (tab-separated)")
        for line, row in enumerate(rows, start=2):
            if not row:
                continue
            if len(row) != 4:
                raise ValueError(f"pytest-diffeval: {source}, line {line}: {len(row)} tab-separated fields, expected 4 "
                                 f"({', '.join(PARTI_COLUMNS)})")
            prompt, category, challenge, note = row[0], *(field.strip() for field in row[1:])
            records.append(PromptRecord(prompt, category, challenge or None, note or None))
    wanted_categories = _choice(categories, sorted({r.category for r in records}), "categories", source)
    wanted_challenges = _choice(challenges, sorted({r.challenge for r in records if r.challenge}), "challenges", source)
    records = [r for r in records
               if (wanted_categories is None or r.category in wanted_categories)
               and (wanted_challenges is None or r.challenge in wanted_challenges)]
    return _sample(records, sample, seed, source)


def load_drawbench(path: str | Path | None = None, *, categories: str | Iterable[str] | None = None,
                   sample: int | None = None, seed: int = 0) -> list[PromptRecord]:
    """DrawBench as :class:`PromptRecord` s, optionally filtered by category
    (case-insensitive) and sampled.  Reads the CSV with ``utf-8-sig`` (the common copy
    starts with a BOM) and accepts the header ``Prompt`` or ``Prompts`` (the hub copy)."""
    source = _local(path, "DrawBench.csv") if path is not None else _hub_file(
        DRAWBENCH_REPO, None, ".csv", "load_drawbench")
    records: list[PromptRecord] = []
    with open(source, encoding="utf-8-sig", newline="") as handle:
        rows = csv.reader(handle)
        header = [h.strip() for h in next(rows, [])]
        if len(header) < 2 or header[0] not in {"Prompt", "Prompts"} or header[1] != "Category":
            raise ValueError(f"pytest-diffeval: {source} is not DrawBench: header {header!r}, expected "
                             "['Prompt', 'Category'] (comma-separated)")
        for line, row in enumerate(rows, start=2):
            if not row:
                continue
            if len(row) < 2:
                raise ValueError(f"pytest-diffeval: {source}, line {line}: {len(row)} field(s), expected Prompt and Category")
            records.append(PromptRecord(row[0], row[1].strip()))
    wanted = _choice(categories, sorted({r.category for r in records}), "categories", source)
    records = [r for r in records if wanted is None or r.category in wanted]
    return _sample(records, sample, seed, source)


__all__ = ["PromptRecord", "PromptSetNotFoundError", "load_drawbench", "load_parti_prompts", "prompts"]
