"""Pipeline identity (issue 16, items 1, 2, 4, 9, 11): a pipeline is identified by its
source's content and every load option, module arguments by their own content; a pipeline
changed after loading is identified again; execution settings that change outputs are in
the provenance and the image-cache key."""

from __future__ import annotations

import copy
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from pytest_diffeval.generation import ImageCache, generate_images
from pytest_diffeval.identity import HASHED_TENSOR_BYTES, load_provenance, module_identity, pipeline_identity
from pytest_diffeval.pipelines import PipelineCache, default_variant, load_identity, load_pipeline
from pytest_diffeval.tripwires import find_problems

STEPS = {"num_inference_steps": 2}


def _black_safety_checker_model(source: Path, target: Path) -> Path:
    """The tiny pipeline with a safety checker that flags every image (so diffusers blacks it
    out), saved as a model folder: what a stock SD checkpoint does to innocent prompts."""
    from diffusers import StableDiffusionPipeline
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPImageProcessor

    pipe = StableDiffusionPipeline.from_pretrained(source)
    config = CLIPConfig(
        text_config=dict(hidden_size=16, intermediate_size=37, num_attention_heads=4, num_hidden_layers=1),
        vision_config=dict(hidden_size=16, intermediate_size=37, num_attention_heads=4, num_hidden_layers=1,
                           image_size=32, patch_size=8),
        projection_dim=8,
    )
    torch.manual_seed(0)
    checker = StableDiffusionSafetyChecker(config).eval()
    with torch.no_grad():  # score = cos - weight > 0 for every concept: every image is "nsfw"
        checker.concept_embeds_weights.fill_(-2.0)
        checker.special_care_embeds_weights.fill_(-2.0)
    pipe.register_modules(safety_checker=checker, feature_extractor=CLIPImageProcessor(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}))
    pipe.register_to_config(requires_safety_checker=True)
    pipe.save_pretrained(target, safe_serialization=True)
    return target


