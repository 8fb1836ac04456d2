"""The fixtures: each returns a small object (a pipeline loader, an image generator, the
test's baseline) that does the work, so the fixture functions stay two lines."""

from __future__ import annotations

import json
import os
from typing import Any

import pytest

from .. import distributed, settings
from .. import session as sessions
from ..baselines import DiffevalBaseline
from ..counters import COUNTERS
from ..exceptions import InputError
from ..generation import ImageSet, check_seeds, generate_images
from ..identity import load_provenance, torch_flags
from ..pipelines import process_pipelines, split_load_options
from ..planning import ensure_plan, images_from_cache, memory_image_cache, plain_text_to_image
from ..split import generate_part
from .options import sharding, value


def resolved_device() -> str:
    """``--diffeval-device`` resolved (a request this machine cannot serve is a UsageError)."""
    try:
        return settings.resolved_device()
    except RuntimeError as exc:
        raise pytest.UsageError(str(exc)) from None


def override(source: Any) -> Any:
    """``source``, or what ``--diffeval-model`` / ``DIFFEVAL_MODEL`` puts in its place."""
    replacement = settings.current().model_override
    if not replacement or not isinstance(source, (str, os.PathLike)):
        return source
    if "=" in replacement:
        original, new = replacement.split("=", 1)
        return new if os.fspath(source) == original else source
    return replacement


class PipelineLoader:
    """``diffusion_pipeline(source, *, pipeline_class=None, dtype=None, device=None,
    scheduler=None, **load_options)``: a pipeline loaded once per process and identity."""

    def __init__(self, config: pytest.Config, device: str) -> None:
        self.config, self.device = config, device

    def __call__(self, source: Any, *, pipeline_class: Any = None, dtype: Any = None, device: str | None = None,
                 scheduler: Any = None, **from_pretrained_kwargs: Any) -> Any:
        return process_pipelines().get(
            override(source), pipeline_class=pipeline_class, dtype=dtype or value(self.config, "diffeval_dtype"),
            device=device or self.device, scheduler=scheduler, **from_pretrained_kwargs,
        )


