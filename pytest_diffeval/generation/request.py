"""Validating a generation request: everything a ``generate()`` call asks for is checked
against the pipeline's ``__call__`` and against itself before any image is generated, and
becomes a :class:`Request` (its cases, their inputs and the pipeline arguments)."""

from __future__ import annotations

import difflib
import inspect
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from ..exceptions import InputError, PromptTruncatedWarning
from .pixels import IMAGE_INPUTS, load_input_images
from .provenance import loaded_provenance

_ALIASES = {"image": "source_images", "mask_image": "masks", "example_image": "exemplars"}
# Text arguments given once (str: for every prompt) or per prompt (list), sent per sample.
_PER_PROMPT_TEXT = ("negative_prompt", "prompt_2", "negative_prompt_2")
# Samplers that draw noise in scheduler.step: DiTPipeline does not pass its generators to
# step, so with these its images would come from the global RNG.
_STOCHASTIC_SCHEDULERS = {"DDPMScheduler", "EulerAncestralDiscreteScheduler", "KDPM2AncestralDiscreteScheduler",
                          "DPMSolverSDEScheduler", "LCMScheduler", "TCDScheduler", "EDMEulerScheduler"}


SEED_MAX = 2**63 - 1


def check_seeds(seeds: Iterable[Any]) -> list[int]:
    """The seeds as ints, each in ``[0, 2**63 - 1]``.  ``torch.Generator.manual_seed`` takes
    ``[-2**63, 2**64 - 1]`` and maps a negative seed ``s`` to ``2**64 + s`` (so ``-1`` and
    ``2**64 - 1`` make the same images but would count as two samples), and anything wider is
    a bare overflow error; ``[0, 2**63 - 1]`` is the range where each seed is one generator
    state and also fits the int64 the seeds are stored as."""
    try:
        values = [int(s) for s in seeds]
    except (TypeError, ValueError) as exc:
        raise InputError(f"pytest-diffeval: seeds must be integers ({exc}); fix: pass e.g. seeds=range(4)") from None
    for seed in values:
        if not 0 <= seed <= SEED_MAX:
            raise InputError(f"pytest-diffeval: seed {seed} is outside [0, 2**63 - 1], the seeds that each give "
                             "their own torch generator state (a negative seed s aliases 2**64 + s); "
                             "fix: use seeds in that range, e.g. seeds=range(4)")
    return values


