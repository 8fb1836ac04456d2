"""Make regressed variants of the embedded model, to watch the release suite catch them.

    python scripts/make_regressions.py --out build/regressions
    pytest model_tests/ --diffeval-model=build/regressions/perturbed      # fails
    pytest model_tests/ --diffeval-model=diffeval/tiny-t2i-undertrained   # fails

Variants (seconds to make; nothing is trained):

* ``perturbed``   - UNet weights plus Gaussian noise of 0.3x each tensor's std
                    (measured here: ~10 CLIP points and ~16% digit accuracy lost;
                    <= 0.1x std changes nothing measurable, a benign perturbation)
* ``text-broken`` - text encoder weights zeroed: the prompt no longer conditions
* ``undertrained``- shipped in the package as ``diffeval/tiny-t2i-undertrained`` (an
                    early checkpoint of the training run); listed here for completeness
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from safetensors.torch import load_file, save_file

from pytest_diffeval.embedded import resolve_embedded
from pytest_diffeval.tiny import perturb_weights

GOOD = "diffeval/tiny-t2i"


def zero_component(path: Path, component: str) -> None:
    for file in sorted((path / component).glob("*.safetensors")):
        tensors = {name: tensor.zero_() if tensor.is_floating_point() else tensor
                   for name, tensor in load_file(str(file)).items()}
        save_file(tensors, str(file), metadata={"format": "pt"})


def make_variants(out: Path) -> dict[str, Path]:
    """Write the variants under ``out`` and return name -> model folder."""
    good = resolve_embedded(GOOD)
    if good is None:
        raise SystemExit(f"the embedded model {GOOD} has no weights; run scripts/train_embedded.py first")
    variants = {}
    for name in ("perturbed", "text-broken"):
        target = out / name
        if target.exists():
            shutil.rmtree(target)
        shutil.copytree(good, target)
        variants[name] = target
    perturb_weights(variants["perturbed"], "unet", scale=0.3, seed=0)
    zero_component(variants["text-broken"], "text_encoder")
    variants["undertrained"] = resolve_embedded("diffeval/tiny-t2i-undertrained")
    return variants


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("build/regressions"))
    args = parser.parse_args()
    for name, path in make_variants(args.out).items():
        print(f"{name:13s} {path}")


if __name__ == "__main__":
    main()
