"""The hooks, as methods of objects registered per session (as pytest-mpl does): each one
reads or fills the :class:`~pytest_diffeval.session.DiffevalSession` and delegates the work.

* :class:`SessionHooks` - plans, shards, GPU markers, check rows, outputs, the summary;
* :class:`XdistHooks` - registered only where pytest-xdist is installed: the model
  scheduler, worker reports and crashes;
* :class:`DistributedHooks` - registered only under torchrun / accelerate launch: the ranks
  agree on the tests, on each outcome and on the exit status (rank 0 decides).
"""

from __future__ import annotations

import os
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import pytest
from _pytest.junitxml import xml_key  # the stash key of --junitxml's writer (unregistered on ranks > 0)

from .. import distributed, settings
from .._hashing import digest_text
from .._version import __version__
from ..baselines import remove_leftovers
from ..counters import COUNTERS
from ..durations import SPLIT_GROUP, Durations, Recorder, read_durations, write_durations
from ..exceptions import DistributedError, DurationsError, add_note
from ..generation import prefetch_images
from ..pipelines import WeightsNotAvailableError, loaded_pipelines
from ..recording import failed_checks_message, failed_checks_note
from ..report import summary_lines, write_outputs
from ..scheduling import balance, entries_of, partition
from ..session import DiffevalSession, is_worker
from ..xdist_scheduler import make_scheduler, write_entries
from .fixtures import override, resolved_device
from .options import durations_path, model_dist, sharding, skip_or_fail, value
from .summary import counter_lines, process_counters

GPU_MISSING = ("pytest-diffeval: --diffeval-require-gpu was given but no CUDA GPU is available here; a GPU runner "
               "that silently runs on the CPU is a false green. fix: check `nvidia-smi`, CUDA_VISIBLE_DEVICES and "
               "that `python -c \"import torch; print(torch.cuda.is_available())\"` prints True (a CUDA build of "
               "torch), or run without --diffeval-require-gpu to test on the CPU")


class SessionHooks:
    """The plugin's hooks for one session."""

    def __init__(self, config: pytest.Config, session: DiffevalSession) -> None:
        self.config, self.session = config, session
        self.store_durations = bool(config.getoption("diffeval_store_durations"))
        self.recorder = Recorder()
        self._groups: dict[str, str | None] = {}  # test -> group, for the durations file
        self._load_mark = 0.0  # pipeline-load seconds of this process at the last phase's end

    # ------------------------------------------------------------------ collection

    @pytest.hookimpl(trylast=True)
    def pytest_collection_modifyitems(self, config: pytest.Config, items: list[pytest.Item]) -> None:
        """``--diffeval-splits N --diffeval-group i`` (or ``--diffeval-shard=i/N``): keep this
        shard's tests, balanced by the durations file's times and model loads, each model's
        tests together; ``diffeval_split`` tests run on every shard (each makes its part)."""
        shards = sharding(config)
        if not shards or not items:
            return
        index, total = shards
        durations = self._durations(config)
        try:
            everywhere = split_tests(items)
            entries = [e for e in entries_of(items) if e.nodeid not in everywhere]
            assigned = (durations.balance(entries, total) if durations else balance(entries, total)).shard_of
        except ValueError as exc:  # a malformed diffeval_plan marker
            raise pytest.UsageError(str(exc)) from None
        keep = [item for item in items if assigned.get(item.nodeid, index - 1) == index - 1]
        if len(keep) < len(items):
            config.hook.pytest_deselected(items=[item for item in items if item not in keep])
            items[:] = keep

    def _durations(self, config: pytest.Config) -> Durations | None:
        """The durations file shards are balanced by: None (by test count) when the default file
        is absent; a named file that is absent or bad is a usage error naming it."""
        path, named = durations_path(config)
        if not named and not path.exists():
            return None
        try:
            return read_durations(path)
        except DurationsError as exc:
            raise pytest.UsageError(str(exc)) from None

    @pytest.hookimpl(tryfirst=True)
    def pytest_collection_finish(self, session: pytest.Session) -> None:
        """Read the plans of the selected tests; under ``-n`` with model scheduling, report each
        test's group to the controller and learn which tests share this worker's units."""
        planner = self.session.planner
        if self.store_durations:
            everywhere = split_tests(session.items)
            self._groups = {e.nodeid: SPLIT_GROUP if e.nodeid in everywhere else e.group
                            for e in entries_of(session.items, self._will_skip)}
            self._load_mark = _load_seconds()
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
        if self.session.settings.update_baselines and not is_worker(session.config) and distributed.is_writer():
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
            skip_or_fail(item.config, "needs a CUDA GPU; run on a GPU machine with `pytest --diffeval-require-gpu` "
                                      f"(device here: {resolved_device()})")
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
        if self.store_durations:  # travels to the xdist controller with the report
            now = _load_seconds()
            report.diffeval_timing = {"group": self._groups.get(item.nodeid), "load_s": now - self._load_mark,
                                      "process": os.getpid()}
            self._load_mark = now
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
        timing = getattr(report, "diffeval_timing", None)
        if timing is not None and not is_worker(self.config):
            self.recorder.add(report.nodeid, report.duration, timing)
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
        if self.store_durations and self.recorder.tests and distributed.is_writer():
            self._write_durations()
        if not self.session.rows or not distributed.is_writer():  # under torchrun rank 0 alone writes
            return
        current = self.session.settings
        meta = {
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "pytest_diffeval": __version__,
            "exitstatus": int(exitstatus),
            "rootdir": str(config.rootpath),
            "args": [str(a) for a in config.invocation_params.args],
            "workers": getattr(config.option, "numprocesses", None) or 0,
            "shard": "/".join(map(str, sharding(config) or ())) or None,
            "results_always": current.results_always,
        }
        self.session.outputs = write_outputs(
            list(self.session.rows), results_dir=Path(current.results_dir), report=self._report_path(), meta=meta,
            outcomes=_outcomes(config), step_summary_file=os.environ.get("GITHUB_STEP_SUMMARY") or None,
        )

    def _write_durations(self) -> None:
        """``--diffeval-store-durations``: this run's times merged into the durations file (a
        file that cannot be read is replaced, with a warning naming it)."""
        path, _ = durations_path(self.config)
        old = None
        if path.exists():
            try:
                old = read_durations(path)
            except DurationsError as exc:
                warnings.warn(f"{exc} (it is written anew from this run)", UserWarning, stacklevel=1)
        write_durations(path, self.recorder.merged_into(old))

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


