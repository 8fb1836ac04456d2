"""FID (torchmetrics' ``FrechetInceptionDistance``) against a reference set whose
feature statistics are computed once and cached on disk (the files: ``statistics_files``)."""

from __future__ import annotations

import io
import json
import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import numpy as np

from .. import distributed, settings
from .._hashing import digest_array, digest_files, digest_text
from ..exceptions import ReferenceSetError  # noqa: F401 - re-exported
from ..fingerprints import file_fingerprint
from ..generation import read_pixels
from ..resampling import bootstrap_indices
from . import Metric, MetricInputError, MetricResult, MissingDependencyError, WeightsFileNotFoundError
from .statistics_files import (
    STAT_KEYS,
    cache_dir,
    features_state,
    read_cached_statistics,
    read_reference_statistics,
    write_cached_statistics,
)

if TYPE_CHECKING:  # imported where used: a cached result needs neither torch nor torchmetrics
    import torch
    from torchmetrics.image.fid import FrechetInceptionDistance

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}


# torch-fidelity's Inception-v3 weights (TensorFlow's 2015-12-05 graph, converted); the file
# name's "-6726825d" is the start of its sha256, which torch.hub checks after a download.
INCEPTION_WEIGHTS_URL = (
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth"
)
INCEPTION_DIMS = (64, 192, 768, 2048)


def _inception_weights_file(configured: str | None) -> Path:
    """The local weights file: ``--diffeval-inception-weights`` if given (it must exist), else
    torch-fidelity's file in the torch.hub cache, downloaded there once (hash-checked)."""
    if configured:
        path = Path(configured).expanduser()
        if not path.is_file():
            raise WeightsFileNotFoundError(
                f"pytest-diffeval: Inception weights file {path} (--diffeval-inception-weights / ini "
                "diffeval_inception_weights) does not exist; fix: point the option at torch-fidelity's "
                "weights-inception-2015-12-05-6726825d.pth (.pth/.pt, loaded with weights_only=True) or its "
                "safetensors conversion, or choose fid_features='clip:<clip model>'"
            )
        return path
    import torch

    path = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_WEIGHTS_URL.rsplit("/", 1)[1]
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            torch.hub.download_url_to_file(INCEPTION_WEIGHTS_URL, str(path), hash_prefix="6726825d", progress=False)
        except Exception as exc:  # noqa: BLE001 - offline, proxy, hash mismatch: one clear message
            raise RuntimeError(
                f"pytest-diffeval: FID features inception-v3-* need torch-fidelity's Inception weights, and "
                f"downloading {INCEPTION_WEIGHTS_URL} failed ({exc}); fix: fetch that file on a machine with "
                "internet and pass it with --diffeval-inception-weights=PATH"
            ) from exc
    return path