class ImageGenerator:
    """``generate(source_or_pipeline, prompts, *, seeds=(0,), batch_size=None, **call_kwargs)``:
    an :class:`ImageSet`, read from the image cache where it can, generated where it must;
    a ``diffeval_plan`` covering the call generates its samples first, in full batches."""

    def __init__(self, request: pytest.FixtureRequest, load: PipelineLoader, device: str) -> None:
        self.config, self.nodeid = request.config, request.node.nodeid
        self.session = sessions.of(request.config)
        self.load, self.device = load, device
        # diffeval_split under --diffeval-splits N (N > 1): (this shard, N); each call makes its block
        shards = sharding(request.config) if request.node.get_closest_marker("diffeval_split") else None
        self.split = shards if shards is not None and shards[1] > 1 else None

    def __call__(self, source_or_pipeline: Any, prompts: Any = None, *, seeds: Any = (0,),
                 batch_size: int | None = None, **call_kwargs: Any) -> ImageSet:
        size = batch_size if batch_size is not None else int(value(self.config, "diffeval_batch_size"))
        if size < 1:  # checked here: a fully cached call never reaches generate_images
            raise ValueError(f"pytest-diffeval: batch_size must be >= 1, got {size}; fix: pass a positive "
                             "batch_size= or --diffeval-batch-size, or leave it out for the default")
        if self.split is not None:  # this shard's block of the samples, made by calls without the split
            split, self.split = self.split, None
            try:
                return generate_part(lambda p, s, kw: self(source_or_pipeline, p, seeds=s, batch_size=batch_size, **kw),
                                     prompts, check_seeds(seeds), call_kwargs, *split, self.nodeid)
            finally:
                self.split = split
        disk = self.session.image_cache()
        by_name = isinstance(source_or_pipeline, (str, os.PathLike))
        load_options, call_kwargs = split_load_options(call_kwargs)
        if load_options and not by_name:
            raise InputError(f"pytest-diffeval: generate() got load options ({', '.join(sorted(load_options))}) with "
                             "a pipeline that is already loaded; fix: pass them to diffusion_pipeline(MODEL, ...) or "
                             "give generate() the model's name")
        loaded: list[Any] = []

        def pipe() -> Any:
            if not loaded:
                loaded.append(self.load(source_or_pipeline, **load_options) if by_name else source_or_pipeline)
            return loaded[0]

        # the memo knows the provenance of a load without options only
        memo = self.session.provenance_memo() if by_name and disk is not None and not load_options else None
        memo_key = None
        if memo is not None:
            dtype = str(value(self.config, "diffeval_dtype") or "auto")
            memo_key = memo.key(os.fspath(override(source_or_pipeline)), dtype, self.device)
        plain = plain_text_to_image(prompts, call_kwargs)
        seed_list = check_seeds(seeds)
        cache = self._run_plan(source_or_pipeline, plain, seed_list, call_kwargs, load_options, pipe, disk, size,
                               memo, memo_key)

        images = None
        if memo is not None and plain is not None and disk is not None:
            provenance = memo.get(memo_key)
            flags = torch_flags()  # None: torch not imported here, so nothing changed its defaults
            if provenance is not None and flags is not None and (provenance.get("execution") or {}).get("flags") != flags:
                provenance = None  # TF32/cuDNN/determinism flags differ from the memo's run: other images
            if provenance is not None:
                images = images_from_cache(disk, provenance, plain, seed_list, call_kwargs, self.nodeid)
        if not distributed.everyone(images is not None, "agree that every sample is cached"):
            images = None  # under torchrun: a rank that lacks samples generates its share, so all do
        if images is None:
            images = generate_images(pipe(), prompts, seeds=seed_list, batch_size=size, test_id=self.nodeid,
                                     cache=cache, **call_kwargs)
            if memo is not None:
                memo.put(memo_key, json.loads(json.dumps(images.provenance, default=repr)))

        nodeid = self.nodeid

        def regenerate(*, batch_size: int = size) -> ImageSet:
            """The same generation again, uncached (for --diffeval-calibrate)."""
            return generate_images(pipe(), prompts, seeds=seed_list, batch_size=batch_size, test_id=nodeid,
                                   **call_kwargs)

        images.regenerate = regenerate
        return images

    def _run_plan(self, source_or_pipeline: Any, plain: Any, seed_list: list[int], call_kwargs: dict[str, Any],
                  load_options: dict[str, Any], pipe: Any, disk: Any, size: int, memo: Any, memo_key: Any) -> Any:
        """In a test with a ``diffeval_plan`` that covers this call, generate the plan's samples
        (once per scheduling unit); returns the image cache the call then reads."""
        planner = self.session.planner
        unit = planner.unit(self.nodeid)
        if unit is None:
            return disk
        plan = unit.plan
        if plain is None:
            why: str | None = "the call is not a plain text-to-image call (input images, class labels)"
        elif load_options:
            why = f"it passes load options ({', '.join(sorted(load_options))}) the plan does not"
        elif isinstance(source_or_pipeline, (str, os.PathLike)):
            why = plan.mismatch(os.fspath(source_or_pipeline), plain, seed_list, call_kwargs)
        else:
            model = load_provenance(source_or_pipeline).get("model")
            why = plan.mismatch(plan.model if model == os.fspath(override(plan.model)) else str(model),
                                plain, seed_list, call_kwargs)
        if why is not None:
            planner.warn_once(self.nodeid, f"pytest-diffeval: {self.nodeid} has a diffeval_plan but its generate() "
                                           f"call is not covered by it ({why}); it is generated on its own")
            return disk
        cache = disk
        if cache is None:
            unit.memory = unit.memory or memory_image_cache()
            cache = unit.memory
        ensure_plan(unit, load=pipe, cache=cache, batch_size=size, memo=memo, memo_key=memo_key, test_id=self.nodeid)
        COUNTERS.plan_tests += 1
        return cache


@pytest.fixture(scope="session")
def diffeval_device() -> str:
    """The device pipelines and metric backbones run on (``--diffeval-device``)."""
    return resolved_device()


@pytest.fixture
def diffusion_pipeline(request: pytest.FixtureRequest, diffeval_device: str) -> PipelineLoader:
    """Factory: ``diffusion_pipeline(source, *, pipeline_class=None, dtype=None, device=None,
    scheduler=None, **load_options)`` loads (once per worker and identity) and returns a
    pipeline.  Load options: ``variant=``, ``revision=``, module arguments (``vae=``,
    ``unet=``, ``safety_checker=None``...), ``device_map=``, ``enable_model_cpu_offload=True``,
    ``torch_compile=``, ``attention_backend=``, ``lora=`` and any other ``from_pretrained``
    argument; each is part of the pipeline's identity (modules by their content)."""
    return PipelineLoader(request.config, diffeval_device)


@pytest.fixture
def generate(request: pytest.FixtureRequest, diffusion_pipeline: PipelineLoader,
             diffeval_device: str) -> ImageGenerator:
    """Factory: ``generate(source_or_pipeline, prompts, *, seeds=(0,), batch_size=None,
    **call_kwargs)`` returns an :class:`ImageSet`, one image per (prompt, seed).  With a
    model name, the load options of ``diffusion_pipeline`` (``variant=``, ``vae=``,
    ``safety_checker=None``, ``torch_compile=``...) may be given here too.

    Samples in the image cache are read, not generated; when all of a call's samples are
    cached the pipeline is not even loaded.  In a test with a ``diffeval_plan`` whose plan
    covers the call, the plan's samples are generated first, in full batches."""
    return ImageGenerator(request, diffusion_pipeline, diffeval_device)


@pytest.fixture
def diffeval_baseline(request: pytest.FixtureRequest, snapshot: Any) -> DiffevalBaseline:
    """The test's stored baseline: ``diffeval_baseline.assert_no_regression(images, "clip_score")``."""
    return DiffevalBaseline(snapshot, request.node.nodeid)
