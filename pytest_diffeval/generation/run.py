"""The batching loop of ``generate()``: a checked request's samples are read from the image
cache or generated in batches (each sample with its own seeded generator), claimed against
other processes sharing the cache, and assembled into an :class:`ImageSet`."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from .. import distributed
from .._hashing import digest_bytes
from ..devices import call_with_oom_backoff
from ..exceptions import DistributedError
from .cache import Claim, ImageCache, fingerprint_arguments
from .imageset import ImageSet, ShardedImageSet, jsonable
from .pixels import to_uint8
from .provenance import GpuMeter, pipeline_provenance
from .request import Request, validate_request


def generate_images(
    pipe: Any,
    prompts: Sequence[str | int] | str | None = None,
    *,
    seeds: Iterable[int] = (0,),
    batch_size: int = 8,
    test_id: str | None = None,
    cache: ImageCache | None = None,
    source_images: Any = None,
    masks: Any = None,
    exemplars: Any = None,
    class_labels: Sequence[int | str] | None = None,
    source_captions: str | Sequence[str] | None = None,
    target_captions: str | Sequence[str] | None = None,
    _prefetch: bool = False,
    **call_kwargs: Any,
) -> ImageSet:
    """Generate one image per ``(prompt, seed)``, batched; samples found in ``cache`` are
    read instead of generated.

    Each image gets its own CPU ``torch.Generator`` seeded with its seed, so its pixels do
    not depend on the batch it landed in nor on the device's RNG.

    What each pipeline takes (its ``__call__`` decides; everything is checked before any
    generation, and carried in ``ImageSet.inputs`` for the metrics):

    * text-to-image (SD, SDXL): ``prompts``; ``negative_prompt`` (and SDXL's
      ``prompt_2`` / ``negative_prompt_2``) once for all or one per prompt.
    * img2img, InstructPix2Pix: ``source_images`` (``prompts`` are the instructions);
      inpainting: also ``masks`` (white = repaint; the output has the sources' size);
      Paint-by-Example: ``source_images``, ``masks`` and ``exemplars``, ``prompts`` are
      optional case labels.  Images come from a folder, a list of paths / PIL images /
      uint8 arrays, or an ImageSet: one per prompt, or one for all.  diffusers' names
      ``image=``, ``mask_image=``, ``example_image=`` are accepted too.
    * DiT: class ids or names in place of ``prompts`` (or ``class_labels=``).
    * unconditional (DDPM): no prompts; ``seeds`` decide the samples.

    ``source_captions`` / ``target_captions`` (once or per prompt) only travel to the
    metrics (CLIP directional similarity).  Other keyword arguments go to the pipeline.
    """
    request = validate_request(
        pipe, prompts, seeds=seeds, batch_size=batch_size, class_labels=class_labels, call_kwargs=call_kwargs,
        images={"source_images": source_images, "masks": masks, "exemplars": exemplars},
        captions={"source_captions": source_captions, "target_captions": target_captions})
    run = _Run(pipe, request, pipeline_provenance(pipe), cache)
    run.generate_missing()
    if _prefetch:
        return None  # type: ignore[return-value]  # prefetch_images: samples other processes claimed stay theirs
    run.wait_for_other_processes()
    run.regenerate_odd_sizes()
    run.gather()
    return run.image_set(test_id)


def prefetch_images(pipe: Any, prompts: Sequence[str], *, seeds: Iterable[int], batch_size: int, cache: ImageCache,
                    **call_kwargs: Any) -> int:
    """Generate into ``cache`` the text-to-image samples that are neither cached nor claimed
    by another process, without waiting for the claimed ones; returns how many this made.
    An idle xdist worker uses it to take a share of the samples other workers' tests still
    need (claims keep every sample made once)."""
    before = cache.misses
    generate_images(pipe, list(prompts), seeds=seeds, batch_size=batch_size, cache=cache, _prefetch=True,
                    **call_kwargs)
    return cache.misses - before


def _batches(items: list[Any], size: int) -> Iterable[list[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _describe_images(arrays: Sequence[np.ndarray]) -> str:
    """An input's images for the recorded call arguments (and so the baseline signature):
    count, size and a content hash of each array's shape and bytes."""
    material = b"".join(str(array.shape).encode() + np.ascontiguousarray(array).tobytes() for array in arrays)
    h, w = arrays[0].shape[:2]
    return f"{len(arrays)} x {h}x{w} sha256:{digest_bytes(material, 16)}"


class _Run:
    """One ``generate()`` call's samples: each is read from the cache or generated here, in
    batches of the request's size, and stored; ``results[i]`` is sample ``i``'s uint8 image
    and whether the pipeline's output held NaN/inf."""

    def __init__(self, pipe: Any, request: Request, provenance: dict[str, Any], cache: ImageCache | None) -> None:
        self.pipe, self.request, self.provenance, self.cache = pipe, request, provenance, cache
        self.jobs = request.jobs
        self.case_inputs = ([self._case_inputs(case) for case in range(len(request.prompts))]
                            if cache is not None else [])
        self.keys = [self._key(case, seed) for case, seed in self.jobs]
        # Under torchrun: this rank's block of the samples, whole batches (each image made in the
        # batch one process makes it in); the others' come from gather().
        self.group = distributed.current()
        self.mine = (self.group.share(len(self.jobs), request.batch_size) if self.group is not None
                     else range(len(self.jobs)))
        self.results: list[tuple[np.ndarray, bool] | None] = [
            cache.get(key) if cache is not None and i in self.mine else None for i, key in enumerate(self.keys)]
        self.fresh: set[int] = set()  # samples generated by this call (the others came from the cache)
        self.waiting: dict[int, Path] = {}  # samples another process claimed
        self.meter = GpuMeter(provenance.get("device") or "cpu")

    def _case_inputs(self, case: int) -> dict[str, Any]:
        """What conditions ``case`` besides its prompt, for cache keys: input images by content, the class id."""
        request = self.request
        inputs: dict[str, Any] = {key: fingerprint_arguments(request.image(key, case)) for key in request.loaded}
        if request.labels is not None:
            inputs["class_label"] = request.labels[case]
        return inputs

    def _key(self, case: int, seed: int) -> str | None:
        """The sample's image-cache key: the call arguments plus the case's inputs."""
        if self.cache is None:
            return None
        inputs = self.case_inputs[case]
        kwargs = {**self.request.call_kwargs, "_inputs": inputs} if inputs else self.request.call_kwargs
        return self.cache.key(self.provenance, kwargs, self.request.prompts[case], seed)

    def produce(self, indices: list[int], claimed: dict[int, Path]) -> None:
        """Generate samples ``indices`` in batches, store them, and release each batch's claims."""
        import torch

        for batch in _batches(indices, self.request.batch_size):
            kwargs = self.request.batch_kwargs([self.jobs[i][0] for i in batch])
            generators = [torch.Generator("cpu").manual_seed(self.jobs[i][1]) for i in batch]
            with self.meter:
                output = call_with_oom_backoff(self.pipe, generators, output_type="np", **kwargs)
            self.meter.images += len(batch)
            raw = np.asarray(output.images, dtype=np.float32)
            if len(raw) != len(batch):
                raise RuntimeError(f"pytest-diffeval: {self.request.pipe_name} returned {len(raw)} images for a batch "
                                   f"of {len(batch)}")
            flags = ~np.isfinite(raw).reshape(len(raw), -1).all(axis=1)
            for index, image, flag in zip(batch, to_uint8(raw), flags):
                self.results[index] = (image, bool(flag))
                self.fresh.add(index)
                if self.cache is not None:
                    self.cache.misses += 1
                    self.cache.put(self.keys[index], image, bool(flag))
            ImageCache.release([claimed.pop(i) for i in batch if i in claimed])

    def generate_missing(self) -> None:
        """Generate the samples the cache lacks.  Processes sharing the cache (xdist workers)
        claim each batch before generating it; samples another process claimed are left to
        it (``waiting``): they split shared samples, never make one twice."""
        candidates = [i for i in self.mine if self.results[i] is None]
        claimed: dict[int, Path] = {}
        try:
            while candidates:
                batch: list[int] = []
                while candidates and len(batch) < self.request.batch_size:
                    i = candidates.pop(0)
                    claim = self.cache.claim(self.keys[i]) if self.cache is not None else Claim("free")
                    if claim.state == "done":
                        self.results[i] = claim.entry
                    elif claim.state == "theirs":
                        self.waiting[i] = claim.path
                    else:
                        if claim.state == "mine":
                            claimed[i] = claim.path
                        batch.append(i)
                self.produce(batch, claimed)
        finally:
            ImageCache.release(claimed.values())

    def wait_for_other_processes(self) -> None:
        """Read the samples other processes claimed once they are stored; make here those
        whose owner gave up or died."""
        if not self.waiting or self.cache is None:
            return
        found = self.cache.wait_for(self.waiting, lambda i: self.keys[i])
        for i, value in found.items():
            self.results[i] = value
        self.produce([i for i, value in found.items() if value is None], {})

    def regenerate_odd_sizes(self) -> None:
        """A cache entry under this call's key whose size differs from its siblings' (a forged
        or corrupt file) is a miss: generated again, never stacked into a bare shape error."""
        if len({self.results[i][0].shape for i in self.mine}) > 1:
            made = {self.results[i][0].shape for i in self.fresh}
            self.produce([i for i in self.mine
                          if i not in self.fresh and (not made or self.results[i][0].shape not in made)], {})

    def gather(self) -> None:
        """Under torchrun: every rank's image shape and non-finite flags on every rank; the
        pixels stay where they were made (a :class:`ShardedImageSet`: metrics run on each
        rank's block and gather values or features, never the whole set's pixels)."""
        if self.group is None:
            return
        local = [self.results[i] for i in self.mine]
        what = f"gather the shapes and flags of the {len(self.jobs)} samples of {self.request.pipe_name}"
        parts = self.group.all_gather_json([[list(r[0].shape), r[1]] for r in local], what)
        shapes = {tuple(shape) for part in parts for shape, _ in part}
        if len(shapes) > 1:
            raise DistributedError(f"pytest-diffeval: ranks produced samples of different shapes {sorted(shapes)}; "
                                   "fix: make every rank load the same model with the same arguments")
        self.shape = shapes.pop()
        self.nonfinite = [bool(flag) for part in parts for _, flag in part]

    def image_set(self, test_id: str | None) -> ImageSet:
        """The samples with what the ImageSet carries: inputs aligned per sample, the call
        arguments as recorded (input images by content), provenance with this run's GPU use."""
        request = self.request
        job_cases = [case for case, _ in self.jobs]
        inputs: dict[str, Any] = {}
        for key, arrays in request.loaded.items():
            if len(arrays) == 1:  # one image for all: a stride-0 view, embedded once by the metrics
                inputs[key] = np.broadcast_to(arrays[0], (len(self.jobs), *arrays[0].shape))
            else:
                inputs[key] = np.stack([arrays[c] for c in job_cases])
        if request.labels is not None:
            inputs["class_labels"] = [request.labels[c] for c in job_cases]
        for key, values in request.captions.items():
            if values is not None:
                inputs[key] = [values[c] for c in job_cases]
        recorded = jsonable(request.call_kwargs)
        generation_inputs: dict[str, Any] = {key: _describe_images(arrays) for key, arrays in request.loaded.items()}
        if request.labels is not None:
            generation_inputs["class_labels"] = list(request.labels)
        if generation_inputs:
            recorded["inputs"] = generation_inputs  # in the baseline signature: other inputs, other numbers
        fields: dict[str, Any] = dict(
            prompts=[request.prompts[c] for c in job_cases],
            seeds=[s for _, s in self.jobs],
            call_kwargs=recorded,
            provenance={**self.provenance, **self.meter.fields()},
            test_id=test_id,
            inputs=inputs,
        )
        if self.group is not None:
            local = [self.results[i][0] for i in self.mine]
            pixels = np.stack(local) if local else np.zeros((0, *self.shape), dtype=np.uint8)
            return ShardedImageSet(local=pixels, block=self.mine, group=self.group, image_size=self.shape[:2],
                                   nonfinite=self.nonfinite, **fields)
        return ImageSet(images=np.stack([r[0] for r in self.results]), nonfinite=[r[1] for r in self.results],
                        **fields)