def load_inception_state(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of an Inception weights file, read without running pickled code:
    ``.safetensors`` as such, anything else with ``torch.load(weights_only=True)``."""
    import torch

    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - corrupt, truncated or a pickle with code in it
        raise MetricInputError(
            f"pytest-diffeval: cannot read Inception weights file {path} ({type(exc).__name__}: {exc}); fix: "
            "use torch-fidelity's weights-inception-2015-12-05-6726825d.pth or its safetensors conversion"
        ) from exc
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise MetricInputError(f"pytest-diffeval: Inception weights file {path} holds no state dict of tensors; fix: "
                               "use torch-fidelity's weights-inception-2015-12-05-6726825d.pth or its safetensors "
                               "conversion")
    return state


def inception_network(features_list: list[str], weights: str | None) -> tuple[torch.nn.Module, Path]:
    """torchmetrics' ``NoTrainInceptionV3`` giving ``features_list`` (e.g. ``["2048"]`` or
    ``["logits_unbiased"]``) with the weights of ``weights`` (see :func:`_inception_weights_file`),
    and that file's path.  torch-fidelity unpickles whatever it is handed (weights_only=False),
    so it gets a buffer serialised here from the tensors read safely, never the file."""
    import torch
    from torchmetrics.image.fid import NoTrainInceptionV3

    path = _inception_weights_file(weights)
    buffer = io.BytesIO()
    torch.save(load_inception_state(path), buffer)
    buffer.seek(0)
    try:
        module = NoTrainInceptionV3(name="inception-v3-compat", features_list=features_list,
                                    feature_extractor_weights_path=buffer, antialias=True)
    except RuntimeError as exc:  # load_state_dict: missing, unexpected or misshaped tensors
        raise MetricInputError(
            f"pytest-diffeval: Inception weights file {path} does not fit torch-fidelity's Inception-v3 "
            f"({str(exc)[:300]}); fix: use weights-inception-2015-12-05-6726825d.pth or its safetensors conversion"
        ) from exc
    return module, path


def inception_features(features: str, weights: str | None) -> tuple[torch.nn.Module, str]:
    """torchmetrics' Inception-v3 (torch-fidelity's network, antialiased resize) giving the
    ``features`` (``"inception-v3-<dim>"``) pool, with the weights of ``weights``, and its
    feature id: the name plus the weights file's content hash (other weights, other scores)."""
    dim = features.rsplit("-", 1)[1]
    if not dim.isdigit() or int(dim) not in INCEPTION_DIMS:
        raise MetricInputError(f"pytest-diffeval: unknown FID features {features!r}; Inception gives "
                               f"{', '.join(f'inception-v3-{d}' for d in INCEPTION_DIMS)}; fix: pick one of those")
    try:
        import torch_fidelity  # noqa: F401 - torchmetrics' Inception is torch-fidelity's network
        from torchmetrics.image.fid import NoTrainInceptionV3  # noqa: F401 - needs torch-fidelity too
    except ImportError as exc:
        raise MissingDependencyError(
            f"pytest-diffeval: FID features {features!r} need torchmetrics' Inception (package torch-fidelity, "
            f"`pip install torch-fidelity`, which needs torchvision; import failed: {exc}) and, offline, its weights "
            "file via --diffeval-inception-weights. Or choose CLIP features: fid_features='clip:<clip model>'."
        ) from exc

    module, path = inception_network([dim], weights)
    module.num_features = int(dim)  # torchmetrics then skips its dummy forward pass
    return module, f"{features}@sha256:{file_fingerprint(path)}"


def _feature_extractor(features: Any, device: str) -> tuple[FrechetInceptionDistance, str, str]:
    """``(metric, feature id, preprocessing description)`` for a features spec:
    ``"inception-v3-<dim>"`` (torchmetrics' Inception, torch-fidelity weights),
    ``"clip:<clip model>"`` (CLIP image embeddings) or an ``nn.Module`` with ``num_features``."""
    import torch
    from torchmetrics.image.fid import FrechetInceptionDistance

    from .backbones import clip_features_module, load_clip

    if isinstance(features, torch.nn.Module):
        metric = FrechetInceptionDistance(feature=features, reset_real_features=False, normalize=False)
        return metric, getattr(features, "id", type(features).__name__), "custom module"
    if features.startswith("clip:"):
        backbone = load_clip(features[5:], device)
        metric = FrechetInceptionDistance(feature=clip_features_module(backbone), reset_real_features=False, normalize=False)
        return metric, f"clip:{backbone.id}", "CLIPProcessor (resize, centre crop, normalise)"
    if features.startswith("inception-v3-"):
        module, feature_id = inception_features(features, settings.current().inception_weights)
        metric = FrechetInceptionDistance(feature=module, reset_real_features=False, normalize=False)
        return metric, feature_id, "torch-fidelity Inception, 299px bilinear, antialias=True"
    raise ValueError(f"pytest-diffeval: unknown FID features {features!r}; use 'inception-v3-2048', 'clip:<model>' or an nn.Module")


def set_feature_precision(metric: Any, device: str, preprocessing: str) -> tuple[Any, str]:
    """Put ``metric``'s feature extractor in the precision :func:`settings.feature_dtype`
    picks for ``device`` and return ``(metric, preprocessing)``, the latter naming float32
    features (so cached float64 reference statistics are not mixed with them).

    float64 converts the Inception weights too (torchmetrics' ``set_dtype``), the CPU
    default; float32 leaves the network as loaded, the CUDA default (float64 convolutions
    run at a small fraction of float32 speed on L4/A10/RTX cards).  The feature sums and
    covariances are torchmetrics float64 states either way, and the Fréchet distance is
    computed from them in float64."""
    import torch

    if settings.feature_dtype(device) == "float64":
        return metric.set_dtype(torch.float64), preprocessing
    return metric, f"{preprocessing}; float32 features"


