"""Inception Score against an independent numpy reference on the embedded digit checker's
softmax, its behaviour on known predictions, and its classifier options and errors."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pytest_diffeval import settings
from pytest_diffeval.embedded import resolve_embedded
from pytest_diffeval.embedded.checker import DigitChecker, colour_stats
from pytest_diffeval.embedded.data import ALL_COMBOS, make_images
from pytest_diffeval.generation import ImageSet
from pytest_diffeval.metrics import MetricInputError, compute_metric

CHECKER = "checker:diffeval/tiny-checker"


def digits(n: int, seed: int, only: int | None = None) -> ImageSet:
    """``n`` real coloured digits (held-out samples): every digit, or only the digit ``only``."""
    combos = ALL_COMBOS if only is None else [combo for combo in ALL_COMBOS if combo[0] == only]
    images, captions = make_images(n, seed=seed, split="heldout", combos=combos)
    return ImageSet(images=images, prompts=captions, seeds=list(range(n)))


def numpy_inception_score(probs: np.ndarray) -> float:
    """IS = exp(E_x KL(p(y|x) || p(y))), p(y) the mean of p(y|x) over the set (one split)."""
    marginal = probs.mean(axis=0)
    kl = (probs * (np.log(probs) - np.log(marginal))).sum(axis=1)
    return float(np.exp(kl.mean()))


def test_inception_score_equals_the_formula_on_the_checkers_softmax() -> None:
    images = digits(40, 0)
    result = compute_metric("inception_score", images, classifier=CHECKER)
    # the same classifier's probabilities, computed here without the metric's adapter
    checker = DigitChecker.from_pretrained(resolve_embedded("diffeval/tiny-checker"))
    ink = torch.from_numpy(colour_stats(images.images, checker.palette)["ink"])[:, None]
    with torch.no_grad():
        logits = checker.net(ink).double().numpy()
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    # float64 on the same float32 logits: only summation order differs (~1e-15)
    assert result.value == pytest.approx(numpy_inception_score(probs), rel=1e-9)
    assert result.backbone.startswith("checker:diffeval/tiny-checker@") and result.higher_is_better
    assert result.details["classes"] == 10 and result.details["n"] == 40 and result.details["spread"] > 0
    assert 1.0 <= result.value <= result.details["upper_bound"]


class CodedLogits(torch.nn.Module):
    """Logits chosen per image: pixel (0, 0)'s red value is the class; ``sharpness`` scales
    the one-hot logit (0: uniform predictions)."""

    id = "coded-logits"

    def __init__(self, sharpness: float, classes: int = 10) -> None:
        super().__init__()
        self.sharpness, self.classes = sharpness, classes

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        labels = images[:, 0, 0, 0].long() % self.classes
        return self.sharpness * torch.nn.functional.one_hot(labels, self.classes).double()


def coded(labels: list[int]) -> ImageSet:
    images = np.zeros((len(labels), 4, 4, 3), np.uint8)
    images[:, 0, 0, 0] = labels
    return ImageSet(images=images, prompts=["x"] * len(labels), seeds=list(range(len(labels))))


def test_confident_diverse_predictions_score_higher_than_uniform_or_single_class_ones() -> None:
    diverse = coded(list(range(10)) * 3)
    confident = compute_metric("inception_score", diverse, classifier=CodedLogits(30.0)).value
    uniform = compute_metric("inception_score", diverse, classifier=CodedLogits(0.0)).value
    one_class = compute_metric("inception_score", coded([4] * 30), classifier=CodedLogits(30.0)).value
    assert confident == pytest.approx(10.0, rel=1e-9)  # one-hot over 10 equally used classes: exp(log 10)
    assert uniform == pytest.approx(1.0, abs=1e-12) and one_class == pytest.approx(1.0, abs=1e-9)
    # on real digits: ten digits read confidently beat one digit repeated
    assert (compute_metric("inception_score", digits(40, 1), classifier=CHECKER).value
            > 3 * compute_metric("inception_score", digits(40, 1, only=3), classifier=CHECKER).value)


def test_splits_are_seeded_and_bounded() -> None:
    images = digits(40, 2)
    torch.manual_seed(1)
    first = compute_metric("inception_score", images, classifier=CHECKER, splits=4)
    torch.manual_seed(2)  # torchmetrics permutes with the global RNG: the metric seeds its own
    second = compute_metric("inception_score", images, classifier=CHECKER, splits=4)
    assert first.value == second.value and first.details["split_std"] > 0
    whole = compute_metric("inception_score", images, classifier=CHECKER).value
    assert first.value < whole  # IS of 10-image splits is capped lower than over all 40
    with pytest.raises(MetricInputError, match=r"splits=30 for 40 images; fix: use 1 <= splits <= N/2"):
        compute_metric("inception_score", images, classifier=CHECKER, splits=30)


def test_result_is_cached_keyed_by_the_classifiers_content(tmp_path: Path) -> None:
    from pytest_diffeval.planning import COUNTERS

    settings.configure(cache_dir=tmp_path / "cache", result_cache=True)  # on, whatever this run's options say
    try:
        images = digits(12, 3)
        hits = COUNTERS.result_hits
        first = compute_metric("inception_score", images, classifier=CHECKER)
        again = compute_metric("inception_score", images, classifier=CHECKER)
        assert COUNTERS.result_hits == hits + 1 and again.value == first.value and again.backbone == first.backbone
        compute_metric("inception_score", images, classifier=CodedLogits(1.0))  # a module: never cached
        compute_metric("inception_score", images, classifier=CodedLogits(1.0))
        assert COUNTERS.result_hits == hits + 1
    finally:
        settings.configure(cache_dir=None)


def test_default_inception_without_torch_fidelity_says_how_to_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "torch_fidelity", None)  # as if not installed (import fails)
    with pytest.raises(ModuleNotFoundError, match=r"(?s)default classifier 'inception-v3' needs .*pip install "
                                                  r"torch-fidelity.*classifier='checker:diffeval/tiny-checker'"):
        compute_metric("inception_score", digits(4, 0))


def test_classifier_errors_name_the_value_and_the_fix(tmp_path: Path) -> None:
    with pytest.raises(MetricInputError, match="unknown inception_score classifier 'vgg'; use 'inception-v3'"):
        compute_metric("inception_score", digits(4, 0), classifier="vgg")
    big = ImageSet(images=np.zeros((4, 32, 32, 3), np.uint8), prompts=["x"] * 4, seeds=[0, 1, 2, 3])
    with pytest.raises(MetricInputError, match=r"takes 16x16 images, got \(32, 32\)"):
        compute_metric("inception_score", big, classifier=CHECKER)
    with pytest.raises(FileNotFoundError, match="'checker:nobody/none' is neither an embedded checker nor a local"):
        compute_metric("inception_score", digits(4, 0), classifier="checker:nobody/none")
