"""Question files for question-based alignment (TIFA, DSG, GenEval 2's Soft-TIFA), read from a
path the user gives (the package ships none: their licences differ), and the questions
generated from the parts of the embedded prompts.

One file holds, per prompt, questions with their choices and correct answer, and optional
DSG parent/child dependencies.  JSON (a list of records, or ``{prompt: [questions]}``) or
JSONL (one record a line).  Accepted record shapes::

    {"caption": P, "question": Q, "choices": [...], "answer": A, "id": ...}       # TIFA, one per question
    {"text": P, "proposition_id": 2, "question_natural_language": Q,
     "dependency": "1"}                                                           # DSG (answer: yes)
    {"prompt": P, "questions": [{"id": 1, "question": Q, "answer": "yes",
                                 "choices": [...], "parents": [0]}, ...]}         # grouped
    {"prompt": P, "vqa_list": [[Q, A], ...]}                                      # GenEval 2

Choices default to Yes/No; answers and choices compare case-insensitively; a parent id of
``0`` (DSG's "no parent") is ignored.  A bad file raises :class:`QuestionFileError` naming the
file, the line (JSONL) or record, the field and the fix.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .._hashing import digest_bytes
from ..embedded.data import parse_caption
from ..exceptions import QuestionFileError

YES_NO = ("Yes", "No")  # t2v_metrics' spelling; a file's "yes" matches it (answers compare case-insensitively)


@dataclass(frozen=True)
class Question:
    """One question about an image: the correct answer among ``choices``, and the ids of the
    questions it depends on (DSG: it counts only when they are answered correctly)."""

    id: str
    text: str
    answer: str
    choices: tuple[str, ...] = YES_NO
    parents: tuple[str, ...] = ()


@dataclass(frozen=True)
class QuestionSet:
    """The questions of every prompt, and where they came from: ``sha256`` of the file's
    bytes (``"generated:embedded"`` for generated ones), recorded in baseline signatures."""

    source: str
    sha256: str
    by_prompt: dict[str, tuple[Question, ...]]

    def for_prompt(self, prompt: str) -> tuple[Question, ...]:
        """The questions of ``prompt`` (compared stripped); a prompt the file lacks is an error."""
        found = self.by_prompt.get(prompt.strip())
        if found is None:
            raise QuestionFileError(
                f"pytest-diffeval: the question file {self.source} has no questions for the prompt {prompt!r} "
                f"(it has {len(self.by_prompt)} prompt{'s' if len(self.by_prompt) != 1 else ''}); fix: add questions for "
                f"it, or generate the images "
                "from the file's prompts")
        return found


def _fail(source: str, where: str, problem: str, fix: str) -> QuestionFileError:
    return QuestionFileError(f"pytest-diffeval: question file {source}, {where}: {problem}; fix: {fix}")


def _records(path: Path) -> list[tuple[str, Any]]:
    """``(where, record)`` for each record of a JSON or JSONL file."""
    text = path.read_text(encoding="utf-8-sig")
    source = str(path)
    if not text.strip():
        raise _fail(source, "line 1", "the file is empty", "write one JSON record per question or prompt")
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        data = None
        records = []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                records.append((f"line {number}", json.loads(line)))
            except json.JSONDecodeError as exc:
                raise _fail(source, f"line {number}", f"not JSON ({exc.msg} at column {exc.colno})",
                            "write one JSON object per line (JSONL) or one JSON document") from None
        return records
    if isinstance(data, dict) and all(isinstance(v, list) for v in data.values()):
        return [(f"prompt {prompt!r}", {"prompt": prompt, "questions": qs}) for prompt, qs in data.items()]
    if isinstance(data, dict):
        return [("line 1", data)]  # a JSONL file of one line
    if isinstance(data, list):
        return [(f"record [{i}]", record) for i, record in enumerate(data)]
    raise _fail(source, "line 1", f"a JSON {type(data).__name__}", "write a list of records or {prompt: [questions]}")


def _text(source: str, where: str, record: dict[str, Any], keys: Sequence[str], what: str) -> str:
    for key in keys:
        value = record.get(key)
        if isinstance(value, str) and value.strip():
            return value.strip()
    raise _fail(source, where, f"no {what} (field {' or '.join(repr(k) for k in keys)})",
                f"give each record its {what} as a non-empty string")


def _question(source: str, where: str, raw: Any, index: int, nested: bool) -> Question:
    """One question from a dict (TIFA/DSG/grouped) or a GenEval 2 ``[question, answer]`` pair."""
    if isinstance(raw, (list, tuple)) and len(raw) == 2 and all(isinstance(v, str) for v in raw):
        raw = {"question": raw[0], "answer": raw[1]}
    if not isinstance(raw, dict):
        raise _fail(source, where, f"a question is {type(raw).__name__} {str(raw)[:60]!r}",
                    "write each question as an object with 'question' and 'answer', or a [question, answer] pair")
    dsg = "question_natural_language" in raw
    text = _text(source, where, raw, ("question", "question_natural_language"), "question")
    answer = raw.get("answer", "yes" if dsg else None)
    if not isinstance(answer, str) or not answer.strip():
        raise _fail(source, f"{where}, field 'answer'", f"the question {text!r} has no answer",
                    "give its correct answer (e.g. \"answer\": \"yes\")")
    choices = raw.get("choices", YES_NO)
    if not isinstance(choices, (list, tuple)) or len(choices) < 2 or not all(isinstance(c, str) for c in choices):
        raise _fail(source, f"{where}, field 'choices'", f"the choices of {text!r} are {choices!r}",
                    "give a list of at least two answers (strings)")
    folded = [c.strip().casefold() for c in choices]
    if answer.strip().casefold() not in folded:
        raise _fail(source, f"{where}, field 'answer'", f"the answer {answer!r} of {text!r} is not among its "
                    f"choices {list(choices)}", "make the answer one of the choices (or fix the choices)")
    # A flat TIFA record's "id" names its caption, shared by the caption's questions: not a question id.
    qid = raw.get("question_id", raw.get("proposition_id", raw.get("id") if nested else None))
    qid = index + 1 if qid is None else qid
    parents = raw.get("parents", raw.get("dependency", raw.get("parent", ())))
    if isinstance(parents, (str, int)):
        parents = [p for p in str(parents).replace(",", " ").split() if p]
    if not isinstance(parents, (list, tuple)):
        raise _fail(source, f"{where}, field 'parents'", f"the parents of {text!r} are {parents!r}",
                    "give a list of question ids (DSG: a comma-separated string; 0 for none)")
    return Question(str(qid), text, choices[folded.index(answer.strip().casefold())],
                    tuple(c.strip() for c in choices), tuple(str(p) for p in parents if str(p) not in ("0", "")))


def _check_prompt(source: str, prompt: str, questions: list[tuple[str, Question]]) -> tuple[Question, ...]:
    """Ids unique, parents known, no dependency cycle."""
    seen: dict[str, str] = {}
    for where, q in questions:
        if q.id in seen:
            raise _fail(source, where, f"duplicate question id {q.id!r} for the prompt {prompt!r} (first at "
                        f"{seen[q.id]})", "give every question of a prompt its own id")
        seen[q.id] = where
    by_id = {q.id: (where, q) for where, q in questions}
    for where, q in questions:
        for parent in q.parents:
            if parent not in by_id:
                raise _fail(source, f"{where}, field 'parents'", f"the question {q.text!r} depends on id {parent!r}, "
                            f"which the prompt {prompt!r} does not have", "name the id of one of its questions")
    state: dict[str, int] = {}

    def visit(qid: str) -> None:
        state[qid] = 1
        for parent in by_id[qid][1].parents:
            if state.get(parent) == 1:
                raise _fail(source, by_id[qid][0], f"the dependencies of the prompt {prompt!r} form a cycle "
                            f"through id {qid!r}", "make the parent/child links a tree (DSG)")
            if parent not in state:
                visit(parent)
        state[qid] = 2

    for qid in by_id:
        if qid not in state:
            visit(qid)
    return tuple(q for _, q in questions)


def load_questions(path: str | os.PathLike[str]) -> QuestionSet:
    """Read a TIFA/DSG/GenEval 2 style question file (JSON or JSONL) from ``path``."""
    path = Path(path).expanduser()
    source = str(path)
    if not path.is_file():
        raise QuestionFileError(f"pytest-diffeval: question file {source} does not exist; fix: pass the path of a "
                                "TIFA/DSG/GenEval 2 style JSON or JSONL file (none is shipped)")
    grouped: dict[str, list[tuple[str, Question]]] = {}
    for where, record in _records(path):
        if not isinstance(record, dict):
            raise _fail(source, where, f"a record is {type(record).__name__}", "make every record a JSON object")
        prompt = _text(source, where, record, ("prompt", "caption", "text"), "prompt")
        nested = record.get("questions", record.get("vqa_list"))
        if nested is not None:
            if not isinstance(nested, list) or not nested:
                raise _fail(source, f"{where}, field 'questions'", f"the prompt {prompt!r} has no questions",
                            "give a non-empty list of questions")
            items = [(f"{where}, question [{i}]", q) for i, q in enumerate(nested)]
        else:
            items = [(where, record)]
        target = grouped.setdefault(prompt, [])
        for item_where, raw in items:
            target.append((item_where, _question(source, item_where, raw, len(target), nested is not None)))
    if not grouped:
        raise _fail(source, "line 1", "the file holds no questions", "write at least one question record")
    by_prompt = {prompt: _check_prompt(source, prompt, qs) for prompt, qs in grouped.items()}
    return QuestionSet(source, digest_bytes(path.read_bytes()), by_prompt)


# --------------------------------------------------------------------------- embedded prompts

EMBEDDED_QUESTIONS = (
    ("digit", "Is the digit a {digit}?", ()),
    ("stroke", "Is the digit {fg}?", ("digit",)),
    ("background", "Is the background {bg}?", ()),
)
"""Questions generated for an embedded prompt ``"a {fg} digit {digit} on a {bg} background"``:
(id, template, parents).  The stroke colour is a property of the asked-for digit (DSG child)."""


def embedded_questions(prompt: str) -> tuple[Question, ...]:
    """The questions of an embedded-data prompt, from its parts (digit, stroke, background)."""
    try:
        digit, fg, bg = parse_caption(prompt)
    except ValueError:
        raise QuestionFileError(
            f"pytest-diffeval: no questions for the prompt {prompt!r}: questions are generated only for the "
            "embedded prompts ('a red digit 7 on a blue background'); fix: pass questions=<path of a TIFA/DSG/"
            "GenEval 2 style JSON or JSONL file>") from None
    return tuple(Question(qid, template.format(digit=digit, fg=fg, bg=bg), "Yes", ("Yes", "No"), parents)
                 for qid, template, parents in EMBEDDED_QUESTIONS)


def generated_questions(prompts: Iterable[str]) -> QuestionSet:
    """A :class:`QuestionSet` generated for embedded prompts (an error names one that is not)."""
    by_prompt = {p.strip(): embedded_questions(p) for p in dict.fromkeys(prompts)}
    return QuestionSet("generated:embedded", "generated:embedded:v1", by_prompt)


def question_set(questions: str | os.PathLike[str] | QuestionSet | None, prompts: Iterable[str]) -> QuestionSet:
    """``questions`` as a :class:`QuestionSet`: a path is read, None generates them for the
    embedded prompts."""
    if questions is None:
        return generated_questions(prompts)
    if isinstance(questions, QuestionSet):
        return questions
    return load_questions(questions)


__all__ = ["EMBEDDED_QUESTIONS", "Question", "QuestionSet", "embedded_questions", "generated_questions",
           "load_questions", "question_set"]
