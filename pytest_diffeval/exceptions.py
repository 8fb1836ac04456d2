"""Every exception and warning pytest-diffeval raises, under one root, :class:`DiffevalError`.

Each class also derives from the builtin type callers already catch (a missing model is a
``FileNotFoundError``, a failed check an ``AssertionError``), so ``except DiffevalError``
catches all of the plugin's own errors and existing ``except ValueError`` clauses keep
working.  Messages start with ``pytest-diffeval:`` and name the file or value and the fix.
Standard library only: every module may import this one.
"""

from __future__ import annotations


class DiffevalError(Exception):
    """Root of pytest-diffeval's own errors."""

    def __str__(self) -> str:  # KeyError's str() would quote the message
        return str(self.args[0]) if len(self.args) == 1 else super().__str__()


class DiffevalInputError(DiffevalError):
    """A clear error about a metric's input, options or set-up (it names the value and the
    fix): ``compute_metric`` lets it through unchanged."""


# --------------------------------------------------------------------------- models and inputs


class PipelineNotFoundError(DiffevalError, FileNotFoundError):
    """A model source could not be found locally nor in the Hugging Face cache/hub."""


class WeightsNotAvailableError(PipelineNotFoundError):
    """A hub model (or hub LoRA) is neither in the local Hugging Face cache nor downloadable
    here.  In a test marked ``gpu`` the plugin turns it into a skip whose reason names the
    model and how to get it, and into a failure under ``--diffeval-require-gpu``."""

    def __init__(self, message: str, model_id: str) -> None:
        super().__init__(message)
        self.model_id = model_id

    def how_to_get(self) -> str:
        return (f"fetch them with `huggingface-cli download {self.model_id}` (into the Hugging Face cache; "
                "on another machine, then point HF_HOME at a copy of that cache), or point the test at a "
                f"local copy with --diffeval-model={self.model_id}=PATH")


class InputError(DiffevalError, ValueError):
    """Inputs of a generation that do not fit the pipeline or each other (raised before
    anything is generated)."""


class PromptSetNotFoundError(DiffevalError, FileNotFoundError):
    """A prompt set file that is neither local nor obtainable from the hub."""


class PromptTruncatedWarning(UserWarning):
    """A prompt is longer than the pipeline's text encoder takes: its tail is cut."""


# --------------------------------------------------------------------------- metrics


class MetricInputError(DiffevalInputError, ValueError):
    """An image set, option or reference a metric cannot use."""


class MissingDependencyError(DiffevalInputError, ModuleNotFoundError):
    """A package a metric needs is not installed (the message names what to install)."""


class WeightsFileNotFoundError(DiffevalInputError, FileNotFoundError):
    """A metric's weights file does not exist (the message names the file, the option and the fix)."""


class UnknownMetricError(DiffevalInputError, KeyError):
    """No metric is registered under the name asked for."""


class ReferenceSetError(DiffevalInputError, ValueError):
    """A reference image set or statistics file that cannot be used."""


class BackboneNotFoundError(DiffevalInputError, FileNotFoundError):
    """A metric backbone (CLIP model, feature weights) could not be found."""


class QuestionFileError(DiffevalInputError, ValueError):
    """A VQA question file (TIFA/DSG/GenEval 2 style) that cannot be used: the message names
    the file, the line or field and the fix."""


class MetricError(DiffevalError, RuntimeError):
    """An unexpected exception inside a metric, raised again naming the metric (the original
    is its ``__cause__``).  Raised as a subclass that is also the original's type (a
    ``ValueError`` stays catchable as one), see ``metrics.metric_error``."""

    metric: str = ""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class NonFiniteMetricError(MetricError, ValueError):
    """A metric gave NaN or inf: no verdict is given on such a value."""


class ExternalInterpreterNotFoundError(DiffevalInputError, FileNotFoundError):
    """An external metric's Python interpreter (``python=``) does not exist or cannot run
    (``metrics/external.py``)."""


class ExternalMetricError(MetricError):
    """An external metric's child process crashed, or its reply broke protocol 1 (not one
    JSON object, another protocol, wrong length, not numbers); the message names the metric,
    the interpreter, the exit code and the tail of the child's stderr."""

    interpreter: str = ""


class ExternalMetricTimeout(ExternalMetricError, TimeoutError):
    """An external metric's child did not answer within its ``timeout``; its process group was killed."""


# --------------------------------------------------------------------------- checks and baselines


class TripwireError(DiffevalError, AssertionError):
    """The images are broken in a way no metric should be asked to judge."""


class BaselineError(DiffevalError, AssertionError):
    """A baseline that is missing, unreadable or recorded under other conditions.
    Always a failure: never a skip, never a silent comparison."""


class BaselineFormatError(DiffevalError, ValueError):
    """A baseline file that cannot be parsed; ``newer`` when a newer pytest-diffeval wrote it."""

    def __init__(self, reason: str, *, newer: bool = False) -> None:
        super().__init__(reason)
        self.newer = newer


# --------------------------------------------------------------------------- scaling out


class DurationsError(DiffevalError, ValueError):
    """A durations file (``--diffeval-durations``) that cannot be read or holds bad values;
    the message names the file, the entry and the fix."""


class SplitError(DiffevalError, ValueError):
    """A generation split across CI shards (``diffeval_split``) that cannot be split, measured
    or merged as asked; the message names the test, the file or the value and the fix."""


# --------------------------------------------------------------------------- reports


class UnsafePath(DiffevalError, ValueError):
    """A file name read from a file (``samples.json``, ``metrics.json``, a thumbnail index)
    that would lead outside the folder it must stay in."""


class ReviewError(DiffevalError):
    """Input of ``python -m pytest_diffeval`` that cannot be read; the message names the file."""


class DistributedError(DiffevalError, RuntimeError):
    """A session spread over torch.distributed ranks (torchrun, accelerate launch) that cannot
    go on: a bad launch environment, ranks that disagree, or a rank that died or hangs (the
    message names the rank, the collective and the test)."""


def add_note(exc: BaseException, note: str) -> None:
    """``exc.add_note(note)`` (PEP 678, Python 3.11+); on Python 3.10, which has no notes, the
    note is appended to the exception's message instead, so it is shown either way."""
    if hasattr(exc, "add_note"):
        exc.add_note(note)
    elif exc.args and isinstance(exc.args[0], str):
        exc.args = (f"{exc.args[0]}\n{note}", *exc.args[1:])
    else:
        exc.args = (*exc.args, note)


class ConversionError(DiffevalInputError, ValueError):
    """A weights file that ``convert-weights`` cannot convert; the message names it and the fix."""
