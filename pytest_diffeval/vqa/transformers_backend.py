"""The transformers VQA backend: any vision-language model that ``AutoModelForImageTextToText``
and ``AutoProcessor`` load (LLaVA, SmolVLM/Idefics3, Qwen2.5-VL, the embedded
``diffeval/tiny-vlm``), from an embedded name, a local folder or a cached hub snapshot,
offline, loaded once per process.

The probability of an answer is read from the model's next-token logits after the question
(put in the processor's chat template when it has one, with the generation prompt), as a
softmax over the whole **vocabulary**: ``P("Yes") = softmax(logits)[id("Yes")]``.  This is
t2v_metrics' VQAScore (its ``exp(-loss)`` of the answer token); the metrics can renormalise
over the candidate answers (``normalize="answers"``, ``P(Yes) / (P(Yes) + P(No))``).  An
answer of several tokens gets the product of its tokens' probabilities, teacher-forced.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .. import process_cache, settings
from ..exceptions import BackboneNotFoundError
from ..fingerprints import hub_snapshot, resolve_model_dir
from ..pipelines.loading import resolve_dtype
from .backend import VQABackend

DEFAULT_VQA_MODEL = "Qwen/Qwen2.5-VL-3B-Instruct"
"""The VLM the VQA metrics load when none is given (``vqa_model=``); t2v_metrics' and GenEval
2's family.  Offline only when the Hugging Face cache holds it."""


def _pil(image: np.ndarray) -> Any:
    from PIL import Image

    return Image.fromarray(np.ascontiguousarray(image))


class TransformersVQA(VQABackend):
    """A transformers vision-language model and its processor as a :class:`VQABackend`."""

    def __init__(self, model: Any, processor: Any, id: str, device: str, batch_size: int = 16) -> None:
        self.model = model
        self.processor = processor
        self.id = id
        self.device = device
        self.batch_size = batch_size
        self.tokenizer = getattr(processor, "tokenizer", processor)

    def prompt(self, question: str) -> str:
        """The text the model reads for ``question``: the processor's chat template (one user
        turn: the image, then the question; with the generation prompt) when it has one, else
        the image token followed by the question."""
        if getattr(self.processor, "chat_template", None):
            messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
            return str(self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False))
        image_token = getattr(self.processor, "image_token", None) or getattr(self.tokenizer, "image_token", "") or ""
        return f"{image_token}{question}"

    def answer_ids(self, answer: str) -> list[int]:
        """The token ids of ``answer`` as the model would continue with it (no special tokens)."""
        ids = list(self.tokenizer(answer, add_special_tokens=False)["input_ids"])
        if not ids:
            raise ValueError(f"pytest-diffeval: the answer {answer!r} is no token of {self.id}'s tokenizer; "
                             "fix: pass answers the model can say (e.g. answers=('Yes', 'No'))")
        return ids

    def _inputs(self, images: np.ndarray, texts: list[str]) -> Any:
        inputs = self.processor(images=[_pil(i) for i in images], text=texts, return_tensors="pt", padding=True,
                                padding_side="right")  # right: every real token keeps its unpadded position
        inputs.pop("labels", None)  # PaliGemma's processor adds training labels; scoring needs no loss
        return inputs.to(self.device)

    def probabilities(self, images: np.ndarray, questions: Sequence[str], answers: Sequence[str]) -> np.ndarray:
        import torch

        answer_ids = [self.answer_ids(a) for a in answers]
        out = np.zeros((len(questions), len(answers)), np.float64)
        texts = [self.prompt(q) for q in questions]
        with torch.no_grad():
            for start in range(0, len(texts), self.batch_size):
                rows = slice(start, start + self.batch_size)
                inputs = self._inputs(images[rows], texts[rows])
                logits = self.model(**inputs).logits.float()
                mask = inputs["attention_mask"]
                last = mask.shape[1] - 1 - mask.flip(1).argmax(1)  # the last real token of each row
                log_p = torch.log_softmax(logits[torch.arange(len(last)), last], dim=-1)
                for k, ids in enumerate(answer_ids):
                    if len(ids) == 1:
                        out[rows, k] = log_p[:, ids[0]].double().exp().cpu().numpy()
                    else:
                        for i in range(len(last)):
                            out[start + i, k] = self._sequence_probability(images[start + i], texts[start + i], ids)
        return out

    def _sequence_probability(self, image: np.ndarray, text: str, ids: list[int]) -> float:
        """The probability of the answer tokens ``ids`` after ``text``, teacher-forced through
        ``generate`` (each step restricted to the next answer token, raw logits kept): the model's
        own generation code extends what each family adds per token (Qwen2.5-VL's
        ``mm_token_type_ids`` and rope deltas, PaliGemma's ``token_type_ids``), which appending
        to ``input_ids`` and ``attention_mask`` by hand got wrong."""
        import torch

        inputs = self._inputs(image[None], [text])
        start = inputs["input_ids"].shape[1]

        def forced(_batch: int, sequence: Any) -> list[int]:
            return [ids[min(len(sequence) - start, len(ids) - 1)]]

        output = self.model.generate(**inputs, max_new_tokens=len(ids), min_new_tokens=len(ids), do_sample=False,
                                     num_beams=1, prefix_allowed_tokens_fn=forced, output_logits=True,
                                     return_dict_in_generate=True)
        logits = torch.stack(output.logits[:len(ids)], 1)[0].float()
        log_p = torch.log_softmax(logits, dim=-1)
        return float(log_p[torch.arange(len(ids)), torch.tensor(ids, device=log_p.device)].double().sum().exp())

    def generate(self, images: np.ndarray, prompt: str, max_new_tokens: int = 30) -> list[str]:
        """Greedy free text for each image after ``prompt`` (in the chat template)."""
        import torch

        texts = []
        with torch.no_grad():
            for image in images:
                inputs = self._inputs(image[None], [self.prompt(prompt)])
                output = self.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
                new = output[0, inputs["input_ids"].shape[1]:]
                texts.append(self.tokenizer.decode(new, skip_special_tokens=True).strip())
        return texts


