"""Scoring with a VQA backend: VQAScore's question from a prompt, the answer probabilities
(over the vocabulary, or renormalised over the candidate answers), and the per-image TIFA /
Soft-TIFA values from a prompt's questions with DSG's dependency rule (a child question
counts as answered correctly only when each of its parents is)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..exceptions import MetricInputError
from .backend import VQABackend, check_probabilities
from .questions import Question

DEFAULT_TEMPLATE = 'Does this figure show "{}"? Please answer Yes or No.'
"""t2v_metrics' VQAScore question; ``{}`` is replaced by the prompt."""

DEFAULT_ANSWERS = ("Yes", "No")
NORMALIZATIONS = ("vocabulary", "answers")


def question_of(template: str, prompt: str) -> str:
    """VQAScore's question for ``prompt`` (``template`` with one ``{}``)."""
    if not isinstance(template, str) or template.count("{}") != 1:
        raise MetricInputError(f"pytest-diffeval: vqa_score: the template {template!r} must hold one '{{}}' where the "
                               f"prompt goes; fix: e.g. template={DEFAULT_TEMPLATE!r}")
    return template.replace("{}", prompt)


def check_normalize(normalize: str) -> str:
    """``normalize`` when it is one of :data:`NORMALIZATIONS` (checked before a model loads)."""
    if normalize not in NORMALIZATIONS:
        raise MetricInputError(f"pytest-diffeval: normalize={normalize!r} is not one of {NORMALIZATIONS}; fix: "
                               "'vocabulary' (t2v_metrics' VQAScore) or 'answers' (P(Yes) / (P(Yes) + P(No)))")
    return normalize


def check_mean(mean: str) -> str:
    """``mean`` when it is ``"arithmetic"`` or ``"geometric"`` (Soft-TIFA's two means)."""
    if mean not in ("arithmetic", "geometric"):
        raise MetricInputError(f"pytest-diffeval: soft_tifa: mean={mean!r} is not 'arithmetic' or 'geometric'; fix: "
                               "pass one of those")
    return mean


def normalized(probabilities: np.ndarray, normalize: str) -> np.ndarray:
    """``"vocabulary"``: the probabilities as the backend gives them (softmax over the whole
    vocabulary, t2v_metrics); ``"answers"``: renormalised to sum to 1 over the candidates."""
    if check_normalize(normalize) == "vocabulary":
        return probabilities
    total = probabilities.sum(axis=1, keepdims=True)
    return np.divide(probabilities, total, out=np.zeros_like(probabilities), where=total > 0)


def check_answers(answers: Sequence[str]) -> tuple[str, ...]:
    """``answers`` as a tuple of at least one non-empty string (the first is the one scored)."""
    if isinstance(answers, str) or not answers or not all(isinstance(a, str) and a.strip() for a in answers):
        raise MetricInputError(f"pytest-diffeval: answers={answers!r}: give the answer tokens as a list of strings, "
                               "the scored one first, e.g. answers=('Yes', 'No')")
    return tuple(answers)


@dataclass(frozen=True)
class Answered:
    """One question asked about one image: the probability of its correct answer, whether
    the model's most likely choice is it, and whether a parent question blocked it (DSG)."""

    question: Question
    p_correct: float
    correct: bool
    blocked_by: str | None = None

    @property
    def passed(self) -> bool:
        return self.correct and self.blocked_by is None

    def as_detail(self) -> dict[str, Any]:
        return {"id": self.question.id, "question": self.question.text, "answer": self.question.answer,
                "p": round(float(self.p_correct), 6), "passed": self.passed,
                **({"blocked_by": self.blocked_by} if self.blocked_by is not None else {})}


def ask(backend: VQABackend, images: np.ndarray, questions: Sequence[Sequence[Question]],
        normalize: str = "vocabulary") -> list[list[Answered]]:
    """Ask every image its questions, batched by choice list: per image, its answered
    questions in order, with DSG's dependency rule applied."""
    rows = [(i, q) for i, qs in enumerate(questions) for q in qs]
    p_correct = np.zeros(len(rows))
    correct = np.zeros(len(rows), bool)
    by_choices: dict[tuple[str, ...], list[int]] = {}
    for r, (_, q) in enumerate(rows):
        by_choices.setdefault(q.choices, []).append(r)
    for choices, members in by_choices.items():
        raw = backend.probabilities(images[[rows[r][0] for r in members]], [rows[r][1].text for r in members], choices)
        probs = normalized(check_probabilities(backend, raw, len(members), len(choices)), normalize)
        for r, row in zip(members, probs):
            k = [c.casefold() for c in choices].index(rows[r][1].answer.casefold())
            p_correct[r], correct[r] = row[k], int(np.argmax(row)) == k
    out: list[list[Answered]] = [[] for _ in questions]
    for r, (i, q) in enumerate(rows):
        out[i].append(Answered(q, float(p_correct[r]), bool(correct[r])))
    return [with_dependencies(answered) for answered in out]


def with_dependencies(answered: Sequence[Answered]) -> list[Answered]:
    """DSG's rule: a question whose parent (transitively) was not answered correctly is
    blocked (scored 0), naming the first such parent."""
    by_id = {a.question.id: a for a in answered}
    blocked: dict[str, str | None] = {}

    def blocker(qid: str) -> str | None:
        if qid not in blocked:
            blocked[qid] = None
            for parent in by_id[qid].question.parents:
                if not by_id[parent].correct or blocker(parent) is not None:
                    blocked[qid] = parent
                    break
        return blocked[qid]

    return [Answered(a.question, a.p_correct, a.correct, blocker(a.question.id)) for a in answered]


def tifa_value(answered: Sequence[Answered], all_correct: bool = False) -> float:
    """TIFA: the share of questions answered correctly (``all_correct``: 1 only when all are)."""
    passed = [a.passed for a in answered]
    return float(all(passed)) if all_correct else float(np.mean(passed))


def soft_tifa_value(answered: Sequence[Answered], mean: str = "arithmetic") -> float:
    """Soft-TIFA (GenEval 2): the mean probability of the correct answers, a blocked question
    counting 0; ``mean="geometric"`` is GenEval 2's per-prompt geometric mean."""
    values = np.array([0.0 if a.blocked_by is not None else a.p_correct for a in answered], np.float64)
    if check_mean(mean) == "arithmetic":
        return float(values.mean())
    return float(np.exp(np.log(values).mean())) if values.all() else 0.0


__all__ = ["DEFAULT_ANSWERS", "DEFAULT_TEMPLATE", "NORMALIZATIONS", "Answered", "ask", "check_answers", "check_mean", "check_normalize",
           "normalized", "question_of", "soft_tifa_value", "tifa_value", "with_dependencies"]
