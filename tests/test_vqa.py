"""VQA metrics (issue 19): the transformers backend's probabilities are a softmax over the logits
of random-weight tiny LLaVA, Idefics3 (SmolVLM) and PaliGemma models computed by hand (Qwen2.5-VL:
test_vqa_qwen.py); DSG's dependency rule; the scorer in the
baseline signature and the result-cache key; McNemar for 0/1 values; the report's answers
table; and ``vqa_score``/``soft_tifa`` in ``assert_no_regression`` end to end."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from pytest_diffeval.baselines import build_record, judge, signature
from pytest_diffeval.exceptions import MetricInputError
from pytest_diffeval.generation import ImageSet
from pytest_diffeval.metrics import compute_metric, get_metric
from pytest_diffeval.metrics.result_cache import ResultCache
from pytest_diffeval.report.html import render_html
from pytest_diffeval.vqa import VQABackend, load_vqa_backend
from pytest_diffeval.vqa.questions import Question, embedded_questions
from pytest_diffeval.vqa.scoring import Answered, ask, soft_tifa_value, tifa_value, with_dependencies

WORDS = ("<unk> <pad> <s> </s> <image> USER ASSISTANT : yes no a an the is digit on background of does this "
         "figure show please answer or red blue green white black yellow drawn in stroke describe image one short "
         "sentence 0 1 2 3 4 5 6 7 8 9 \" ? . ,").split()
CHAT = ("{% for m in messages %}USER: {% for c in m['content'] %}{% if c['type'] == 'image' %}<image> "
        "{% else %}{{ c['text'] }}{% endif %}{% endfor %} {% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}")
PROMPTS = ["a red digit 7 on a blue background", "a green digit 3 on a white background"]


def word_level_tokenizer(vocab: dict[str, int], **tokens: Any) -> Any:
    """A lower-casing word-level fast tokenizer over ``vocab`` (words and punctuation split),
    with ``<unk>``/``<pad>`` and the special ``tokens`` given: the tiny VLMs' tokenizer."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(),
                                                       pre_tokenizers.Punctuation("isolated")])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", pad_token="<pad>", **tokens)


