"""Prompt-set loaders on the copies in ``../shared/prompts`` (row counts and labels from
``SOURCES.md``, checked against a plain line split of the files), the parsing pitfalls
(the prompt that starts with a quote, the BOM), filters, seeded sampling, and the hub path
offline: a fake hub cache that holds the files, and an empty one that must say what to do."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

import pytest_diffeval
from pytest_diffeval.prompts import (
    PromptRecord,
    PromptSetNotFoundError,
    load_drawbench,
    load_parti_prompts,
    prompts,
)

SHARED = Path(__file__).resolve().parents[2] / "shared" / "prompts"
PARTI = SHARED / "PartiPrompts.tsv"
DRAWBENCH = SHARED / "DrawBench.csv"
pytestmark = pytest.mark.skipif(not PARTI.is_file() or not DRAWBENCH.is_file(),
                                reason=f"the shared prompt files are not at {SHARED}")

# from SOURCES.md
PARTI_CATEGORIES = {"Animals": 314, "Artifacts": 287, "World Knowledge": 214, "People": 177, "Outdoor Scenes": 131,
                    "Illustrations": 124, "Vehicles": 104, "Food & Beverage": 74, "Arts": 66, "Abstract": 51,
                    "Produce & Plants": 50, "Indoor Scenes": 40}
PARTI_CHALLENGES = {"Fine-grained Detail": 312, "Basic": 272, "Simple Detail": 232, "Style & Format": 206,
                    "Imagination": 150, "Complex": 113, "Writing & Symbols": 91, "Quantity": 90, "Perspective": 70,
                    "Linguistic Structures": 61, "Properties & Positioning": 35}
DRAWBENCH_CATEGORIES = {"Colors": 25, "Conflicting": 10, "Counting": 19, "DALL-E": 20, "Descriptions": 20,
                        "Gary Marcus et al.": 10, "Misspellings": 10, "Positional": 20, "Rare Words": 7, "Reddit": 38,
                        "Text": 21}
GIGGLE = '"G I G G L E" painted in thick colorful lettering as graffiti on a faded red brick wall with a splotch of exploding white paint.'


def count(values: list[str | None]) -> dict[str | None, int]:
    out: dict[str | None, int] = {}
    for value in values:
        out[value] = out.get(value, 0) + 1
    return out


def test_parti_prompts_rows_labels_and_the_quoted_prompt() -> None:
    records = load_parti_prompts(PARTI)
    assert len(records) == 1632 and len(set(prompts(records))) == 1632
    assert count([r.category for r in records]) == PARTI_CATEGORIES
    assert count([r.challenge for r in records]) == PARTI_CHALLENGES
    assert sum(r.note is not None for r in records) == 190
    lines = PARTI.read_text(encoding="utf-8").splitlines()[1:]
    assert prompts(records) == [line.split("\t")[0] for line in lines]  # verbatim, quote included
    assert GIGGLE in prompts(records)
    assert all(isinstance(r, PromptRecord) for r in records)


def test_drawbench_rows_labels_and_the_bom() -> None:
    assert DRAWBENCH.read_bytes().startswith(b"\xef\xbb\xbf")
    records = load_drawbench(DRAWBENCH)
    assert len(records) == 200 and len(set(prompts(records))) == 200
    assert count([r.category for r in records]) == DRAWBENCH_CATEGORIES
    assert records[0] == PromptRecord("A red colored car.", "Colors")
    assert not any("\ufeff" in r.prompt for r in records)
    assert all(r.challenge is None and r.note is None for r in records)


def test_filters_are_case_insensitive_and_unknown_values_list_the_valid_ones() -> None:
    animals = load_parti_prompts(PARTI, categories="animals")
    assert len(animals) == 314 and {r.category for r in animals} == {"Animals"}
    both = load_parti_prompts(PARTI, categories=["ANIMALS", "vehicles"], challenges=[" quantity "])
    assert {r.category for r in both} <= {"Animals", "Vehicles"} and {r.challenge for r in both} == {"Quantity"}
    assert len(both) == sum(1 for r in load_parti_prompts(PARTI)
                            if r.category in {"Animals", "Vehicles"} and r.challenge == "Quantity")
    assert len(load_drawbench(DRAWBENCH, categories=["counting", "Text"])) == 19 + 21
    with pytest.raises(ValueError, match=r"unknown categories \['Animal'\] .*valid: \['Abstract', 'Animals'"):
        load_parti_prompts(PARTI, categories="Animal")
    with pytest.raises(ValueError, match=r"unknown challenges \['Hard'\] .*'Writing & Symbols'\]"):
        load_parti_prompts(PARTI, challenges=["Hard"])
    with pytest.raises(ValueError, match=r"unknown categories \['Colours'\] .*'Colors'"):
        load_drawbench(DRAWBENCH, categories="Colours")


def test_sampling_is_seeded_keeps_file_order_and_respects_filters() -> None:
    first = load_parti_prompts(PARTI, sample=20, seed=3)
    assert first == load_parti_prompts(PARTI, sample=20, seed=3)
    assert first != load_parti_prompts(PARTI, sample=20, seed=4)
    everything = prompts(load_parti_prompts(PARTI))
    positions = [everything.index(p) for p in prompts(first)]
    assert positions == sorted(positions) and len(set(positions)) == 20
    counting = load_drawbench(DRAWBENCH, categories="Counting", sample=5, seed=0)
    assert len(counting) == 5 and {r.category for r in counting} == {"Counting"}
    with pytest.raises(ValueError, match="sample=20 but .* has 19 matching prompts"):
        load_drawbench(DRAWBENCH, categories="Counting", sample=20)


def test_other_drawbench_copies_and_malformed_files(tmp_path: Path) -> None:
    variant = tmp_path / "drawbench.csv"  # header "Prompts" (hub copy), no BOM, label with a trailing space
    variant.write_text('Prompts,Category\n"A horse riding an astronaut, in space.",Gary Marcus et al. \nA cube.,Colors\n')
    records = load_drawbench(variant)
    assert records == [PromptRecord("A horse riding an astronaut, in space.", "Gary Marcus et al."),
                       PromptRecord("A cube.", "Colors")]
    (tmp_path / "bad.tsv").write_text("Prompt\tCategory\tChallenge\tNote\na cat\tAnimals\tBasic\n")
    with pytest.raises(ValueError, match=r"bad.tsv, line 2: 3 tab-separated fields, expected 4"):
        load_parti_prompts(tmp_path / "bad.tsv")
    with pytest.raises(ValueError, match="is not PartiPrompts.tsv: header"):
        load_parti_prompts(DRAWBENCH)
    with pytest.raises(PromptSetNotFoundError, match="nope.tsv does not exist"):
        load_parti_prompts(tmp_path / "nope.tsv")


@pytest.fixture
def empty_offline_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    import huggingface_hub.constants as hub_constants

    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    return cache


def test_hub_offline_without_a_cached_copy_says_to_pass_a_path(empty_offline_hub: Path) -> None:
    with pytest.raises(PromptSetNotFoundError, match=r"(?s)dataset 'nateraw/parti-prompts'.*fix: pass a local copy, "
                                                     r"load_parti_prompts\(path='...'\)"):
        load_parti_prompts()
    with pytest.raises(PromptSetNotFoundError, match=r"(?s)dataset 'sayakpaul/drawbench'.*load_drawbench\(path='...'\)"):
        load_drawbench()


def test_hub_path_reads_a_cached_copy(empty_offline_hub: Path) -> None:
    commit = "0123456789abcdef0123456789abcdef01234567"
    for repo, source, name in [("nateraw/parti-prompts", PARTI, "PartiPrompts.tsv"),
                               ("sayakpaul/drawbench", DRAWBENCH, "drawbench.csv")]:
        folder = empty_offline_hub / f"datasets--{repo.replace('/', '--')}"
        (folder / "snapshots" / commit).mkdir(parents=True)
        shutil.copy(source, folder / "snapshots" / commit / name)
        (folder / "refs").mkdir()
        (folder / "refs" / "main").write_text(commit)
    assert load_parti_prompts(categories="Arts") == load_parti_prompts(PARTI, categories="Arts")
    assert load_drawbench() == load_drawbench(DRAWBENCH)


def test_exports_and_the_package_ships_no_prompt_files() -> None:
    assert pytest_diffeval.load_parti_prompts is load_parti_prompts
    assert pytest_diffeval.load_drawbench is load_drawbench and pytest_diffeval.PromptRecord is PromptRecord
    package = Path(pytest_diffeval.__file__).parent
    assert not [p for p in package.rglob("*") if p.suffix.lower() in {".tsv", ".csv"}]
