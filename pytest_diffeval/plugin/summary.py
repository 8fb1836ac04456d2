"""The ``-v`` summary: what each process loaded, generated and read from the caches."""

from __future__ import annotations

import sys
import time
from typing import Any

from ..pipelines import loaded_pipelines
from ..session import DiffevalSession


def process_counters(session: DiffevalSession) -> dict[str, Any]:
    """This process's loads and cache counts in ``session`` (sent from xdist workers to the controller)."""
    images = session.image_cache() if session.image_cache_used else None
    loads = process_loads()
    return {
        "tests": session.tests_run,
        "cpu_s": round(time.process_time(), 1),
        **{kind: since(counts, session.loads_at_start.get(kind, {})) for kind, counts in loads.items()},
        "images": [images.misses, images.hits, str(images.directory)] if images is not None else None,
        **{k: v for k, v in session.counters.as_dict().items() if k != "oom_backoffs"},
    }


def process_loads() -> dict[str, dict[str, int]]:
    """How often this process loaded each pipeline and backbone and evicted each pipeline so
    far (models are kept per process, so a session counts the change while it ran)."""
    backbones = sys.modules.get("pytest_diffeval.metrics.backbones")
    pipelines = loaded_pipelines()
    return {
        "pipelines": dict(pipelines.loads) if pipelines is not None else {},
        "evictions": dict(getattr(pipelines, "evictions", {})) if pipelines is not None else {},
        "backbones": dict(getattr(backbones, "LOADS", {}) or {}),
    }


def since(counts: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    """``counts`` minus ``before``, keeping only what grew."""
    return {name: n - before.get(name, 0) for name, n in counts.items() if n - before.get(name, 0) > 0}


def counter_lines(where: str, counters: dict[str, Any]) -> list[str]:
    """The ``-v`` summary lines of one process."""
    lines = []
    if where.startswith("gw"):
        lines.append(f"diffeval work in {where}: {counters.get('tests', 0)} tests, {counters.get('cpu_s', 0)} s CPU")
    pipelines, backbones = counters.get("pipelines") or {}, counters.get("backbones") or {}
    if pipelines or backbones or counters.get("images"):
        loads = f"diffeval loads in {where}: pipelines " + (", ".join(f"{k}: {v}" for k, v in pipelines.items())
                                                            or "none")
        if backbones:
            loads += "; backbones " + ", ".join(f"{k}: {v}" for k, v in backbones.items())
        lines.append(loads)
    if counters.get("evictions"):
        lines.append(f"diffeval evictions in {where}: " + ", ".join(f"{k}: {v}" for k, v in counters["evictions"].items())
                     + " (pipelines dropped to make room: --diffeval-max-pipelines, or GPU memory short)")
    if counters.get("images"):
        misses, hits, directory = counters["images"]
        line = f"diffeval images in {where}: {misses} generated, {hits} from the cache {directory}"
        if counters.get("lazy_hits"):
            line += f" ({counters['lazy_hits']} generate() calls read only from the cache)"
        lines.append(line)
    if counters.get("feature_hits") or counters.get("feature_misses"):
        lines.append(f"diffeval features in {where}: {counters['feature_misses']} computed, "
                     f"{counters['feature_hits']} from the cache {counters.get('feature_dir')}")
    if counters.get("result_hits") or counters.get("result_misses"):
        cached = (f", {counters['result_hits']} from the cache {counters['result_dir']}" if counters.get("result_dir")
                  else " (no result cache)")
        lines.append(f"diffeval metrics in {where}: {counters['result_misses']} computed{cached}")
    if counters.get("plan_tests"):
        lines.append(f"diffeval plans in {where}: {counters['plan_tests']} planned tests; {counters['plan_samples']} "
                     f"samples generated for them in {counters['plan_batches']} batches")
    if counters.get("help_samples"):
        lines.append(f"diffeval help in {where}: {counters['help_samples']} samples generated, once idle, for "
                     "planned tests of other workers")
    return lines
