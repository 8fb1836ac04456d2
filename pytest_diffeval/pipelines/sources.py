"""Where a model comes from: an embedded name, a local folder or a hub id; its
``model_index.json`` checked before diffusers reads it; the pipeline class it names; and
the errors that say where a missing model was looked for and how to fix it."""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import re
from pathlib import Path
from typing import Any

from ..embedded import resolve_embedded
from ..exceptions import PipelineNotFoundError, WeightsNotAvailableError
from ..fingerprints import hub_snapshot


def _known_pipeline_classes() -> dict[str, type]:
    """Pipeline classes shipped by this package, looked up by the name in model_index.json
    (diffusers itself would otherwise try to load them as remote code)."""
    from ..pixel_pipeline import PixelTextToImagePipeline

    return {"PixelTextToImagePipeline": PixelTextToImagePipeline}


def resolve_source(source: str | os.PathLike) -> tuple[str, Path | None]:
    """Return ``(kind, path)``: ``("embedded", path)`` for a name like ``diffeval/tiny-t2i``,
    ``("local", path)`` for an existing directory, ``("hub", None)`` otherwise."""
    text = os.fspath(source)
    embedded = resolve_embedded(text)
    if embedded is not None:
        return "embedded", embedded
    path = Path(text).expanduser()
    if path.is_dir():
        return "local", path.resolve()
    return "hub", None


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")  # "org/name" or "name", not a path


def _missing_model_error(source: str, exc: BaseException) -> PipelineNotFoundError:
    """Where a model was looked for and how to fix it; a hub id (not a path) that is not
    here is :class:`WeightsNotAvailableError`, which ``gpu`` tests turn into a skip."""
    from huggingface_hub.constants import HF_HUB_CACHE, HF_HUB_OFFLINE

    hub_id = _HUB_ID.match(source) is not None and ".." not in source
    return (WeightsNotAvailableError if hub_id else PipelineNotFoundError)(
        f"pytest-diffeval: cannot load the diffusion model {source!r}.\n"
        f"  looked for a local directory: {Path(source).expanduser().resolve()} (not found)\n"
        f"  looked in the Hugging Face cache {HF_HUB_CACHE} and the hub "
        f"(HF_HUB_OFFLINE={int(bool(HF_HUB_OFFLINE))}): {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}\n"
        "  fix: pass the path of a local copy in diffusers layout (a folder with model_index.json), "
        "e.g. one made by `huggingface-cli download <id> --local-dir DIR` on a machine with access, "
        "or set HF_HOME to a cache that holds it; embedded offline models: 'diffeval/tiny-t2i'.",
        *([source] if hub_id else []),
    )


def _not_diffusers_layout(path: Path) -> PipelineNotFoundError:
    return PipelineNotFoundError(
        f"pytest-diffeval: {path} is a directory but not a diffusers pipeline: it has no "
        "model_index.json. Fix: point at the folder that holds model_index.json (one made by "
        "`pipeline.save_pretrained(DIR)`), not at a single component or weights file."
    )


MODEL_INDEX_FIX = ("each component entry is [library, class] as `pipeline.save_pretrained(DIR)` writes it, e.g. "
                   '"unet": ["diffusers", "UNet2DConditionModel"], and "_class_name" names a diffusers pipeline class; '
                   "re-save the model or correct the entry")


