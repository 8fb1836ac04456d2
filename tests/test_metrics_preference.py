"""Human-preference scorers on random-weight models of their real architectures: PickScore
(a transformers CLIPModel) and HPS v2 (an open_clip CLIP, tiny config registered through
open_clip's model-config API) give, per image, the published formula computed here by
hand from the same model's own forward pass; weights are found locally or in the hub
cache, hashed into the backbone id, and missing weights or extras fail clearly."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from pytest_diffeval.exceptions import MissingDependencyError, WeightsNotAvailableError
from pytest_diffeval.generation import ImageSet
from pytest_diffeval.metrics import compute_metric

PROMPTS = ["a red square", "a blue circle on a long table in a quiet room " * 8, "x"]


def image_set(size: int = 40, seed: int = 0) -> ImageSet:
    rng = np.random.default_rng(seed)
    images = (rng.random((len(PROMPTS), size, size, 3)) * 255).astype(np.uint8)
    return ImageSet(images=images, prompts=list(PROMPTS), seeds=list(range(len(PROMPTS))))


# --------------------------------------------------------------------------- PickScore


@pytest.fixture(scope="module")
def pickscore_folders(tiny_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """PickScore's layout: a CLIPModel folder without processor files, and the processor
    (of the CLIP it was fine-tuned from) in a folder of its own."""
    root = tmp_path_factory.mktemp("pickscore")
    model, processor = root / "model", root / "processor"
    shutil.copytree(tiny_models["clip"], model)
    shutil.copytree(tiny_models["clip"], processor)
    for file in model.iterdir():
        if file.name not in ("config.json", "model.safetensors"):
            file.unlink()
    return model, processor


def test_pick_score_is_logit_scale_times_cosine_of_the_models_own_embeddings(pickscore_folders):
    from transformers import CLIPModel, CLIPProcessor

    model_dir, processor_dir = pickscore_folders
    images = image_set()
    with pytest.warns(UserWarning, match="longer than the 77 tokens"):
        result = compute_metric("pick_score", images, pickscore_model=str(model_dir),
                                pickscore_processor=str(processor_dir))

    model = CLIPModel.from_pretrained(str(model_dir)).eval()
    processor = CLIPProcessor.from_pretrained(str(processor_dir))
    inputs = processor(text=list(images.prompts), images=images.to_pil(), padding=True, truncation=True,
                       max_length=77, return_tensors="pt")
    with torch.no_grad():
        logits = model(**inputs).logits_per_image  # logit_scale.exp() * cos, every image x every prompt
    expected = torch.diagonal(logits).double().numpy()
    np.testing.assert_allclose(result.per_sample, expected, rtol=1e-5, atol=1e-5)
    assert result.value == pytest.approx(expected.mean())
    assert result.backbone.startswith("pick_score:model@") and "+processor:processor@" in result.backbone
    assert result.details["truncated_prompts"] == [PROMPTS[1]]
    assert len(set(np.round(result.per_sample, 6))) == len(PROMPTS)  # the images are told apart


def test_pick_score_other_weights_are_another_backbone(pickscore_folders, tmp_path):
    from safetensors.torch import load_file, save_file

    model_dir, processor_dir = pickscore_folders
    changed = tmp_path / "model"
    shutil.copytree(model_dir, changed)
    state = load_file(str(changed / "model.safetensors"))
    state["logit_scale"] = state["logit_scale"] + 1.0
    save_file(state, str(changed / "model.safetensors"), metadata={"format": "pt"})
    images = image_set()
    with pytest.warns(UserWarning):
        first = compute_metric("pick_score", images, pickscore_model=str(model_dir), pickscore_processor=str(processor_dir))
        second = compute_metric("pick_score", images, pickscore_model=str(changed), pickscore_processor=str(processor_dir))
    assert first.backbone != second.backbone
    np.testing.assert_allclose(second.per_sample, first.per_sample * np.e, rtol=1e-4)


def test_pick_score_reads_a_cached_hub_snapshot_and_names_a_missing_one(hub_cache):
    images = image_set()
    with pytest.warns(UserWarning):
        result = compute_metric("pick_score", images, pickscore_model="openai/tiny-clip-test")
    assert result.backbone.startswith("pick_score:openai/tiny-clip-test@0123456789abcdef")
    with pytest.raises(WeightsNotAvailableError, match=r"huggingface-cli download yuvalkirstain/PickScore_v1"):
        compute_metric("pick_score", images)


# --------------------------------------------------------------------------- HPS v2


TINY_OPEN_CLIP = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 8, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 4, "layers": 2},
}


def _open_clip():
    """open_clip, or a skip that says why; DIFFEVAL_REQUIRE_OPEN_CLIP=1 (the CI step that
    installs the extra) makes its absence a failure instead."""
    try:
        import open_clip
    except Exception as exc:  # noqa: BLE001 - ImportError, or a torchvision that does not fit this torch
        if os.environ.get("DIFFEVAL_REQUIRE_OPEN_CLIP") == "1":
            raise
        pytest.skip(f"the [hps] extra (open_clip_torch, with a torchvision built for this torch) is not importable: "
                    f"{type(exc).__name__}: {exc}")
    return open_clip


@pytest.fixture(scope="module")
def hps_checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Random open_clip models of a tiny registered config, saved as HPS publishes its
    checkpoints (``{"state_dict": ...}`` in a ``.pt``) and as safetensors."""
    open_clip = _open_clip()
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("hps")
    (root / "configs").mkdir()
    (root / "configs" / "tiny-hps-test.json").write_text(json.dumps(TINY_OPEN_CLIP))
    open_clip.add_model_config(root / "configs")
    files = {}
    for seed, version in enumerate(("v2.0", "v2.1")):
        torch.manual_seed(seed)
        model = open_clip.create_model("tiny-hps-test", pretrained=None)
        files[version] = root / f"HPS_{version}_compressed.pt"
        torch.save({"state_dict": model.state_dict()}, files[version])
    save_file({k: v.contiguous() for k, v in torch.load(files["v2.1"], weights_only=True)["state_dict"].items()},
              str(root / "hps.safetensors"))
    files["safetensors"] = root / "hps.safetensors"
    return files


