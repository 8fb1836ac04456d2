"""The VQA formula on Qwen2.5-VL (issue 19): the transformers backend's probabilities equal a
softmax over the logits computed by hand (:func:`test_vqa.assert_formula`) on a random-weight
tiny Qwen2.5-VL whose processor is built offline from a word-level tokenizer.

Qwen2.5-VL's processor holds a video processor that needs torchvision, which the CPU torch 2.13
environment cannot have: this file skips there, and ``.ci/run`` runs it in ``.venv-inception``
(torch 2.14.1 + torchvision 0.29.1) with ``DIFFEVAL_REQUIRE_TORCHVISION=1``, which makes a
missing torchvision a failure instead of a skip."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from test_vqa import WORDS, assert_formula, word_level_tokenizer


def _torchvision() -> None:
    """torchvision, or a skip that says why; DIFFEVAL_REQUIRE_TORCHVISION=1 fails instead."""
    try:
        import torchvision  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - ImportError, or a torchvision built for another torch
        if os.environ.get("DIFFEVAL_REQUIRE_TORCHVISION") == "1":
            raise
        pytest.skip("Qwen2.5-VL's processor (its video processor) needs torchvision, which the CPU torch 2.13 "
                    f"environment cannot have; .ci/run runs this file in .venv-inception: {type(exc).__name__}: {exc}")


def build_tiny_qwen2_5_vl(folder: Path) -> Path:
    """A random-weight Qwen2.5-VL (windowed ViT with 2x2 patch merger, Qwen2 text model with
    multimodal rope) and Qwen2_5_VLProcessor with the word-level tokenizer and Qwen's chat
    template (``<|im_start|>user ... <|vision_start|><|image_pad|><|vision_end|>``): a 16x16
    image is 4x4 patches of 4 pixels, merged into 4 image tokens."""
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2_5_VLProcessor,
        Qwen2VLImageProcessor,
        Qwen2VLVideoProcessor,
    )

    special = ["<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
    vocab = {w: i for i, w in enumerate([*WORDS, *special, "user", "assistant"])}
    fast = word_level_tokenizer(vocab,
                                   eos_token="<|im_end|>", padding_side="left")  # the backend pads right itself
    fast.add_special_tokens({"additional_special_tokens": special})
    chat = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% for c in m['content'] %}{% if c['type'] == 'image' %}"
            "<|vision_start|><|image_pad|><|vision_end|>{% else %}{{ c['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
            "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    sizes = {"patch_size": 4, "merge_size": 2, "temporal_patch_size": 2, "size": {"shortest_edge": 64, "longest_edge": 256}}
    processor = Qwen2_5_VLProcessor(image_processor=Qwen2VLImageProcessor(**sizes),
                                    video_processor=Qwen2VLVideoProcessor(**sizes), tokenizer=fast, chat_template=chat)
    config = Qwen2_5_VLConfig(
        text_config={"vocab_size": len(vocab), "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                     "num_attention_heads": 2, "num_key_value_heads": 2, "max_position_embeddings": 128,
                     "initializer_range": 0.5, "pad_token_id": vocab["<pad>"], "bos_token_id": None,
                     "eos_token_id": vocab["<|im_end|>"],
                     "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1]}},
        vision_config={"depth": 1, "hidden_size": 16, "intermediate_size": 32, "num_heads": 2, "patch_size": 4,
                       "spatial_merge_size": 2, "temporal_patch_size": 2, "window_size": 16, "out_hidden_size": 16,
                       "fullatt_block_indexes": [0]},
        image_token_id=vocab["<|image_pad|>"], video_token_id=vocab["<|video_pad|>"],
        vision_start_token_id=vocab["<|vision_start|>"], vision_end_token_id=vocab["<|vision_end|>"])
    torch.manual_seed(0)
    Qwen2_5_VLForConditionalGeneration(config).eval().save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def test_qwen2_5_vl_probabilities_are_a_softmax_over_the_vocabulary_of_the_next_token_logits(tmp_path: Path) -> None:
    _torchvision()
    assert_formula(build_tiny_qwen2_5_vl(tmp_path / "tiny-qwen2_5_vl"))