def split_tests(items: list[pytest.Item]) -> set[str]:
    """The tests marked ``diffeval_split``: they run on every shard."""
    return {item.nodeid for item in items if item.get_closest_marker("diffeval_split") is not None}


def _load_seconds() -> float:
    """Seconds this process has spent loading pipelines so far."""
    pipelines = loaded_pipelines()
    return pipelines.load_seconds if pipelines is not None else 0.0


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
    if reason is not None:
        skip_or_fail(item.config, reason)


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



def torchrun_launch(config: pytest.Config) -> distributed.Launch | None:
    """This process's torchrun / accelerate launch, or None (no launch, an xdist worker, or a
    pytest run inside a rank's test).  ``-n`` inside a launch is a UsageError."""
    if is_worker(config) or distributed.current() is not None:
        return None
    try:
        launch = distributed.detect_launch()
    except DistributedError as exc:
        raise pytest.UsageError(str(exc)) from None
    refusal = distributed.xdist_refusal(launch, getattr(config.option, "numprocesses", None))
    if refusal:
        raise pytest.UsageError(refusal)
    return launch


def join_launch(config: pytest.Config, session: DiffevalSession, launch: distributed.Launch) -> None:
    """Join the launch's process group (gloo on the CPU, NCCL for CUDA tensors) for ``session``."""
    raw = value(config, "diffeval_dist_timeout")
    try:
        timeout = float(raw)
        if not timeout > 0:
            raise ValueError
    except (TypeError, ValueError):
        raise pytest.UsageError(f"pytest-diffeval: --diffeval-dist-timeout={raw!r} is not a positive number of "
                                "seconds; fix: pass e.g. --diffeval-dist-timeout=600") from None
    try:
        session.group = distributed.start(launch, device=resolved_device(), timeout=timeout)
    except DistributedError as exc:
        raise pytest.UsageError(str(exc)) from None