def _hand_hps(checkpoint: Path, images: ImageSet) -> np.ndarray:
    """100 x the diagonal of open_clip's own image @ text features (as HPSv2's img_score
    and evaluation.py), preprocessing by hand: bicubic resize, OpenAI mean/std."""
    open_clip = _open_clip()
    from PIL import Image

    model = open_clip.create_model("tiny-hps-test", pretrained=None)
    model.load_state_dict(torch.load(checkpoint, weights_only=True)["state_dict"])
    model.eval()
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(3, 1, 1)
    pixels = torch.stack([
        (torch.from_numpy(np.asarray(Image.fromarray(a).resize((32, 32), Image.BICUBIC), np.float32) / 255)
         .permute(2, 0, 1) - mean) / std
        for a in images.images])
    tokens = open_clip.get_tokenizer("tiny-hps-test")(list(images.prompts))
    with torch.no_grad():
        image_features, text_features, _ = model(pixels, tokens)  # normalised features
    return (100 * torch.diagonal(image_features @ text_features.T)).double().numpy()


def test_hps_is_100_times_cosine_of_open_clips_own_features(hps_checkpoints):
    images = image_set(size=48)
    with pytest.warns(UserWarning, match="longer than the 77 tokens"):
        result = compute_metric("hps_v2", images, hps_version="v2.1", hps_weights=str(hps_checkpoints["v2.1"]),
                                hps_architecture="tiny-hps-test")
    expected = _hand_hps(hps_checkpoints["v2.1"], images)
    np.testing.assert_allclose(result.per_sample, expected, rtol=1e-4, atol=1e-4)
    assert result.backbone.startswith("hps_v2.1:")
    assert len(set(np.round(result.per_sample, 5))) == len(PROMPTS)