def _load_folder(folder: Path) -> Iterator[np.ndarray]:
    from PIL import Image, UnidentifiedImageError

    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ReferenceSetError(
            f"pytest-diffeval: reference folder {folder} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))}); "
            "fix: point at a folder of reference images or at cached statistics (.safetensors)"
        )
    for file in files:
        try:
            with Image.open(file) as image:
                pixels = read_pixels(image, "RGB", name=f"reference image {file}", error=ReferenceSetError)
            yield pixels
        except (UnidentifiedImageError, OSError) as exc:
            raise ReferenceSetError(f"pytest-diffeval: cannot read reference image {file}: {exc}; fix: remove or replace the file") from exc


def _folder_fingerprint(folder: Path) -> str:
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    return "read_pixels 2:" + digest_files(files, 16)  # how files become pixels (16-bit scaled since 2)


def _update_from_arrays(metric: FrechetInceptionDistance, arrays: Iterator[np.ndarray], real: bool, device: str,
                        batch_size: int) -> int:
    """Stream images (same-size runs batched) through the extractor; never holds all of them."""
    import torch

    batch: list[np.ndarray] = []
    count = 0

    def flush() -> None:
        if batch:
            tensor = torch.from_numpy(np.stack(batch)).permute(0, 3, 1, 2).to(device)
            metric.update(tensor, real=real)
            batch.clear()

    for image in arrays:
        if batch and (image.shape != batch[0].shape or len(batch) == batch_size):
            flush()
        batch.append(image)
        count += 1
    flush()
    return count


def _extracting(extractor: Any, device: str, batch_size: int) -> Any:
    """A function of an image block giving its per-image features (rows, CPU), in batches."""
    import torch

    def extract(block: Any) -> torch.Tensor:
        rows = []
        with torch.no_grad():
            for start in range(0, len(block), batch_size):
                batch = torch.from_numpy(block.images[start:start + batch_size]).permute(0, 3, 1, 2).to(device)
                rows.append(extractor(batch).detach().cpu())
        return torch.cat(rows)

    return extract


def block_features(extractor: Any, images: Any, device: str, batch_size: int, what: str) -> torch.Tensor:
    """The per-image features (rows, sample order, CPU) of a
    :class:`~pytest_diffeval.generation.ShardedImageSet`'s whole set: each rank runs
    ``extractor`` on its own block of images, in batches, and the rows are all-gathered (a few
    KB per image instead of its pixels).  KID and CMMD need them all on every rank."""
    import torch

    return torch.from_numpy(images.gather_rows(_extracting(extractor, device, batch_size), what))


def one_process_sums(features: torch.Tensor, batch_size: int, count_dtype: Any) -> dict[str, torch.Tensor]:
    """Σf, Σfᵀf and n (of ``count_dtype``, the metric's) of ``features`` (float64) under the
    names of :data:`STAT_KEYS`, summed as torchmetrics' ``update`` sums one process's stream of
    batches of ``batch_size``: the same bytes, so a statistics file written under torchrun is
    the file one process writes."""
    import torch

    dims = features.shape[1]
    total, outer = torch.zeros(dims, dtype=torch.float64), torch.zeros(dims, dims, dtype=torch.float64)
    for start in range(0, len(features), batch_size):
        chunk = features[start:start + batch_size].double()
        total += chunk.sum(dim=0)
        outer += chunk.t().mm(chunk)
    return dict(zip(STAT_KEYS, (total, outer, torch.tensor(len(features), dtype=count_dtype))))


