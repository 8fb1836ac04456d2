"""Loading pipelines: local folders, hub ids (through a fake offline hub cache), caching,
identity and the errors a user sees."""

from __future__ import annotations

import gc
import shutil
import weakref
from pathlib import Path

import pytest
import torch

from pytest_diffeval import identity
from pytest_diffeval.identity import load_provenance, pipeline_identity
from pytest_diffeval.pipelines import PipelineCache, PipelineNotFoundError, load_pipeline, model_fingerprint
from pytest_diffeval.tiny import perturb_weights


def test_local_folder_loads_in_eval_mode_with_provenance(tiny_models: dict[str, Path]) -> None:
    pipe = load_pipeline(tiny_models["pipe"])
    assert type(pipe).__name__ == "StableDiffusionPipeline"
    assert not pipe.unet.training and not pipe.vae.training and not pipe.text_encoder.training
    assert pipe.unet.dtype == torch.float32 and pipe.device.type == "cpu"
    provenance = load_provenance(pipe)
    assert provenance["model_kind"] == "local" and provenance["model_hash"] == model_fingerprint(tiny_models["pipe"])


def test_a_loaded_pipeline_carries_no_attribute_of_this_package(tiny_models: dict[str, Path]) -> None:
    """Provenance and identity live in identity.py's side table: the pipeline object is as
    diffusers made it, and the record goes away with the pipeline."""
    pipe = load_pipeline(tiny_models["pipe"])
    assert [name for name in vars(pipe) if name.startswith("_diffeval")] == []
    assert load_provenance(pipe)["pipeline_id"] == pipeline_identity(pipe) is not None
    assert load_provenance(object()) == {} and pipeline_identity(object()) is None  # not loaded here
    gone = weakref.ref(pipe)
    records = len(identity._LOADED)
    del pipe
    gc.collect()
    assert gone() is None and len(identity._LOADED) == records - 1


def test_hub_id_resolves_through_the_hub_cache(hub_cache: Path) -> None:
    pipe = load_pipeline("diffeval-test/tiny-sd")
    assert load_provenance(pipe)["model_kind"] == "hub"
    assert load_provenance(pipe)["model_hash"] != "unknown"


def test_missing_model_says_where_it_looked_and_how_to_fix(hub_cache: Path) -> None:
    with pytest.raises(PipelineNotFoundError) as info:
        load_pipeline("nobody/no-such-model")
    message = str(info.value)
    assert "'nobody/no-such-model'" in message
    assert "looked for a local directory" in message and str(hub_cache) in message
    assert "pass the path of a local copy" in message


def test_folder_without_model_index_is_not_a_pipeline(tmp_path: Path) -> None:
    (tmp_path / "unet").mkdir()
    with pytest.raises(PipelineNotFoundError, match="no model_index.json"):
        load_pipeline(tmp_path)


def test_cache_loads_once_per_key_and_again_when_something_changes(tiny_models: dict[str, Path]) -> None:
    cache = PipelineCache()
    first = cache.get(tiny_models["pipe"])
    assert cache.get(str(tiny_models["pipe"])) is first
    assert cache.loads == {str(tiny_models["pipe"]): 1}
    other = cache.get(tiny_models["pipe"], scheduler="DPMSolverMultistepScheduler")
    assert other is not first and type(other.scheduler).__name__ == "DPMSolverMultistepScheduler"
    assert cache.get(tiny_models["pipe"], dtype="bfloat16").unet.dtype == torch.bfloat16
    assert cache.loads[str(tiny_models["pipe"])] == 3


def test_fingerprint_follows_content_not_name(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    copy = shutil.copytree(tiny_models["pipe"], tmp_path / "copy")
    assert model_fingerprint(copy) == model_fingerprint(tiny_models["pipe"])
    perturb_weights(copy, "unet", scale=0.01)
    assert model_fingerprint(copy) != model_fingerprint(tiny_models["pipe"])


def test_unknown_scheduler_and_dtype_are_clear_errors(tiny_models: dict[str, Path]) -> None:
    with pytest.raises(ValueError, match="unknown scheduler 'NoSuchScheduler'"):
        load_pipeline(tiny_models["pipe"], scheduler="NoSuchScheduler")
    with pytest.raises(ValueError, match="unknown dtype 'float8'"):
        load_pipeline(tiny_models["pipe"], dtype="float8")


def test_missing_hub_weights_skip_a_gpu_test_with_how_to_get_them_and_fail_under_require_gpu(
        pytester: pytest.Pytester, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A GPU runner without the weights: the test skips naming the model and how to fetch
    it, and --diffeval-require-gpu fails it instead.  "Has a GPU" is simulated by pointing
    the device resolution at cuda (the model is missing, so nothing is moved there)."""
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hub-cache"))  # the subprocess sees an empty cache
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pytester.makeconftest("""
        import pytest_diffeval.settings as settings

        settings.resolved_device = lambda: "cuda:0"  # pretend this machine has a GPU
    """)
    pytester.makepyfile(test_hub="""
        import pytest

        @pytest.mark.gpu
        def test_by_id(generate):
            generate("nobody/not-downloaded", ["a cat"])

        @pytest.mark.gpu
        def test_by_fixture(diffusion_pipeline):
            diffusion_pipeline("nobody/not-downloaded")

        def test_not_gpu_marked_still_fails(generate):
            generate("nobody/not-downloaded", ["a cat"])
    """)
    skipped = pytester.runpytest("-rs", "-p", "no:cacheprovider")
    skipped.assert_outcomes(skipped=2, failed=1)
    skipped.stdout.fnmatch_lines([
        "SKIPPED*needs the weights of 'nobody/not-downloaded', which are neither in the Hugging Face cache nor "
        "downloadable here; fetch them with `huggingface-cli download nobody/not-downloaded`*HF_HOME*"
        "--diffeval-model=nobody/not-downloaded=PATH*",
    ])
    assert "cannot load the diffusion model 'nobody/not-downloaded'" in skipped.stdout.str()  # the unmarked test
    required = pytester.runpytest("--diffeval-require-gpu", "-p", "no:cacheprovider")
    required.assert_outcomes(failed=3)
    required.stdout.fnmatch_lines(["*needs the weights of 'nobody/not-downloaded'*a failure, not a skip, under "
                                   "--diffeval-require-gpu*"])


def test_a_hub_lora_that_is_not_here_is_missing_weights_too(tiny_models: dict[str, Path], hub_cache: Path) -> None:
    from pytest_diffeval import WeightsNotAvailableError

    with pytest.raises(WeightsNotAvailableError, match="cannot load the LoRA 'nobody/no-lora'") as info:
        load_pipeline(tiny_models["pipe"], lora="nobody/no-lora")
    assert info.value.model_id == "nobody/no-lora" and "huggingface-cli download nobody/no-lora" in info.value.how_to_get()


def test_a_missing_local_path_is_not_missing_hub_weights(tmp_path: Path, hub_cache: Path) -> None:
    """Only a hub id can be "not downloaded yet"; a wrong path stays an error, even in a gpu test."""
    from pytest_diffeval import WeightsNotAvailableError

    with pytest.raises(PipelineNotFoundError) as info:
        load_pipeline(tmp_path / "no-such-folder")
    assert not isinstance(info.value, WeightsNotAvailableError)
    with pytest.raises(WeightsNotAvailableError) as info:
        load_pipeline("nobody/no-such-model")
    assert info.value.model_id == "nobody/no-such-model"
