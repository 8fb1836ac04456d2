"""The state of one pytest session: a :class:`DiffevalSession` kept in ``config.stash``.

Built in ``pytest_configure`` and ended in ``pytest_unconfigure`` (as pytest's own
cacheprovider and syrupy's ``SnapshotSession`` do), it owns what lives as long as the session:
the settings built once from the options, the cache counters, the plans, the check rows,
the image cache and provenance memo, what xdist workers reported, and the outputs.  Code
far from the hooks (metrics, generation, baselines) reads the settings and counters of the
*active* session through ``settings.current()`` and ``counters.COUNTERS``; a session pushes
them when it starts and pops them when it ends, so a pytest run inside a test (pytester,
in-process) has its own and leaves the outer session's untouched.

Deliberately per process, not per session: loaded models (pipelines, metric backbones), all
in :mod:`pytest_diffeval.process_cache`, so in-process runs share a model once loaded.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from . import counters, distributed, settings
from .counters import Counters
from .distributed import Group
from .generation import ImageCache
from .planning import Planner, ProvenanceMemo
from .report import Outputs

_KEY = pytest.StashKey["DiffevalSession"]()


@dataclass
class DiffevalSession:
    """What one pytest session (controller or xdist worker) holds; see the module docstring."""

    settings: settings.Settings
    no_cache: bool = False
    counters: Counters = field(default_factory=Counters)
    planner: Planner = field(default_factory=Planner)
    rows: list[dict[str, Any]] = field(default_factory=list)  # every metric check (on the controller: all workers')
    failed_tests: set[str] = field(default_factory=set)  # their baselines are kept under --snapshot-update
    worker_counters: dict[str, dict[str, Any]] = field(default_factory=dict)  # controller: each worker's counters
    crashed_workers: list[str] = field(default_factory=list)  # controller: workers that died
    tests_run: int = 0
    loads_at_start: dict[str, dict[str, int]] = field(default_factory=dict)  # the process's model loads then
    entries_dir: str | None = None  # controller under model scheduling: where workers report their tests
    outputs: Outputs | None = None
    group: Group | None = None  # under torchrun / accelerate launch: this rank's process group
    _images: ImageCache | None = None
    _memo: ProvenanceMemo | None = None
    _tokens: tuple[int, int] = (0, 0)

    def start(self) -> None:
        """Make this session's settings and counters the active ones."""
        self.counters.feature_cache_enabled = not self.no_cache
        self._tokens = (settings.push(self.settings), counters.push(self.counters))

    def end(self) -> None:
        """Give the settings and counters in force before back; remove temporary files."""
        settings.pop(self._tokens[0])
        counters.pop(self._tokens[1])
        if self.group is not None:
            distributed.stop(self.group)
            self.group = None
        if self.entries_dir:
            shutil.rmtree(self.entries_dir, ignore_errors=True)

    @property
    def image_cache_used(self) -> bool:
        return self._images is not None

    @property
    def cache_dir(self) -> Path | None:
        return None if self.settings.cache_dir is None else Path(self.settings.cache_dir)

    def image_cache(self) -> ImageCache | None:
        """The on-disk image cache, or None with ``--diffeval-no-cache`` or without a cache dir."""
        if self.no_cache or self.cache_dir is None:
            return None
        if self._images is None:
            self._images = ImageCache(self.cache_dir / "images")
        return self._images

    def provenance_memo(self) -> ProvenanceMemo | None:
        """Provenance of pipelines loaded before (lets a fully cached ``generate`` skip the load)."""
        if self.cache_dir is None:
            return None
        if self._memo is None:
            self._memo = ProvenanceMemo(self.cache_dir / "pipelines")
        return self._memo


def install(config: pytest.Config, session: DiffevalSession) -> DiffevalSession:
    """Keep ``session`` in ``config.stash`` and make it active."""
    config.stash[_KEY] = session
    session.start()
    return session


def of(config: pytest.Config) -> DiffevalSession:
    """The session of ``config`` (built in the plugin's ``pytest_configure``)."""
    return config.stash[_KEY]


def uninstall(config: pytest.Config) -> None:
    """End the session of ``config``, if it has one."""
    session = config.stash.get(_KEY, None)
    if session is not None:
        session.end()
        del config.stash[_KEY]


def is_worker(config: pytest.Config) -> bool:
    """An xdist worker (its config has ``workerinput``).  Not the environment variable: a
    pytest started from inside a worker (pytester) inherits it but is a controller."""
    return hasattr(config, "workerinput")