def _call_parameters(pipe: Any) -> set[str] | None:
    """Names the pipeline's ``__call__`` takes; None when it takes only ``**kwargs``."""
    try:
        parameters = inspect.signature(pipe.__call__).parameters
    except (TypeError, ValueError):
        return None
    names = {name for name, p in parameters.items() if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
    return names or None


def _class_label(pipe: Any, label: Any) -> tuple[int, str]:
    """``(class id, name)`` of a DiT class given by id or by one of its names (``id2label``)."""
    known: dict[str, int] = dict(getattr(pipe, "labels", None) or {})
    transformer = getattr(pipe, "transformer", None)
    count = getattr(getattr(transformer, "config", None), "num_embeds_ada_norm", None)
    if isinstance(label, (int, np.integer)) and not isinstance(label, bool):
        label = int(label)
        if label < 0 or (count is not None and label >= count):
            raise InputError(f"pytest-diffeval: class label {label} is out of range; "
                             f"{type(pipe).__name__} has classes 0..{(count or 1) - 1}")
        names = [name for name, index in known.items() if index == label]
        return label, _id2label(pipe).get(label) or (", ".join(names) if names else f"class {label}")
    if not isinstance(label, str):
        raise InputError(f"pytest-diffeval: class label {label!r} is neither a class id (int) nor a class name (str)")
    if label.strip() not in known:
        close = difflib.get_close_matches(label.strip(), list(known), n=3)
        hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
        raise InputError(f"pytest-diffeval: {label!r} is not a class name of {type(pipe).__name__} ({len(known)} names "
                         f"known from its id2label){hint} Pass a name from pipe.labels or a class id (int).")
    return known[label.strip()], label


def _id2label(pipe: Any) -> dict[int, str]:
    """The full ``id2label`` names of a loaded DiT checkpoint (its ``model_index.json``)."""
    path = loaded_provenance(pipe).get("model_path")
    try:
        index = json.loads((Path(path) / "model_index.json").read_text()) if path else {}
        return {int(k): str(v) for k, v in (index.get("id2label") or {}).items()}
    except (OSError, ValueError, AttributeError):
        return {}


def _per_prompt(value: Any, *, what: str, count: int) -> list[Any] | None:
    """A text given once (str) or per prompt (list) as one entry per prompt."""
    if value is None:
        return None
    if isinstance(value, str):
        return [value] * count
    values = list(value)
    if len(values) != count:
        raise InputError(f"pytest-diffeval: {what} holds {len(values)} entries for {count} prompts; give one per "
                         "prompt (same order) or a single str for all")
    return values


def _token_count(tokenizer: Any, text: str) -> int | None:
    try:
        return len(tokenizer(text, truncation=False)["input_ids"])
    except Exception:  # noqa: BLE001 - a tokenizer we cannot call this way: no warning rather than no images
        return None


def warn_long_prompts(pipe: Any, prompts: Sequence[str], texts: dict[str, list[Any] | None], *,
                      stacklevel: int = 3) -> list[str]:
    """Warn once per prompt longer than the pipeline's text encoder takes
    (``tokenizer.model_max_length`` tokens, start/end tokens included, 77 for CLIP), naming
    the prompt, its length and the limit: diffusers cuts the tail off silently, so the
    images do not show it.  SDXL's second encoder (``tokenizer_2``) reads ``prompt_2``
    when given, else the prompt.  Return the prompts warned about."""
    pairs: list[tuple[str, Any, list[Any]]] = []
    tokenizer, tokenizer_2 = getattr(pipe, "tokenizer", None), getattr(pipe, "tokenizer_2", None)
    if tokenizer is not None:
        pairs.append(("tokenizer", tokenizer, [*prompts, *(texts.get("negative_prompt") or [])]))
    if tokenizer_2 is not None:
        second = texts.get("prompt_2") or prompts
        negative = texts.get("negative_prompt_2") or texts.get("negative_prompt") or []
        pairs.append(("tokenizer_2", tokenizer_2, [*second, *negative]))
    long: dict[str, list[str]] = {}
    for name, tok, items in pairs:
        limit = getattr(tok, "model_max_length", None)
        if not isinstance(limit, int) or limit <= 0 or limit > 100_000:  # unset: transformers' huge sentinel
            continue
        for text in dict.fromkeys(t for t in items if isinstance(t, str) and t):
            count = _token_count(tok, text)
            if count is not None and count > limit:
                long.setdefault(text, []).append(f"{count} tokens > {name}'s limit of {limit}")
    for text, reasons in long.items():
        warnings.warn(
            f"pytest-diffeval: prompt {text!r} is longer than {type(pipe).__name__}'s text encoder takes "
            f"({'; '.join(reasons)}); the tail beyond the limit is cut off and does not reach the images. "
            "Fix: shorten the prompt (or accept that its end is ignored).",
            PromptTruncatedWarning, stacklevel=stacklevel,
        )
    return list(long)



@dataclass
class Request:
    """A checked ``generate()`` call.  One case per prompt (DiT: per class, Paint-by-Example:
    per label), each with its inputs; the samples are ``(case, seed)``, prompt-major.
    ``loaded`` holds each image input as one array per case or one for all."""

    pipe_name: str
    prompts: list[str]
    seeds: list[int]
    batch_size: int
    call_kwargs: dict[str, Any]  # as given (diffusers' image names taken out): recorded and keyed
    pipe_kwargs: dict[str, Any]  # what every batch passes to the pipeline besides its per-sample values
    takes_prompt: bool
    batch_size_argument: bool  # an unconditional pipeline's own batch_size=
    labels: list[int] | None = None
    loaded: dict[str, list[np.ndarray]] = field(default_factory=dict)
    texts: dict[str, list[Any] | None] = field(default_factory=dict)  # per-prompt text arguments
    captions: dict[str, list[Any] | None] = field(default_factory=dict)  # only for the metrics
    _pil: dict[tuple[str, int], Any] = field(default_factory=dict, repr=False)

    @property
    def jobs(self) -> list[tuple[int, int]]:
        """``(case, seed)`` of every sample, prompt-major."""
        return [(case, seed) for case in range(len(self.prompts)) for seed in self.seeds]

    def image(self, key: str, case: int) -> np.ndarray:
        """The ``key`` input image (``source_images``, ``masks``, ``exemplars``) of ``case``."""
        arrays = self.loaded[key]
        return arrays[case if len(arrays) > 1 else 0]

    def _pil_image(self, key: str, case: int) -> Any:
        from PIL import Image

        index = case if len(self.loaded[key]) > 1 else 0
        if (key, index) not in self._pil:
            self._pil[key, index] = Image.fromarray(self.loaded[key][index], mode=IMAGE_INPUTS[key][1])
        return self._pil[key, index]

    def batch_kwargs(self, cases: Sequence[int]) -> dict[str, Any]:
        """The pipeline arguments of one batch of samples of ``cases`` (all but generators)."""
        kwargs = dict(self.pipe_kwargs)
        if self.takes_prompt:
            kwargs["prompt"] = [self.prompts[c] for c in cases]
        if self.labels is not None:
            kwargs["class_labels"] = [self.labels[c] for c in cases]
        for name, values in self.texts.items():
            if values is not None:
                kwargs[name] = [values[c] for c in cases]
        for key in self.loaded:
            kwargs[IMAGE_INPUTS[key][0]] = [self._pil_image(key, c) for c in cases]
        if self.batch_size_argument:
            kwargs["batch_size"] = len(cases)
        return kwargs


def _take_image_aliases(given: dict[str, Any], call_kwargs: dict[str, Any]) -> None:
    """diffeval's image inputs given under diffusers' names (``image=``...), moved into ``given``."""
    for alias, name in _ALIASES.items():
        if alias in call_kwargs:
            if given[name] is not None:
                raise InputError(f"pytest-diffeval: both {alias}= and {name}= were given; pass the images once")
            given[name] = call_kwargs.pop(alias)


def _check_sampling(seeds: Iterable[Any], batch_size: int, call_kwargs: dict[str, Any]) -> list[int]:
    """The seeds, checked with the batch size and the sampling arguments."""
    values = check_seeds(seeds)
    if not values:
        raise ValueError("pytest-diffeval: generate() got an empty seed list; pass e.g. seeds=range(4)")
    if batch_size < 1:
        raise ValueError(f"pytest-diffeval: batch_size must be >= 1, got {batch_size}")
    if "num_images_per_prompt" in call_kwargs:
        raise InputError("pytest-diffeval: num_images_per_prompt is not supported; more images per prompt come "
                         "from more seeds (seeds=range(4)), each with its own generator")
    strength, steps = call_kwargs.get("strength"), call_kwargs.get("num_inference_steps")
    if isinstance(strength, (int, float)) and isinstance(steps, int) and int(steps * strength) < 1:
        raise InputError(f"pytest-diffeval: strength={strength} x num_inference_steps={steps} leaves no denoising step "
                         "(diffusers runs int(steps * strength) of them); raise num_inference_steps or strength")
    return values


def _prompts_and_labels(pipe: Any, prompts: list[Any] | None, class_labels: Sequence[int | str] | None, *,
                        class_conditional: bool, takes_prompt: bool) -> tuple[list[Any] | None, list[int] | None]:
    """The prompts (DiT: its class names) and class ids, checked against what the pipeline takes."""
    pipe_name = type(pipe).__name__
    if prompts is not None and not prompts:
        raise ValueError("pytest-diffeval: generate() got an empty prompt list; pass at least one prompt")
    if class_conditional:
        if (prompts is None) == (class_labels is None):
            raise InputError(f"pytest-diffeval: {pipe_name} is class-conditional: give its classes once, as names or "
                             "ids in place of the prompts (generate(model, ['tabby cat', 207])) or as class_labels=")
        resolved = [_class_label(pipe, label) for label in (prompts if prompts is not None else list(class_labels))]
        return [r[1] for r in resolved], [r[0] for r in resolved]
    if class_labels is not None:
        raise InputError(f"pytest-diffeval: class_labels= is for class-conditional pipelines (DiT); {pipe_name} "
                         "takes no class labels")
    if takes_prompt:
        if prompts is None:
            raise InputError(f"pytest-diffeval: {pipe_name} needs prompts; pass a list of prompts (or instructions)")
        bad = [p for p in prompts if not isinstance(p, str)]
        if bad:
            raise InputError(f"pytest-diffeval: prompts must be str, got {bad[0]!r}")
    return prompts, None


def _load_images(pipe_name: str, params: set[str] | None, given: dict[str, Any]) -> dict[str, list[np.ndarray]]:
    """The image inputs the pipeline takes, read; one it needs but did not get is an error."""
    loaded: dict[str, list[np.ndarray]] = {}
    for key, value in given.items():
        argument, mode, _ = IMAGE_INPUTS[key]
        if value is None:
            if params is not None and argument in params:
                raise InputError(f"pytest-diffeval: {pipe_name} needs {key}= ({argument}= of the pipeline): a folder, "
                                 "a list of paths, PIL images or uint8 arrays, one per prompt or one for all")
            continue
        if params is not None and argument not in params:
            raise InputError(f"pytest-diffeval: {pipe_name} takes no {key} (its __call__ has no {argument}=); "
                             "load the pipeline class that does, e.g. pipeline_class='StableDiffusionImg2ImgPipeline'")
        loaded[key], _ = load_input_images(value, what=key, mode=mode)
    return loaded


def _label_cases(pipe_name: str, prompts: list[Any] | None, loaded: dict[str, list[np.ndarray]], *,
                 unconditional: bool) -> list[str]:
    """Labels for the cases of a pipeline without a text prompt (given ones are checked)."""
    if prompts is not None:
        bad = [p for p in prompts if not isinstance(p, str)]
        if bad:
            raise InputError(f"pytest-diffeval: labels must be str, got {bad[0]!r}")
    else:
        counts = {key: len(arrays) for key, arrays in loaded.items() if len(arrays) > 1}
        if len(set(counts.values())) > 1:
            raise InputError(f"pytest-diffeval: {pipe_name} got no prompts, so the cases come from the input images, "
                             f"but they disagree: {', '.join(f'{k} holds {n}' for k, n in counts.items())}; give every "
                             "input the same number of images (or one for all), or pass one label per case as prompts")
        count = max((len(v) for v in loaded.values()), default=1)
        prompts = [""] if unconditional or not loaded else [f"example {i}" for i in range(count)]
    if unconditional and len(prompts) != 1:
        raise InputError(f"pytest-diffeval: {pipe_name} is unconditional: every label would give the same images; "
                         "pass prompts=None (or one label) and choose the samples with seeds=")
    return prompts


def _check_images_fit(pipe: Any, prompts: list[str], loaded: dict[str, list[np.ndarray]], *,
                      takes_prompt: bool, class_conditional: bool) -> None:
    """The image inputs agree with the cases, with each other and with the pipeline's latent grid."""
    pipe_name, n_cases = type(pipe).__name__, len(prompts)
    for key, arrays in loaded.items():
        if len(arrays) not in (1, n_cases):
            raise InputError(f"pytest-diffeval: {key} holds {len(arrays)} images for {n_cases} "
                             f"{'prompts' if takes_prompt else 'cases'}; give one per prompt (same order) or one for all")
    if "masks" in loaded and "source_images" in loaded:
        mask_size, source_size = loaded["masks"][0].shape[:2], loaded["source_images"][0].shape[:2]
        if mask_size != source_size:
            raise InputError(f"pytest-diffeval: masks are {mask_size[0]}x{mask_size[1]} (HxW) but source_images are "
                             f"{source_size[0]}x{source_size[1]}; give masks of the source images' size")
    factor = getattr(pipe, "vae_scale_factor", None)
    if "source_images" in loaded and isinstance(factor, int) and factor > 1:
        h, w = loaded["source_images"][0].shape[:2]
        if h % factor or w % factor:
            raise InputError(f"pytest-diffeval: source_images are {h}x{w} (HxW) but {pipe_name} works at multiples of "
                             f"{factor} pixels; resize them (e.g. to {h - h % factor}x{w - w % factor}) so the "
                             "output stays aligned with its source")
    if (loaded or class_conditional) and len(set(prompts)) < n_cases:
        duplicate = next(p for p in prompts if prompts.count(p) > 1)
        raise InputError(f"pytest-diffeval: the prompt {duplicate!r} appears twice; prompts identify samples (baselines "
                         "pair them by (prompt, seed)), so give each source its own prompt or label")


def _check_sampler(pipe: Any) -> None:
    """A class-conditional pipeline (DiT) with a sampler that would draw from the global RNG is an error."""
    scheduler = getattr(pipe, "scheduler", None)
    stochastic = type(scheduler).__name__ in _STOCHASTIC_SCHEDULERS or str(
        getattr(getattr(scheduler, "config", None), "algorithm_type", "")).startswith("sde")
    if stochastic:
        raise InputError(f"pytest-diffeval: {type(pipe).__name__} does not pass its generators to the scheduler, so "
                         f"{type(scheduler).__name__} would draw noise from the global RNG and images would not be "
                         "reproducible; load it with a deterministic sampler, e.g. scheduler='DDIMScheduler' or "
                         "'DPMSolverMultistepScheduler'")


def validate_request(pipe: Any, prompts: Sequence[str | int] | str | None, *, seeds: Iterable[int],
                     batch_size: int, images: dict[str, Any], class_labels: Sequence[int | str] | None,
                     captions: dict[str, Any], call_kwargs: dict[str, Any]) -> Request:
    """Check a ``generate()`` call (see :func:`~pytest_diffeval.generation.generate_images`)
    and return it as a :class:`Request`; raise :class:`InputError` (or ValueError for an
    empty list or a bad batch size) naming what does not fit.  ``images`` maps
    ``source_images`` / ``masks`` / ``exemplars`` to what was given, ``captions`` maps
    ``source_captions`` / ``target_captions``.  Warns about prompts the text encoder cuts."""
    call_kwargs, given = dict(call_kwargs), {key: images.get(key) for key in IMAGE_INPUTS}
    _take_image_aliases(given, call_kwargs)
    seeds = _check_sampling(seeds, batch_size, call_kwargs)
    params = _call_parameters(pipe)
    pipe_name = type(pipe).__name__
    class_conditional = params is not None and "class_labels" in params
    takes_prompt = (params is None or "prompt" in params) and not class_conditional
    unconditional = params is not None and not ({"prompt", "class_labels", "image"} & params)

    prompts = [prompts] if isinstance(prompts, str) else (list(prompts) if prompts is not None else None)
    prompts, labels = _prompts_and_labels(pipe, prompts, class_labels, class_conditional=class_conditional,
                                          takes_prompt=takes_prompt)
    loaded = _load_images(pipe_name, params, given)
    if not takes_prompt and not class_conditional:
        prompts = _label_cases(pipe_name, prompts, loaded, unconditional=unconditional)
    _check_images_fit(pipe, prompts, loaded, takes_prompt=takes_prompt, class_conditional=class_conditional)
    n_cases = len(prompts)
    texts = {name: _per_prompt(call_kwargs.get(name), what=name, count=n_cases) for name in _PER_PROMPT_TEXT}
    if takes_prompt:
        warn_long_prompts(pipe, prompts, texts, stacklevel=4)  # validate_request <- generate_images <- its caller
    captions = {name: _per_prompt(captions.get(name), what=name, count=n_cases)
                for name in ("source_captions", "target_captions")}
    if class_conditional:
        _check_sampler(pipe)

    pipe_kwargs = {k: v for k, v in call_kwargs.items() if k not in _PER_PROMPT_TEXT}
    if "source_images" in loaded and params is not None and "height" in params and \
            "height" not in call_kwargs and "width" not in call_kwargs:
        pipe_kwargs["height"], pipe_kwargs["width"] = loaded["source_images"][0].shape[:2]
    return Request(pipe_name=pipe_name, prompts=prompts, seeds=seeds, batch_size=batch_size, call_kwargs=call_kwargs,
                   pipe_kwargs=pipe_kwargs, takes_prompt=takes_prompt,
                   batch_size_argument=unconditional and "batch_size" in params, labels=labels, loaded=loaded,
                   texts=texts, captions=captions)
