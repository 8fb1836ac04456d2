"""Prompt alignment of SD 1.5 and SDXL asked of a real vision-language model: VQAScore of each
image's own prompt, and TIFA / Soft-TIFA of the questions in a TIFA, DSG or GenEval 2 question
file, each against a stored baseline.  The prompts are the question file's first prompts, so
every image has its questions.

They need a CUDA GPU, the weights of the diffusion model and of the VLM (in the Hugging Face
cache, or downloadable) and a question file (none is shipped: their licences differ): without
a GPU or the weights they skip with a reason naming what is missing, without a question file
too; ``--diffeval-require-gpu`` turns every such skip into a failure.  On a GPU runner::

    huggingface-cli download Qwen/Qwen2.5-VL-3B-Instruct   # or set DIFFEVAL_VQA_MODEL=<hub id or folder>
    export DIFFEVAL_VQA_QUESTIONS=/data/tifa_v1.0_question_answers.json   # TIFA, DSG or GenEval 2, JSON/JSONL
    pytest model_tests/test_hub_vqa.py --diffeval-require-gpu --snapshot-update  # first time
    pytest model_tests/test_hub_vqa.py --diffeval-require-gpu

The CPU suite runs :func:`check_prompt_alignment` itself on a tiny random-weight VLM in a
hand-made hub cache, loaded by hub id offline (``tests/test_vqa_hub_example.py``).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

import pytest

from pytest_diffeval import ImageSet, load_questions, skip_or_fail
from pytest_diffeval.vqa import DEFAULT_VQA_MODEL

QUESTIONS_ENV = "DIFFEVAL_VQA_QUESTIONS"
"""The environment variable naming the question file (a path)."""
VQA_MODEL_ENV = "DIFFEVAL_VQA_MODEL"
"""The environment variable naming the VLM (hub id or local folder); default: the package's
default, Qwen2.5-VL-3B-Instruct (GenEval 2's scorer family)."""
PROMPTS = 4  # the question file's first prompts
CHECKPOINTS = {
    "sd15": ("stable-diffusion-v1-5/stable-diffusion-v1-5", {"num_inference_steps": 30, "guidance_scale": 7.5}),
    "sdxl": ("stabilityai/stable-diffusion-xl-base-1.0", {"num_inference_steps": 30, "guidance_scale": 5.0}),
}


def vqa_model() -> str:
    """The VLM these checks ask: ``$DIFFEVAL_VQA_MODEL`` or the package's default."""
    return os.environ.get(VQA_MODEL_ENV) or DEFAULT_VQA_MODEL


@pytest.fixture
def vqa_questions(request: pytest.FixtureRequest) -> str:
    """The question file named by ``$DIFFEVAL_VQA_QUESTIONS``; missing: a skip that says how
    to give one, a failure under ``--diffeval-require-gpu``."""
    path = os.environ.get(QUESTIONS_ENV, "")
    if path and os.path.isfile(path):
        return path
    reason = (f"needs a question file: set {QUESTIONS_ENV} to a TIFA, DSG or GenEval 2 question file (JSON or JSONL; "
              f"none is shipped){f', {path!r} is not a file' if path else ''}")
    skip_or_fail(request.config, reason)


def file_prompts(questions: str, count: int = PROMPTS) -> list[str]:
    """The first ``count`` prompts of the question file (each has its questions there)."""
    return list(load_questions(questions).by_prompt)[:count]


def check_prompt_alignment(generate: Any, diffeval_baseline: Any, model: Any, sampling: dict[str, Any],
                           questions: str, vlm: str, seeds: Iterable[int] = range(2), **vqa_options: Any) -> ImageSet:
    """Generate the question file's prompts with ``model`` and check VQAScore, Soft-TIFA and
    TIFA (asked of ``vlm``) against their baselines; the images are returned."""
    images = generate(model, file_prompts(questions), seeds=seeds, **sampling)
    diffeval_baseline.assert_no_regression(images, "vqa_score", vqa_model=vlm, **vqa_options)
    diffeval_baseline.assert_no_regression(images, ["soft_tifa", "tifa"], vqa_model=vlm, questions=questions,
                                           **vqa_options)
    return images


@pytest.mark.gpu
@pytest.mark.parametrize("name", sorted(CHECKPOINTS))
def test_hub_prompt_alignment_asked_of_a_vlm(generate, diffeval_baseline, vqa_questions, name):
    model_id, sampling = CHECKPOINTS[name]
    # bfloat16: Qwen2.5-VL's activations overflow float16 (CUDA's default dtype here)
    check_prompt_alignment(generate, diffeval_baseline, model_id, {"batch_size": 4, **sampling}, vqa_questions,
                           vqa_model(), dtype="bfloat16")
