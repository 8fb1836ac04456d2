"""Make regressed variants of the embedded model, to watch the release suite catch them.

    python scripts/make_regressions.py --out build/regressions
    pytest model_tests/ --diffeval-model=build/regressions/perturbed      # fails
    pytest model_tests/ --diffeval-model=diffeval/tiny-t2i-undertrained   # fails

Variants (seconds to make; nothing is trained), the "regression zoo":

* ``undertrained``      shipped as ``diffeval/tiny-t2i-undertrained``: an early checkpoint
* ``noise-0.3``         UNet weights + Gaussian noise of 0.3x each tensor's std
* ``noise-1.0``         the same at 1.0x std (<= 0.1x std changes nothing measurable)
* ``text-zeroed``       text encoder weights zeroed: the prompt no longer conditions
* ``prompts-shuffled``  a wrong tokenizer: colour and digit words swapped in its vocabulary
                        (red<->blue, green<->yellow, black<->white, 0<->5, 1<->7 ...)
* ``scheduler-swapped`` Stable Diffusion's scheduler config (``scaled_linear`` betas) shipped
                        instead of the cosine schedule the model was trained with (a plain
                        DDPM swap at 20 steps is *not* a regression here: it samples as well)
* ``overflow-nan``      one UNet weight scaled past float range (what fp16 does past 65504):
                        the output is NaN
* ``colours-swapped``   a composition failure: every image shows the asked-for digit with the
                        prompt's two colours exchanged (stroke <-> background).  Made without
                        training: the shipped tokenizer's ``tokenizer.json`` gains normalizer rules
                        that rewrite each embedded prompt with its colours swapped, loaded as a
                        ``PreTrainedTokenizerFast`` (which honours them); model weights untouched

Benign variations the suite must pass (tests/test_embedded_suite.py): 1 or 2 threads,
batch size 1 or 8, ``-n 2``, a fresh process.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from safetensors.torch import load_file, save_file

from pytest_diffeval.embedded import resolve_embedded
from pytest_diffeval.embedded.data import ALL_COMBOS, caption
from pytest_diffeval.tiny import perturb_weights

GOOD = "diffeval/tiny-t2i"


def zero_component(path: Path, component: str) -> None:
    for file in sorted((path / component).glob("*.safetensors")):
        tensors = {name: tensor.zero_() if tensor.is_floating_point() else tensor
                   for name, tensor in load_file(str(file)).items()}
        save_file(tensors, str(file), metadata={"format": "pt"})


SWAPS = [("red", "blue"), ("green", "yellow"), ("black", "white"), ("0", "5"), ("1", "7"), ("2", "9"), ("3", "8")]


def swap_tokens(path: Path) -> None:
    """Swap the ids of word pairs in the tokenizer's vocabulary (both files that hold it)."""
    for name in ("vocab.json", "tokenizer.json"):
        file = path / "tokenizer" / name
        if not file.is_file():
            continue
        data = json.loads(file.read_text())
        vocab = data["model"]["vocab"] if name == "tokenizer.json" else data
        for a, b in SWAPS:
            a, b = f"{a}</w>", f"{b}</w>"
            vocab[a], vocab[b] = vocab[b], vocab[a]
        file.write_text(json.dumps(data))


def swap_scheduler(path: Path) -> None:
    config_file = path / "scheduler" / "scheduler_config.json"
    config = json.loads(config_file.read_text())
    config.update(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    config_file.write_text(json.dumps(config, indent=2))


def overflow(path: Path) -> None:
    file = path / "unet" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(str(file))
    name = next(k for k in tensors if k.startswith("conv_in.weight"))
    tensors[name] = tensors[name] * 1e38  # past float16's (and soon float32's) range
    save_file(tensors, str(file), metadata={"format": "pt"})


def swap_colours(path: Path) -> None:
    """Rewrite every embedded prompt "a F digit D on a B background" as "a B digit D on a F
    background" in the tokenizer's normalizer (one literal rule per prompt; the rewritten text
    starts with "A" so no later rule matches it again, and a final lowercase undoes that)."""
    file = path / "tokenizer" / "tokenizer.json"
    data = json.loads(file.read_text())
    rules = [{"type": "Replace", "pattern": {"String": caption(digit, fg, bg)},
              "content": "A" + caption(digit, bg, fg)[1:]} for digit, fg, bg in ALL_COMBOS]
    data["normalizer"] = {"type": "Sequence", "normalizers": [data["normalizer"], *rules, {"type": "Lowercase"}]}
    file.write_text(json.dumps(data))
    index_file = path / "model_index.json"  # CLIPTokenizer rebuilds its normalizer; the fast tokenizer reads the file
    index = json.loads(index_file.read_text())
    index["tokenizer"] = ["transformers", "PreTrainedTokenizerFast"]
    index_file.write_text(json.dumps(index, indent=2))


MAKERS = {
    "noise-0.3": lambda p: perturb_weights(p, "unet", scale=0.3, seed=0),
    "noise-1.0": lambda p: perturb_weights(p, "unet", scale=1.0, seed=0),
    "text-zeroed": lambda p: zero_component(p, "text_encoder"),
    "prompts-shuffled": swap_tokens,
    "scheduler-swapped": swap_scheduler,
    "overflow-nan": overflow,
    "colours-swapped": swap_colours,
}


def make_variants(out: Path) -> dict[str, Path]:
    """Write the variants under ``out`` and return name -> model folder."""
    good = resolve_embedded(GOOD)
    if good is None:
        raise SystemExit(f"the embedded model {GOOD} has no weights; run scripts/train_embedded.py first")
    variants = {"undertrained": resolve_embedded("diffeval/tiny-t2i-undertrained")}
    for name, make in MAKERS.items():
        target = out / name
        if target.exists():
            shutil.rmtree(target)
        shutil.copytree(good, target)
        make(target)
        variants[name] = target
    return variants


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("build/regressions"))
    args = parser.parse_args()
    for name, path in make_variants(args.out).items():
        print(f"{name:13s} {path}")


if __name__ == "__main__":
    main()
