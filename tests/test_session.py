"""The session object: a pytest run inside a test (pytester, in-process) has its own
settings, counters, plans and rows, and leaves the outer session's as they were."""

from __future__ import annotations

import pytest

from pytest_diffeval import counters, settings
from pytest_diffeval.session import DiffevalSession

INNER_TEST = """
    from conftest import PIPE

    def test_two_images(generate):
        images = generate(PIPE, ["a red square", "a blue circle"], num_inference_steps=2)
        assert images.images.shape[0] == 2
"""


def test_an_in_process_run_has_its_own_session_and_leaves_the_outer_one_untouched(
        user_project: pytest.Pytester) -> None:
    outer_settings = settings.current()
    outer_counters = counters.COUNTERS.as_dict()
    user_project.makepyfile(test_inner=INNER_TEST)

    first = user_project.runpytest("-v", "-p", "no:randomly")  # in this process
    first.assert_outcomes(passed=1)
    first.stdout.fnmatch_lines(["diffeval images in this process: 2 generated, 0 from the cache *"])
    assert settings.current() is outer_settings
    assert counters.COUNTERS.as_dict() == outer_counters

    second = user_project.runpytest("-v", "-p", "no:randomly")  # counts apart: its own images, none loaded again
    second.assert_outcomes(passed=1)
    second.stdout.fnmatch_lines(["diffeval images in this process: 0 generated, 2 from the cache *"])
    assert settings.current() is outer_settings


def test_a_session_pushes_its_settings_and_counters_and_pops_them_at_its_end() -> None:
    before, hits_before = settings.current(), counters.COUNTERS.result_hits
    session = DiffevalSession(settings.Settings(clip_model="inner-clip"))
    session.start()
    try:
        assert settings.current().clip_model == "inner-clip"
        counters.COUNTERS.result_hits += 3
        assert session.counters.result_hits == 3
        settings.configure(clip_model="changed-inside")  # replaces the inner settings only
    finally:
        session.end()
    assert settings.current() is before
    assert counters.COUNTERS.result_hits == hits_before


def test_nested_sessions_end_in_reverse_order() -> None:
    outer, inner = DiffevalSession(settings.Settings(clip_model="a")), DiffevalSession(settings.Settings(clip_model="b"))
    base = settings.current()
    outer.start()
    inner.start()
    assert settings.current().clip_model == "b"
    inner.end()
    assert settings.current().clip_model == "a"
    outer.end()
    assert settings.current() is base
