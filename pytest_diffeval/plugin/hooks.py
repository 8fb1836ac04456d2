"""The hooks, as methods of objects registered per session (as pytest-mpl does): each one
reads or fills the :class:`~pytest_diffeval.session.DiffevalSession` and delegates the work.

* :class:`SessionHooks` - plans, shards, GPU markers, check rows, outputs, the summary;
* :class:`XdistHooks` - registered only where pytest-xdist is installed: the model
  scheduler, worker reports and crashes.
"""

from __future__ import annotations

import os
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import pytest

from .. import settings
from .._version import __version__
from ..baselines import remove_leftovers
from ..counters import COUNTERS
from ..exceptions import add_note
from ..generation import prefetch_images
from ..pipelines import WeightsNotAvailableError, loaded_pipelines
from ..recording import failed_checks_message, failed_checks_note
from ..report import summary_lines, write_outputs
from ..scheduling import assign_shards, entries_of, parse_shard, partition
from ..session import DiffevalSession, is_worker
from ..xdist_scheduler import make_scheduler, write_entries
from .fixtures import override, resolved_device
from .options import model_dist, value
from .summary import counter_lines, process_counters

GPU_MISSING = ("pytest-diffeval: --diffeval-require-gpu was given but no CUDA GPU is available here; a GPU runner "
               "that silently runs on the CPU is a false green. fix: check `nvidia-smi`, CUDA_VISIBLE_DEVICES and "
               "that `python -c \"import torch; print(torch.cuda.is_available())\"` prints True (a CUDA build of "
               "torch), or run without --diffeval-require-gpu to test on the CPU")


