"""Prompt alignment by asking a vision-language model questions about each image: the backend
interface, the transformers backend, question files, scoring and captions (the metrics
``vqa_score``, ``tifa`` and ``soft_tifa`` live in :mod:`.metrics`, registered by name).
Nothing here imports torch or transformers at module level."""

from __future__ import annotations

from .backend import VQABackend
from .captions import caption, captioner_id
from .questions import Question, QuestionSet, embedded_questions, load_questions
from .scoring import DEFAULT_ANSWERS, DEFAULT_TEMPLATE
from .transformers_backend import DEFAULT_VQA_MODEL, TransformersVQA, load_vqa_backend

__all__ = ["DEFAULT_ANSWERS", "DEFAULT_TEMPLATE", "DEFAULT_VQA_MODEL", "Question", "QuestionSet", "TransformersVQA",
           "VQABackend", "caption", "captioner_id", "embedded_questions", "load_questions", "load_vqa_backend"]
