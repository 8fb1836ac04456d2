"""What the caches, plans and generations did in this process, for the ``-v`` summary.

Each pytest session owns a :class:`Counters` (see ``session.DiffevalSession``); every module
that counts writes through :data:`COUNTERS`, which forwards to the active session's
(standard library only, so any module may import it).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Counters:
    """What the caches and plans did in this process (reset at each pytest session)."""

    feature_hits: int = 0
    feature_misses: int = 0
    feature_dir: str | None = None
    feature_cache_enabled: bool = True  # --diffeval-no-cache turns it off
    plan_units: int = 0  # planned generations run (one per plan and scheduling unit)
    plan_samples: int = 0  # samples those generated (cached ones excluded)
    plan_batches: int = 0
    plan_tests: int = 0  # planned tests whose generate() call the plan served
    help_samples: int = 0  # samples an idle xdist worker made for planned tests of other workers
    lazy_hits: int = 0  # generate() calls answered from the cache without loading the pipeline
    result_hits: int = 0  # compute_metric calls answered from the result cache
    result_misses: int = 0  # compute_metric calls that computed (cacheable or not)
    result_dir: str | None = None
    oom_backoffs: list[str] = field(default_factory=list)

    def reset(self, *, feature_cache: bool = True) -> None:
        for name, value in Counters().__dict__.items():
            setattr(self, name, value)
        self.feature_cache_enabled = feature_cache

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


class _Active:
    """:data:`COUNTERS`: reads and writes go to the counters of the innermost active pytest
    session (a pytester run inside a test run counts apart and ends with its session)."""

    def __getattr__(self, name: str) -> Any:
        return getattr(_stack[-1], name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(_stack[-1], name, value)


_stack: list[Counters] = [Counters()]
COUNTERS: Counters = _Active()  # type: ignore[assignment]


def push(counters: Counters) -> int:
    """Make ``counters`` active until :func:`pop` with the returned token (a pytest session's
    configure/unconfigure; sessions end in the reverse order they start)."""
    _stack.append(counters)
    return len(_stack) - 1


def pop(token: int) -> None:
    """End what :func:`push` returned ``token`` for (and anything pushed after it); what was
    active before is active again."""
    del _stack[max(1, token):]


