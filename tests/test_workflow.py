"""The CI template (``.github/workflows/model-tests.yml``) and the README's example of it:
both must run on a self-hosted GPU runner only, run the model tests with one worker per GPU
and ``--diffeval-require-gpu``, cache the hub and pytest-diffeval's cache, upload the
results even when the tests fail, and let a regression fail the job.  Read with PyYAML (a
dependency of transformers), which sees the structure GitHub sees."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

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


def read_jobs(text: str) -> list[Job]:
    """The jobs of a workflow, with what the checks need of each step."""
    jobs = []
    for job in yaml.safe_load(text)["jobs"].values():
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


@pytest.mark.parametrize("source", sorted(SOURCES))
def test_workflow_runs_on_a_self_hosted_gpu_runner_and_keeps_the_results(source: str) -> None:
    check_workflow(read_jobs(SOURCES[source]()))


def test_readme_example_matches_the_template() -> None:
    template, example = read_jobs(SOURCES["template"]())[0], read_jobs(readme_workflow())[0]
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


@pytest.mark.parametrize("broken", sorted(BROKEN))
def test_each_check_catches_a_broken_workflow(broken: str) -> None:
    """The checks are not vacuous: each edit of the template that breaks a property fails."""
    old, new = BROKEN[broken]
    text = SOURCES["template"]()
    assert text.count(old) == 1, f"the template changed; update BROKEN[{broken!r}]"
    with pytest.raises(AssertionError):
        check_workflow(read_jobs(text.replace(old, new)))


def test_template_runs_the_model_tests_offline_unless_asked_to_download() -> None:
    """Issue 16 item 3: with the hub unreachable from the runner and HF_HUB_OFFLINE unset, each
    cached model cost minutes of retries; the template runs its tests with HF_HUB_OFFLINE=1
    and says so, and only a manual run with ``download`` ticked may reach the hub."""
    text = WORKFLOW.read_text(encoding="utf-8")
    workflow = yaml.safe_load(text)
    [tests] = [s for s in workflow["jobs"]["model-tests"]["steps"] if re.search(r"\bpytest\b", str(s.get("run")))]
    value = str((tests.get("env") or {}).get("HF_HUB_OFFLINE"))
    assert value in ("1", "${{ inputs.download && '0' || '1' }}"), value
    if "inputs.download" in value:  # PyYAML reads `on:` as True
        assert workflow[True]["workflow_dispatch"]["inputs"]["download"]["default"] is False
    assert "HF_HUB_OFFLINE=1:" in text  # the comment that explains it
