"""Inception Score (Salimans et al. 2016): ``exp(E_x KL(p(y|x) || p(y)))`` over a
classifier's class probabilities, computed by torchmetrics' ``InceptionScore``.  High
when each image is classified confidently (sharp ``p(y|x)``) and the set covers many
classes (broad ``p(y)``); between 1 and the number of classes (and the number of images).

The classifier is recorded as the result's backbone (scores from different classifiers
are not comparable):

* ``"inception-v3"`` (default): torchmetrics' Inception-v3 logits (torch-fidelity's
  network and weights, ImageNet's 1008 classes), as in the papers;
* ``"checker:<name or folder>"``: a :class:`~pytest_diffeval.embedded.checker.DigitChecker`'s
  10 digit logits, e.g. ``"checker:diffeval/tiny-checker"`` (offline, CPU, 16x16 digits);
* an ``nn.Module`` mapping uint8 ``(N, 3, H, W)`` images to ``(N, classes)`` logits (its
  ``id`` attribute, else its class name, is the backbone).

Under torchrun each rank classifies its own block of a
:class:`~pytest_diffeval.generation.ShardedImageSet` and the logits are gathered (a few KB
per image, never the pixels); the score is then computed from the whole set's logits in
sample order exactly as one process computes it.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any

import numpy as np

from .. import settings
from ..fingerprints import file_fingerprint, path_fingerprint, resolve_model_dir
from . import Metric, MetricInputError, MetricResult, MissingDependencyError
from .fid import inception_network
from .result_cache import bound_options, canonical

if TYPE_CHECKING:  # imported where used: a cached result needs neither torch nor torchmetrics
    import torch

DEFAULT_CLASSIFIER = "inception-v3"
SEED = 0  # torchmetrics permutes the images before splitting them: seeded, same images same number
BOOTSTRAP_RESAMPLES = 50


def _checker_logits(name: str) -> Any:
    """A DigitChecker (embedded name or local folder) as a logits module."""
    import torch

    from ..embedded.checker import DigitChecker, colour_stats
    from .backbones import BackboneNotFoundError

    backbone_id, path = resolve_model_dir(name)
    if path is None:
        raise BackboneNotFoundError(
            f"pytest-diffeval: inception_score classifier 'checker:{name}' is neither an embedded checker nor a local "
            "folder; fix: classifier='checker:diffeval/tiny-checker' or 'checker:<folder written by "
            "DigitChecker.save_pretrained>'"
        )
    checker = DigitChecker.from_pretrained(path)

    class CheckerLogits(torch.nn.Module):
        """The checker's digit logits (float64) of uint8 ``(N, 3, H, W)`` images."""

        def __init__(self) -> None:
            super().__init__()
            self.net = checker.net
            self.size = int(checker.config.get("image_size", 16))
            self.id = f"checker:{backbone_id}"

        def forward(self, images: torch.Tensor) -> torch.Tensor:
            if tuple(images.shape[-2:]) != (self.size, self.size):
                raise MetricInputError(
                    f"pytest-diffeval: inception_score: the classifier {self.id} takes {self.size}x{self.size} images, "
                    f"got {tuple(images.shape[-2:])}; fix: choose a classifier for these images (default "
                    "'inception-v3', or an nn.Module returning logits)"
                )
            ink = colour_stats(images.permute(0, 2, 3, 1).cpu().numpy(), checker.palette)["ink"]
            weight = next(self.net.parameters())
            with torch.no_grad():
                return self.net(torch.from_numpy(ink)[:, None].to(weight.device, weight.dtype)).double()

    return CheckerLogits()


def _inception_logits() -> tuple[Any, str]:
    """torchmetrics' Inception-v3 giving ImageNet logits (``logits_unbiased``), with the same
    weights file and identity rules as FID's Inception features."""
    try:
        import torch_fidelity  # noqa: F401 - torchmetrics' Inception is torch-fidelity's network
        from torchmetrics.image.fid import NoTrainInceptionV3  # noqa: F401 - needs torch-fidelity too
    except ImportError as exc:
        raise MissingDependencyError(
            "pytest-diffeval: inception_score's default classifier 'inception-v3' needs torchmetrics' Inception "
            f"(package torch-fidelity: `pip install torch-fidelity`, which needs torchvision; import failed: {exc}) "
            "and, offline, its weights file via --diffeval-inception-weights. Or pass classifier="
            "'checker:diffeval/tiny-checker' (offline, 16x16 digits) or an nn.Module returning logits."
        ) from exc

    module, path = inception_network(["logits_unbiased"], settings.current().inception_weights)
    return module, f"inception-v3-logits@sha256:{file_fingerprint(path)}"


def classifier_module(classifier: Any) -> tuple[Any, str, str]:
    """``(logits module, backbone id, description)`` for a classifier spec (see the module doc)."""
    import torch

    if isinstance(classifier, torch.nn.Module):
        return classifier, str(getattr(classifier, "id", type(classifier).__name__)), "custom module"
    if not isinstance(classifier, str):
        raise MetricInputError(f"pytest-diffeval: inception_score classifier {classifier!r} is not a name or an "
                               "nn.Module; use 'inception-v3', 'checker:<name or folder>' or an nn.Module returning "
                               "logits")
    if classifier.startswith("checker:"):
        module = _checker_logits(classifier[len("checker:"):])
        return module, module.id, "DigitChecker digit logits (colour-free ink map)"
    if classifier == DEFAULT_CLASSIFIER:
        module, backbone = _inception_logits()
        return module, backbone, "torch-fidelity Inception-v3 logits_unbiased, 299px bilinear, antialias=True"
    raise MetricInputError(f"pytest-diffeval: unknown inception_score classifier {classifier!r}; use 'inception-v3', "
                           "'checker:<name or folder>' (e.g. 'checker:diffeval/tiny-checker') or an nn.Module "
                           "returning logits")