def test_hps_versions_and_weights_are_never_the_same_backbone(hps_checkpoints):
    images = image_set(size=32)
    scores = {}
    with pytest.warns(UserWarning):
        for name, version in (("v2.0", "v2.0"), ("v2.1", "v2.1"), ("safetensors", "v2.1")):
            scores[name] = compute_metric("hps_v2", images, hps_version=version, hps_architecture="tiny-hps-test",
                                          hps_weights=str(hps_checkpoints[name]))
    assert scores["v2.0"].backbone.startswith("hps_v2.0:") and scores["v2.1"].backbone.startswith("hps_v2.1:")
    assert len({s.backbone for s in scores.values()}) == 3
    np.testing.assert_allclose(scores["safetensors"].per_sample, scores["v2.1"].per_sample, rtol=1e-6)
    assert not np.allclose(scores["v2.0"].per_sample, scores["v2.1"].per_sample)


def test_hps_checkpoint_with_a_pickled_object_is_refused_then_converted(hps_checkpoints, tmp_path):
    """A published-style checkpoint that also pickles its training arguments: refused by
    weights_only=True with the conversion command named; once converted, it scores as the
    tensors-only file does."""
    import argparse

    from pytest_diffeval.convert_weights import convert
    from pytest_diffeval.exceptions import MetricInputError
    from pytest_diffeval.fingerprints import file_fingerprint

    images = image_set(size=32)
    state = torch.load(hps_checkpoints["v2.1"], weights_only=True)["state_dict"]
    pickled = tmp_path / "HPS_v2.1_compressed.pt"
    torch.save({"state_dict": state, "args": argparse.Namespace(lr=1e-5)}, pickled)
    options = {"hps_version": "v2.1", "hps_architecture": "tiny-hps-test"}
    with pytest.raises(MetricInputError, match=r"weights_only=True.*python -m pytest_diffeval convert-weights"):
        compute_metric("hps_v2", images, hps_weights=str(pickled), **options)
    convert(pickled, tmp_path / "HPS_v2.1_compressed.safetensors", ["argparse.Namespace"])
    with pytest.warns(UserWarning):
        converted = compute_metric("hps_v2", images, hps_weights=str(tmp_path), **options)  # the folder: .safetensors
        original = compute_metric("hps_v2", images, hps_weights=str(hps_checkpoints["v2.1"]), **options)
    np.testing.assert_allclose(converted.per_sample, original.per_sample, rtol=1e-6)
    # the converted file keeps the id of the pickle it came from: baselines recorded with it still compare
    assert converted.backbone == f"hps_v2.1:{file_fingerprint(pickled)}+tiny-hps-test" != original.backbone


def test_hps_without_open_clip_names_the_extra(monkeypatch, tmp_path):
    import sys

    weights = tmp_path / "HPS_v2.1_compressed.pt"
    torch.save({"state_dict": {"w": torch.zeros(1)}}, weights)
    monkeypatch.setitem(sys.modules, "open_clip", None)  # import open_clip -> ImportError
    with pytest.raises(MissingDependencyError, match=r"pip install 'pytest-diffeval\[hps\]'"):
        compute_metric("hps_v2", image_set(), hps_weights=str(weights))


def test_hps_weights_not_cached_and_unknown_version_fail_clearly(tmp_path):
    from pytest_diffeval.exceptions import MetricInputError

    with pytest.raises(WeightsNotAvailableError, match=r"huggingface-cli download xswu/HPSv2 HPS_v2.1_compressed.pt"):
        compute_metric("hps_v2", image_set())
    with pytest.raises(MetricInputError, match=r"hps_version='v2.0' or 'v2.1'"):
        compute_metric("hps_v2", image_set(), hps_version="v3")
    from pytest_diffeval.exceptions import WeightsFileNotFoundError

    missing = tmp_path / "HPS_v2.1_compressed.pt"
    with pytest.raises(WeightsFileNotFoundError, match=rf"weights file {missing} \(hps_weights=\) does not exist"):
        compute_metric("hps_v2", image_set(), hps_weights=str(missing))


# --------------------------------------------------------------------------- ImageReward