def summed_features(metric: Any, images: Any, real: bool, device: str, batch_size: int) -> torch.Tensor | None:
    """Stream a :class:`~pytest_diffeval.generation.ShardedImageSet` into ``metric``'s real or
    fake side the way EDM2 computes one FID across GPUs: each rank extracts its block's
    features, and their Σf, Σfᵀf and n are all-reduced in float64 (D² numbers per rank, whatever
    the set's size).  The per-image rows go to rank 0 only, which alone needs them (paired
    verdicts, spread, seed noise: rank 0 decides and broadcasts).  Returns them (float64, CPU)
    on rank 0, None on the other ranks."""
    import torch

    dims = int(metric.real_features_sum.shape[0])
    local = images.block_rows(_extracting(metric.inception, device, batch_size),
                              f"extract the features of {len(images)} images")
    local = np.asarray(local, dtype=np.float64).reshape(-1, dims)
    sums = images.group.all_reduce_sums(distributed.statistics_of(local),
                                        f"all-reduce the feature sums of {len(images)} images")
    side = "real" if real else "fake"
    total, outer, count = (getattr(metric, f"{side}_features_{name}") for name in ("sum", "cov_sum", "num_samples"))
    total.copy_(torch.from_numpy(sums["sum"]).to(total.device, total.dtype))
    outer.copy_(torch.from_numpy(sums["outer"]).to(outer.device, outer.dtype))
    count.fill_(int(sums["n"][0]))
    metric._update_count += 1  # torchmetrics' own count of updates: compute() warns when it is 0
    rows = images.group.gather_to_root(local, f"gather the features of {len(images)} images to rank 0", kind="rows")
    return None if rows is None else torch.from_numpy(rows)


def update_capturing_features(metric: Any, images: Any, real: bool, device: str, batch_size: int) -> Any:
    """Stream ``images`` into ``metric`` (its real or fake side) and return their per-image
    features (float64, CPU), which the bootstrap spread and drift's seed noise resample.
    Under torchrun (a sharded set) the feature sums are all-reduced and the features reach
    rank 0 only; the other ranks get None (:func:`summed_features`)."""
    import torch

    if hasattr(images, "gather_rows"):
        return summed_features(metric, images, real, device, batch_size)
    captured: list[torch.Tensor] = []
    hook = metric.inception.register_forward_hook(lambda m, i, out: captured.append(out.detach().double().cpu()))
    try:
        _update_from_arrays(metric, iter(images.images), real, device, batch_size)
    finally:
        hook.remove()
    return torch.cat(captured)


def reference_statistics(metric: FrechetInceptionDistance, feature_id: str, preprocessing: str, reference: Any,
                         device: str, batch_size: int = 64) -> dict[str, Any]:
    """Fill ``metric``'s real-feature state from ``reference`` (an ImageSet, a folder of images
    or a ``.safetensors`` statistics file), caching folder and ImageSet statistics on disk
    keyed by backbone, feature size, preprocessing, torchmetrics version and content."""
    import torchmetrics

    if isinstance(reference, (str, os.PathLike)) and str(reference).endswith(".safetensors"):
        path = Path(reference)

        tensors = read_reference_statistics(path, feature_id, metric.real_features_sum.shape[0])
        source = {"kind": "statistics", "path": str(path)}
    else:
        if hasattr(reference, "images") and hasattr(reference, "sample_keys"):
            content = digest_array(reference.images)  # pixels, shape and dtype
            arrays: Any = iter(reference.images)
            source = {"kind": "imageset", "n": len(reference)}
        else:
            folder = Path(reference)
            if not folder.is_dir():
                raise ReferenceSetError(f"pytest-diffeval: reference {folder} is neither a folder of images nor a .safetensors statistics file")
            content = _folder_fingerprint(folder)
            arrays = _load_folder(folder)
            source = {"kind": "folder", "path": str(folder)}

        dims = metric.real_features_sum.shape[0]
        key = json.dumps([feature_id, dims, preprocessing, torchmetrics.__version__, content])
        path = cache_dir() / f"{digest_text(key, 24)}.safetensors"
        tensors = read_cached_statistics(path, key, dims)  # another key's, corrupt or misshapen: a miss
        source["cached"] = tensors is not None
        if tensors is None:
            _update_from_arrays(metric, arrays, True, device, batch_size)
            tensors = {k: getattr(metric, k).detach().cpu() for k in STAT_KEYS}
            write_cached_statistics(tensors=tensors, path=path, key=key,
                                    metadata={"feature_id": feature_id, "preprocessing": preprocessing,
                                              "torchmetrics": torchmetrics.__version__})
    for name in STAT_KEYS:
        setattr(metric, name, tensors[name].to(device=getattr(metric, name).device, dtype=getattr(metric, name).dtype))
    source["n"] = int(tensors["real_features_num_samples"])
    return source


BOOTSTRAP_MAX_FEATURES = 256  # above this each resample costs a large eigendecomposition
BOOTSTRAP_RESAMPLES = 20