class SessionHooks:
    """The plugin's hooks for one session."""

    def __init__(self, config: pytest.Config, session: DiffevalSession) -> None:
        self.config, self.session = config, session

    # ------------------------------------------------------------------ collection

    @pytest.hookimpl(trylast=True)
    def pytest_collection_modifyitems(self, config: pytest.Config, items: list[pytest.Item]) -> None:
        """``--diffeval-shard=i/N``: keep this shard's tests (each model's tests together)."""
        shard = config.getoption("diffeval_shard")
        if not shard or not items:
            return
        index, total = parse_shard(shard)
        try:
            assigned = assign_shards(entries_of(items), total)  # machine-independent: every runner agrees
        except ValueError as exc:  # a malformed diffeval_plan marker
            raise pytest.UsageError(str(exc)) from None
        keep = [item for item in items if assigned[item.nodeid] == index - 1]
        dropped = [item for item in items if assigned[item.nodeid] != index - 1]
        if dropped:
            config.hook.pytest_deselected(items=dropped)
            items[:] = keep

    @pytest.hookimpl(tryfirst=True)
    def pytest_collection_finish(self, session: pytest.Session) -> None:
        """Read the plans of the selected tests; under ``-n`` with model scheduling, report each
        test's group to the controller and learn which tests share this worker's units."""
        planner = self.session.planner
        try:
            planner.collect(session.items)
        except ValueError as exc:
            raise pytest.UsageError(str(exc)) from None
        workerinput = getattr(session.config, "workerinput", None)
        directory = (workerinput or {}).get("diffeval_entries_dir")
        if directory:
            entries = entries_of(session.items, self._will_skip)
            write_entries(directory, str(workerinput.get("workerid", "gw")), entries)
            if planner.plans:
                planner.unit_of = partition(entries, int(workerinput.get("workercount", 1))).unit_of

    def _will_skip(self, item: pytest.Item) -> bool:
        """Whether a GPU test will be skipped here (for scheduling: it holds no model)."""
        return (item.get_closest_marker("gpu") is not None and not item.config.getoption("diffeval_require_gpu")
                and not resolved_device().startswith("cuda"))

    # ------------------------------------------------------------------ running

    def pytest_sessionstart(self, session: pytest.Session) -> None:
        if session.config.getoption("diffeval_require_gpu") and not resolved_device().startswith("cuda"):
            raise pytest.UsageError(GPU_MISSING)
        if self.session.settings.update_baselines and not is_worker(session.config):
            remove_leftovers(self.session.settings.baselines_dir)  # what killed updates left, in every test's folder

    @pytest.hookimpl(wrapper=True)
    def pytest_runtestloop(self, session: pytest.Session) -> Any:
        """An xdist worker whose tests are done helps the others before it exits (see
        :meth:`_help_with_plans`)."""
        result = yield
        if is_worker(session.config) and not (session.shouldfail or session.shouldstop):
            self._help_with_plans()
        return result

    def _help_with_plans(self) -> None:
        """Generate, into the shared image cache, the samples that planned tests still need and
        nobody has made or claimed yet, with pipelines this worker already loaded.

        The scheduler shuts a worker down once nothing is left that it may run, while another
        may still be working through a big planned test (128 samples is one test).  Claims
        (claims.py) let this worker take batches of that test's samples that its owner has not
        reached yet; the owner then reads them from the cache.  Never loads a model, never fails
        the run: a helping error is a warning."""
        cache, planner, pipelines = self.session.image_cache(), self.session.planner, loaded_pipelines()
        if cache is None or not planner.plans or pipelines is None:
            return
        dtype = value(self.config, "diffeval_dtype")
        size = int(value(self.config, "diffeval_batch_size"))
        for plan_id, plan in planner.plans.items():
            pipe = pipelines.loaded(override(plan.model), dtype=dtype, device=resolved_device())
            if pipe is None:
                continue
            wanted: set[str] = set()
            for test, test_plan in planner.test_plan.items():
                if test_plan == plan_id:
                    wanted.update(planner.test_prompts.get(test) or plan.prompts)
            prompts = [p for p in plan.prompts if p in wanted]
            try:
                COUNTERS.help_samples += prefetch_images(pipe, prompts, seeds=plan.seeds,
                                                         batch_size=plan.batch_size or size, cache=cache,
                                                         **plan.call_kwargs)
            except Exception as exc:  # noqa: BLE001 - helping is optional; the owner generates what is left
                warnings.warn(f"pytest-diffeval: an idle worker could not help with the plan of {plan.model!r}: "
                              f"{type(exc).__name__}: {exc}", UserWarning, stacklevel=1)
                return

    def pytest_runtest_logfinish(self, nodeid: str) -> None:
        self.session.planner.finished(nodeid)
        self.session.tests_run += 1

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_setup(self, item: pytest.Item) -> Any:
        if item.get_closest_marker("gpu") and not resolved_device().startswith("cuda"):
            reason = ("needs a CUDA GPU; run on a GPU machine with `pytest --diffeval-require-gpu` "
                      f"(device here: {resolved_device()})")
            if item.config.getoption("diffeval_require_gpu"):
                pytest.fail(reason)
            pytest.skip(reason)
        try:
            return (yield)
        except FileNotFoundError as exc:  # a fixture may load the hub model
            skip_missing_weights(item, exc)
            raise

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_call(self, item: pytest.Item) -> Any:
        """Failed checks of the test are kept (``recording.check_failed``) and the test goes on;
        at its end it fails once with all of them, or, when its own code raised, they are
        added to that error as a note."""
        __tracebackhide__ = True
        failed: list[str] = []
        settings.current().deferred_checks = (item.nodeid, failed)
        try:
            outcome = yield
        except BaseException as exc:
            if failed:
                add_note(exc, failed_checks_note(failed))
            if isinstance(exc, FileNotFoundError) and not failed:
                skip_missing_weights(item, exc)
            if failed and isinstance(exc, pytest.skip.Exception):  # a skip must not hide a failed check
                raise AssertionError(failed_checks_message(failed)) from exc
            raise
        finally:
            settings.current().deferred_checks = None
        if failed:
            raise AssertionError(failed_checks_message(failed))
        return outcome

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_makereport(self, item: pytest.Item, call: pytest.CallInfo[Any]) -> Any:
        outcome = yield
        report = outcome.get_result()
        if call.when == "call":
            records = self.session.settings.records
            mine = [r for r in records if r["test"] == item.nodeid]
            records[:] = [r for r in records if r["test"] != item.nodeid]
            report.diffeval = mine  # an attribute of the report travels from xdist workers to the controller
            for row in mine:
                item.user_properties.append((f"diffeval.{row['metric']}", f"{row['value']:.6g}"))
                item.user_properties.append((f"diffeval.{row['metric']}.verdict", row["verdict"]))

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        self.session.rows.extend(getattr(report, "diffeval", None) or [])
        if report.failed:  # its baseline went unused because it failed (a tripwire, say): keep it
            self.session.settings.failed_tests.add(report.nodeid)

    # ------------------------------------------------------------------ the end

    def pytest_sessionfinish(self, session: pytest.Session, exitstatus: int) -> None:
        """On the controller (all workers' rows are in by now): write ``metrics.json``, the HTML
        report and, on GitHub Actions, the step summary."""
        config = session.config
        if is_worker(config):
            config.workeroutput["diffeval_counters"] = process_counters(self.session)  # type: ignore[attr-defined]
            return
        if not self.session.rows:
            return
        current = self.session.settings
        meta = {
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "pytest_diffeval": __version__,
            "exitstatus": int(exitstatus),
            "rootdir": str(config.rootpath),
            "args": [str(a) for a in config.invocation_params.args],
            "workers": getattr(config.option, "numprocesses", None) or 0,
            "shard": config.getoption("diffeval_shard") or None,
            "results_always": current.results_always,
        }
        self.session.outputs = write_outputs(
            list(self.session.rows), results_dir=Path(current.results_dir), report=self._report_path(), meta=meta,
            outcomes=_outcomes(config), step_summary_file=os.environ.get("GITHUB_STEP_SUMMARY") or None,
        )

    def _report_path(self) -> Path:
        given = value(self.config, "diffeval_report")
        if given:
            return (Path(self.config.rootpath) / given).resolve()
        return Path(self.session.settings.results_dir) / "report.html"

    def pytest_terminal_summary(self, terminalreporter: Any, config: pytest.Config) -> None:
        if is_worker(config):
            return
        rows, outputs = self.session.rows, self.session.outputs
        if rows:
            terminalreporter.write_sep("=", "diffeval: metric checks")
            for line, bad in summary_lines(rows):
                terminalreporter.write_line(line, red=bad, bold=bad)
            if outputs is not None:
                if outputs.report:
                    terminalreporter.write_line(f"diffeval HTML report: {outputs.report}")
                if outputs.metrics:
                    terminalreporter.write_line(f"diffeval metrics: {outputs.metrics}")
                if outputs.step_summary:
                    terminalreporter.write_line(f"diffeval step summary appended to {outputs.step_summary}")
                for error in outputs.errors:
                    terminalreporter.write_line(f"diffeval: {error}", yellow=True)
        if config.getoption("verbose") > 0:
            for line in counter_lines("this process", process_counters(self.session)):
                terminalreporter.write_line(line)
            workers = self.session.worker_counters
            for worker in sorted(workers, key=lambda w: (len(w), w)):
                for line in counter_lines(worker, workers[worker]):
                    terminalreporter.write_line(line)


