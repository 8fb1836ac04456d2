"""``image_reward`` with the REAL ImageReward package (``image-reward`` 1.5, THUDM) in a venv of
its own, offline, on a random-weight model of its real architecture: BLIP's
``VisionTransformer`` (2 blocks of width 64 instead of ViT-L's 24 of 1024, through
``image_reward_real/sitecustomize.py``, so it runs in seconds), BLIP's BERT text encoder with
cross-attention (2 layers, hidden size 768 as the MLP needs; ``med_config.json`` written here),
the package's MLP, tokenizer (``BertTokenizer.from_pretrained('bert-base-uncased')``, served
from a hand-made Hugging Face cache with a tiny vocabulary) and ``score()``.  The metric's
values, through the external-environment route, equal ImageReward's formula computed by hand
in that venv from the same weights file (``image_reward_real/hand_reward.py``).

The venv's interpreter is ``DIFFEVAL_TEST_IMAGE_REWARD_PYTHON`` (``.ci/run`` builds one,
``.venv-image-reward``); without it these tests skip, and with
``DIFFEVAL_REQUIRE_IMAGE_REWARD=1`` a missing one fails the run instead.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

from pytest_diffeval.exceptions import ExternalMetricError
from pytest_diffeval.generation import ImageSet
from pytest_diffeval.metrics import compute_metric
from pytest_diffeval.metrics.image_reward import MAX_TOKENS, MEAN, SCORER_FILE, STD

HERE = Path(__file__).parent / "image_reward_real"
REVISION = "0123456789abcdef0123456789abcdef01234567"
WORDS = "a photo of cat dog red blue green sky tree house on the in with and small big".split()
LONG = " ".join(["a red cat on the blue house with a green tree"] * 4)  # 44 tokens: cut at 35
PROMPTS = ["a photo of a red cat", LONG, "a small dog in the sky"]


def _python() -> str | None:
    configured = os.environ.get("DIFFEVAL_TEST_IMAGE_REWARD_PYTHON")
    found = configured if configured and Path(configured).is_file() else None
    if os.environ.get("DIFFEVAL_REQUIRE_IMAGE_REWARD") == "1" and found is None:
        raise RuntimeError(f"DIFFEVAL_REQUIRE_IMAGE_REWARD=1 but DIFFEVAL_TEST_IMAGE_REWARD_PYTHON={configured!r} names "
                           "no interpreter; .ci/run creates .venv-image-reward and points it there")
    return found


PYTHON = _python()  # an error here fails the run (collection error), never a skip
pytestmark = pytest.mark.skipif(PYTHON is None, reason="no ImageReward venv: set DIFFEVAL_TEST_IMAGE_REWARD_PYTHON "
                                "to the python of a venv with image-reward 1.5 (see .ci/run)")


def _hub_cache(root: Path) -> Path:
    """``bert-base-uncased`` as the hub cache lays it out, with a tiny vocabulary."""
    repo = root / "models--bert-base-uncased"
    snapshot = repo / "snapshots" / REVISION
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(REVISION)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS, *"abcdefghijklmnopqrstuvwxyz",
             *("##" + c for c in "abcdefghijklmnopqrstuvwxyz")]
    (snapshot / "vocab.txt").write_text("\n".join(vocab) + "\n")
    (snapshot / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": True, "model_max_length": 512}))
    (snapshot / "config.json").write_text(json.dumps({"model_type": "bert", "vocab_size": len(vocab)}))
    return root


def _med_config(path: Path, vocab_size: int) -> Path:
    """ImageReward's ``med_config.json`` (BERT-base with cross-attention), smaller: 2 layers,
    a narrow feed-forward; hidden size 768 stays, the package's MLP takes 768 features."""
    path.write_text(json.dumps({
        "architectures": ["BertModel"], "attention_probs_dropout_prob": 0.1, "hidden_act": "gelu",
        "hidden_dropout_prob": 0.1, "hidden_size": 768, "initializer_range": 0.02, "intermediate_size": 256,
        "layer_norm_eps": 1e-12, "max_position_embeddings": 64, "model_type": "bert", "num_attention_heads": 12,
        "num_hidden_layers": 2, "pad_token_id": 0, "type_vocab_size": 2, "vocab_size": vocab_size,
        "encoder_width": 768, "add_cross_attention": True}))
    return path


