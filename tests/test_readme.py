"""The README's quickstart, run exactly as written: its Python block becomes the user's test
file and each line of its bash block a pytest run (record the baseline, then compare).
The numbers its comment quotes are checked against what the run measures, so README and
code cannot drift apart."""

from __future__ import annotations

import inspect
import json
import re
import shlex
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def quickstart() -> tuple[str, str, list[list[str]]]:
    """``(file name, python source, pytest argument lists)`` of the README's Quickstart."""
    text = README.read_text()
    section = text.split("\n## Quickstart\n", 1)[1].split("\n## ", 1)[0]
    [python] = re.findall(r"```python\n(.*?)```", section, re.S)
    [bash] = re.findall(r"```bash\n(.*?)```", section, re.S)
    name = re.match(r"# (\S+\.py)\n", python).group(1)
    commands = []
    for line in bash.splitlines():
        words = shlex.split(line, comments=True)
        if words:
            assert words[0] == "pytest", f"the quickstart's commands are pytest runs: {line!r}"
            commands.append(words[1:])
    return name, python, commands


def quoted(pattern: str, source: str) -> float:
    """A number the quickstart's comments quote (comment lines joined, '#' removed)."""
    comments = " ".join(line.strip().lstrip("#").strip() for line in source.splitlines() if line.strip().startswith("#"))
    match = re.search(pattern, comments)
    assert match, f"the quickstart comment no longer says {pattern!r}: {comments}"
    return float(match.group(1))


def test_the_commands_record_then_compare() -> None:
    name, _, commands = quickstart()
    assert name == "test_my_model.py"
    assert len(commands) == 2 and commands[0][-1] == "--snapshot-update" and "--snapshot-update" not in commands[1]
    assert all(name in command for command in commands)


def test_quickstart_runs_as_written(pytester: pytest.Pytester) -> None:
    name, python, commands = quickstart()
    pytester.path.joinpath(name).write_text(python)
    record, compare = commands
    recorded = pytester.runpytest_subprocess(*record)
    recorded.assert_outcomes(passed=1)
    recorded.stdout.fnmatch_lines(["*1 snapshot generated*"])
    baseline = pytester.path / "baselines" / Path(name).stem / "test_alignment.json"
    [entry] = json.loads(baseline.read_text())["checks"]["clip_score"]["hardware"].values()
    assert entry["backbone"].startswith("diffeval/tiny-clip@")
    assert len(entry["samples"]) == 8  # 2 prompts x 4 seeds
    assert round(entry["value"], 1) == quoted(r"images score (\d+\.\d) with tiny-clip", python)
    floor = float(re.search(r"assert_clip_score_at_least\(images, (\d+\.\d+)\)", python).group(1))
    assert entry["value"] - floor > 20  # the floor leaves room for seed noise (per-image spread ~11)

    compared = pytester.runpytest_subprocess(*compare)
    compared.assert_outcomes(passed=1)
    compared.stdout.re_match_lines([r"test_my_model.py::test_alignment +clip_score .* pass$"])
    assert "snapshot generated" not in compared.stdout.str()


def test_quickstart_without_its_guidance_fails_as_its_comment_says(pytester: pytest.Pytester) -> None:
    """The comment explains why the sampling arguments matter; keep that true too."""
    from pytest_diffeval.pixel_pipeline import PixelTextToImagePipeline

    name, python, commands = quickstart()
    default = inspect.signature(PixelTextToImagePipeline.__call__).parameters["guidance_scale"].default
    assert default == quoted(r"default guidance (\d+(?:\.\d)?) ", python)
    sampling = ', "guidance_scale": 2.0}'
    assert sampling in python
    pytester.path.joinpath(name).write_text(python.replace(sampling, "}"))
    result = pytester.runpytest(*commands[1])
    result.assert_outcomes(failed=1)
    score = quoted(r"over-saturates this tiny model: (\d+\.\d)", python)
    result.stdout.re_match_lines([rf".*clip_score.*\b{re.escape(f'{score:.1f}')}\d*\b.*"])


def bad_input_matrix() -> str:
    text = README.read_text()
    return text.split("\n## Bad input\n", 1)[1].split("\n## ", 1)[0]


# Each case of the bad-input issue, as the matrix's first column names it.
ISSUE_CASES = ["baseline not JSON", "baseline truncated", "newer format version", "another metric backbone, resolution, "
               "step count, prompt list or seed list", "empty prompt list", "over the text encoder's length",
               "source/mask count mismatch", "source/mask size mismatch", "images with NaN", "all-black images",
               "model path missing", "not a diffusers layout", "metric weights file missing",
               "reference image folder empty", "unreadable file", "CUDA requested where none is",
               "CUDA out of memory", "`..` in a results merge", "a metric gives NaN", "two test ids that sanitise",
               # issue 21: faults that must never hang a run, lose a baseline or turn a regression green
               "a worker crash under `-n`", "read-only or full baselines folder", "nested too deeply",
               "huge integer", "symbolic link leading outside", "a field of the wrong type", "named `report.html`",
               "one results folder", "16-bit greyscale", "float image (TIFF) with NaN", "a pickle LoRA",
               "`model_index.json` with an invalid class entry", "a seed outside", "image-cache claim nobody holds",
               "read-only or full image cache", "replaced by one of the same size and mtime",
               "a cache entry swapped with another", "reference-statistics cache"]


def test_bad_input_matrix_lists_every_case() -> None:
    rows = [line.split(" | ")[0] for line in bad_input_matrix().splitlines() if line.startswith("| ")]
    missing = [case for case in ISSUE_CASES if not any(case in row for row in rows)]
    assert missing == []


def test_bad_input_matrix_quotes_the_tripwire_messages_as_the_code_writes_them() -> None:
    from pytest_diffeval import tripwires

    matrix = bad_input_matrix()
    for fix in (tripwires.FIX_BLACK, tripwires.FIX_CONSTANT):
        assert fix in matrix
    assert tripwires.FIX_NONFINITE.split(";")[0] in matrix