def load_vqa_backend(name: str | None = None, device: str | None = None, dtype: Any = None) -> TransformersVQA:
    """Load (once per process, device and dtype) a transformers VLM by embedded name, local
    folder or hub id; a hub id loads from its snapshot in the Hugging Face cache, so nothing
    asks the hub.  ``dtype`` as for pipelines: None/"auto" is float32 on the CPU, float16 on CUDA."""
    name = name or DEFAULT_VQA_MODEL
    device = device or settings.resolved_device()
    torch_dtype = resolve_dtype(dtype, device)
    backbone_id, path = resolve_model_dir(name)
    key = ("vqa", backbone_id, device, str(torch_dtype))

    def load() -> TransformersVQA:
        from transformers import AutoModelForImageTextToText, AutoProcessor

        snapshot = hub_snapshot(*backbone_id.split("@", 1)) if path is None and "@" in backbone_id else None
        location = str(path) if path is not None else str(snapshot) if snapshot is not None else name
        try:
            model = AutoModelForImageTextToText.from_pretrained(location, dtype=torch_dtype, use_safetensors=True)
            processor = AutoProcessor.from_pretrained(location)
        except (OSError, ValueError) as exc:
            from huggingface_hub.constants import HF_HUB_CACHE

            raise BackboneNotFoundError(
                f"pytest-diffeval: cannot load the vision-language model {name!r} (looked for a local folder "
                f"{Path(name).expanduser().resolve()} and in the Hugging Face cache {HF_HUB_CACHE}): "
                f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}\n"
                "  fix: pass vqa_model=<local folder that AutoModelForImageTextToText and AutoProcessor load, "
                "safetensors weights>, download it once with `huggingface-cli download <id>`, or use the "
                "embedded 'diffeval/tiny-vlm'"
            ) from exc
        identity = backbone_id if torch_dtype == resolve_dtype("float32", "cpu") else f"{backbone_id}|{torch_dtype}"
        return TransformersVQA(model.to(device).eval(), processor, identity, device)

    return process_cache.get_or_load(key, load)


__all__ = ["DEFAULT_VQA_MODEL", "TransformersVQA", "load_vqa_backend"]