def build_tiny_llava(folder: Path) -> Path:
    """A random-weight LLaVA (tiny CLIP vision tower, tiny Llama) and LlavaProcessor with a
    word-level tokenizer and a chat template, saved in hub layout.  The text model's weights
    are drawn wide (initializer_range 0.5) so answers get clearly different probabilities."""
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    vocab = {w: i for i, w in enumerate(WORDS)}
    fast = word_level_tokenizer(vocab, bos_token="<s>",
                                   eos_token="</s>", padding_side="left",  # the backend must pad right itself
                                   extra_special_tokens={"image_token": "<image>"})
    vision = CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                              image_size=16, patch_size=8, projection_dim=16)
    text = LlamaConfig(vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                       num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128,
                       pad_token_id=vocab["<pad>"], eos_token_id=vocab["</s>"], initializer_range=0.5)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=vocab["<image>"],
                         vision_feature_layer=-1, vision_feature_select_strategy="default", image_seq_length=4)
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(config).eval()
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16}),
        tokenizer=fast, patch_size=8, vision_feature_select_strategy="default", num_additional_image_tokens=1,
        chat_template=CHAT)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def build_tiny_idefics3(folder: Path) -> Path:
    """A random-weight Idefics3 (SmolVLM's architecture: SigLIP-style tower, pixel-shuffle
    connector, Llama text model) and Idefics3Processor with the same word-level tokenizer."""
    from transformers import (
        Idefics3Config,
        Idefics3ForConditionalGeneration,
        Idefics3ImageProcessor,
        Idefics3Processor,
    )

    special = ["<end_of_utterance>", "<fake_token_around_image>", "<global-img>"]
    vocab = {w: i for i, w in enumerate([*WORDS, *special, "user", "assistant"])}
    fast = word_level_tokenizer(vocab,
                                   eos_token="<end_of_utterance>", padding_side="left")
    fast.add_special_tokens({"additional_special_tokens": ["<image>", *special]})
    chat = ("{% for m in messages %}{{ m['role'] }}:{% for c in m['content'] %}{% if c['type'] == 'image' %}<image>"
            "{% else %} {{ c['text'] }}{% endif %}{% endfor %}<end_of_utterance> {% endfor %}"
            "{% if add_generation_prompt %}assistant:{% endif %}")
    processor = Idefics3Processor(
        image_processor=Idefics3ImageProcessor(size={"longest_edge": 16}, do_image_splitting=False,
                                               max_image_size={"longest_edge": 16}),
        tokenizer=fast, chat_template=chat, image_seq_len=1)
    config = Idefics3Config(
        text_config={"model_type": "llama", "vocab_size": len(vocab), "hidden_size": 16, "intermediate_size": 32,
                     "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 2,
                     "max_position_embeddings": 128, "initializer_range": 0.5, "pad_token_id": vocab["<pad>"]},
        vision_config={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                       "image_size": 16, "patch_size": 4},
        image_token_id=vocab["<image>"], scale_factor=4)  # 4x4 patches shuffled into one image token
    torch.manual_seed(0)
    Idefics3ForConditionalGeneration(config).eval().save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def build_tiny_paligemma(folder: Path) -> Path:
    """A random-weight PaliGemma (SigLIP tower, Gemma text model) and PaliGemmaProcessor with the
    same word-level tokenizer.  It has no chat template: the processor puts the image tokens and
    BOS before the question and a newline after it; its prefix attends bidirectionally."""
    from transformers import (
        PaliGemmaConfig,
        PaliGemmaForConditionalGeneration,
        PaliGemmaProcessor,
        SiglipImageProcessor,
    )

    vocab = {w: i for i, w in enumerate([*WORDS, "\n"])}
    fast = word_level_tokenizer(vocab, bos_token="<s>",
                                   eos_token="</s>", padding_side="left")
    image_processor = SiglipImageProcessor(size={"height": 16, "width": 16})
    image_processor.image_seq_length = 4  # (16 / 8) ** 2 patches
    processor = PaliGemmaProcessor(image_processor=image_processor, tokenizer=fast)
    config = PaliGemmaConfig(
        text_config={"model_type": "gemma", "vocab_size": len(processor.tokenizer), "hidden_size": 16,
                     "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1,
                     "head_dim": 8, "max_position_embeddings": 128, "initializer_range": 0.5,
                     "pad_token_id": vocab["<pad>"]},
        vision_config={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                       "image_size": 16, "patch_size": 8, "projection_dim": 16},
        image_token_id=processor.image_token_id, projection_dim=16)
    torch.manual_seed(0)
    PaliGemmaForConditionalGeneration(config).eval().save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_vlm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_llava(tmp_path_factory.mktemp("vlm") / "tiny-llava")


