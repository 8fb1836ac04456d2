"""Generation planning: what makes many small tests cost what one big test costs.

* :class:`Plan` - ``@pytest.mark.diffeval_plan(model, prompts, seeds=..., **call_kwargs)`` on a
  test or a module, read at collection: the first ``generate`` call of a planned test
  generates the samples of every planned test (of its scheduling unit) in full batches, into
  the image cache (or an in-memory store without one); each test then reads its own.
* :class:`ProvenanceMemo` - what a loaded pipeline's provenance was, on disk, so a rerun whose
  images are all cached does not load the pipeline at all.

Nothing here imports torch at module level (the plugin imports this module in every run).
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from . import distributed
from ._hashing import digest_files, digest_json, library_versions
from ._io import atomic_write_text
from .counters import COUNTERS, Counters  # noqa: F401 - re-exported
from .devices import PER_SAMPLE_ARGUMENTS, call_with_oom_backoff  # noqa: F401 - re-exported
from .fingerprints import hub_snapshot, model_fingerprint
from .generation import RUN_FIELDS, ImageCache, ImageSet, check_seeds, generate_images, jsonable, pipeline_provenance
from .generation import fingerprint_arguments as _fingerprint
from .pipelines import resolve_source

# --------------------------------------------------------------------------- plans


@dataclass(frozen=True)
class Plan:
    """The generations that a group of tests will ask for, declared up front."""

    model: str
    prompts: tuple[str, ...]
    seeds: tuple[int, ...]
    call_kwargs: dict[str, Any]
    batch_size: int | None = None

    @property
    def id(self) -> str:
        material = [self.model, list(self.prompts), list(self.seeds), _fingerprint(self.call_kwargs)]
        return digest_json(material, 16)

    @classmethod
    def from_marker(cls, mark: Any, where: str) -> "Plan":
        """``diffeval_plan(model, prompts, seeds=(0,), batch_size=None, **call_kwargs)``."""
        args, kwargs = list(mark.args), dict(mark.kwargs)
        usage = ("use @pytest.mark.diffeval_plan(model, prompts, seeds=range(4), **call_kwargs), "
                 "with the same model, seeds and call arguments the tests pass to generate()")
        model = args.pop(0) if args else kwargs.pop("model", None)
        prompts = args.pop(0) if args else kwargs.pop("prompts", None)
        if args:
            raise ValueError(f"pytest-diffeval: {where}: diffeval_plan takes model and prompts positionally, "
                             f"everything else by keyword; {usage}")
        if not isinstance(model, (str, os.PathLike)):
            raise ValueError(f"pytest-diffeval: {where}: diffeval_plan needs the model as a name or path "
                             f"(got {model!r}); {usage}")
        if isinstance(prompts, str):
            prompts = [prompts]
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise ValueError(f"pytest-diffeval: {where}: diffeval_plan needs a non-empty list of prompts (str); {usage}")
        seeds = kwargs.pop("seeds", (0,))
        batch_size = kwargs.pop("batch_size", None)
        if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
            raise ValueError(f"pytest-diffeval: {where}: diffeval_plan batch_size must be an int >= 1, got {batch_size!r}")

        try:
            seeds = tuple(check_seeds(seeds))
        except ValueError as exc:
            raise ValueError(f"pytest-diffeval: {where}: diffeval_plan: {str(exc).removeprefix('pytest-diffeval: ')}"
                             ) from None
        if not seeds:
            raise ValueError(f"pytest-diffeval: {where}: diffeval_plan got an empty seed list")
        return cls(os.fspath(model), tuple(dict.fromkeys(prompts)), seeds, kwargs, batch_size)

    def own_prompts(self, params: dict[str, Any]) -> list[str] | None:
        """The prompts one test asks for, read from its parameters (a parameter whose value
        is one of the plan's prompts, or a list of them); None when no parameter says."""
        known = set(self.prompts)
        found: list[str] = []
        for value in params.values():
            if isinstance(value, str) and value in known:
                found.append(value)
            elif isinstance(value, (list, tuple)) and value and all(isinstance(v, str) and v in known for v in value):
                found.extend(value)
        return list(dict.fromkeys(found)) or None

    def mismatch(self, model: str, prompts: Sequence[Any], seeds: Sequence[int], call_kwargs: dict[str, Any]) -> str | None:
        """Why a ``generate()`` call is not one this plan covers (None when it is)."""
        if os.fspath(model) != self.model:
            return f"model {os.fspath(model)!r} is not the plan's {self.model!r}"
        outside = [p for p in prompts if p not in set(self.prompts)]
        if outside:
            return f"prompt {outside[0]!r} is not among the plan's {len(self.prompts)} prompts"
        extra = sorted(set(int(s) for s in seeds) - set(self.seeds))
        if extra:
            return f"seed {extra[0]} is not among the plan's seeds {list(self.seeds)}"
        if _fingerprint(call_kwargs) != _fingerprint(self.call_kwargs):
            names = sorted(set(call_kwargs) | set(self.call_kwargs))
            differ = [n for n in names if _fingerprint(call_kwargs.get(n)) != _fingerprint(self.call_kwargs.get(n))]
            return "call arguments differ: " + ", ".join(
                f"{n}={call_kwargs.get(n, '<not given>')!r} (plan: {self.call_kwargs.get(n, '<not given>')!r})"
                for n in differ)
        return None


@dataclass
class PlanUnit:
    """The planned tests that run together in one process (all of them without xdist, one
    scheduling unit's under ``-n``): their samples are generated in one go."""

    plan: Plan
    tests: list[str]
    prompts: list[str]  # the union of the tests' own prompts, in plan order
    done: bool = False
    memory: Any = None  # MemoryImageCache when there is no disk cache
    pending: set[str] = field(default_factory=set)


class Planner:
    """The session's plans: which test belongs to which plan and unit."""

    def __init__(self) -> None:
        self._reset()

    def _reset(self) -> None:
        self.plans: dict[str, Plan] = {}
        self.test_plan: dict[str, str] = {}  # nodeid -> plan id
        self.test_prompts: dict[str, list[str] | None] = {}
        self.units: dict[tuple[str, str], PlanUnit] = {}
        self.unit_of: dict[str, str] = {}  # nodeid -> scheduling unit (under -n with the model scheduler)
        self.warned: set[str] = set()

    def collect(self, items: Iterable[Any]) -> None:
        """Read the ``diffeval_plan`` marker of each selected test (forgetting earlier ones)."""
        self._reset()
        for item in items:
            mark = item.get_closest_marker("diffeval_plan")
            if mark is None:
                continue
            plan = Plan.from_marker(mark, item.nodeid)
            self.plans.setdefault(plan.id, plan)
            self.test_plan[item.nodeid] = plan.id
            params = getattr(getattr(item, "callspec", None), "params", {}) or {}
            self.test_prompts[item.nodeid] = plan.own_prompts(params)

    def unit(self, nodeid: str) -> PlanUnit | None:
        """The plan unit of a test (None when it has no plan)."""
        plan_id = self.test_plan.get(nodeid)
        if plan_id is None:
            return None
        scope = self.unit_of.get(nodeid, "")
        key = (plan_id, scope)
        if key not in self.units:
            tests = [t for t, p in self.test_plan.items() if p == plan_id and self.unit_of.get(t, "") == scope]
            plan = self.plans[plan_id]
            wanted: set[str] = set()
            for test in tests:
                wanted.update(self.test_prompts.get(test) or plan.prompts)
            prompts = [p for p in plan.prompts if p in wanted]
            self.units[key] = PlanUnit(plan, tests, prompts, pending=set(tests))
        return self.units[key]

    def finished(self, nodeid: str) -> None:
        """A test is done: free its unit's in-memory images once every test of the unit ran."""
        plan_id = self.test_plan.get(nodeid)
        if plan_id is None:
            return
        unit = self.units.get((plan_id, self.unit_of.get(nodeid, "")))
        if unit is not None:
            unit.pending.discard(nodeid)
            if not unit.pending:
                unit.memory = None

    def warn_once(self, nodeid: str, message: str) -> None:
        if nodeid not in self.warned:
            self.warned.add(nodeid)
            warnings.warn(message, UserWarning, stacklevel=3)


def memory_image_cache() -> Any:
    """An :class:`~pytest_diffeval.generation.ImageCache` that keeps images in memory
    (for plans when there is no disk cache); counted apart from the disk cache."""
    class MemoryImageCache(ImageCache):
        def __init__(self) -> None:
            super().__init__("<memory>")
            self.store: dict[str, tuple[Any, bool]] = {}

        def get(self, key: str | None) -> Any:
            if key is None or key not in self.store:
                return None
            self.hits += 1
            return self.store[key]

        def put(self, key: str | None, image: Any, nonfinite: bool) -> None:
            if key is not None:
                self.store[key] = (image, nonfinite)

        def claim_path(self, key: str | None) -> None:
            return None  # one process's memory: nothing to claim against (and no folder to write)

    return MemoryImageCache()


# --------------------------------------------------------------------------- lazy pipelines


_PACKAGE = Path(__file__).resolve().parent
# The code that computes a pipeline's provenance and its images' cache keys: each a module
# (``name.py``) or a package of modules (``name/*.py``).
_GENERATION_CODE = ("generation", "pipelines", "pixel_pipeline", "identity")


def generation_code_files(package: Path = _PACKAGE) -> list[Path]:
    """The files of :data:`_GENERATION_CODE` under ``package``, a module or a package's modules each."""
    files: list[Path] = []
    for name in _GENERATION_CODE:
        folder = package / name
        files += sorted(folder.glob("*.py")) if folder.is_dir() else [package / f"{name}.py"]
    return files


def _code_digest(package: Path = _PACKAGE) -> str:
    """The generation code itself: a changed provenance or key recipe invalidates the memo."""
    return digest_files(generation_code_files(package), 16)


class ProvenanceMemo:
    """The provenance of pipelines loaded before, keyed by the model folder's content hash
    (:func:`~pytest_diffeval.fingerprints.model_fingerprint`, remembered on disk under the
    files' stat with ctime and inode, so a weights file replaced by one of the same size and
    mtime is another key), the load options, library versions and this package's
    generation code; each entry carries its key and is a miss under any other.  With it,
    the image-cache keys of a ``generate()`` call are known without loading the pipeline,
    and a call whose samples are all cached loads nothing."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self._keys: dict[tuple[str, str, str], str | None] = {}
        self._stored: set[str] = set()

    def key(self, source: str, dtype: str, device: str) -> str | None:
        memo = (source, dtype, device)
        if memo not in self._keys:
            self._keys[memo] = self._compute_key(source, dtype, device)
        return self._keys[memo]

    def _compute_key(self, source: str, dtype: str, device: str) -> str | None:
        kind, path = resolve_source(source)
        if path is None:
            path = hub_snapshot(source, None)
            if path is None:
                return None
        material = {"source": source, "kind": kind, "path": str(path), "content": model_fingerprint(path),
                    "dtype": dtype, "device": device, "versions": library_versions(), "code": _code_digest()}
        return digest_json(material, 32)

    def _path(self, key: str) -> Path:
        return self.directory / f"{key}.json"

    def get(self, key: str | None) -> dict[str, Any] | None:
        if key is None:
            return None
        try:
            data = json.loads(self._path(key).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None  # absent or corrupt: load the pipeline
        if not isinstance(data, dict) or data.get("key") != key:
            return None  # another entry's file (swapped or stale): load the pipeline
        provenance = data.get("provenance")
        return provenance if isinstance(provenance, dict) and provenance.get("model_hash") else None

    def put(self, key: str | None, provenance: dict[str, Any]) -> None:
        if key is None or key in self._stored:
            return
        self._stored.add(key)

        provenance = {k: v for k, v in provenance.items() if k not in RUN_FIELDS}  # that run's, not the model's
        try:
            atomic_write_text(self._path(key), json.dumps({"key": key, "provenance": provenance}, sort_keys=True,
                                                          default=str))
        except OSError:
            pass  # a read-only cache only costs a load next time


# Arguments that make generate_images key a sample by more than (call kwargs, prompt, seed).
_NOT_PLAIN = frozenset({"source_images", "masks", "exemplars", "class_labels", "source_captions", "target_captions",
                        "image", "mask_image", "example_image"})


def plain_text_to_image(prompts: Any, call_kwargs: dict[str, Any]) -> list[str] | None:
    """The prompts of a plain text-to-image call (whose cache keys are known without the
    pipeline), else None."""
    if isinstance(prompts, str):
        prompts = [prompts]
    if not isinstance(prompts, (list, tuple)) or not prompts or not all(isinstance(p, str) for p in prompts):
        return None
    if _NOT_PLAIN & set(call_kwargs):
        return None
    return list(prompts)


def cached_keys(cache: Any, provenance: dict[str, Any], prompts: Sequence[str], seeds: Sequence[int],
                call_kwargs: dict[str, Any]) -> list[str] | None:
    """The image-cache keys of every ``(prompt, seed)`` sample when all are on disk, else None."""
    keys = [cache.key(provenance, call_kwargs, p, int(s)) for p in prompts for s in seeds]
    if any(k is None or not cache._path(k).is_file() for k in keys):
        return None
    return keys


def images_from_cache(cache: Any, provenance: dict[str, Any], prompts: Sequence[str], seeds: Sequence[int],
                      call_kwargs: dict[str, Any], test_id: str | None) -> Any:
    """The :class:`ImageSet` ``generate_images`` would return, read from the cache without
    the pipeline; None when a sample is missing or unreadable (then generate normally)."""

    seeds = [int(s) for s in seeds]
    keys = cached_keys(cache, provenance, prompts, seeds, call_kwargs)
    if keys is None:
        return None
    before = cache.hits
    results = []
    for key in keys:
        entry = cache.get(key)
        if entry is None:  # corrupt: regenerate through the normal path
            cache.hits = before
            return None
        results.append(entry)
    if len({r[0].shape for r in results}) > 1:  # an entry of another size (forged or corrupt): generate normally
        cache.hits = before
        return None
    COUNTERS.lazy_hits += 1
    return ImageSet(
        images=np.stack([r[0] for r in results]),
        prompts=[p for p in prompts for _ in seeds],
        seeds=[s for _ in prompts for s in seeds],
        call_kwargs=jsonable(call_kwargs),
        provenance=dict(provenance),
        test_id=test_id,
        nonfinite=[r[1] for r in results],
    )


def ensure_plan(unit: PlanUnit, *, load: Callable[[], Any], cache: Any, batch_size: int, memo: ProvenanceMemo | None,
                memo_key: str | None, test_id: str) -> None:
    """Generate the samples of a plan unit that the cache lacks, in full batches (once)."""
    if unit.done:
        return
    unit.done = True
    plan = unit.plan
    size = plan.batch_size or batch_size
    provenance = memo.get(memo_key) if memo is not None else None
    cached = provenance is not None and cached_keys(cache, provenance, unit.prompts, plan.seeds, plan.call_kwargs)
    if distributed.everyone(bool(cached), "agree that the plan is cached"):
        return  # a warm rerun: everything is on disk, nothing to load (under torchrun: on every rank)

    pipe = load()
    live = _provenance_of(pipe)
    if cache.key(live, plan.call_kwargs, unit.prompts[0], plan.seeds[0]) is None:
        warnings.warn(f"pytest-diffeval: the diffeval_plan of {test_id} cannot batch: its model {plan.model!r} has no "
                      "content hash to key cached images by, so each test generates its own", UserWarning, stacklevel=3)
        return
    misses_before = cache.misses
    generate_images(pipe, unit.prompts, seeds=plan.seeds, batch_size=size, test_id=test_id, cache=cache,
                    **plan.call_kwargs)
    generated = cache.misses - misses_before
    COUNTERS.plan_units += 1
    COUNTERS.plan_samples += generated
    COUNTERS.plan_batches += -(-generated // size)
    if memo is not None:
        memo.put(memo_key, live)


def _provenance_of(pipe: Any) -> dict[str, Any]:
    return json.loads(json.dumps(pipeline_provenance(pipe), default=repr))
