"""Question files (issue 19): TIFA, DSG and GenEval 2 shapes read from a user path, the errors a
bad file gives (naming the file, the line or record, the field and the fix), and the questions
generated from the embedded prompts."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from pytest_diffeval import load_questions
from pytest_diffeval.embedded.data import HELDOUT_PROMPTS, parse_caption
from pytest_diffeval.exceptions import QuestionFileError
from pytest_diffeval.vqa.questions import embedded_questions, generated_questions, question_set


def jsonl(path: Path, records: list) -> Path:
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n", encoding="utf-8")
    return path


def test_tifa_records_group_by_caption_with_their_choices(tmp_path: Path) -> None:
    records = [  # TIFA v1.0: "id" names the caption, shared by its questions
        {"id": "coco_1", "caption": "two dogs on grass", "question": "how many dogs are there?",
         "choices": ["1", "2", "3"], "answer": "2"},
        {"id": "coco_1", "caption": "two dogs on grass", "question": "are there dogs?", "choices": ["yes", "no"],
         "answer": "Yes"},
        {"id": "coco_2", "caption": "a red car", "question": "what color is the car?",
         "choices": ["red", "blue"], "answer": "red"},
    ]
    path = tmp_path / "tifa.json"
    path.write_text(json.dumps(records))
    loaded = load_questions(path)
    dogs = loaded.for_prompt("two dogs on grass ")  # compared stripped
    assert [(q.id, q.text, q.answer, q.choices) for q in dogs] == [
        ("1", "how many dogs are there?", "2", ("1", "2", "3")), ("2", "are there dogs?", "yes", ("yes", "no"))]
    assert len(loaded.sha256) == 64 and loaded.source == str(path)


def test_dsg_dependencies_and_geneval2_pairs(tmp_path: Path) -> None:
    dsg = jsonl(tmp_path / "dsg.jsonl", [
        {"item_id": "d1", "text": "a cat on a mat", "proposition_id": 1, "question_natural_language": "Is there a cat?",
         "dependency": "0"},
        {"item_id": "d1", "text": "a cat on a mat", "proposition_id": 2, "question_natural_language": "Is there a mat?",
         "dependency": "0"},
        {"item_id": "d1", "text": "a cat on a mat", "proposition_id": 3,
         "question_natural_language": "Is the cat on the mat?", "dependency": "1,2"},
    ])
    [cat, mat, on] = load_questions(dsg).for_prompt("a cat on a mat")
    assert (cat.parents, mat.parents, on.parents) == ((), (), ("1", "2")) and on.answer == "Yes"
    geneval = jsonl(tmp_path / "geneval2.jsonl", [
        {"prompt": "three apples", "vqa_list": [["Are there apples?", "Yes"], ["Are there three apples?", "Yes"]],
         "skills": ["counting"], "atom_count": 2}])
    questions = load_questions(geneval).for_prompt("three apples")
    assert [q.text for q in questions] == ["Are there apples?", "Are there three apples?"]
    grouped = tmp_path / "grouped.json"
    grouped.write_text(json.dumps({"a dog": [{"id": "e", "question": "Is there a dog?", "answer": "yes"},
                                             {"id": "c", "question": "Is it brown?", "answer": "no", "parents": ["e"]}]}))
    assert load_questions(grouped).for_prompt("a dog")[1].parents == ("e",)


@pytest.mark.parametrize(("content", "where", "problem"), [
    ("", "line 1", "the file is empty"),
    ('{"prompt": "a", "question": "q?"}\n', "line 1, field 'answer'", "the question 'q?' has no answer"),
    ('{"prompt": "a", "question": "q?", "answer": "yes"}\n{"prompt": "a", "question": "r?", "choices": ["red", "blue"], '
     '"answer": "green"}\n', "line 2, field 'answer'", "the answer 'green' of 'r?' is not among its choices"),
    ('{"prompt": "a", "question_id": 1, "question": "q?", "answer": "yes"}\n\n'
     '{"prompt": "a", "question_id": 1, "question": "r?", "answer": "no"}\n', "line 3",
     "duplicate question id '1' for the prompt 'a' (first at line 1)"),
    ('{"prompt": "a", "question": "q?", "answer": "yes"}\n{"prompt": "a", "question": \n', "line 2", "not JSON"),
    ('[{"prompt": "a", "questions": [{"id": 1, "question": "q?", "answer": "yes", "parents": [7]}]}]',
     "record [0], question [0], field 'parents'", "depends on id '7'"),
    ('[{"prompt": "a", "questions": [{"id": 1, "question": "q?", "answer": "yes", "parents": [2]}, '
     '{"id": 2, "question": "r?", "answer": "yes", "parents": [1]}]}]', "record [0], question [", "form a cycle"),
    ('[{"question": "q?", "answer": "yes"}]', "record [0]", "no prompt"),
    ('{"a": []}', "prompt 'a', field 'questions'", "the prompt 'a' has no questions"),
])
def test_a_bad_question_file_names_the_file_the_line_and_the_fix(tmp_path: Path, content: str, where: str,
                                                                  problem: str) -> None:
    path = tmp_path / "questions.jsonl"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(QuestionFileError) as caught:
        load_questions(path)
    message = str(caught.value)
    assert message.startswith(f"pytest-diffeval: question file {path}, {where}"), message
    assert problem in message and "; fix: " in message


def test_a_missing_file_and_a_prompt_the_file_lacks(tmp_path: Path) -> None:
    with pytest.raises(QuestionFileError, match=re.escape(f"question file {tmp_path / 'nope.json'} does not exist")):
        load_questions(tmp_path / "nope.json")
    path = jsonl(tmp_path / "q.jsonl", [{"prompt": "a", "question": "q?", "answer": "yes"}])
    with pytest.raises(QuestionFileError, match="has no questions for the prompt 'b'"):
        load_questions(path).for_prompt("b")


def test_embedded_prompts_get_questions_from_their_parts() -> None:
    prompt = HELDOUT_PROMPTS[0]
    digit, fg, bg = parse_caption(prompt)
    questions = embedded_questions(prompt)
    assert [q.text for q in questions] == [f"Is the digit a {digit}?", f"Is the digit {fg}?", f"Is the background {bg}?"]
    assert [q.parents for q in questions] == [(), ("digit",), ()] and {q.answer for q in questions} == {"Yes"}
    assert question_set(None, [prompt]).for_prompt(prompt) == questions
    assert generated_questions(HELDOUT_PROMPTS).sha256 == generated_questions([prompt]).sha256  # the generator's id
    with pytest.raises(QuestionFileError, match="fix: pass questions=<path"):
        embedded_questions("a photo of a cat")
