"""Odd and untrusted inputs outside the results merge (see tests/test_shards.py for that):
16-bit and float images, pickle LoRA files, broken ``model_index.json`` entries, seeds
outside torch's range, and test ids that sanitise to one results folder."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from pytest_diffeval.exceptions import InputError, PipelineNotFoundError, ReferenceSetError
from pytest_diffeval.generation import SEED_MAX, check_seeds, generate_images, load_input_images
from pytest_diffeval.metrics.fid import _load_folder
from pytest_diffeval.pipelines import apply_lora, check_model_index, load_pipeline
from pytest_diffeval.recording import results_folder

PIXELS = np.random.default_rng(0).integers(0, 256, (16, 16), dtype=np.uint8)


# --------------------------------------------------------------------------- 16-bit and float images


def test_a_16_bit_reference_folder_reads_as_the_same_pixels_as_8_bit(tmp_path: Path) -> None:
    for bits, array in (("8", PIXELS), ("16", PIXELS.astype(np.uint16) * 257)):
        (tmp_path / bits).mkdir()
        Image.fromarray(array).save(tmp_path / bits / "a.png")
    assert Image.open(tmp_path / "16" / "a.png").mode.startswith("I")  # PIL clipped these at 255 before
    eight, sixteen = next(_load_folder(tmp_path / "8")), next(_load_folder(tmp_path / "16"))
    assert sixteen.dtype == np.uint8 and sixteen.shape == (16, 16, 3)
    np.testing.assert_array_equal(sixteen, eight)


def test_16_bit_and_float_source_images_convert_faithfully(tmp_path: Path) -> None:
    Image.fromarray(PIXELS.astype(np.uint16) * 257).save(tmp_path / "sixteen.png")
    Image.fromarray(PIXELS.astype(np.float32) / 255).save(tmp_path / "float.tif")
    for file in ("sixteen.png", "float.tif"):
        arrays, _ = load_input_images(str(tmp_path / file), what="source_images")
        np.testing.assert_array_equal(arrays[0], np.repeat(PIXELS[..., None], 3, axis=-1))


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_a_float_image_with_nan_or_inf_is_refused_naming_the_file(tmp_path: Path, bad: float) -> None:
    array = PIXELS.astype(np.float32) / 255
    array[3, 4] = bad
    Image.fromarray(array).save(tmp_path / "source.tif")
    with pytest.raises(InputError, match=re.escape(f"source_images: {tmp_path / 'source.tif'} is a float image with 1 "
                                                   "NaN or infinite pixels; fix: save it as an 8- or 16-bit PNG")):
        load_input_images(str(tmp_path / "source.tif"), what="source_images")
    reference = tmp_path / "reference"
    reference.mkdir()
    shutil.copy(tmp_path / "source.tif", reference / "a.png")  # a TIFF under a .png name is still read
    with pytest.raises(ReferenceSetError, match="reference image .*a.png is a float image with 1 NaN"):
        list(_load_folder(reference))


# --------------------------------------------------------------------------- LoRA and model_index.json


class _LoraPipe:
    """Records what diffusers' LoRA loading would have been asked to read."""

    def __init__(self) -> None:
        self.loaded: list[tuple[str, Any]] = []

    def load_lora_weights(self, location: str, **kwargs: Any) -> None:
        self.loaded.append((location, kwargs.get("weight_name")))

    def fuse_lora(self, **kwargs: Any) -> None:
        pass

    def unload_lora_weights(self) -> None:
        pass


def test_a_pickle_lora_is_refused_unless_the_user_opts_in(tmp_path: Path) -> None:
    pytest.importorskip("peft")
    lora = tmp_path / "lora.bin"
    lora.write_bytes(b"a pickle would run code here")
    pipe = _LoraPipe()
    with pytest.raises(PipelineNotFoundError, match=r"(?s)the LoRA '.*lora.bin' is the pickle file 'lora.bin' where a "
                                                    r"\.safetensors file is expected.*use_safetensors=False"):
        apply_lora(pipe, lora, 1.0)
    assert pipe.loaded == []  # never handed to torch.load
    apply_lora(pipe, lora, 1.0, use_safetensors=False)  # the same opt-in as pickle model folders
    assert pipe.loaded == [(str(tmp_path.resolve()), "lora.bin")]


