"""Loading pipelines: local folders, hub ids (through a fake offline hub cache), caching,
identity and the errors a user sees."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from pytest_diffeval.pipelines import PipelineCache, PipelineNotFoundError, load_pipeline, model_fingerprint
from pytest_diffeval.tiny import perturb_weights


def test_local_folder_loads_in_eval_mode_with_provenance(tiny_models: dict[str, Path]) -> None:
    pipe = load_pipeline(tiny_models["pipe"])
    assert type(pipe).__name__ == "StableDiffusionPipeline"
    assert not pipe.unet.training and not pipe.vae.training and not pipe.text_encoder.training
    assert pipe.unet.dtype == torch.float32 and pipe.device.type == "cpu"
    provenance = pipe._diffeval_provenance
    assert provenance["model_kind"] == "local" and provenance["model_hash"] == model_fingerprint(tiny_models["pipe"])


def test_hub_id_resolves_through_the_hub_cache(hub_cache: Path) -> None:
    pipe = load_pipeline("diffeval-test/tiny-sd")
    assert pipe._diffeval_provenance["model_kind"] == "hub"
    assert pipe._diffeval_provenance["model_hash"] != "unknown"


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
