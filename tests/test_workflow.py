"""The CI template (``.github/workflows/model-tests.yml``) and the README's example of it:
both must run on a self-hosted GPU runner only, run the model tests with one worker per GPU
and ``--diffeval-require-gpu``, cache the hub and pytest-diffeval's cache, upload the
results even when the tests fail, and let a regression fail the job.

Each file is read twice: with PyYAML (the structure GitHub sees) when it is importable, and
with a line-based reader that needs nothing, so the checks hold on a machine without PyYAML."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import pytest

ROOT = Path(__file__).resolve().parents[1]
WORKFLOW = ROOT / ".github" / "workflows" / "model-tests.yml"
HOSTED = re.compile(r"^(ubuntu|windows|macos)-", re.I)  # GitHub-hosted runner labels (ubuntu-latest, ...)
HUB_CACHE = "huggingface/hub"
DIFFEVAL_CACHE = ".pytest_cache/d/diffeval"


@dataclass
class Step:
    name: str | None = None
    uses: str | None = None
    condition: str | None = None  # the step's `if:`
    run: str | None = None
    continue_on_error: str | None = None
    paths: list[str] = field(default_factory=list)  # `with: path:` lines


@dataclass
class Job:
    runs_on: list[str]
    steps: list[Step]


# --------------------------------------------------------------------------- readers


def read_with_yaml(text: str) -> list[Job]:
    yaml = pytest.importorskip("yaml", reason="PyYAML not installed; the line-based reader still checks the file")
    data = yaml.safe_load(text)
    jobs = []
    for job in data["jobs"].values():
        runs_on = job["runs-on"]
        steps = []
        for raw in job.get("steps", []):
            paths = str((raw.get("with") or {}).get("path") or "").split("\n")
            steps.append(Step(raw.get("name"), raw.get("uses"), _str(raw.get("if")), _str(raw.get("run")),
                              _str(raw.get("continue-on-error")), [p.strip() for p in paths if p.strip()]))
        jobs.append(Job(runs_on if isinstance(runs_on, list) else [runs_on], steps))
    return jobs


def _str(value: Any) -> str | None:
    return None if value is None else str(value).strip()


def _scalar(value: str) -> str:
    value = value.split(" #")[0].strip()
    return value[1:-1] if len(value) > 1 and value[0] == value[-1] and value[0] in "'\"" else value


def _block(lines: list[str], start: int, indent: int) -> tuple[list[str], int]:
    """The lines after ``start`` indented deeper than ``indent`` (a YAML block scalar or map)."""
    out, i = [], start + 1
    while i < len(lines) and (not lines[i].strip() or len(lines[i]) - len(lines[i].lstrip()) > indent):
        out.append(lines[i].strip())
        i += 1
    return [line for line in out if line], i


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def read_lines(text: str) -> list[Job]:
    """A reader for the subset of YAML workflows use (block maps, ``- `` lists, ``|`` and
    ``>-`` scalars, flow lists for runs-on): enough to check the properties here without PyYAML."""
    lines = [line.rstrip() for line in text.splitlines() if not line.lstrip().startswith("#")]
    jobs: list[Job] = []
    for i, line in enumerate(lines):
        found = re.match(r"^(\s*)runs-on:\s*(.*)$", line)
        if not found:
            continue
        depth = len(found.group(1))
        value = _scalar(found.group(2))
        if value.startswith("["):
            labels = [_scalar(v) for v in value.strip("[]").split(",")]
        elif value:
            labels = [value]
        else:
            labels = [_scalar(v.lstrip("- ")) for v in _block(lines, i, depth)[0]]
        begin = max(k for k in range(i) if lines[k].strip() and _indent(lines[k]) < depth)
        end = next((k for k in range(i + 1, len(lines)) if lines[k].strip() and _indent(lines[k]) < depth), len(lines))
        jobs.append(Job(labels, _steps(lines[begin + 1:end])))
    return jobs


_STEP_KEYS = {"name": "name", "uses": "uses", "if": "condition", "run": "run", "continue-on-error": "continue_on_error"}


def _steps(lines: list[str]) -> list[Step]:
    start = next(k for k, line in enumerate(lines) if re.match(r"^\s*steps:\s*$", line))
    indent = min(_indent(lines[k]) for k in range(start + 1, len(lines)) if lines[k].strip())
    items = [k for k in range(start + 1, len(lines)) if _indent(lines[k]) == indent and lines[k].lstrip().startswith("- ")]
    steps = []
    for a, b in zip(items, items[1:] + [len(lines)]):
        body = [lines[a].replace("- ", "  ", 1)] + lines[a + 1:b]
        step, i = Step(), 0
        while i < len(body):  # step-level keys; a nested map or block scalar is read as a whole
            found = re.match(r"^(\s*)([\w-]+):\s*(.*)$", body[i])
            if not found:
                i += 1
                continue
            key, value = found.group(2), found.group(3).strip()
            if value in ("|", "|-", ">", ">-", ""):
                block, i = _block(body, i, len(found.group(1)))
                value = "\n".join(block) if value.startswith("|") else " ".join(block)
                if key == "with":
                    step.paths = _with_path(block)
            else:
                i += 1
                value = _scalar(value)
            if key in _STEP_KEYS:
                setattr(step, _STEP_KEYS[key], value)
        steps.append(step)
    return steps


def _with_path(block: list[str]) -> list[str]:
    """The ``path:`` of a step's ``with:`` map (its lines, de-indented)."""
    for k, line in enumerate(block):
        if line.startswith("path:"):
            value = line[len("path:"):].strip()
            if value not in ("|", "|-", ">", ">-"):
                return [_scalar(value)]
            paths = []
            for entry in block[k + 1:]:
                if re.match(r"^[\w-]+:(\s|$)", entry):
                    break
                paths.append(entry)
            return paths
    return []


