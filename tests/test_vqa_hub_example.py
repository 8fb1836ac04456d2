"""The GPU hub VQA example (``model_tests/test_hub_vqa.py``) on the CPU: its own
``check_prompt_alignment`` and ``vqa_questions`` fixture, run end to end by pytester on the tiny
text-to-image model and a tiny random-weight LLaVA placed in a hand-made Hugging Face cache as
``diffeval-test/tiny-vlm`` (``models--org--name/snapshots/<commit>`` + ``refs/main``), named by
``$DIFFEVAL_VQA_MODEL`` and loaded by hub id with ``HF_HUB_OFFLINE=1``, and a TIFA question file
named by ``$DIFFEVAL_VQA_QUESTIONS``.  The values it records equal those of the same folder
loaded by path."""

from __future__ import annotations

import json
import shutil
import textwrap
from pathlib import Path

import numpy as np
import pytest
from conftest import FAKE_COMMIT
from test_vqa import PROMPTS, build_tiny_llava

from pytest_diffeval.baselines.files import read_baseline_file
from pytest_diffeval.generation import ImageSet
from pytest_diffeval.metrics import compute_metric

EXAMPLE = Path(__file__).resolve().parents[1] / "model_tests" / "test_hub_vqa.py"
HUB_ID = "diffeval-test/tiny-vlm"


def tifa_file(path: Path) -> Path:
    """A TIFA-shaped question file (one record per question) for :data:`PROMPTS`: yes/no and
    multiple-choice questions."""
    records = []
    for prompt in PROMPTS:
        words = prompt.split()  # "a red digit 7 on a blue background"
        records += [
            {"caption": prompt, "id": f"{prompt}#0", "question": f"is the digit {words[3]}?", "choices": ["yes", "no"],
             "answer": "yes"},
            {"caption": prompt, "id": f"{prompt}#1", "question": "what colour is the stroke?",
             "choices": ["red", "green", "blue"], "answer": words[1]},
            {"caption": prompt, "id": f"{prompt}#2", "question": f"is the background {words[6]}?",
             "choices": ["yes", "no"], "answer": "yes"},
        ]
    path.write_text(json.dumps(records))
    return path


def test_the_hub_vqa_example_loads_its_vlm_by_hub_id_offline_and_scores_as_the_folder_does(
        user_project: pytest.Pytester, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants as hub_constants

    folder = build_tiny_llava(tmp_path / "tiny-llava")
    repo = tmp_path / "hub" / f"models--{HUB_ID.replace('/', '--')}"
    shutil.copytree(folder, repo / "snapshots" / FAKE_COMMIT)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(FAKE_COMMIT)
    for name, value in [("HF_HUB_CACHE", str(tmp_path / "hub")), ("HF_HUB_OFFLINE", True)]:
        monkeypatch.setenv(name, "1" if value is True else value)
        monkeypatch.setattr(hub_constants, name, value)
    questions = tifa_file(tmp_path / "tifa_questions.json")
    monkeypatch.setenv("DIFFEVAL_VQA_QUESTIONS", str(questions))
    monkeypatch.setenv("DIFFEVAL_VQA_MODEL", HUB_ID)
    saved = tmp_path / "images.npz"
    user_project.makepyfile(test_example=textwrap.dedent(f"""
        import importlib.util
        import numpy as np
        from conftest import PIPE

        spec = importlib.util.spec_from_file_location("hub_vqa_example", {str(EXAMPLE)!r})
        example = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(example)
        vqa_questions = example.vqa_questions  # the example's fixture: the file named by $DIFFEVAL_VQA_QUESTIONS

        def test_example(generate, diffeval_baseline, vqa_questions):
            images = example.check_prompt_alignment(generate, diffeval_baseline, PIPE, {{"num_inference_steps": 2}},
                                                    vqa_questions, example.vqa_model())
            np.savez({str(saved)!r}, images=images.images, prompts=images.prompts, seeds=images.seeds)
    """))
    user_project.runpytest("--snapshot-update", "-p", "no:randomly").assert_outcomes(passed=1)

    checks = read_baseline_file(user_project.path / "baselines" / "test_example" / "test_example.json")["checks"]
    data = np.load(saved)
    images = ImageSet(images=data["images"], prompts=[str(p) for p in data["prompts"]],
                      seeds=[int(s) for s in data["seeds"]])
    assert images.prompts == [p for p in PROMPTS for _ in range(2)]  # the file's prompts, two seeds each
    for metric, options in [("vqa_score", {}), ("soft_tifa", {"questions": str(questions)}),
                            ("tifa", {"questions": str(questions)})]:
        [record] = checks[metric]["hardware"].values()
        assert record["backbone"] == f"{HUB_ID}@{FAKE_COMMIT}"  # loaded by hub id, from the cache's snapshot
        by_path = compute_metric(metric, images, vqa_model=str(folder), device="cpu", **options)
        assert by_path.backbone.startswith("tiny-llava@")
        recorded = {(s["prompt"], s["seed"]): s["value"] for s in record["samples"]}
        np.testing.assert_allclose([recorded[(p, s)] for p, s in zip(images.prompts, images.seeds)],
                                   by_path.per_sample, rtol=1e-6, atol=1e-12)
        assert record["value"] == pytest.approx(by_path.value, rel=1e-6)
    assert len({round(s["value"], 6) for s in checks["soft_tifa"]["hardware"]["cpu/float32"]["samples"]}) > 1
    assert checks["soft_tifa"]["hardware"]["cpu/float32"]["signature"]["scorer"]["questions_sha256"] == \
        by_path.details["scorer"]["questions_sha256"]