def real_moments(metric: FrechetInceptionDistance) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and covariance (float64, CPU) of ``metric``'s real-feature state."""
    import torch

    n = metric.real_features_num_samples.cpu().double()
    mean_real = metric.real_features_sum.cpu().double() / n
    return mean_real, (metric.real_features_cov_sum.cpu().double() - n * torch.outer(mean_real, mean_real)) / (n - 1)


def bootstrap_spread(metric: FrechetInceptionDistance, fake: torch.Tensor, keys: list[str],
                     resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0) -> float:
    """Std of FID over seeded two-stage resamples of the generated set (prompts, then seeds
    within a prompt: :func:`~pytest_diffeval.resampling.bootstrap_indices` on the sample
    ``keys``): how much the number moves with other images of the same model."""
    import torch
    from torchmetrics.image.fid import _compute_fid

    mean_real, cov_real = real_moments(metric)
    values = []
    for index in bootstrap_indices(keys, seed, resamples):
        sample = fake[torch.as_tensor(index)]
        values.append(float(_compute_fid(mean_real, cov_real, sample.mean(0), torch.cov(sample.T))))
    return float(np.std(values, ddof=1))


class FID(Metric):
    """Fréchet distance between feature Gaussians of the generated and a reference set,
    computed by torchmetrics in float64.  Default tolerance: 10% of the baseline's value."""

    name = "fid"
    higher_is_better = False
    per_sample = False
    reads_blocks = True
    state_on_root = True
    relative_tolerance = 0.10
    cacheable = True

    def compute(self, images: Any, *, reference: Any, features: Any = None, device: str | None = None,
                batch_size: int = 64) -> MetricResult:
        import torch

        if len(images) < 2:  # torchmetrics would fail later, deep inside compute(), with a RuntimeError
            raise MetricInputError(f"pytest-diffeval: FID needs at least 2 generated images (a covariance needs 2), "
                                   f"got N={len(images)}; fix: generate more prompts or seeds (FID is stable only "
                                   "with hundreds of images; for a few, use CMMD or a per-sample metric)")
        device = device or settings.resolved_device()
        features = features or settings.current().fid_features
        metric, feature_id, preprocessing = _feature_extractor(features, device)
        metric, preprocessing = set_feature_precision(metric.to(device), device, preprocessing)
        num_features = int(metric.real_features_sum.shape[0])
        source = reference_statistics(metric, feature_id, preprocessing, reference, device, batch_size)
        if source["n"] < 2:
            raise ReferenceSetError(f"pytest-diffeval: FID needs at least 2 reference images (a covariance needs 2), "
                                    f"got N={source['n']} in {reference!r}; fix: use a larger reference set")
        fake = update_capturing_features(metric, images, False, device, batch_size)
        metric.orig_dtype = torch.float64  # torchmetrics casts the result to the features' dtype; keep float64
        value = float(metric.compute())
        if -1e-3 < value < 1e-9:  # float error on (near-)identical sets (either sign)
            value = 0.0
        details = {"n": len(images), "n_reference": source["n"], "num_features": num_features,
                   "preprocessing": preprocessing, "reference": source}
        if num_features <= BOOTSTRAP_MAX_FEATURES and fake is not None:
            details["spread"] = bootstrap_spread(metric, fake, images.sample_keys)
        small = [side for side, count in (("generated", len(images)), ("reference", source["n"]))
                 if count <= num_features]  # either side's covariance below full rank biases the distance
        if small:
            details["warning"] = (
                f"FID on {len(images)} generated and {source['n']} reference images with {num_features}-d features "
                f"is biased upward (the {' and '.join(small)} set's covariance has rank < its dimension); compare FIDs "
                "only at equal N, or use KID or CMMD for small sets"
            )
            warnings.warn("pytest-diffeval: " + details["warning"], UserWarning, stacklevel=3)
        state = None
        if fake is not None:  # under torchrun: rank 0 alone holds the per-image features
            mean_real, cov_real = real_moments(metric)
            state = features_state(fake, images.sample_keys, feature_id, {"mean": mean_real, "cov": cov_real},
                                   metadata={"preprocessing": preprocessing})
        if hasattr(images, "gather_rows"):  # rank 0's value and details on every rank, to the last bit
            value, details = images.group.broadcast_json([value, details], "broadcast rank 0's FID")
        return MetricResult(self.name, value, feature_id, False, details=details, state=state)