@pytest.mark.parametrize("entry, message", [
    ({"unet": ["diffusers", "NoSuchUNet"]}, "entry 'unet' is ['diffusers', 'NoSuchUNet'], but diffusers has no class "
                                            "'NoSuchUNet'"),
    ({"unet": ["nolib", "UNet2DConditionModel"]}, "entry 'unet' is ['nolib', 'UNet2DConditionModel'], but there is no "
                                                  "library or diffusers pipeline module 'nolib'"),
    ({"unet": "UNet2DConditionModel"}, "entry 'unet' is 'UNet2DConditionModel', not a [library, class] pair"),
    ({"unet": ["diffusers"]}, "entry 'unet' is ['diffusers'], not a [library, class] pair"),
    ({"_class_name": 5}, "'_class_name' is 5, not a pipeline class of diffusers nor of pytest-diffeval"),
    ({"_class_name": "NoSuchPipeline"}, "'_class_name' is 'NoSuchPipeline', not a pipeline class"),
], ids=["unknown-class", "unknown-library", "not-a-pair", "short", "class-name-int", "class-name-unknown"])
def test_invalid_model_index_entries_name_the_file_the_entry_and_the_fix(tmp_path: Path, entry: dict[str, Any],
                                                                          message: str) -> None:
    index = {"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"], **entry}
    (tmp_path / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(PipelineNotFoundError) as info:
        load_pipeline(tmp_path)
    assert str(info.value).startswith(f"pytest-diffeval: {tmp_path / 'model_index.json'}: {message}")
    assert "Fix: each component entry is [library, class]" in str(info.value)


def test_model_index_check_accepts_what_save_pretrained_writes(tmp_path: Path) -> None:
    index = {"_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.42.1",
             "requires_safety_checker": True, "image_encoder": [None, None],
             "safety_checker": ["stable_diffusion", "StableDiffusionSafetyChecker"],
             "feature_extractor": ["transformers", "CLIPImageProcessor"], "unet": ["diffusers", "UNet2DConditionModel"]}
    (tmp_path / "model_index.json").write_text(json.dumps(index))
    assert check_model_index(tmp_path) == index
    (tmp_path / "model_index.json").write_text("{bad")
    with pytest.raises(PipelineNotFoundError, match="model_index.json: cannot read it as JSON"):
        check_model_index(tmp_path)


# --------------------------------------------------------------------------- seeds


@pytest.mark.parametrize("seed", [-1, -2**63, 2**63, 2**64 - 1, 2**64])
def test_seeds_outside_the_range_of_distinct_generator_states_are_refused_up_front(seed: int) -> None:
    with pytest.raises(InputError, match=rf"seed {seed} is outside \[0, 2\*\*63 - 1\].*fix: use seeds in that range"):
        generate_images(object(), ["a cat"], seeds=[0, seed])  # refused before the pipeline is touched


def test_the_seed_range_is_what_torch_takes_without_aliasing() -> None:
    import torch

    assert check_seeds(range(3)) == [0, 1, 2] and check_seeds([SEED_MAX]) == [SEED_MAX]
    # the aliasing that made -1 and 2**64 - 1 two "different" samples of the same images
    assert torch.Generator().manual_seed(-1).initial_seed() == torch.Generator().manual_seed(2**64 - 1).initial_seed()
    assert torch.Generator().manual_seed(SEED_MAX).initial_seed() == SEED_MAX
    with pytest.raises(InputError, match="seeds must be integers"):
        check_seeds(["x"])


# --------------------------------------------------------------------------- results folders


def test_results_folders_are_unique_per_test_id() -> None:
    ids = ["t.py::test_a[x/y]", "t.py::test_a[x_y]", "t.py::test_a[x y]", "t.py::TestC::test_a", "t.py::TestC__test_a"]
    folders = [results_folder(i) for i in ids]
    assert len({f.name for f in folders}) == len(ids)
    assert folders[1].name == "t.py__test_a[x_y]"  # ids that sanitising leaves alone keep their readable name
    assert results_folder("tests/test_x.py::test_y").name == "tests_test_x.py__test_y"
    assert all(f.parent == folders[0].parent for f in folders)


def test_a_plan_with_an_out_of_range_seed_is_refused_at_collection() -> None:
    from pytest_diffeval.planning import Plan

    mark = pytest.mark.diffeval_plan("diffeval/tiny-t2i", ["a cat"], seeds=[0, -1]).mark
    with pytest.raises(ValueError, match=r"test_x: diffeval_plan: seed -1 is outside \[0, 2\*\*63 - 1\]"):
        Plan.from_marker(mark, "test_x")
    assert Plan.from_marker(pytest.mark.diffeval_plan("m", ["a"], seeds=range(2)).mark, "test_x").seeds == (0, 1)