def image_set(n: int = 4) -> ImageSet:
    pixels = np.random.default_rng(0).integers(0, 256, (n, 16, 16, 3), dtype=np.uint8)
    return ImageSet(images=pixels, prompts=[PROMPTS[i % 2] for i in range(n)], seeds=[i // 2 for i in range(n)])


def by_hand(folder: Path, image: np.ndarray, question: str, answer: Sequence[str]) -> float:
    """P(answer | image, question) from the model's logits, one unpadded row, the whole sequence
    run again for each answer token.  The prompt is the chat template's user turn, or (PaliGemma,
    no template) ``<image>`` and the question; each appended answer token is text in Qwen2.5-VL's
    ``mm_token_type_ids`` (0) and a causal suffix token in PaliGemma's ``token_type_ids`` (1)."""
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(folder).eval()
    processor = AutoProcessor.from_pretrained(folder)
    if processor.chat_template:
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    else:
        text = f"<image>{question}"
    inputs = processor(images=[Image.fromarray(image)], text=[text], return_tensors="pt")
    inputs.pop("labels", None)
    ids = [processor.tokenizer.convert_tokens_to_ids(a.lower()) for a in answer]
    appended = {"input_ids": None, "attention_mask": 1, "mm_token_type_ids": 0, "token_type_ids": 1}
    probability = 1.0
    with torch.no_grad():
        for token in ids:
            logits = model(**inputs).logits[0, -1].double()
            probability *= float(torch.softmax(logits, -1)[token])
            for key, value in appended.items():
                if key in inputs:
                    column = torch.full((1, 1), token if value is None else value, dtype=inputs[key].dtype)
                    inputs[key] = torch.cat([inputs[key], column], 1)
    return probability


# --------------------------------------------------------------------------- the formula


@pytest.mark.parametrize("family", ["llava", "idefics3", "paligemma"])
def test_probabilities_are_a_softmax_over_the_vocabulary_of_the_next_token_logits(
        family: str, tiny_vlm: Path, tmp_path: Path) -> None:
    builders = {"idefics3": build_tiny_idefics3, "paligemma": build_tiny_paligemma}
    tiny_vlm = tiny_vlm if family == "llava" else builders[family](tmp_path / f"tiny-{family}")
    assert_formula(tiny_vlm)


def assert_formula(tiny_vlm: Path) -> None:
    """The backend's batched, right-padded probabilities of one- and two-token answers equal
    :func:`by_hand`'s softmax of unpadded single rows (shared with the Qwen2.5-VL test)."""
    images = image_set(3).images
    questions = ["Is the digit red?", 'Does this figure show "a red digit 7 on a blue background"? Please answer '
                 "Yes or No.", "Is the background blue?"]  # different lengths: the batch is padded
    backend = load_vqa_backend(str(tiny_vlm), "cpu")
    got = backend.probabilities(images, questions, ["Yes", "No", "a red"])  # "a red": two tokens, teacher-forced
    expected = np.array([[by_hand(tiny_vlm, image, q, [a]) if a != "a red" else by_hand(tiny_vlm, image, q, ["a", "red"])
                          for a in ("Yes", "No", "a red")] for image, q in zip(images, questions)])
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-9)
    assert len({round(v, 6) for v in got[:, 0]}) == 3 and got[:, :2].sum(1).max() < 1  # a vocabulary softmax


def test_vqa_score_is_p_yes_of_the_template_and_renormalises_over_the_answers(tiny_vlm: Path) -> None:
    images = image_set(2)
    template = 'Does this image show "{}"?'
    result = compute_metric("vqa_score", images, vqa_model=str(tiny_vlm), template=template, device="cpu")
    yes = [by_hand(tiny_vlm, i, template.format(p), ["Yes"]) for i, p in zip(images.images, images.prompts)]
    np.testing.assert_allclose(result.per_sample, yes, rtol=1e-5)
    assert result.details["scorer"]["template"] == template and result.backbone.startswith("tiny-llava@")
    renormalised = compute_metric("vqa_score", images, vqa_model=str(tiny_vlm), template=template, device="cpu",
                                  normalize="answers")
    no = [by_hand(tiny_vlm, i, template.format(p), ["No"]) for i, p in zip(images.images, images.prompts)]
    np.testing.assert_allclose(renormalised.per_sample, np.array(yes) / (np.array(yes) + no), rtol=1e-5)
    with pytest.raises(MetricInputError, match="must hold one '{}'"):
        compute_metric("vqa_score", images, vqa_model=str(tiny_vlm), template="no placeholder")


def test_soft_tifa_and_tifa_of_the_embedded_questions_follow_the_answer_probabilities(tiny_vlm: Path) -> None:
    images = image_set(2)
    soft = compute_metric("soft_tifa", images, vqa_model=str(tiny_vlm), device="cpu")
    tifa = compute_metric("tifa", images, vqa_model=str(tiny_vlm), device="cpu")
    for i, (image, prompt) in enumerate(zip(images.images, images.prompts)):
        questions = embedded_questions(prompt)
        p = {q.id: by_hand(tiny_vlm, image, q.text, ["Yes"]) for q in questions}
        correct = {q.id: p[q.id] > by_hand(tiny_vlm, image, q.text, ["No"]) for q in questions}
        stroke_counts = correct["digit"]  # the stroke question is the digit question's child
        expected_soft = (p["digit"] + (p["stroke"] if stroke_counts else 0.0) + p["background"]) / 3
        expected_tifa = (correct["digit"] + (correct["stroke"] and stroke_counts) + correct["background"]) / 3
        assert soft.per_sample[i] == pytest.approx(expected_soft, rel=1e-5)
        assert tifa.per_sample[i] == pytest.approx(expected_tifa)
        shown = {q["id"]: q for q in soft.details["answers"][i]["questions"]}
        assert shown["digit"]["p"] == pytest.approx(p["digit"], abs=1e-6)


# --------------------------------------------------------------------------- scoring rules


class FixedBackend(VQABackend):
    """Answers from a table: question text -> probability of the first choice."""

    def __init__(self, table: dict[str, float], id: str = "fixed@1") -> None:
        self.table, self.id = table, id

    def probabilities(self, images: np.ndarray, questions: Sequence[str], answers: Sequence[str]) -> np.ndarray:
        first = np.array([self.table[q] for q in questions])
        rest = np.tile(((1 - first) / (len(answers) - 1))[:, None], (1, len(answers) - 1))
        return np.concatenate([first[:, None], rest], axis=1)


def test_dsg_a_child_counts_only_when_its_parent_is_answered_correctly() -> None:
    questions = [Question("1", "Is there a dog?", "yes"), Question("2", "Is the dog brown?", "yes", parents=("1",)),
                 Question("3", "Is the dog sitting?", "yes", parents=("2",)), Question("4", "Is it day?", "yes")]
    images = np.zeros((2, 4, 4, 3), np.uint8)
    table = {"Is there a dog?": 0.2, "Is the dog brown?": 0.9, "Is the dog sitting?": 0.8, "Is it day?": 0.7}
    [answered, _] = ask(FixedBackend(table), images, [questions, questions[3:]])
    assert [a.correct for a in answered] == [False, True, True, True]  # as answered
    assert [a.blocked_by for a in answered] == [None, "1", "2", None]  # the grandchild is blocked too
    assert tifa_value(answered) == 0.25 and tifa_value(answered, all_correct=True) == 0.0
    assert soft_tifa_value(answered) == pytest.approx((0.2 + 0 + 0 + 0.7) / 4)
    assert soft_tifa_value(answered, "geometric") == 0.0
    parent_yes = with_dependencies([Answered(q, 0.9, True) for q in questions])
    assert all(a.passed for a in parent_yes) and soft_tifa_value(parent_yes, "geometric") == pytest.approx(0.9)


def test_the_scorer_is_in_the_signature_and_the_cache_key(tmp_path: Path) -> None:
    questions = tmp_path / "questions.jsonl"
    lines = [{"prompt": p, "question": f"Q{i}", "choices": ["yes", "no"], "answer": "yes"} for i, p in enumerate(PROMPTS)]
    questions.write_text("\n".join(json.dumps(line) for line in lines))
    images, backend = image_set(2), FixedBackend({"Q0": 0.8, "Q1": 0.3})
    cache = ResultCache(tmp_path / "cache")

    def run(**options: object) -> tuple[dict, str | None]:
        options = {"questions": str(questions), **options}
        result = compute_metric("soft_tifa", images, vqa_model=backend, **options)
        key = cache.key(get_metric("soft_tifa"), images, {"vqa_model": backend, **options})
        return signature(result, images, options), key

    first, key = run()
    assert first["scorer"]["questions_sha256"] and first["scorer"]["vlm"] == "fixed@1" and key is not None
    assert run() == (first, key)
    lines[1]["choices"] = ["yes", "no", "maybe"]  # the same prompts and questions, another file
    questions.write_text("\n".join(json.dumps(line) for line in lines))
    changed, changed_key = run()
    assert changed["scorer"]["questions_sha256"] != first["scorer"]["questions_sha256"] and changed_key != key
    geometric, _ = run(mean="geometric")
    assert geometric["scorer"]["mean"] == "geometric" and geometric != changed
    backend.id = "fixed@2"  # other weights
    assert run()[0]["scorer"]["vlm"] == "fixed@2"
    vqa = compute_metric("vqa_score", images, vqa_model=FixedBackend({f'Is it "{p}"?': 0.5 for p in PROMPTS}),
                         template='Is it "{}"?', answers=("Yes", "No"))
    assert signature(vqa, images, {})["scorer"] == {"vlm": "fixed@1", "template": 'Is it "{}"?',
                                                    "answers": ["Yes", "No"], "normalize": "vocabulary"}


def test_the_cache_key_follows_the_template_the_answers_and_the_vlm_weights(tmp_path: Path) -> None:
    folder = tmp_path / "vlm"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"weights 1")
    cache, images, metric = ResultCache(tmp_path / "cache"), image_set(2), get_metric("vqa_score")
    keys = [cache.key(metric, images, {"vqa_model": str(folder)}),
            cache.key(metric, images, {"vqa_model": str(folder), "template": 'Is it "{}"?'}),
            cache.key(metric, images, {"vqa_model": str(folder), "answers": ("yes", "no")}),
            cache.key(metric, images, {"vqa_model": str(folder), "normalize": "answers"})]
    (folder / "model.safetensors").write_bytes(b"weights 2")
    keys.append(cache.key(metric, images, {"vqa_model": str(folder)}))
    assert None not in keys and len(set(keys)) == 5
    assert cache.key(metric, images, {"vqa_model": FixedBackend({}, id="")}) is None  # no identity: not cached


