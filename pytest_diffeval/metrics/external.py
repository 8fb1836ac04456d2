"""Metrics in their own environment: a scorer run by another Python interpreter (a virtual
environment with its own pins, e.g. ImageReward's old transformers), spoken to over JSON.

::

    from pytest_diffeval.metrics.external import register_external_metric

    register_external_metric("brightness_ext", python="/opt/scorer-venv/bin/python",
                             module="scorers/brightness.py:score", higher_is_better=True, timeout=600)

The plugin runs ``python pytest_diffeval/external_child.py`` (a stdlib-only file, so the other
environment needs neither torch nor this plugin), writes the images as PNG files into a fresh
temporary folder (lossless for uint8 RGB, readable by any image library without torch or
safetensors; removed afterwards) and speaks protocol 1 (see ``external_child``): a
``describe`` handshake (interpreter, Python version, every installed distribution's version,
the scorer file's sha256 and its ``info()``), then ``score`` (one float per image).  Only JSON
is read back, validated (one object, this protocol, one finite number per image); nothing of
the child's output is executed or unpickled.

Results are cached like any metric's: the key holds the handshake (Python and package
versions, the scorer's file and ``info()``), the content hash of ``weights=`` (hashed here)
and the options.  The handshake is remembered per process until a folder on the child's
``sys.path`` or the scorer file changes (a ``pip install`` there).  The environment is shown
in the result's ``details`` (and so in baselines and ``metrics.json``); the backbone, part of a
baseline's signature, names the scorer, its ``info()`` version and the weights hash.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .. import external_child
from .._hashing import digest_json
from .._io import atomic_path
from ..exceptions import (
    ExternalInterpreterNotFoundError,
    ExternalMetricError,
    ExternalMetricTimeout,
    MetricInputError,
    NonFiniteMetricError,
    WeightsFileNotFoundError,
)
from ..fingerprints import path_fingerprint
from . import Metric, _where_nonfinite, register_metric
from .result import MetricResult
from .result_cache import canonical

PROTOCOL = external_child.PROTOCOL
CHILD = Path(external_child.__file__).resolve()
_REPLY_LIMIT = 64 << 20  # bytes of stdout read back at most
_STDERR_LINES = 20


@dataclass(frozen=True)
class ExternalScorer:
    """Where and how a scorer runs: ``python`` (the other environment's interpreter),
    ``scorer`` (``module[:function]`` importable there, or ``path/to/file.py[:function]``;
    function default ``score``), ``options`` sent to it (JSON), ``weights`` (a file or folder
    hashed here and passed as ``weights=``), extra ``pythonpath`` folders, the ``timeout`` in
    seconds per child run, and ``command``: a program of its own that speaks protocol 1,
    run instead of ``python external_child.py``."""

    python: str
    scorer: str
    timeout: float = 600.0
    options: Mapping[str, Any] = field(default_factory=dict)
    weights: str | None = None
    pythonpath: tuple[str, ...] = ()
    command: tuple[str, ...] | None = None

    def argv(self) -> list[str]:
        return list(self.command) if self.command else [self.python, str(CHILD)]

    def target(self) -> tuple[str, list[str]]:
        """``(module:function, pythonpath)`` as the child takes them: a ``.py`` path becomes
        its module name with its folder on the path."""
        head, _, function = self.scorer.rpartition(":")
        if not (head and function.isidentifier()):
            head, function = self.scorer, "score"
        paths = [str(Path(p).resolve()) for p in self.pythonpath]
        if head.endswith(".py"):
            file = Path(head).expanduser().resolve()
            if not file.is_file():
                raise MetricInputError(f"pytest-diffeval: external scorer file {file} does not exist; fix: pass "
                                       "module='path/to/scorer.py' of an existing file, or an importable module name")
            return f"{file.stem}:{function}", [str(file.parent), *paths]
        return f"{head}:{function}", [*paths, os.getcwd()]


@dataclass(frozen=True)
class Environment:
    """What the child's ``describe`` handshake said about its environment and scorer."""

    interpreter: str
    python: str
    implementation: str
    packages: dict[str, str]
    key_packages: dict[str, str]
    scorer: dict[str, Any]

    def key(self) -> dict[str, Any]:
        """Cache-key material: everything but where the interpreter lives."""
        return {"python": self.python, "implementation": self.implementation, "packages": self.packages,
                "scorer": {k: self.scorer.get(k) for k in ("module", "sha256", "info")}}

    def details(self) -> dict[str, str]:
        """Flat strings for ``MetricResult.details`` (kept in baselines and ``metrics.json``)."""
        shown = self.key_packages or self.packages
        return {"interpreter": self.interpreter, "python": f"{self.implementation} {self.python}",
                "packages": ", ".join(f"{k}=={v}" for k, v in sorted(shown.items())),
                "environment": digest_json(self.packages, 16), "scorer": str(self.scorer.get("module")),
                "scorer_sha256": str(self.scorer.get("sha256") or "-"), "protocol": str(PROTOCOL)}


def check_interpreter(name: str, scorer: ExternalScorer) -> None:
    """Raise :class:`ExternalInterpreterNotFoundError` when the program to run is missing."""
    program = scorer.argv()[0]
    found = Path(program).expanduser() if os.sep in program or (os.altsep and os.altsep in program) else None
    if found is None:
        located = shutil.which(program)
        found = Path(located) if located else None
    if found is None or not found.is_file() or not os.access(found, os.X_OK):
        what = "does not exist" if found is None or not found.exists() else "is not an executable file"
        raise ExternalInterpreterNotFoundError(
            f"pytest-diffeval: external metric {name!r}: the interpreter {program} {what}; fix: create that "
            "environment (python3 -m venv ENV && ENV/bin/pip install <the scorer's packages>) and pass python= "
            "its bin/python (Scripts\\python.exe on Windows)")


def _tail(text: str) -> str:
    lines = text.strip().splitlines()[-_STDERR_LINES:]
    return "\n".join(f"    | {line}" for line in lines) if lines else "    (stderr was empty)"


def run_child(name: str, scorer: ExternalScorer, request: dict[str, Any]) -> dict[str, Any]:
    """Run the child once with ``request`` and return its validated JSON reply (a dict of
    this protocol); a crash, timeout or malformed reply is a clear error naming ``name`` and
    the interpreter.  On timeout the child's whole process group is killed."""
    check_interpreter(name, scorer)
    where = f"external metric {name!r} (interpreter {scorer.argv()[0]}, {request['op']})"
    payload = json.dumps({"protocol": PROTOCOL, **request}).encode()
    with tempfile.TemporaryFile() as stderr:
        process = subprocess.Popen(scorer.argv(), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr,
                                   start_new_session=os.name == "posix")
        try:
            out, _ = process.communicate(payload, timeout=scorer.timeout)
        except subprocess.TimeoutExpired:
            _kill_group(process)
            stderr.seek(0)
            error = ExternalMetricTimeout(
                f"pytest-diffeval: {where} gave no answer within {scorer.timeout:g} s; its process group was killed.\n"
                f"  stderr (last lines):\n{_tail(stderr.read().decode(errors='replace'))}\n"
                "  fix: raise timeout= of the external metric, or find what the scorer waits for (a download? "
                "a lock? a prompt on stdin?)")
            raise _named(error, name, scorer) from None
        stderr.seek(0)
        err_text = stderr.read().decode(errors="replace")
    if process.returncode != 0:
        raise _named(ExternalMetricError(
            f"pytest-diffeval: {where} crashed: the child exited with code {process.returncode}.\n"
            f"  stderr (last lines):\n{_tail(err_text)}\n"
            "  fix: the child's traceback is in the stderr above; a package missing there: install it with that "
            "environment's pip; to debug, call the scorer's score() by hand with that interpreter"), name, scorer)
    return _parse(where, name, scorer, out, err_text)


def _kill_group(process: subprocess.Popen[bytes]) -> None:
    try:
        if os.name == "posix":
            os.killpg(process.pid, signal.SIGKILL)
        else:
            process.kill()
    except (ProcessLookupError, PermissionError):
        pass
    process.communicate()


def _named(error: ExternalMetricError, name: str, scorer: ExternalScorer) -> ExternalMetricError:
    error.metric, error.interpreter = name, scorer.argv()[0]
    return error


def _malformed(where: str, name: str, scorer: ExternalScorer, what: str, err_text: str = "") -> ExternalMetricError:
    tail = f"\n  stderr (last lines):\n{_tail(err_text)}" if err_text.strip() else ""
    return _named(ExternalMetricError(
        f"pytest-diffeval: {where} sent a malformed reply: {what}{tail}\n"
        f"  fix: the child must print one JSON object of protocol {PROTOCOL} on stdout and nothing else "
        f"(the plugin's {CHILD.name} does; a scorer's score() returns one number per image)"), name, scorer)


def _parse(where: str, name: str, scorer: ExternalScorer, out: bytes, err_text: str) -> dict[str, Any]:
    if len(out) > _REPLY_LIMIT:
        raise _malformed(where, name, scorer, f"{len(out)} bytes, more than any reply", err_text)
    try:
        reply = json.loads(out.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise _malformed(where, name, scorer, f"not one JSON object ({exc}); it began {out[:80]!r}", err_text) from None
    if not isinstance(reply, dict):
        raise _malformed(where, name, scorer, f"a JSON {type(reply).__name__}, not an object", err_text)
    if reply.get("protocol") != PROTOCOL:
        raise _malformed(where, name, scorer, f"protocol {reply.get('protocol')!r}, this plugin speaks {PROTOCOL} "
                         "(a copy of external_child.py from another pytest-diffeval version?)", err_text)
    return reply


# --------------------------------------------------------------------------- the two operations

_DESCRIBED: dict[str, tuple[Environment, dict[str, int | None]]] = {}


def _stamps(paths: Sequence[Any]) -> dict[str, int | None]:
    """``mtime_ns`` of each path (None when gone): a ``pip install`` changes its site-packages'."""
    found: dict[str, int | None] = {}
    for path in paths[:64]:
        try:
            found[str(path)] = os.stat(str(path)).st_mtime_ns
        except (OSError, TypeError, ValueError):
            found[str(path)] = None
    return found


def describe(name: str, scorer: ExternalScorer) -> Environment:
    """The child's environment (the ``describe`` handshake), remembered per process while
    the folders on its ``sys.path`` and the scorer file are unchanged."""
    target, pythonpath = scorer.target()
    request = {"op": "describe", "scorer": target, "pythonpath": pythonpath, "options": sent_options(name, scorer, {})}
    memo = json.dumps([scorer.argv(), request], sort_keys=True)
    if memo in _DESCRIBED:
        environment, stamps = _DESCRIBED[memo]
        if _stamps(list(stamps)) == stamps:
            return environment
    reply = run_child(name, scorer, request)
    where = f"external metric {name!r} (interpreter {scorer.argv()[0]}, describe)"
    packages, key_packages, described = reply.get("packages"), reply.get("key_packages", {}), reply.get("scorer")
    for field_name, value in (("packages", packages), ("key_packages", key_packages)):
        if not (isinstance(value, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in value.items())):
            raise _malformed(where, name, scorer, f"{field_name!r} is {str(value)[:80]}, not an object of strings")
    if not (isinstance(described, dict) and isinstance(described.get("info", {}), dict)
            and isinstance(reply.get("python"), str)):
        raise _malformed(where, name, scorer, "'python' (a string) or 'scorer' (an object) is missing")
    environment = Environment(interpreter=str(reply.get("executable") or scorer.argv()[0]), python=reply["python"],
                              implementation=str(reply.get("implementation", "?")), packages=dict(packages),
                              key_packages=dict(key_packages), scorer=dict(described))
    listed = reply.get("path") if isinstance(reply.get("path"), list) else []
    watched = [*(p for p in listed if isinstance(p, str)), *pythonpath]
    if isinstance(described.get("file"), str):
        watched.append(described["file"])
    _DESCRIBED[memo] = (environment, _stamps(watched))
    return environment


def sent_options(name: str, scorer: ExternalScorer, options: Mapping[str, Any]) -> dict[str, Any]:
    """The declared options with the call's on top (and ``weights=``), checked to be JSON."""
    merged = {**scorer.options, **options}
    if scorer.weights is not None:
        merged["weights"] = str(Path(scorer.weights).expanduser().resolve())
    for key, value in merged.items():
        try:
            json.dumps(value, allow_nan=False)
        except (TypeError, ValueError):
            raise MetricInputError(f"pytest-diffeval: external metric {name!r}: option {key}={value!r} cannot be sent "
                                   "as JSON; fix: pass strings, numbers, booleans, lists or dicts of them (a path "
                                   "as a string)") from None
    return merged


def weights_identity(name: str, scorer: ExternalScorer) -> str | None:
    """The content hash of ``weights=`` (``file:<hash>`` / ``dir:<hash>``), hashed here."""
    if scorer.weights is None:
        return None
    found = path_fingerprint(scorer.weights)
    if found == "missing":
        raise WeightsFileNotFoundError(f"pytest-diffeval: external metric {name!r}: weights {scorer.weights} "
                                       "(weights=) does not exist; fix: pass weights= an existing file or folder")
    return found


def score(name: str, scorer: ExternalScorer, images: Any, options: Mapping[str, Any]) -> np.ndarray:
    """Per-sample values of ``images`` from the child (``score``), validated: one finite
    number per image."""
    target, pythonpath = scorer.target()
    sent = sent_options(name, scorer, options)
    from PIL import Image

    with tempfile.TemporaryDirectory(prefix="diffeval-external-") as folder:
        paths = []
        for index, pixels in enumerate(images.images):
            path = Path(folder) / f"{index:06d}.png"
            with atomic_path(path) as tmp:
                Image.fromarray(np.ascontiguousarray(pixels), "RGB").save(tmp, format="PNG", compress_level=1)
            paths.append(str(path))
        reply = run_child(name, scorer, {"op": "score", "scorer": target, "pythonpath": pythonpath, "options": sent,
                                         "images": paths, "prompts": [str(p) for p in images.prompts],
                                         "seeds": [int(s) for s in images.seeds]})
    return _values(name, scorer, images, reply)


def _values(name: str, scorer: ExternalScorer, images: Any, reply: dict[str, Any]) -> np.ndarray:
    where = f"external metric {name!r} (interpreter {scorer.argv()[0]}, score)"
    values = reply.get("values")
    if not isinstance(values, list):
        raise _malformed(where, name, scorer, f"'values' is {str(values)[:80]}, not a list of numbers")
    if len(values) != len(images):
        raise _named(ExternalMetricError(
            f"pytest-diffeval: {where} sent {len(values)} values for {len(images)} images.\n"
            "  fix: the scorer's score(images, prompts, **options) must return one number per image path, in the "
            "order given"), name, scorer)
    for index, value in enumerate(values):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _malformed(where, name, scorer, f"values[{index}] is {str(value)[:80]!r}, not a number")
    array = np.asarray(values, dtype=np.float64)
    bad = np.flatnonzero(~np.isfinite(array)).tolist()
    if bad:
        result = MetricResult(name, math.nan, "", True, per_sample=array)
        error = NonFiniteMetricError(
            f"pytest-diffeval: {where} gave a non-finite result: {_where_nonfinite(images, result, array, bad)}. "
            "No verdict is given on bad data.\n"
            "  fix: look at those images and at the scorer (a division by zero? NaN weights?); score() must "
            "return finite numbers")
        error.metric = name
        raise error
    return array


# --------------------------------------------------------------------------- the metric


class ExternalMetric(Metric):
    """A per-sample metric computed by a scorer in another environment (the mean is the
    value); cacheable, keyed by the environment, the scorer, its weights and the options.

    Under torchrun each rank's child scores that rank's block of the set (its images, prompts,
    seeds and the call options named in ``per_sample_options``, sliced) and the values are
    gathered, unless ``sample_wise=False`` (a scorer whose values depend on the other images
    of the set: it then gets the whole set, its pixels gathered)."""

    per_sample = True
    cacheable = True

    def __init__(self, name: str, scorer: ExternalScorer, *, higher_is_better: bool = True,
                 absolute_tolerance: float = 0.0, relative_tolerance: float = 0.0, binary: bool | None = None,
                 sample_wise: bool = True, per_sample_options: Sequence[str] = ()) -> None:
        self.name, self.scorer = name, scorer
        self.higher_is_better, self.binary = higher_is_better, binary
        self.absolute_tolerance, self.relative_tolerance = absolute_tolerance, relative_tolerance
        self.sample_wise = sample_wise
        self.per_sample_options = ((per_sample_options,) if isinstance(per_sample_options, str)
                                   else tuple(per_sample_options))

    def environment(self) -> Environment:
        return describe(self.name, self.scorer)

    def backbone(self, environment: Environment) -> str:
        """``external:<module>[@<info version>][+weights:<hash>]``: what a baseline must share."""
        version = environment.scorer.get("info", {}).get("version")
        weights = weights_identity(self.name, self.scorer)
        return (f"external:{environment.scorer.get('module')}" + (f"@{version}" if version else "")
                + (f"+weights:{weights.split(':')[-1][:12]}" if weights else ""))

    def cache_material(self, images: Any, options: dict[str, Any]) -> Any:
        sent = sent_options(self.name, self.scorer, options)
        return {"environment": self.environment().key(), "scorer": self.scorer.scorer,
                "command": bool(self.scorer.command), "weights": weights_identity(self.name, self.scorer),
                "options": {k: canonical(v, top=True) for k, v in sorted(sent.items()) if k != "weights"}}

    def compute(self, images: Any, **options: Any) -> MetricResult:
        environment = self.environment()
        backbone = self.backbone(environment)  # a missing weights file fails before any scoring
        values = score(self.name, self.scorer, images, options)
        return MetricResult(self.name, float(values.mean()), backbone, self.higher_is_better,
                            per_sample=values, details=environment.details())


def register_external_metric(name: str, *, python: str | os.PathLike[str], module: str,
                             higher_is_better: bool = True, timeout: float = 600.0,
                             options: Mapping[str, Any] | None = None, weights: str | os.PathLike[str] | None = None,
                             pythonpath: Sequence[str | os.PathLike[str]] = (), command: Sequence[str] | None = None,
                             absolute_tolerance: float = 0.0, relative_tolerance: float = 0.0,
                             binary: bool | None = None, sample_wise: bool = True,
                             per_sample_options: Sequence[str] = ()) -> ExternalMetric:
    """Register ``name`` as a metric computed by ``module`` (``module[:function]`` or
    ``file.py[:function]``) under the interpreter ``python``; see :class:`ExternalScorer`.
    Nothing runs until the metric is first computed.  Under torchrun each rank scores its
    block (``per_sample_options``: call options holding one entry per image, sliced with it);
    ``sample_wise=False`` for a scorer whose values depend on the whole set."""
    if not (isinstance(timeout, (int, float)) and timeout > 0):
        raise MetricInputError(f"pytest-diffeval: external metric {name!r}: timeout={timeout!r} is not a positive "
                               "number of seconds; fix: e.g. timeout=600")
    scorer = ExternalScorer(python=os.fspath(python), scorer=module, timeout=float(timeout),
                            options=dict(options or {}), weights=None if weights is None else os.fspath(weights),
                            pythonpath=tuple(os.fspath(p) for p in pythonpath),
                            command=tuple(command) if command else None)
    sent_options(name, scorer, {})  # options that cannot be sent fail here, at registration
    metric = ExternalMetric(name, scorer, higher_is_better=higher_is_better, absolute_tolerance=absolute_tolerance,
                            relative_tolerance=relative_tolerance, binary=binary, sample_wise=sample_wise,
                            per_sample_options=per_sample_options)
    register_metric(metric)
    return metric


def current_python() -> str:
    """This process's interpreter: an external metric whose packages are installed here."""
    return sys.executable


__all__ = ["CHILD", "PROTOCOL", "Environment", "ExternalMetric", "ExternalScorer", "current_python", "describe",
           "register_external_metric", "run_child", "score"]