def _module_exists(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def _pipelines_attribute(name: str) -> bool:
    """Whether ``diffusers.pipelines`` has ``name`` (a module registered by name, as
    :func:`_register_moved_pipeline_modules` does)."""
    from diffusers import pipelines

    try:
        return getattr(pipelines, name, None) is not None
    except ImportError:
        return False


def _library(name: str) -> Any:
    """The ``diffusers`` or ``transformers`` module (imported by name, never dynamically)."""
    if name == "transformers":
        import transformers

        return transformers
    import diffusers

    return diffusers


def check_model_index(path: Path, *, pipeline_class: type | str | None = None, custom: bool = False) -> dict[str, Any]:
    """The model folder's ``model_index.json``, checked before diffusers reads it: an object
    whose ``_class_name`` (unless ``pipeline_class`` or a custom pipeline overrides it) is a
    pipeline class diffusers or this package has, and whose component entries are
    ``[library, class]`` with a library diffusers can load from and, for ``diffusers`` and
    ``transformers``, a class that library has.  Anything else is
    :class:`PipelineNotFoundError` naming the file, the entry and the fix (diffusers' own
    errors are bare unpacking or attribute errors)."""
    file = path / "model_index.json"

    def bad(entry: str, value: Any, why: str) -> PipelineNotFoundError:
        return PipelineNotFoundError(f"pytest-diffeval: {file}: {entry} is {value!r}, {why}. Fix: {MODEL_INDEX_FIX}")

    try:
        index = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise PipelineNotFoundError(f"pytest-diffeval: {file}: cannot read it as JSON ({exc}). "
                                    f"Fix: {MODEL_INDEX_FIX}") from None
    if not isinstance(index, dict):
        raise bad("the file", type(index).__name__, "not a JSON object")
    name = index.get("_class_name")
    if pipeline_class is None and not custom and name is not None:
        import diffusers

        if not isinstance(name, str) or not (name in _known_pipeline_classes() or hasattr(diffusers, name)):
            raise bad("'_class_name'", name, "not a pipeline class of diffusers nor of pytest-diffeval "
                      "(or pass pipeline_class=)")
    for key, value in index.items():
        if key.startswith("_") or value is None or isinstance(value, (bool, int, float, dict)):
            continue  # settings such as "requires_safety_checker": true, not components
        if (not isinstance(value, (list, tuple)) or len(value) != 2
                or not all(v is None or isinstance(v, str) for v in value) or (value[0] is None) != (value[1] is None)):
            raise bad(f"entry {key!r}", value, "not a [library, class] pair")
        library, class_name = value
        if library is None:  # an optional component that is absent
            continue
        if library in ("diffusers", "transformers") and _module_exists(library):
            if not hasattr(_library(library), class_name):
                raise bad(f"entry {key!r}", value, f"but {library} has no class {class_name!r}")
        elif not (any(_module_exists(m) for m in (library, f"diffusers.pipelines.{library}",
                                                   f"diffusers.pipelines.deprecated.{library}"))
                  or _pipelines_attribute(library)):
            raise bad(f"entry {key!r}", value, f"but there is no library or diffusers pipeline module {library!r}")
    return index


def _pipeline_class(path: Path | None, pipeline_class: type | str | None) -> type:
    import diffusers

    if isinstance(pipeline_class, type):
        return pipeline_class
    known = _known_pipeline_classes()
    name = pipeline_class
    if name is None and path is not None:
        name = json.loads((path / "model_index.json").read_text()).get("_class_name")
        name = name if isinstance(name, str) else None  # a custom pipeline: diffusers resolves it
    if name in known:
        return known[name]
    if name is not None and hasattr(diffusers, name):
        return getattr(diffusers, name)
    return diffusers.DiffusionPipeline


def _register_moved_pipeline_modules() -> None:
    """Let checkpoints that name a component ``["paint_by_example", ...]`` (e.g.
    ``Fantasy-Studio/Paint-by-Example``) load again: diffusers (after 0.33) moved that pipeline
    under ``diffusers.pipelines.deprecated`` and no longer resolves the old name."""
    from diffusers import pipelines

    for name in ("paint_by_example",):
        try:
            getattr(pipelines, name)
            continue
        except (AttributeError, ImportError):
            pass
        try:
            setattr(pipelines, name, importlib.import_module(f"diffusers.pipelines.deprecated.{name}"))
        except ImportError:
            pass


def _hub_snapshot(repo_id: str, revision: str | None) -> Path | None:
    """The local snapshot folder of a hub model that ``from_pretrained`` just loaded."""
    return hub_snapshot(repo_id, revision)