def _outcomes(config: pytest.Config) -> dict[str, str]:
    """pytest's outcome of each test (from the terminal reporter's statistics)."""
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    outcomes: dict[str, str] = {}
    for key in ("passed", "failed", "error", "skipped", "xfailed", "xpassed"):
        for report in getattr(reporter, "stats", {}).get(key, []):
            nodeid = getattr(report, "nodeid", None)
            if nodeid and (key in {"failed", "error"} or nodeid not in outcomes):
                outcomes[nodeid] = key
    return outcomes


def skip_missing_weights(item: pytest.Item, exc: FileNotFoundError) -> None:
    """In a ``gpu`` test, hub weights that are not here (not cached, not downloadable) skip
    the test with a reason naming the model and how to get it; under
    ``--diffeval-require-gpu`` they fail it (a GPU runner that silently skips is a false
    green).  Elsewhere a missing model stays the error it is (this returns)."""
    reason = missing_weights_reason(exc) if item.get_closest_marker("gpu") else None
    if reason is None:
        return
    if item.config.getoption("diffeval_require_gpu"):
        pytest.fail(f"{reason} (a failure, not a skip, under --diffeval-require-gpu)", pytrace=False)
    pytest.skip(reason)


def missing_weights_reason(exc: FileNotFoundError) -> str | None:
    if isinstance(exc, WeightsNotAvailableError):
        return (f"needs the weights of {exc.model_id!r}, which are neither in the Hugging Face cache nor "
                f"downloadable here; {exc.how_to_get()}")
    if type(exc).__name__ == "BackboneNotFoundError":  # a metric's CLIP/feature weights (metrics/backbones.py)
        return f"needs a metric backbone's weights that are not here: {str(exc).splitlines()[0]}"
    return None


class XdistHooks:
    """The hooks only pytest-xdist calls (registered only where it is installed)."""

    def __init__(self, config: pytest.Config, session: DiffevalSession) -> None:
        self.config, self.session = config, session
        if model_dist(config):
            session.entries_dir = tempfile.mkdtemp(prefix="diffeval-sched-")

    def pytest_xdist_make_scheduler(self, config: pytest.Config, log: Any) -> Any:
        """Under ``-n``: keep each model's tests on as few workers as possible (see xdist_scheduler.py)."""
        if self.session.entries_dir is None:
            return None
        return make_scheduler(config, log, self.session.entries_dir)

    def pytest_configure_node(self, node: Any) -> None:
        if self.session.entries_dir is not None:
            node.workerinput["diffeval_entries_dir"] = self.session.entries_dir

    def pytest_testnodedown(self, node: Any, error: Any) -> None:
        counters = getattr(node, "workeroutput", {}).get("diffeval_counters")
        if counters:
            self.session.worker_counters[str(node.gateway.id)] = counters
        if error is not None and error != "keyboard-interrupt":  # the worker crashed
            if not self.session.crashed_workers:
                node.config.pluginmanager.register(KeepBaselinesAfterCrash(self.session),
                                                   "diffeval-keep-baselines-after-crash")
            self.session.crashed_workers.append(str(node.gateway.id))


class KeepBaselinesAfterCrash:
    """After a worker crash, syrupy's unused-baseline accounting is wrong: the dead worker
    never sent its record of the baselines its tests used (its replacement sends one, so
    syrupy's own missing-report check passes), and ``--snapshot-update`` deleted them as
    unused.  So unused detection is off for that run (as syrupy does when reports are
    missing) and the terminal says why."""

    def __init__(self, session: DiffevalSession) -> None:
        self.session = session

    @pytest.hookimpl(tryfirst=True)
    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        if hasattr(session.config.option, "disable_unused_snapshots"):
            session.config.option.disable_unused_snapshots = True

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        workers = ", ".join(repr(w) for w in self.session.crashed_workers)
        terminalreporter.write_line(
            f"pytest-diffeval: worker {workers} crashed: unused-baseline detection skipped, no baseline deleted "
            "(the dead worker's record of the baselines its tests used is lost); fix: fix the crash, then run "
            "again to report or delete unused baselines", yellow=True)