class DistributedHooks:
    """Under torchrun / accelerate launch: every rank collects the same tests and runs them
    (each ``generate`` makes this rank's share of the samples, see generation/run.py); rank 0
    decides each test's outcome and the exit status and every rank takes them; only rank 0
    writes (JUnit here; baselines, results and report where they are written)."""

    def __init__(self, config: pytest.Config, session: DiffevalSession) -> None:
        self.config, self.session = config, session

    @property
    def group(self) -> distributed.Group:
        assert self.session.group is not None
        return self.session.group

    @pytest.hookimpl(tryfirst=True)
    def pytest_sessionstart(self, session: pytest.Session) -> None:
        if self.group.rank != 0:  # --junitxml: rank 0's file only
            xml = self.config.stash.get(xml_key, None)
            if xml is not None:
                del self.config.stash[xml_key]
                self.config.pluginmanager.unregister(xml)

    @pytest.hookimpl(trylast=True)
    def pytest_collection_finish(self, session: pytest.Session) -> None:
        """Every rank must run the same tests in the same order (each generation is split
        over them): compare the collected ids' digests."""
        mine = digest_text("\n".join(item.nodeid for item in session.items), 16)
        try:
            digests = self.group.all_gather_json([mine, len(session.items)], "compare the collected tests")
        except DistributedError as exc:
            raise pytest.UsageError(str(exc)) from None
        if any(d != digests[0] for d in digests):
            counts = ", ".join(f"rank {r}: {d[1]} test{'' if d[1] == 1 else 's'}" for r, d in enumerate(digests))
            raise pytest.UsageError(f"pytest-diffeval: the ranks collected different tests ({counts}, or the same "
                                    "number in another order); each generation is split over the ranks, so they "
                                    "must run the same tests; fix: give every rank the same arguments, files and "
                                    "environment (no rank-dependent -k/-m or test generation)")

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_makereport(self, item: pytest.Item, call: pytest.CallInfo[Any]) -> Any:
        """Each phase's outcome is rank 0's on every rank (so a value that differs in the last
        bit on another rank cannot split the verdict); a rank missing here stops the session."""
        outcome = yield
        report = outcome.get_result()
        if self.group.broken:  # the test already failed with the message naming the missing rank
            item.session.shouldfail = self.group.broken.splitlines()[0]
            return
        try:
            decided = self.group.broadcast_json(_decision(report), f"agree on the {call.when} outcome")
        except DistributedError as exc:
            report.outcome, report.longrepr = "failed", str(exc)
            item.session.shouldfail = str(exc).splitlines()[0]  # stop: the group is broken
            return
        if self.group.rank != 0:
            _take_decision(report, decided)

    @pytest.hookimpl(wrapper=True, tryfirst=True)
    def pytest_sessionfinish(self, session: pytest.Session) -> Any:
        """After every other sessionfinish (syrupy may change the status): rank 0's exit status everywhere."""
        result = yield
        if not self.group.broken:
            try:
                session.exitstatus = int(self.group.broadcast_json(int(session.exitstatus), "agree on the exit status"))
            except DistributedError as exc:
                session.exitstatus = pytest.ExitCode.TESTS_FAILED
                warnings.warn(str(exc), UserWarning, stacklevel=1)
        # Said by every rank: torchrun's agent stops the slower ranks once one exits non-zero,
        # so its own summary may show them killed (-15) rather than with this status.
        self.config.get_terminal_writer().line(
            f"pytest-diffeval: rank {self.group.rank} of {self.group.world_size}: exit status "
            f"{int(session.exitstatus)}" + (" (rank 0's)" if not self.group.broken else " (process group broken)"))
        return result


def _decision(report: pytest.TestReport) -> dict[str, Any]:
    """What rank 0 tells the others about one phase of a test."""
    skip = list(report.longrepr) if report.skipped and isinstance(report.longrepr, tuple) else None
    return {"outcome": report.outcome, "skip": skip, "wasxfail": getattr(report, "wasxfail", None),
            "text": report.longreprtext if report.failed else ""}


def _take_decision(report: pytest.TestReport, decided: dict[str, Any]) -> None:
    """Make this rank's report say what rank 0 decided (its own failure text kept when it agrees)."""
    if decided["outcome"] == report.outcome and (not report.failed or report.longreprtext == decided["text"]):
        return
    report.outcome = decided["outcome"]
    if decided["outcome"] == "passed":
        report.longrepr = None
    elif decided["outcome"] == "skipped":
        report.longrepr = tuple(decided["skip"]) if decided["skip"] else ("", 0, "skipped on rank 0")
    else:
        report.longrepr = f"rank 0 decided this outcome (every rank reports it):\n{decided['text']}"
    if decided["wasxfail"] is not None:
        report.wasxfail = decided["wasxfail"]
    elif hasattr(report, "wasxfail"):
        del report.wasxfail