@pytest.fixture(scope="module")
def checked_model(tiny_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _black_safety_checker_model(tiny_models["pipe"], tmp_path_factory.mktemp("checked") / "model")


def test_safety_checker_none_after_the_black_image_tripwire_makes_new_images(checked_model: Path,
                                                                              tmp_path: Path) -> None:
    """Item 1: the tripwire says "pass safety_checker=None"; doing that must not return the
    cached black images (the image-cache key ignored load options)."""
    pipelines, images = PipelineCache(), ImageCache(tmp_path / "images")
    black = generate_images(pipelines.get(checked_model), ["a cat"], seeds=[0], cache=images, **STEPS)
    assert black.images.max() == 0
    assert any("safety_checker=None" in problem for problem in find_problems(black))
    fixed = generate_images(pipelines.get(checked_model, safety_checker=None), ["a cat"], seeds=[0], cache=images,
                            **STEPS)
    assert fixed.images.max() > 0 and not find_problems(fixed)
    assert fixed.provenance["pipeline_id"] != black.provenance["pipeline_id"]
    assert fixed.provenance["load_options"] == {"safety_checker": None}


def test_a_module_argument_is_identified_by_its_content(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    """Item 2: diffusion_pipeline(M, vae=vae_b) after diffusion_pipeline(M, vae=vae_a) is
    another pipeline with other images (the cache key was the modules' repr, equal for two
    VAEs of one architecture); a copy with the same weights is the same pipeline."""
    from diffusers import AutoencoderKL

    vae_a = AutoencoderKL.from_pretrained(tiny_models["pipe"] / "vae")
    vae_b = copy.deepcopy(vae_a)
    with torch.no_grad():
        for parameter in vae_b.decoder.parameters():
            parameter.mul_(1.5)
    assert repr(vae_a) == repr(vae_b)
    pipelines, images = PipelineCache(), ImageCache(tmp_path / "images")
    first = pipelines.get(tiny_models["pipe"], vae=vae_a)
    second = pipelines.get(tiny_models["pipe"], vae=vae_b)
    assert second is not first and second.vae is vae_b
    a = generate_images(first, ["a cat"], seeds=[0], cache=images, **STEPS)
    b = generate_images(second, ["a cat"], seeds=[0], cache=images, **STEPS)
    assert not np.array_equal(a.images, b.images)
    assert a.provenance["load_options"]["vae"]["content"] != b.provenance["load_options"]["vae"]["content"]
    assert pipelines.get(tiny_models["pipe"], vae=copy.deepcopy(vae_a)) is first  # same content, same pipeline


def test_module_content_is_hashed_once_per_object_and_again_after_a_change(tiny_models: dict[str, Path]) -> None:
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(tiny_models["pipe"] / "vae")
    first = module_identity(vae)
    read = HASHED_TENSOR_BYTES[0]
    assert module_identity(vae) == first and HASHED_TENSOR_BYTES[0] == read  # memoised: no weight read again
    saved = vae.decoder.conv_out.bias.detach().clone()
    vae.decoder.conv_out.bias.data.add_(0.5)  # through .data, as LoRA fusing writes: no version bump
    changed = module_identity(vae)
    assert changed != first and HASHED_TENSOR_BYTES[0] > read
    vae.decoder.conv_out.bias.data.copy_(saved)
    assert module_identity(vae) == first  # content, not history


@pytest.mark.parametrize("change", ["load_state_dict", "swapped module", "fused weights", "attention processor"])
def test_a_pipeline_changed_after_loading_is_identified_again(tiny_models: dict[str, Path], change: str) -> None:
    from diffusers.models.attention_processor import AttnProcessor

    cache = PipelineCache()
    pipe = cache.get(tiny_models["pipe"])
    loaded = pipeline_identity(pipe)
    assert loaded == load_provenance(pipe)["pipeline_id"]
    if change == "load_state_dict":
        pipe.unet.load_state_dict({k: v * 0.5 for k, v in pipe.unet.state_dict().items()})
    elif change == "swapped module":
        other = copy.deepcopy(pipe.vae)
        with torch.no_grad():
            other.decoder.conv_out.weight.mul_(2)
        pipe.vae = other
    elif change == "fused weights":
        pipe.unet.conv_out.weight.data += 0.1
    else:
        pipe.unet.set_attn_processor(AttnProcessor())
    changed = pipeline_identity(pipe)
    assert changed is not None and changed != loaded
    assert cache.get(tiny_models["pipe"]) is not pipe and cache.reloads_after_change == 1  # the next test gets the model


def test_fp16_variant_is_read_by_default_in_float16(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    """Item 9: dtype float16 reads the folder's fp16 variant files (not the float32 ones cast
    down) when every component has them; variant= is in the identity and the provenance."""
    from diffusers import StableDiffusionPipeline

    folder = Path(shutil.copytree(tiny_models["pipe"], tmp_path / "model"))
    pipe = StableDiffusionPipeline.from_pretrained(folder)
    with torch.no_grad():
        pipe.unet.conv_out.bias.fill_(0.25)  # the variant's weights differ from the float32 files
    pipe.to(torch.float16).save_pretrained(folder, variant="fp16", safe_serialization=True)
    assert default_variant(folder, torch.float16, {}) == "fp16"
    assert default_variant(folder, torch.float32, {}) is None and default_variant(tiny_models["pipe"], torch.float16, {}) is None
    loaded = load_pipeline(folder, dtype="float16")
    assert loaded.unet.dtype == torch.float16 and torch.all(loaded.unet.conv_out.bias == 0.25)
    assert load_provenance(loaded)["load_options"] == {"variant": "fp16"}
    assert load_identity(folder, dtype="float16") == load_identity(folder, dtype="float16", variant="fp16")
    assert load_identity(folder, dtype="float16") != load_identity(folder, dtype="float16", variant=None)


def test_load_options_are_in_the_identity_and_the_provenance(tiny_models: dict[str, Path],
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Item 9/11: torch_compile= and attention_backend= are applied, identified and recorded."""
    compiled: list[tuple[str, dict]] = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kw: compiled.append((type(self).__name__, kw)))
    base = load_identity(tiny_models["pipe"])
    assert load_identity(tiny_models["pipe"], torch_compile=True) != base
    assert load_identity(tiny_models["pipe"], attention_backend="native") != base
    pipe = load_pipeline(tiny_models["pipe"], torch_compile={"mode": "reduce-overhead"}, attention_backend="native")
    assert compiled == [("UNet2DConditionModel", {"mode": "reduce-overhead"})]
    assert load_provenance(pipe)["load_options"] == {"torch_compile": {"mode": "reduce-overhead"},
                                                         "attention_backend": "native"}
    assert load_provenance(pipe)["pipeline_id"] == load_identity(
        tiny_models["pipe"], torch_compile={"mode": "reduce-overhead"}, attention_backend="native")


def test_execution_settings_are_in_the_provenance_and_the_image_cache_key(tiny_models: dict[str, Path],
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Item 11: TF32/cuDNN/determinism flags, attention processors and the watermark."""
    from diffusers.models.attention_processor import AttnProcessor

    from pytest_diffeval.generation import pipeline_provenance

    pipe = load_pipeline(tiny_models["pipe"])
    cache = ImageCache("unused")

    def key() -> str | None:
        return cache.key(pipeline_provenance(pipe), STEPS, "a cat", 0)

    before, provenance = key(), pipeline_provenance(pipe)
    assert provenance["execution"]["flags"]["cudnn_benchmark"] == torch.backends.cudnn.benchmark
    assert provenance["execution"]["watermark"] is False and provenance["execution"]["attention"]["unet"]
    keys = {before}
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", not torch.backends.cudnn.benchmark)
    keys.add(key())
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = not tf32  # a property of torch's cuBLAS module: set and restore
    try:
        keys.add(key())
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    monkeypatch.setattr(torch, "are_deterministic_algorithms_enabled", lambda: True)
    keys.add(key())
    pipe.watermark = object()  # SDXL's invisible watermark applied
    keys.add(key())
    assert pipeline_provenance(pipe)["execution"]["watermark"] is True
    pipe.unet.set_attn_processor(AttnProcessor())
    keys.add(key())
    assert len(keys) == 6 and None not in keys


def test_loading_does_not_use_the_deprecated_torch_dtype(tiny_models: dict[str, Path]) -> None:
    """Item 4: diffusers 0.42 deprecates torch_dtype= and warns on every load."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load_pipeline(tiny_models["pipe"], dtype="float32")
    assert not [w for w in caught if "torch_dtype" in str(w.message)], [str(w.message) for w in caught]


OFFLINE_SCRIPT = """
import json, socket, sys, time

import diffusers, transformers  # noqa: F401 - imported before the network is cut, as in a test session
from pytest_diffeval.identity import load_provenance
from pytest_diffeval.metrics.backbones import load_clip
from pytest_diffeval.pipelines import load_pipeline

attempts = []

def refuse(address):
    attempts.append(str(address))
    raise OSError("pytest-diffeval test: no network")

real_connect = socket.socket.connect
def connect(self, address):
    if self.family in (socket.AF_INET, socket.AF_INET6):
        refuse(address)
    return real_connect(self, address)

socket.socket.connect = connect
socket.create_connection = lambda address, *args, **kwargs: refuse(address)
start = time.perf_counter()
clip = load_clip("openai/tiny-clip-test")
pipe = load_pipeline("diffeval-test/tiny-sd")
print(json.dumps({"attempts": attempts, "seconds": time.perf_counter() - start, "clip": clip.id,
                  "revision": load_provenance(pipe)["revision"]}))
"""


def test_cached_hub_models_load_without_a_network_attempt(fake_hub: Path, tmp_path: Path) -> None:
    """Item 3: with the hub unreachable and HF_HUB_OFFLINE unset, a hub CLIP and a hub
    pipeline that are in the Hugging Face cache load from their snapshot folders: not one
    connection is attempted (transformers retried for minutes before)."""
    import json
    import os
    import subprocess
    import sys

    from conftest import FAKE_COMMIT

    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")}
    env.update(HF_HUB_CACHE=str(fake_hub), HF_ENDPOINT="http://127.0.0.1:9", HF_HOME=str(tmp_path / "hf-home"),
               CUDA_VISIBLE_DEVICES="")
    done = subprocess.run([sys.executable, "-c", OFFLINE_SCRIPT], capture_output=True, text=True, timeout=300,
                          env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["attempts"] == [], result
    assert result["clip"] == f"openai/tiny-clip-test@{FAKE_COMMIT}" and result["revision"] == FAKE_COMMIT
    assert result["seconds"] < 30, result  # tiny models from a local folder: no retries, no timeouts


def test_generate_takes_load_options_and_keeps_their_images_apart(user_project: pytest.Pytester,
                                                                   checked_model: Path) -> None:
    """Items 1 and 9 end to end: ``generate(MODEL, ..., safety_checker=None)`` loads the model
    without its checker and does not get the black images cached for ``generate(MODEL)``,
    cold and warm (a warm run reads both from the image cache)."""
    import textwrap

    user_project.makeconftest(textwrap.dedent(f"""
        CHECKED = {str(checked_model)!r}
    """))
    user_project.makepyfile(test_checker="""
        import pytest
        from conftest import CHECKED

        def test_black_then_fixed(generate):
            black = generate(CHECKED, ["a cat"], num_inference_steps=2)
            fixed = generate(CHECKED, ["a cat"], num_inference_steps=2, safety_checker=None)
            assert black.images.max() == 0 and fixed.images.max() > 0
            assert fixed.provenance["load_options"] == {"safety_checker": None}
            assert "safety_checker" not in fixed.call_kwargs

        def test_load_options_need_a_model_name(generate, diffusion_pipeline):
            with pytest.raises(ValueError, match="load options [(]variant[)] with a pipeline that is already loaded"):
                generate(diffusion_pipeline(CHECKED), ["a cat"], variant="fp16")
    """)
    user_project.runpytest("-p", "no:randomly").assert_outcomes(passed=2)
    warm = user_project.runpytest("-p", "no:randomly", "-v")
    warm.assert_outcomes(passed=2)


def test_the_report_shows_the_identity_and_the_execution_settings(tiny_models: dict[str, Path]) -> None:
    from pytest_diffeval.generation import pipeline_provenance
    from pytest_diffeval.report.html import _provenance

    provenance = pipeline_provenance(load_pipeline(tiny_models["pipe"], safety_checker=None))
    shown = _provenance([{"provenance": provenance}], {})
    assert provenance["pipeline_id"] in shown and "load_options" in shown and "safety_checker" in shown
    assert "cudnn_benchmark" in shown and "watermark" in shown