@pytest.fixture(scope="module")
def real(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The weights file, config, hub cache, images and the hand-computed rewards."""
    root = tmp_path_factory.mktemp("image_reward_real")
    hub = _hub_cache(root / "hub")
    vocab_size = len((hub / "models--bert-base-uncased" / "snapshots" / REVISION / "vocab.txt").read_text().split())
    config = _med_config(root / "med_config.json", vocab_size + 2)  # + the [DEC] and [ENC] BLIP adds
    rng = np.random.default_rng(0)
    images = ImageSet(images=rng.integers(0, 256, (len(PROMPTS), 40, 40, 3), dtype=np.uint8), prompts=list(PROMPTS),
                      seeds=list(range(len(PROMPTS))))
    paths = []
    for i, image in enumerate(images.to_pil()):
        paths.append(str(root / f"{i}.png"))
        image.save(paths[-1])
    env = {**os.environ, **_child_env(hub)}
    request = {"weights": str(root / "ImageReward.pt"), "med_config": str(config), "images": paths,
               "prompts": list(PROMPTS), "mean": MEAN, "std": STD, "scorer": str(SCORER_FILE)}
    done = subprocess.run([PYTHON, str(HERE / "hand_reward.py")], input=json.dumps(request), capture_output=True,
                          text=True, env=env, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-4000:]
    hand = json.loads(done.stdout.strip().splitlines()[-1])
    return {"root": root, "hub": hub, "config": config, "weights": root / "ImageReward.pt", "images": images,
            "hand": hand}


def _child_env(hub: Path) -> dict[str, str]:
    return {"PYTHONPATH": str(HERE), "HF_HUB_CACHE": str(hub), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


@pytest.fixture
def offline(real: dict, monkeypatch: pytest.MonkeyPatch) -> dict:
    """This process and the scorer's child see the hand-made hub cache, offline."""
    import huggingface_hub.constants as hub_constants

    for name, value in _child_env(real["hub"]).items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(real["hub"]))
    return real


def test_the_hand_formula_runs_on_the_packages_real_architecture(real):
    """What the hand formula ran on: the package's model (BLIP ViT with the small size, the
    BERT encoder of ``med_config.json``, the MLP), its own mean and std; its own ``score()``
    and the plugin's scorer as the in-process route calls it agree with the formula by hand
    (tokens cut at 35, the preprocessing)."""
    hand = real["hand"]
    assert hand["vit_blocks"] == 2 and hand["text_layers"] == 2, hand
    assert hand["package_mean_std"] == [MEAN, STD]
    assert hand["token_lengths"][1] > MAX_TOKENS >= max(hand["token_lengths"][0], hand["token_lengths"][2])
    np.testing.assert_allclose(hand["package_score"], hand["rewards"], rtol=0, atol=1e-5)
    # the scorer file as the in-process route runs it (PIL images), with the real package
    np.testing.assert_allclose(hand["scorer_in_process"], hand["rewards"], rtol=0, atol=1e-5)
    assert np.ptp(hand["rewards"]) > 1e-3  # the images and prompts give distinct rewards


def test_image_reward_in_its_own_venv_equals_the_formula_by_hand(offline):
    """The metric, through the external-environment route with the real package, gives the
    hand-computed rewards; the prompt the package cuts at 35 tokens is the one reported."""
    with pytest.warns(UserWarning, match="longer than the 35 tokens"):
        result = compute_metric("image_reward", offline["images"], image_reward_weights=str(offline["weights"]),
                                image_reward_med_config=str(offline["config"]), image_reward_python=PYTHON,
                                device="cpu", timeout=600)
    np.testing.assert_allclose(result.per_sample, offline["hand"]["rewards"], rtol=0, atol=1e-5)
    assert result.value == pytest.approx(float(np.mean(offline["hand"]["rewards"])), abs=1e-5)
    assert result.details["route"] == "external" and result.details["interpreter"] == PYTHON
    assert "image-reward==1.5" in result.details["packages"]
    assert result.backbone.startswith("image_reward:ImageReward-v1.0:")
    assert result.details["truncated_prompts"] == [LONG]


@pytest.mark.filterwarnings("ignore:.*longer than the 35 tokens")
def test_a_weights_file_that_misses_the_models_tensors_is_refused(offline, tmp_path):
    """``load_state_dict(strict=False)`` (as the package's ``load()``) would keep the random
    initialisation for every tensor a wrong file lacks and score with it: refused, named."""
    code = ("import sys, torch; w = torch.load(sys.argv[1], weights_only=True); "
            "torch.save({k: v for k, v in w.items() if not k.startswith('mlp.')}, sys.argv[2])")
    subprocess.run([PYTHON, "-c", code, str(offline["weights"]), str(tmp_path / "ImageReward.pt")], check=True,
                   timeout=300)
    with pytest.raises(ExternalMetricError, match=r"ImageReward\.pt lacks 10 of the model's parameters \(mlp\.layers.*fix:"):
        compute_metric("image_reward", offline["images"], image_reward_weights=str(tmp_path / "ImageReward.pt"),
                       image_reward_med_config=str(offline["config"]), image_reward_python=PYTHON, device="cpu",
                       timeout=600)


@pytest.mark.filterwarnings("ignore:.*longer than the 35 tokens")
def test_a_tokenizer_missing_from_the_venvs_hub_cache_is_named_with_the_fix(offline, tmp_path, monkeypatch):
    """The package takes its tokenizer from the hub (``bert-base-uncased``); offline and not
    cached, the child's error names it and the one-time command, not only transformers' OSError."""
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty"))
    with pytest.raises(ExternalMetricError, match=r"could not load its BLIP tokenizer 'bert-base-uncased'.*fix: "
                       r"put it in this environment's Hugging Face cache once"):
        compute_metric("image_reward", offline["images"], image_reward_weights=str(offline["weights"]),
                       image_reward_med_config=str(offline["config"]), image_reward_python=PYTHON, device="cpu",
                       timeout=600)
