"""The child side of an external metric: a stdlib-only program that runs a scorer in another
Python environment and answers pytest-diffeval over JSON on stdin/stdout (protocol 1).

It imports nothing but the standard library and the scorer module, so the other environment
needs neither torch nor pytest-diffeval: the plugin runs this very file by its path
(``/other/venv/bin/python /path/to/pytest_diffeval/external_child.py``); you may also copy it
anywhere, or run ``python -m pytest_diffeval.external_child`` where the plugin is installed.
Works on Python 3.8 and later.

Protocol 1: the parent writes ONE JSON object to stdin and closes it; the child writes ONE
JSON object to stdout and exits 0.  Anything else (a non-zero exit, no or several objects)
is an error the parent reports with the tail of stderr.

* ``{"protocol": 1, "op": "describe", "scorer": "module:function", "pythonpath": [...],
  "options": {...}}`` -> ``{"protocol": 1, "python": "3.11.7", "implementation": "cpython",
  "executable": ..., "packages": {distribution: version, ...}, "key_packages": {...},
  "scorer": {"module": ..., "file": ..., "sha256": ..., "info": {...}}}``
* ``{"protocol": 1, "op": "score", "scorer": ..., "pythonpath": [...], "options": {...},
  "images": [png path, ...], "prompts": [...], "seeds": [...]}`` -> ``{"protocol": 1,
  "values": [float, ...]}`` (one per image, in order).

The scorer module defines ``score(images, prompts, **options) -> sequence of floats`` (the
function name is the part after ``:``, default ``score``) and may define ``info(**options)
-> dict`` whose string values (e.g. ``"version"``, ``"weights"``: a content hash of its
weights) join the cache key.  While the scorer runs, the real stdout is redirected to stderr
(at the file-descriptor level), so a library that prints cannot corrupt the reply.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import platform
import sys
from importlib import metadata

PROTOCOL = 1


def _own_folder_off_path() -> None:
    """Run by its path, Python puts this file's folder (the plugin's package) first on
    ``sys.path``; its modules (``settings``, ``exceptions``...) must not shadow the scorer's."""
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != here]


def _load(spec, pythonpath):
    """The scorer module and its function from ``module:function`` (or a ``.py`` path)."""
    module_name, _, function = spec.partition(":")
    for folder in reversed(pythonpath):
        sys.path.insert(0, folder)
    module = importlib.import_module(module_name)
    return module, getattr(module, function or "score")


def _packages():
    found = {}
    for dist in metadata.distributions():
        name = dist.metadata["Name"]
        if name:  # the first on sys.path is the one imported
            found.setdefault(str(name), str(dist.version))
    return found


def _key_packages(before, packages):
    """The distributions of the modules importing the scorer brought in (3.10+; else {})."""
    mapping = getattr(metadata, "packages_distributions", None)
    if mapping is None:
        return {}
    tops = {name.split(".")[0] for name in sys.modules if name not in before}
    owners = mapping()
    names = {dist for top in tops for dist in owners.get(top, ())}
    lowered = {name.lower(): name for name in packages}
    return {lowered[n.lower()]: packages[lowered[n.lower()]] for n in sorted(names) if n.lower() in lowered}


def _file_sha256(path):
    if not path or not os.path.isfile(path):
        return None
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _describe(request):
    before = set(sys.modules)
    module, _ = _load(request["scorer"], request.get("pythonpath") or [])
    info_func = getattr(module, "info", None)
    info = dict(info_func(**(request.get("options") or {}))) if callable(info_func) else {}
    packages = _packages()
    file = getattr(module, "__file__", None)
    return {"python": platform.python_version(), "implementation": sys.implementation.name,
            "executable": sys.executable, "prefix": sys.prefix, "packages": packages,
            "path": [p for p in sys.path if p and os.path.isdir(p)],
            "key_packages": _key_packages(before, packages),
            "scorer": {"module": module.__name__, "file": file, "sha256": _file_sha256(file),
                       "info": {str(k): str(v) for k, v in info.items()}}}


def _number(value):
    if isinstance(value, (bool, int, float)) or value is None:
        return value
    if hasattr(value, "item"):  # a numpy scalar
        return value.item()
    return value  # anything else: the parent rejects the reply, naming it


def _score(request):
    _, func = _load(request["scorer"], request.get("pythonpath") or [])
    values = func(list(request["images"]), list(request.get("prompts") or []), **(request.get("options") or {}))
    if hasattr(values, "tolist"):
        values = values.tolist()
    try:
        values = [_number(v) for v in values]
    except TypeError:  # not iterable: sent as it is, refused by the parent
        pass
    return {"values": values}


def main():
    _own_folder_off_path()
    reply_fd = os.dup(1)
    os.dup2(2, 1)  # the scorer's prints (Python or C) go to stderr, never into the reply
    sys.stdout = sys.stderr
    request = json.loads(sys.stdin.read())
    if not isinstance(request, dict) or request.get("protocol") != PROTOCOL:
        sys.stderr.write("pytest-diffeval external child: this child speaks protocol %d, the request was %r\n"
                         % (PROTOCOL, request.get("protocol") if isinstance(request, dict) else request))
        return 2
    operations = {"describe": _describe, "score": _score}
    if request.get("op") not in operations:
        sys.stderr.write("pytest-diffeval external child: unknown op %r\n" % (request.get("op"),))
        return 2
    reply = dict(operations[request["op"]](request), protocol=PROTOCOL)
    text = json.dumps(reply, default=repr)
    with os.fdopen(reply_fd, "w", encoding="utf-8") as out:
        out.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