READERS: dict[str, Callable[[str], list[Job]]] = {"yaml": read_with_yaml, "lines": read_lines}


def readme_workflow() -> str:
    """The README's example workflow: the fenced YAML block with a ``runs-on`` in it."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    blocks = [b for b in re.findall(r"^```ya?ml\n(.*?)^```", readme, re.S | re.M) if "runs-on:" in b]
    assert len(blocks) == 1, "README.md should hold one example workflow (a ```yaml block with runs-on)"
    return blocks[0]


SOURCES = {"template": lambda: WORKFLOW.read_text(encoding="utf-8"), "readme": readme_workflow}


# --------------------------------------------------------------------------- the properties


def check_workflow(jobs: list[Job]) -> None:
    """What a model-test workflow must do; an AssertionError says which property broke."""
    assert len(jobs) == 1, [j.runs_on for j in jobs]
    [job] = jobs
    assert "self-hosted" in job.runs_on and "gpu" in job.runs_on, job.runs_on
    assert not [label for label in job.runs_on if HOSTED.match(label)], job.runs_on

    [tests] = [s for s in job.steps if s.run and re.search(r"\bpytest\b", s.run)]
    command = " ".join(tests.run.split())
    assert "model_tests/" in command and re.search(r"(^|\s)-n\s+\S+", command), command
    assert "--diffeval-require-gpu" in command, command
    assert "|| true" not in command and tests.continue_on_error in (None, "false"), "a regression must fail the job"

    [upload] = [s for s in job.steps if s.uses and s.uses.startswith("actions/upload-artifact@")]
    assert upload.condition and upload.condition.replace("${{", "").replace("}}", "").strip() == "always()", upload
    assert any("diffeval-results" in p for p in upload.paths), upload.paths

    [cache] = [s for s in job.steps if s.uses and s.uses.startswith("actions/cache@")]
    assert any(p.rstrip("/").endswith(HUB_CACHE) for p in cache.paths), cache.paths
    assert any(p.rstrip("/").endswith(DIFFEVAL_CACHE) for p in cache.paths), cache.paths


@pytest.mark.parametrize("reader", sorted(READERS))
@pytest.mark.parametrize("source", sorted(SOURCES))
def test_workflow_runs_on_a_self_hosted_gpu_runner_and_keeps_the_results(source: str, reader: str) -> None:
    check_workflow(READERS[reader](SOURCES[source]()))


def test_readme_example_matches_the_template() -> None:
    template, example = read_lines(SOURCES["template"]())[0], read_lines(readme_workflow())[0]
    assert example.runs_on == template.runs_on

    def paths(job: Job, action: str) -> list[str]:
        return [p for s in job.steps if s.uses and s.uses.startswith(action) for p in s.paths]

    assert set(paths(example, "actions/cache@")) <= set(paths(template, "actions/cache@"))
    assert paths(example, "actions/upload-artifact@") == paths(template, "actions/upload-artifact@")


BROKEN = {
    "hosted runner": ("runs-on: [self-hosted, gpu]", "runs-on: ubuntu-latest"),
    "no -n": (" -n ${{ steps.gpus.outputs.n }}", ""),
    "no --diffeval-require-gpu": ("--diffeval-require-gpu --diffeval-results", "--diffeval-results"),
    "upload only on success": ("        if: always()\n", ""),
    "no hub cache": ("            .cache/huggingface/hub\n", ""),
    "no diffeval cache": ("            model_tests/.pytest_cache/d/diffeval\n", ""),
    "regression ignored": ("--junitxml=model_tests/diffeval-results/junit.xml",
                           "--junitxml=model_tests/diffeval-results/junit.xml || true"),
}


@pytest.mark.parametrize("reader", sorted(READERS))
@pytest.mark.parametrize("broken", sorted(BROKEN))
def test_each_check_catches_a_broken_workflow(broken: str, reader: str) -> None:
    """The checks are not vacuous: each edit of the template that breaks a property fails."""
    old, new = BROKEN[broken]
    text = SOURCES["template"]()
    assert text.count(old) == 1, f"the template changed; update BROKEN[{broken!r}]"
    with pytest.raises(AssertionError):
        check_workflow(READERS[reader](text.replace(old, new)))


@pytest.mark.parametrize("source", sorted(SOURCES))
def test_line_reader_agrees_with_pyyaml(source: str) -> None:
    """The fallback reader sees what PyYAML (and GitHub) sees in both files."""
    text = SOURCES[source]()
    assert read_lines(text) == read_with_yaml(text)
