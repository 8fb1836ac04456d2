"""The embedded tiny vision-language model ``diffeval/tiny-vlm`` (trained by
``scripts/train_tiny_vlm.py``): its committed weights load through the Auto classes a real
VLM uses, offline, answer held-out yes/no questions above the stated floor, and are the
weights the training run measured (sha256 in ``training.json``)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pytest_diffeval._hashing import digest_file
from pytest_diffeval.embedded import resolve_embedded
from pytest_diffeval.embedded.data import ALL_COMBOS, COLORS, DIGITS, caption, make_images, parse_caption

NAME = "diffeval/tiny-vlm"
ACCURACY_FLOOR = 0.85
"""Per question kind on the fixed batch below (48 held-out images x a true and a false question).
The training run measured 95.5% (digit) to 99.98% (background) on 2000 held-out images
(``training.json``, README); 96 answers have a sampling error of about 3 points, so 0.85 fails
a model that lost its digit (chance is 50%) but not the shipped one by bad luck."""


def folder():
    path = resolve_embedded(NAME)
    assert path is not None, f"{NAME} has no weights in the package; run scripts/train_tiny_vlm.py"
    return path


@pytest.fixture(scope="module")
def vlm():
    """(model, processor) loaded exactly as a VQA metric loads a hub VLM."""
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    torch.set_num_threads(1)
    return AutoModelForImageTextToText.from_pretrained(folder()).eval(), AutoProcessor.from_pretrained(folder())


def prompt(processor, question: str) -> str:
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def p_yes(vlm, images: np.ndarray, questions: list[str]) -> np.ndarray:
    """P(" Yes") at the next token after the prompt, softmax over the whole vocabulary (VQAScore)."""
    import torch

    model, processor = vlm
    [yes] = processor.tokenizer(" Yes", add_special_tokens=False).input_ids
    texts = [prompt(processor, q) for q in questions]
    inputs = processor(images=list(images), text=texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        return torch.softmax(model(**inputs).logits[:, -1].float(), -1)[:, yes].numpy()


def questions(truth: tuple[int, str, str], rng: np.random.Generator, wrong: int) -> dict[str, list[tuple[str, bool]]]:
    """One true and one false question per kind about an image showing ``truth``; the false
    whole-prompt question gets part ``wrong`` (0 digit, 1 stroke, 2 background) wrong."""
    d, fg, bg = truth
    other_digit = int(rng.choice([v for v in DIGITS if v != d]))
    other_fg, other_bg = (str(rng.choice([c for c in COLORS if c not in (fg, bg)])) for _ in range(2))
    full = 'Does this figure show "{}"? Please answer Yes or No.'
    false = [caption(other_digit, fg, bg), caption(d, other_fg, bg), caption(d, fg, other_bg)][wrong]
    return {
        "full": [(full.format(caption(d, fg, bg)), True), (full.format(false), False)],
        "swap": [(full.format(caption(d, fg, bg)), True), (full.format(caption(d, bg, fg)), False)],
        "digit": [(f"Is the digit a {d}?", True), (f"Is the digit a {other_digit}?", False)],
        "fg": [(f"Is the digit {fg}?", True), (f"Is the digit {other_fg}?", False)],
        "bg": [(f"Is the background {bg}?", True), (f"Is the background {other_bg}?", False)],
    }


def test_answers_held_out_questions_above_the_floor(vlm) -> None:
    images, captions = make_images(48, seed=2026, split="heldout", combos=ALL_COMBOS)
    rng = np.random.default_rng(2026)
    asked: dict[str, list[tuple[int, str, bool]]] = {}
    for i, text in enumerate(captions):
        for kind, pairs in questions(parse_caption(text), rng, i % 3).items():
            asked.setdefault(kind, []).extend((i, q, a) for q, a in pairs)
    accuracy = {}
    for kind, rows in asked.items():
        probs = p_yes(vlm, images[[i for i, _, _ in rows]], [q for _, q, _ in rows])
        accuracy[kind] = float(((probs > 0.5) == np.array([a for _, _, a in rows])).mean())
    assert min(accuracy.values()) >= ACCURACY_FLOOR, accuracy


def test_answer_tokens_and_padding(vlm) -> None:
    """"Yes", " Yes" and "yes" are one token; a batch of prompts of different lengths (left
    padding) gives each image the answer it gets alone."""
    model, processor = vlm
    ids = {text: processor.tokenizer(text, add_special_tokens=False).input_ids for text in ("Yes", " Yes", "yes")}
    assert len({tuple(v) for v in ids.values()}) == 1 and len(ids["yes"]) == 1, ids
    images, _ = make_images(2, seed=3, split="heldout")
    asks = ["Is the background red?", 'Does this figure show "a red digit 3 on a white background"? Please answer yes or no.']
    together = p_yes(vlm, images, asks)
    alone = np.array([p_yes(vlm, images[i : i + 1], asks[i : i + 1])[0] for i in range(2)])
    np.testing.assert_allclose(together, alone, atol=1e-4)


def test_weights_are_the_measured_ones() -> None:
    record = json.loads((folder() / "training.json").read_text())
    assert digest_file(folder() / "model.safetensors") == record["sha256"]["model.safetensors"]
    assert min(record["heldout_real_accuracy"].values()) >= ACCURACY_FLOOR
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    for kind in ("full", "digit"):  # the README quotes the measured numbers, bold
        assert f"**{100 * record['heldout_real_accuracy'][kind]:.1f}%**" in readme, kind


def test_loads_offline_in_a_fresh_process(tmp_path) -> None:
    """A new interpreter with the hub switched off loads the folder through the Auto classes."""
    code = (
        "import sys\n"
        "from transformers import AutoModelForImageTextToText, AutoProcessor\n"
        "m = AutoModelForImageTextToText.from_pretrained(sys.argv[1])\n"
        "p = AutoProcessor.from_pretrained(sys.argv[1])\n"
        "print(type(m).__name__, type(p).__name__, p.chat_template is not None)\n"
    )
    env = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HOME": str(tmp_path / "empty-hf-home"),
           "HOME": str(tmp_path), "PATH": ""}
    out = subprocess.run([sys.executable, "-c", code, str(folder())], env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["LlavaForConditionalGeneration", "LlavaProcessor", "True"]
