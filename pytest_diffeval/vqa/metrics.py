"""The VQA metrics: ``vqa_score`` (VQAScore: P(Yes | image, "Does this figure show '{prompt}'?")),
``tifa`` (share of a prompt's questions answered correctly) and ``soft_tifa`` (GenEval 2: mean
probability of the correct answers), per image, registered like every built-in metric.

Their results record a ``scorer`` in ``details`` (the VLM's content id, the template, the
answer tokens, the normalisation, the question file's sha256), which baselines put in their
signature: another question file or scorer is a signature mismatch, not a silent drift.
Per image, ``details["answers"]`` lists each question with the probability of its correct
answer and whether it passed; the HTML report shows the failed ones.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..fingerprints import resolve_model_dir
from ..metrics import Metric, MetricInputError, MetricResult
from ..metrics.result_cache import Unkeyable, bound_options, canonical
from .backend import VQABackend, check_probabilities
from .questions import Question, QuestionSet, question_set
from .scoring import (
    DEFAULT_ANSWERS,
    DEFAULT_TEMPLATE,
    Answered,
    ask,
    check_answers,
    check_mean,
    check_normalize,
    normalized,
    question_of,
    soft_tifa_value,
    tifa_value,
)
from .transformers_backend import DEFAULT_VQA_MODEL, load_vqa_backend


def backend_of(vqa_model: str | VQABackend | None, device: str | None, dtype: Any) -> VQABackend:
    """A :class:`VQABackend` given as one, or the transformers VLM named by ``vqa_model``."""
    if isinstance(vqa_model, VQABackend):
        return vqa_model
    return load_vqa_backend(vqa_model, device, dtype)


def _answers_detail(images: Any, answered: Sequence[Sequence[Answered]]) -> list[dict[str, Any]]:
    """Per image (prompt, seed): its questions, the probability of each correct answer, passed or not."""
    return [{"prompt": str(p), "seed": int(s), "questions": [a.as_detail() for a in qs]}
            for p, s, qs in zip(images.prompts, images.seeds, answered)]


class _VQAMetric(Metric):
    """What the VQA metrics share: cacheable, keyed by the VLM's content and the question file's."""

    higher_is_better = True
    per_sample = True
    cacheable = True
    # Each image's value and answers depend on that image, its prompt and its prompt's questions
    # alone (the question set of a file or of the embedded prompts is the same for any block):
    # under torchrun each rank asks about its own block (metrics._per_block).
    sample_wise = True

    def combine(self, per_sample: np.ndarray, details: list[dict[str, Any]]) -> tuple[float, dict[str, Any]]:
        """The mean, and the blocks' details: the scorer and question file (the same in every
        block) with every block's per-image ``answers`` in sample order (blocks in rank order)."""
        value, combined = super().combine(per_sample, details)
        combined["answers"] = [answer for block in details for answer in block.get("answers", [])]
        return value, combined

    def cache_material(self, images: Any, options: dict[str, Any]) -> Any:
        """The bound options, the VLM by its content (a backend by its ``id``) and a question
        file or set by its sha256."""
        raw = dict(options)
        model = raw.pop("vqa_model", None)
        questions = raw.pop("questions", None)
        dtype = raw.pop("dtype", None)
        if isinstance(model, VQABackend) and not model.id:
            raise Unkeyable("a VQA backend without an id")  # its results cannot be told apart: not cached
        material = bound_options(self.compute, images, raw)
        # by content (embedded, local) or cached hub commit; a hub id not cached yet stays bare, as for
        # the preference scorers: loading it records its commit in the result's backbone
        material["vqa_model"] = model.id if isinstance(model, VQABackend) else resolve_model_dir(
            os.fspath(model or DEFAULT_VQA_MODEL))[0]
        material["dtype"] = None if dtype is None else str(dtype)
        if isinstance(questions, QuestionSet):
            material["questions"] = questions.sha256
        elif questions is not None:
            if not isinstance(questions, (str, os.PathLike)):
                raise Unkeyable(f"questions of type {type(questions).__name__}")
            material["questions"] = canonical(os.fspath(questions), top=True)  # an existing file: by its bytes
        return material