FAKE_IMAGE_REWARD = '''
"""A stand-in for THUDM/ImageReward's ImageReward/ImageReward.py with the same interface:
ImageReward(med_config, device), load_state_dict, score(prompt, image) with the image a PIL
image or a file path, and the published standardisation (reward - mean) / std."""
import json

import numpy as np
import torch
import torch.nn as nn
from PIL import Image


class ImageReward(nn.Module):
    def __init__(self, med_config, device="cpu"):
        super().__init__()
        with open(med_config) as handle:
            width = json.load(handle)["hidden_size"]
        self.device = device
        self.visual_encoder = nn.Linear(3 * 8 * 8, width)
        self.text_encoder = nn.Embedding(128, width)
        self.mlp = nn.Sequential(nn.Linear(width, 4), nn.Linear(4, 1))
        self.mean = 0.16717362830052426
        self.std = 1.0333394966054072

    def features(self, prompt, image):
        if isinstance(image, str):
            image = Image.open(image)
        pixels = np.asarray(image.convert("RGB").resize((8, 8), Image.BICUBIC), np.float32) / 255
        ids = torch.tensor([min(ord(c), 127) for c in prompt[:35]])
        return torch.tanh(self.visual_encoder(torch.from_numpy(pixels).flatten())) * self.text_encoder(ids).mean(0)

    def score(self, prompt, image):
        rewards = self.mlp(self.features(prompt, image))
        return ((rewards - self.mean) / self.std).detach().cpu().numpy().item()
'''