def inception_score_of(logits: torch.Tensor) -> float:
    """IS of one set of logits (one split): ``exp(mean_x KL(p(y|x) || mean_x p(y|x)))``, as
    torchmetrics computes each split; used for the bootstrap spread."""
    import torch

    log_p = torch.log_softmax(logits.double(), dim=1)
    p = log_p.exp()
    log_marginal = torch.log(p.mean(0, keepdim=True))
    return float(torch.exp((p * (log_p - log_marginal)).sum(1).mean()))


class InceptionScore(Metric):
    """Inception Score of the generated set (no reference needed); higher is better.  One
    value per set; ``details["spread"]`` is its std over seeded bootstrap resamples of the
    images, from which baselines derive the tolerance.  Default tolerance: 5% of the
    baseline's value."""

    name = "inception_score"
    higher_is_better = True
    per_sample = False
    relative_tolerance = 0.05
    cacheable = True
    reads_blocks = True  # under torchrun: each rank's logits, gathered (logits_of)

    def cache_material(self, images: Any, options: dict[str, Any]) -> Any:
        """The options, with the classifier keyed by its content (an nn.Module: not cached)."""
        material = bound_options(self.compute, images, {k: v for k, v in options.items() if k != "classifier"})
        material["classifier"] = _classifier_identity(options.get("classifier") or DEFAULT_CLASSIFIER)
        if not isinstance(material["classifier"], (str, dict)):
            material["classifier"] = canonical(material["classifier"])  # raises Unkeyable for a module
        return material

    def compute(self, images: Any, *, classifier: Any = None, splits: int = 1, device: str | None = None,
                batch_size: int = 64) -> MetricResult:
        """``splits`` > 1 averages IS over that many seeded random splits (the papers use 10 on
        50k images); the default, 1, scores the whole set (least noisy at test-suite sizes)."""
        import torch
        from torchmetrics.image.inception import InceptionScore as TorchInceptionScore

        if not isinstance(splits, int) or splits < 1 or splits > len(images) // 2:
            raise MetricInputError(f"pytest-diffeval: inception_score: splits={splits!r} for {len(images)} images; "
                                   "fix: use 1 <= splits <= N/2 (each split needs at least 2 images)")
        device = device or settings.resolved_device()
        module, backbone, description = classifier_module(classifier or DEFAULT_CLASSIFIER)
        with warnings.catch_warnings():  # "will save all extracted features in buffer": that is the point
            warnings.filterwarnings("ignore", message=".*save all extracted features.*")
            metric = TorchInceptionScore(feature=module, splits=splits, normalize=False).to(device)
        logits = logits_of(module, images, device, batch_size)
        metric.features = [logits.to(device)]  # as ``update`` collects them; the softmax in float64
        with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*degrees of freedom.*")  # the std of one split
            warnings.filterwarnings("ignore", message=".*called before the ``update`` method.*")  # logits_of did it
            torch.manual_seed(SEED)
            mean, std = metric.compute()
        generator = torch.Generator().manual_seed(SEED)
        resampled = [inception_score_of(logits[torch.randint(len(logits), (len(logits),), generator=generator)])
                     for _ in range(BOOTSTRAP_RESAMPLES)]
        details = {"n": len(images), "classes": int(logits.shape[1]), "splits": splits, "classifier": description,
                   "upper_bound": min(len(images), int(logits.shape[1])), "spread": float(np.std(resampled, ddof=1))}
        if splits > 1:
            details["split_std"] = float(std)
        return MetricResult(self.name, float(mean), backbone, True, details=details)


def logits_of(module: Any, images: Any, device: str, batch_size: int) -> torch.Tensor:
    """The classifier's logits (float64, CPU, one row per image in sample order) of an
    ImageSet, in batches of ``batch_size``; under torchrun (a ShardedImageSet) each rank
    classifies its own block and the rows are all-gathered, so no pixels travel."""
    import torch

    def classify(block: Any) -> torch.Tensor:
        rows = []
        with torch.no_grad():
            for start in range(0, len(block), batch_size):
                batch = torch.from_numpy(np.ascontiguousarray(block.images[start:start + batch_size]))
                rows.append(module(batch.permute(0, 3, 1, 2).contiguous().to(device)).detach().double().cpu())
        return torch.cat(rows)

    if hasattr(images, "gather_rows"):
        return torch.from_numpy(images.gather_rows(classify, "gather the inception_score logits"))
    return classify(images)


def _classifier_identity(classifier: Any) -> Any:
    """What a classifier spec resolves to, by content: a checker by its files, Inception by
    its weights file (or torch-fidelity's default); anything else as given."""
    if isinstance(classifier, str) and classifier.startswith("checker:"):
        return "checker:" + resolve_model_dir(classifier[len("checker:"):])[0]
    if classifier == DEFAULT_CLASSIFIER:
        weights = settings.current().inception_weights
        return {"classifier": classifier, "weights": path_fingerprint(weights) if weights else "torch-fidelity default"}
    return classifier


__all__ = ["DEFAULT_CLASSIFIER", "InceptionScore", "classifier_module", "inception_score_of", "logits_of"]
