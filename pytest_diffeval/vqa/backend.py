"""The VQA backend interface: the probability of each candidate answer given an image and a
question, batched.  Every VQA metric (``vqa_score``, ``tifa``, ``soft_tifa``) and the VLM
captioner ask a backend only this, so any vision-language model that can say how likely an
answer is plugs in by implementing :meth:`VQABackend.probabilities` and an ``id``."""

from __future__ import annotations

import abc
from collections.abc import Sequence

import numpy as np


class VQABackend(abc.ABC):
    """A vision-language model that answers questions about images.

    ``id`` identifies the scorer by content (the weights' hash, the answer normalisation):
    results and baselines record it, so another model or setting is a signature mismatch,
    never a silent drift."""

    id: str = ""

    @abc.abstractmethod
    def probabilities(self, images: np.ndarray, questions: Sequence[str], answers: Sequence[str]) -> np.ndarray:
        """``P(answer_k | image_i, question_i)`` as float64 ``(N, K)``: ``images`` uint8
        ``(N, H, W, 3)``, ``questions`` N strings, ``answers`` the K candidate answers asked
        for every row (e.g. ``("Yes", "No")``)."""

    def generate(self, images: np.ndarray, prompt: str, max_new_tokens: int = 30) -> list[str]:
        """Free text for each image given ``prompt`` (captioning); optional for a backend."""
        raise NotImplementedError(f"pytest-diffeval: the VQA backend {self.id!r} cannot generate text; "
                                  "fix: caption with backend='clip' or use a transformers VLM")


def check_probabilities(backend: VQABackend, values: np.ndarray, rows: int, answers: int) -> np.ndarray:
    """``values`` as float64 ``(rows, answers)``; a backend that returns another shape is a
    bug in that backend, named here rather than surfacing as a broadcasting error later."""
    array = np.asarray(values, dtype=np.float64)
    if array.shape != (rows, answers):
        raise ValueError(f"pytest-diffeval: the VQA backend {backend.id!r} returned probabilities of shape "
                         f"{array.shape} for {rows} questions and {answers} answers; fix the backend's "
                         "probabilities() to return one row per question, one column per answer")
    return array


__all__ = ["VQABackend", "check_probabilities"]