@pytest.fixture
def fake_image_reward(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A fake ``ImageReward`` package (importable here and, through PYTHONPATH, in a child
    interpreter) and random weights for it saved as the published ``ImageReward.pt`` (a
    state dict) beside ``med_config.json``."""
    import sys

    packages = tmp_path / "packages"
    (packages / "ImageReward").mkdir(parents=True)
    (packages / "ImageReward" / "__init__.py").write_text("from .ImageReward import ImageReward\n")  # as the package
    (packages / "ImageReward" / "ImageReward.py").write_text(FAKE_IMAGE_REWARD)
    monkeypatch.syspath_prepend(str(packages))
    monkeypatch.setenv("PYTHONPATH", str(packages))
    weights = tmp_path / "weights"
    weights.mkdir()
    (weights / "med_config.json").write_text(json.dumps({"hidden_size": 8}))
    module = __import__("ImageReward.ImageReward", fromlist=["ImageReward"])
    torch.manual_seed(3)
    model = module.ImageReward(str(weights / "med_config.json")).eval()
    torch.save(model.state_dict(), weights / "ImageReward.pt")
    yield model, weights
    for name in [n for n in sys.modules if n == "ImageReward" or n.startswith("ImageReward.")]:
        del sys.modules[name]  # imported by this fixture: nothing to restore


def _hand_image_reward(model, images: ImageSet) -> np.ndarray:
    """(MLP(text-image feature) - published mean) / published std, from the model's own pieces."""
    with torch.no_grad():
        rewards = [model.mlp(model.features(p, image)).item() for p, image in zip(images.prompts, images.to_pil())]
    return (np.asarray(rewards) - 0.16717362830052426) / 1.0333394966054072


def test_image_reward_in_process_and_in_its_own_interpreter_give_the_packages_reward(fake_image_reward):
    import sys

    model, weights = fake_image_reward
    images = image_set(size=24)
    expected = _hand_image_reward(model, images)
    here = compute_metric("image_reward", images, image_reward_weights=str(weights / "ImageReward.pt"), device="cpu")
    child = compute_metric("image_reward", images, image_reward_weights=str(weights / "ImageReward.pt"),
                           image_reward_python=sys.executable, device="cpu", timeout=120)
    np.testing.assert_allclose(here.per_sample, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(child.per_sample, expected, rtol=1e-5, atol=1e-6)  # PNG round trip is lossless
    assert here.backbone == child.backbone and here.backbone.startswith("image_reward:ImageReward-v1.0:")
    assert here.details["route"] == "in-process" and child.details["route"] == "external"
    assert child.details["interpreter"] and "ImageReward" not in here.details.get("interpreter", "")


def test_image_reward_refuses_a_pickle_and_names_the_conversion(fake_image_reward, tmp_path):
    from pytest_diffeval.exceptions import MetricInputError

    _, weights = fake_image_reward

    import argparse

    torch.save({"args": argparse.Namespace(lr=1)}, weights / "ImageReward.pt")  # weights_only=True refuses it
    with pytest.raises(MetricInputError, match=r"weights_only=True.*python -m pytest_diffeval convert-weights"):
        compute_metric("image_reward", image_set(), image_reward_weights=str(weights / "ImageReward.pt"), device="cpu")


def test_image_reward_refuses_weights_that_leave_scored_parameters_random(fake_image_reward):
    """``strict=False`` (as the package's ``load()``) would keep a random MLP for a file that
    lacks it; the real package's run is in test_image_reward_real.py."""
    from pytest_diffeval.exceptions import MetricInputError

    model, weights = fake_image_reward
    torch.save({k: v for k, v in model.state_dict().items() if not k.startswith("mlp.")}, weights / "ImageReward.pt")
    with pytest.raises(MetricInputError, match=r"ImageReward\.pt lacks 4 of the model's parameters \(mlp\.0\.bias.*fix:"):
        compute_metric("image_reward", image_set(), image_reward_weights=str(weights / "ImageReward.pt"), device="cpu")


def test_image_reward_without_the_package_or_an_interpreter_names_both(tmp_path, monkeypatch):
    monkeypatch.delenv("DIFFEVAL_IMAGE_REWARD_PYTHON", raising=False)
    (tmp_path / "ImageReward.pt").write_bytes(b"")
    (tmp_path / "med_config.json").write_text("{}")
    with pytest.raises(MissingDependencyError, match=r"pytest-diffeval\[image-reward\].*image_reward_python="):
        compute_metric("image_reward", image_set(), image_reward_weights=str(tmp_path / "ImageReward.pt"))


# --------------------------------------------------------------------------- convert-weights


def test_convert_weights_writes_the_tensors_and_admits_only_named_classes(tmp_path, capsys):
    import argparse

    from safetensors.torch import load_file

    from pytest_diffeval.__main__ import main

    state = {"visual.proj": torch.randn(4, 3), "nested": {"bias": torch.arange(3.0)}}
    source = tmp_path / "HPS_v2.1_compressed.pt"
    torch.save({"state_dict": state, "args": argparse.Namespace(lr=1e-4)}, source)
    out = tmp_path / "HPS_v2.1_compressed.safetensors"

    assert main(["convert-weights", str(source), str(out)]) == 2  # weights_only=True refuses the Namespace
    error = capsys.readouterr().err
    assert "refuses" in error and "--allow-global argparse.Namespace" in error and not out.exists()

    assert main(["convert-weights", str(source), str(out), "--allow-global", "argparse.Namespace"]) == 0
    assert "wrote 2 tensors" in capsys.readouterr().out
    converted = load_file(str(out))
    assert set(converted) == {"visual.proj", "nested.bias"}
    torch.testing.assert_close(converted["visual.proj"], state["visual.proj"])
    torch.testing.assert_close(converted["nested.bias"], state["nested"]["bias"])


def test_cache_material_holds_the_weights_content_and_version(pickscore_folders, tmp_path):
    """What keys a cached result: other weights (same path, other bytes) or another HPS version
    is another key; weights that cannot be found still key (compute raises the clear error)."""
    from pytest_diffeval.metrics import get_metric

    images = image_set()
    model_dir, processor_dir = pickscore_folders
    pick = get_metric("pick_score")
    copy = tmp_path / "pick"
    shutil.copytree(model_dir, copy)
    before = pick.cache_material(images, {"pickscore_model": str(copy), "pickscore_processor": str(processor_dir)})
    (copy / "config.json").write_text((copy / "config.json").read_text() + " ")
    after = pick.cache_material(images, {"pickscore_model": str(copy), "pickscore_processor": str(processor_dir)})
    assert before["backbone"] != after["backbone"]

    hps = get_metric("hps_v2")
    weights = tmp_path / "hps"
    weights.mkdir()
    for name in ("HPS_v2_compressed.pt", "HPS_v2.1_compressed.pt"):
        torch.save({"state_dict": {"w": torch.full((1,), float(len(name)))}}, weights / name)
    keys = {v: hps.cache_material(images, {"hps_version": v, "hps_weights": str(weights)})["weights"]
            for v in ("v2.0", "v2.1")}
    assert keys["v2.0"].startswith("v2.0:") and keys["v2.1"].startswith("v2.1:") and keys["v2.0"][5:] != keys["v2.1"][5:]
    assert hps.cache_material(images, {"hps_weights": str(tmp_path / "nowhere.pt")})["weights"] == "unavailable"