def test_tifa_zero_one_values_are_compared_with_the_exact_mcnemar_test(tmp_path: Path) -> None:
    questions = tmp_path / "questions.json"
    questions.write_text(json.dumps({p: [{"question": f"Q{i}", "answer": "yes"}] for i, p in enumerate(PROMPTS)}))
    images = ImageSet(images=np.zeros((20, 4, 4, 3), np.uint8), prompts=[PROMPTS[i % 2] for i in range(20)],
                      seeds=[i // 2 for i in range(20)])
    before = compute_metric("tifa", images, vqa_model=FixedBackend({"Q0": 0.9, "Q1": 0.9}), questions=str(questions))
    after = compute_metric("tifa", images, vqa_model=FixedBackend({"Q0": 0.9, "Q1": 0.1}), questions=str(questions))
    assert set(before.per_sample) == {1.0} and set(after.per_sample) == {0.0, 1.0}
    options = {"questions": str(questions)}
    stored = build_record(before, images, options)
    comparison = judge(build_record(after, images, options), stored, None)
    assert comparison.method == "mcnemar" and comparison.discordant == (10, 0) and comparison.verdict == "regressed"


def test_the_report_lists_each_images_failed_questions_with_their_probabilities() -> None:
    images = image_set(2)
    backend = FixedBackend({q.text: (0.3 if q.id == "digit" else 0.8) for p in PROMPTS for q in embedded_questions(p)})
    result = compute_metric("soft_tifa", images, vqa_model=backend)
    row = {"test": "t::x", "metric": "soft_tifa", "backbone": result.backbone, "value": result.value,
           "higher_is_better": True, "verdict": "pass", "per_sample": list(result.per_sample),
           "prompts": images.prompts, "seeds": images.seeds, "details": {"answers": result.details["answers"]}}
    page = render_html([row])
    assert 'class="per-prompt vqa-answers"' in page
    assert "Is the digit a 7? → Yes: p=0.3000" in page and "(blocked: parent digit failed)" in page
    assert "background: 0.8000" in page


# --------------------------------------------------------------------------- end to end

USER_TEST = """
import numpy as np
from pytest_diffeval.generation import ImageSet

def test_alignment(diffeval_baseline):
    pixels = np.random.default_rng(0).integers(0, 256, (4, 16, 16, 3), dtype=np.uint8)
    images = ImageSet(images=pixels, prompts={prompts!r}, seeds=[0, 0, 1, 1])
    diffeval_baseline.assert_no_regression(images, "vqa_score", vqa_model={vlm!r}, template={template!r})
    diffeval_baseline.assert_no_regression(images, "soft_tifa", vqa_model={vlm!r}, questions="questions.jsonl")
"""


def test_vqa_score_and_soft_tifa_in_assert_no_regression(pytester: pytest.Pytester, tiny_vlm: Path) -> None:
    def write(template: str, question: str) -> None:
        pytester.makepyfile(test_user=USER_TEST.format(prompts=PROMPTS * 2, vlm=str(tiny_vlm), template=template))
        (pytester.path / "questions.jsonl").write_text("\n".join(
            json.dumps({"prompt": p, "questions": [{"id": 1, "question": question.format(p), "answer": "yes"}]})
            for p in PROMPTS))

    pytester.makeini("[pytest]\nfilterwarnings = ignore::FutureWarning\n")
    write('Does this figure show "{}"? Please answer Yes or No.', "Is this {}?")
    pytester.runpytest("--snapshot-update", "-p", "no:randomly").assert_outcomes(passed=1)
    [baseline] = sorted((pytester.path / "baselines").rglob("*.json"))
    recorded = json.loads(baseline.read_text())
    assert {"vqa_score", "soft_tifa"} <= set(recorded["checks"]) and "questions_sha256" in baseline.read_text()
    pytester.runpytest("-p", "no:randomly").assert_outcomes(passed=1)
    write('Does this figure show "{}"? Please answer Yes or No.', "Is the image {}?")  # another question file
    changed = pytester.runpytest("-p", "no:randomly", "--diffeval-report=report.html")
    changed.assert_outcomes(failed=1)
    changed.stdout.fnmatch_lines(["*for 'soft_tifa' was recorded under other conditions*",
                                  "*scorer: baseline {*'questions_sha256': *}, this run {*'questions_sha256'*"])
    assert "for 'vqa_score' was recorded" not in changed.stdout.str()  # its scorer did not change
    page = (pytester.path / "report.html").read_text()
    assert 'class="per-prompt vqa-answers"' in page and "Is the image a red digit 7 on a blue background?" in page
