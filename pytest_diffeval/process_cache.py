"""The deliberate per-process caches: models loaded once per process (pipelines, CLIP
backbones, the aesthetic head, VGG19) and shared by every pytest session in it, a pytester
run inside a test run included.  Loading a model costs seconds to minutes and its identity
is its content, so sharing it is safe; everything else a session holds lives on its
``DiffevalSession``."""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Any, TypeVar

T = TypeVar("T")

_MODELS: dict[tuple[Hashable, ...], Any] = {}


def get(key: tuple[Hashable, ...]) -> Any | None:
    """The object cached under ``key`` (``(kind, ...)``), or None."""
    return _MODELS.get(key)


def get_or_load(key: tuple[Hashable, ...], load: Callable[[], T]) -> T:
    """The object cached under ``key``, loaded by ``load()`` the first time it is asked for."""
    if key not in _MODELS:
        _MODELS[key] = load()
    return _MODELS[key]


def put(key: tuple[Hashable, ...], value: T) -> T:
    """Cache ``value`` under ``key`` (a loader that must decide the key after loading)."""
    _MODELS[key] = value
    return value