class VQAScore(_VQAMetric):
    """VQAScore (Lin et al. 2024, t2v_metrics): per image the probability that the VLM answers
    ``answers[0]`` to ``template`` filled with the image's prompt, from its next-token logits
    (softmax over the vocabulary; ``normalize="answers"`` renormalises over ``answers``).
    Default tolerance: 0.02."""

    name = "vqa_score"
    absolute_tolerance = 0.02
    per_sample_options = ("prompts",)

    def compute(self, images: Any, *, vqa_model: str | VQABackend | None = None, template: str = DEFAULT_TEMPLATE,
                answers: Sequence[str] = DEFAULT_ANSWERS, normalize: str = "vocabulary",
                prompts: Sequence[str] | None = None, device: str | None = None, dtype: Any = None) -> MetricResult:
        """Score ``images`` against their own prompts (or ``prompts``, one per image)."""
        answers = check_answers(answers)
        prompts = list(prompts) if prompts is not None else list(images.prompts)
        if len(prompts) != len(images):
            raise MetricInputError(f"pytest-diffeval: vqa_score: {len(prompts)} prompts for {len(images)} images; "
                                   "give one prompt per image")
        questions = [question_of(template, p) for p in prompts]
        check_normalize(normalize)  # a bad option fails before a model loads
        backend = backend_of(vqa_model, device, dtype)
        raw = check_probabilities(backend, backend.probabilities(images.images, questions, answers),
                                  len(questions), len(answers))
        per_sample = normalized(raw, normalize)[:, 0]
        answered = [[Answered(Question("vqa", q, answers[0], answers),
                              float(p), bool(p >= 0.5))] for q, p in zip(questions, per_sample)]
        scorer = {"vlm": backend.id, "template": template, "answers": list(answers), "normalize": normalize}
        return MetricResult(self.name, float(per_sample.mean()), backend.id, True, per_sample=per_sample,
                            details={"scorer": scorer, "answers": _answers_detail(images, answered)})


class _QuestionMetric(_VQAMetric):
    """TIFA and Soft-TIFA: the image's prompt's questions from a question file (or generated
    for the embedded prompts), asked per image, DSG dependencies honoured."""

    def _ask(self, images: Any, vqa_model: Any, questions: Any, normalize: str, device: str | None,
             dtype: Any) -> tuple[VQABackend, QuestionSet, list[list[Answered]]]:
        prompts = [str(p) for p in images.prompts]
        qset = question_set(questions, prompts)
        per_image = [qset.for_prompt(p) for p in prompts]
        check_normalize(normalize)  # a bad option fails before a model loads
        backend = backend_of(vqa_model, device, dtype)
        return backend, qset, ask(backend, images.images, per_image, normalize)

    def _result(self, images: Any, values: list[float], backend: VQABackend, qset: QuestionSet,
                answered: list[list[Answered]], scorer: dict[str, Any]) -> MetricResult:
        per_sample = np.asarray(values, np.float64)
        scorer = {"vlm": backend.id, "questions_sha256": qset.sha256, **scorer}
        return MetricResult(self.name, float(per_sample.mean()), backend.id, True, per_sample=per_sample,
                            details={"scorer": scorer, "question_file": qset.source,
                                     "answers": _answers_detail(images, answered)})


class Tifa(_QuestionMetric):
    """TIFA (Hu et al. 2023) with DSG's dependencies: per image the share of its prompt's
    questions whose most likely choice is the correct answer (a child of a failed parent
    fails); ``all_correct=True``: 1 only when every question passes.  Values that are all 0
    or 1 (one question per prompt, or ``all_correct``) are compared with the exact McNemar
    test (``binary`` is decided from the values).  Default tolerance: 0.05."""

    name = "tifa"
    absolute_tolerance = 0.05
    binary = None  # a share of questions; 0/1 data (all_correct, one question) goes to McNemar

    def compute(self, images: Any, *, questions: str | os.PathLike[str] | QuestionSet | None = None,
                vqa_model: str | VQABackend | None = None, normalize: str = "vocabulary", all_correct: bool = False,
                device: str | None = None, dtype: Any = None) -> MetricResult:
        """``questions``: a question file path (None: generated for the embedded prompts)."""
        backend, qset, answered = self._ask(images, vqa_model, questions, normalize, device, dtype)
        values = [tifa_value(a, all_correct) for a in answered]
        return self._result(images, values, backend, qset, answered,
                            {"normalize": normalize, "all_correct": bool(all_correct)})


class SoftTifa(_QuestionMetric):
    """Soft-TIFA (GenEval 2): per image the mean probability of the correct answers of its
    prompt's questions (a child of a failed parent counts 0); ``mean="geometric"`` for GenEval
    2's per-prompt geometric mean.  Default tolerance: 0.02."""

    name = "soft_tifa"
    absolute_tolerance = 0.02

    def compute(self, images: Any, *, questions: str | os.PathLike[str] | QuestionSet | None = None,
                vqa_model: str | VQABackend | None = None, normalize: str = "vocabulary", mean: str = "arithmetic",
                device: str | None = None, dtype: Any = None) -> MetricResult:
        """``questions``: a question file path (None: generated for the embedded prompts)."""
        check_mean(mean)  # a bad option fails before a model loads
        backend, qset, answered = self._ask(images, vqa_model, questions, normalize, device, dtype)
        values = [soft_tifa_value(a, mean) for a in answered]
        return self._result(images, values, backend, qset, answered, {"normalize": normalize, "mean": mean})


__all__ = ["SoftTifa", "Tifa", "VQAScore", "backend_of"]
