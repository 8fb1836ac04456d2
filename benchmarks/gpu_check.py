"""GPU check (issue 16): the plugin on a real GPU with real-size models, no hub access.

    python benchmarks/gpu_check.py [--quick] [--skip-sdxl] [--steps 20] [--images 16]

Builds random-weight pipelines of real size from diffusers config dicts written here
(Stable Diffusion 1.5: UNet 860M parameters; SDXL base: UNet 2.6B, two text encoders),
saved in fp16 in Hugging Face cache layout in a temporary folder, and loads them by hub id
with ``HF_HUB_OFFLINE=1``.  Then it prints:

1. throughput: the plugin's generation (``generate_images``, per-image CPU generators,
   image cache on disk) vs a raw diffusers loop, same pipeline, prompts, seeds and batches:
   images/s of each, their ratio, the GPU idle share between batches (wall time outside
   the pipeline calls), the largest pixel difference, and the GPU seconds per image and
   peak memory the plugin records in provenance;
2. binding: with 2+ GPUs, ``pytest -n 2`` on a generated project: each worker's CUDA sees
   one GPU and the two workers' GPUs differ (their UUIDs);
3. eviction: SD-1.5 and SDXL alternately with ``max_pipelines=1``, and with the default
   (memory-driven) eviction on a GPU made small by a ballast tensor: the peak allocated
   memory stays under the budget and nothing runs out of memory;
4. offload: ``enable_model_cpu_offload=True`` on the last GPU: the provenance records that
   CUDA device (not ``cpu``), so the baseline goes under the CUDA hardware key.

It prints figures and exits non-zero when a check fails; it is not a CPU test.  Budget: under
8 minutes on one H100 (building the SDXL weights is the slowest part; ``--skip-sdxl`` halves it).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

COMMIT = "0" * 40  # the snapshot folder name of the built models

# --------------------------------------------------------------------------- real-size configs
# From the models' own config.json files (runwayml/stable-diffusion-v1-5,
# stabilityai/stable-diffusion-xl-base-1.0); keys are diffusers' / transformers' argument names.
SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, center_input_sample=False, flip_sin_to_cos=True, freq_shift=0,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, downsample_padding=1, mid_block_scale_factor=1,
    act_fn="silu", norm_num_groups=32, norm_eps=1e-5, cross_attention_dim=768, attention_head_dim=8,
)
SDXL_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, center_input_sample=False, flip_sin_to_cos=True, freq_shift=0,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(320, 640, 1280), layers_per_block=2, act_fn="silu", norm_num_groups=32, norm_eps=1e-5,
    cross_attention_dim=2048, attention_head_dim=(5, 10, 20), transformer_layers_per_block=(1, 2, 10),
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,  # 1280 (pooled text) + 6 x 256 (size/crop conditioning)
)
VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, act_fn="silu", norm_num_groups=32,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
)
CLIP_L_TEXT = dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
                   max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768, vocab_size=49408)
CLIP_BIGG_TEXT = dict(hidden_size=1280, intermediate_size=5120, num_attention_heads=20, num_hidden_layers=32,
                      max_position_embeddings=77, hidden_act="gelu", projection_dim=1280, vocab_size=49408)
SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                 steps_offset=1, timestep_spacing="leading")
# Parameter counts of the real checkpoints (millions), checked after building.
EXPECTED_M = {"sd15.unet": 859.5, "sdxl.unet": 2567.5, "vae": 83.7, "clip_l": 123.1, "clip_bigg": 694.7}

PROMPTS = ["a red bicycle leaning on a wall", "a bowl of ramen, studio light", "a lighthouse at dusk",
           "an astronaut riding a horse", "a watercolor fox", "a city street in the rain", "a cup of coffee",
           "a mountain lake at sunrise"]


def fail(message: str) -> None:
    print(f"FAIL: {message}", flush=True)
    FAILURES.append(message)


FAILURES: list[str] = []


def millions(module: Any) -> float:
    return sum(p.numel() for p in module.parameters()) / 1e6


def build(kind: str, hub_cache: Path) -> str:
    """Build a random-weight ``kind`` ("sd15" or "sdxl") pipeline on the GPU in fp16, save it
    as the snapshot of hub id ``gpucheck/<kind>`` in ``hub_cache``; return the hub id."""
    import diffusers
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from pytest_diffeval.tiny import tiny_tokenizer

    start = time.perf_counter()
    torch.manual_seed(0)
    with torch.device("cuda"):
        unet = diffusers.UNet2DConditionModel(**(SD15_UNET if kind == "sd15" else SDXL_UNET))
        vae = diffusers.AutoencoderKL(**VAE, sample_size=512 if kind == "sd15" else 1024,
                                      scaling_factor=0.18215 if kind == "sd15" else 0.13025,
                                      force_upcast=kind == "sdxl")
        text_encoder = CLIPTextModel(CLIPTextConfig(**CLIP_L_TEXT))
        text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_BIGG_TEXT)) if kind == "sdxl" else None
    counts = {f"{kind}.unet": millions(unet), "vae": millions(vae), "clip_l": millions(text_encoder)}
    if text_encoder_2 is not None:
        counts["clip_bigg"] = millions(text_encoder_2)
    for name, count in counts.items():
        if abs(count - EXPECTED_M[name]) > 0.01 * EXPECTED_M[name]:
            fail(f"{name} has {count:.1f}M parameters, the real checkpoint {EXPECTED_M[name]}M: config wrong")
    for module in (unet, vae, text_encoder, text_encoder_2):
        if module is not None:
            module.half()
    scheduler = diffusers.EulerDiscreteScheduler(**SCHEDULER)
    tokenizer = tiny_tokenizer()
    if kind == "sd15":
        pipe = diffusers.StableDiffusionPipeline(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                                                 scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                                 requires_safety_checker=False)
    else:
        pipe = diffusers.StableDiffusionXLPipeline(unet=unet, vae=vae, text_encoder=text_encoder,
                                                   text_encoder_2=text_encoder_2, tokenizer=tokenizer,
                                                   tokenizer_2=tiny_tokenizer(), scheduler=scheduler)
    repo = hub_cache / f"models--gpucheck--{kind}"
    pipe.save_pretrained(repo / "snapshots" / COMMIT)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(COMMIT)
    del pipe, unet, vae, text_encoder, text_encoder_2
    torch.cuda.empty_cache()
    size = sum(p.stat().st_size for p in (repo / "snapshots").rglob("*.safetensors")) / 2**30
    print(f"   built gpucheck/{kind}: " + ", ".join(f"{k} {v:.1f}M" for k, v in counts.items())
          + f"; {size:.2f} GiB fp16 in {time.perf_counter() - start:.0f} s", flush=True)
    return f"gpucheck/{kind}"


class Timeline:
    """Wraps a pipeline: every call's start and end (after a CUDA synchronize)."""

    def __init__(self, pipe: Any) -> None:
        self.pipe, self.spans = pipe, []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.pipe, name)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        import torch

        torch.cuda.synchronize()
        start = time.perf_counter()
        out = self.pipe(*args, **kwargs)
        torch.cuda.synchronize()
        self.spans.append((start, time.perf_counter()))
        return out

    def idle_share(self) -> float:
        """Wall time between the first call's start and the last call's end spent outside calls."""
        wall = self.spans[-1][1] - self.spans[0][0]
        busy = sum(end - start for start, end in self.spans)
        return max(0.0, (wall - busy) / wall)


def throughput(model: str, *, size: int, steps: int, n: int, batch: int, cache_dir: Path) -> None:
    import numpy as np
    import torch

    from pytest_diffeval.generation import ImageCache, generate_images, to_uint8
    from pytest_diffeval.pipelines import PipelineCache

    pipe = PipelineCache().get(model, dtype="float16", device="cuda")
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(n)]
    call = dict(num_inference_steps=steps, height=size, width=size)
    pipe(prompt=prompts[:1], num_inference_steps=2, height=size, width=size, output_type="np")  # warm-up

    # the plugin: per-image CPU generators, cache on disk (PNG writes between batches)
    timed = Timeline(pipe)
    start = time.perf_counter()
    ours = generate_images(timed, prompts, seeds=[0], batch_size=batch, cache=ImageCache(cache_dir / model), **call)
    plugin_s = time.perf_counter() - start
    plugin_idle = timed.idle_share()
    # the raw loop a user would write: same batches, prompts, generators
    raw_timed = Timeline(pipe)
    raw_images = []
    start = time.perf_counter()
    for i in range(0, n, batch):
        generators = [torch.Generator("cpu").manual_seed(0) for _ in prompts[i:i + batch]]
        out = raw_timed(prompt=prompts[i:i + batch], generator=generators, output_type="np", **call)
        raw_images.append(to_uint8(out.images))
    raw_s = time.perf_counter() - start
    diff = int(np.abs(np.concatenate(raw_images).astype(int) - ours.images.astype(int)).max())
    ratio = (n / plugin_s) / (n / raw_s)
    print(f"   {model} {size}px {steps} steps, {n} images in batches of {batch}: plugin {n / plugin_s:.2f} img/s, "
          f"raw diffusers {n / raw_s:.2f} img/s, ratio {ratio:.3f}; GPU idle between batches: plugin "
          f"{100 * plugin_idle:.1f}%, raw {100 * raw_timed.idle_share():.1f}%; max pixel difference {diff}; "
          f"provenance: {ours.provenance['gpu_s_per_image']} GPU s/image, peak {ours.provenance['gpu_peak_memory_mb']} MB, "
          f"device {ours.provenance['device']}", flush=True)
    if ratio < 0.9:
        fail(f"{model}: the plugin generates at {ratio:.2f}x the raw loop's rate (goal >= 0.9)")
    if ours.provenance["gpu_s_per_image"] is None or ours.provenance["gpu_peak_memory_mb"] is None:
        fail(f"{model}: GPU seconds / peak memory missing from the provenance")
    if diff > 2:
        fail(f"{model}: the plugin's images differ from the raw loop's by up to {diff}/255")
    del pipe, timed, raw_timed


def binding(hub_cache: Path) -> None:
    import torch

    if torch.cuda.device_count() < 2:
        print(f"   binding: skipped, {torch.cuda.device_count()} GPU visible (needs 2+)", flush=True)
        return
    with tempfile.TemporaryDirectory() as tmp:
        project = Path(tmp)
        (project / "test_bound.py").write_text(textwrap.dedent("""
            import json, os
            import pytest

            @pytest.mark.parametrize("i", range(4))
            def test_where(i, diffeval_device, diffusion_pipeline):
                import torch
                pipe = diffusion_pipeline("gpucheck/sd15", enable_model_cpu_offload=True)
                pipe(prompt=["x"], num_inference_steps=1, height=256, width=256, output_type="np")
                from pytest_diffeval.generation import pipeline_provenance
                record = {"worker": os.environ["PYTEST_XDIST_WORKER"], "visible": os.environ.get("CUDA_VISIBLE_DEVICES"),
                          "count": torch.cuda.device_count(), "device": diffeval_device,
                          "uuid": str(torch.cuda.get_device_properties(0).uuid),
                          "provenance_device": pipeline_provenance(pipe)["device"]}
                with open(f"{os.environ['PYTEST_XDIST_WORKER']}-{i}.json", "w") as f:
                    json.dump(record, f)
        """))
        env = {**os.environ, "HF_HUB_CACHE": str(hub_cache), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
        env.pop("CUDA_VISIBLE_DEVICES", None)
        from importlib.metadata import entry_points

        installed = any(e.value.startswith("pytest_diffeval") for e in entry_points(group="pytest11"))
        plugin = [] if installed else ["-p", "pytest_diffeval.plugin"]  # a checkout that was not pip-installed
        done = subprocess.run([sys.executable, "-m", "pytest", *plugin, "-n", "2", "-p", "no:cacheprovider", "-q",
                               "--diffeval-dtype=float16"], cwd=project, env=env,
                              capture_output=True, text=True, timeout=300)
        records = [json.loads(p.read_text()) for p in sorted(project.glob("gw*.json"))]
        if done.returncode != 0 or not records:
            fail(f"binding: pytest -n 2 failed:\n{done.stdout[-3000:]}{done.stderr[-2000:]}")
            return
        by_worker = {r["worker"]: r for r in records}
        for record in by_worker.values():
            print(f"   binding: {record['worker']}: CUDA_VISIBLE_DEVICES={record['visible']}, sees {record['count']} "
                  f"GPU, device {record['device']}, GPU {record['uuid'][:13]}, offload provenance "
                  f"{record['provenance_device']}", flush=True)
            if record["count"] != 1 or not record["provenance_device"].startswith("cuda"):
                fail(f"binding: {record['worker']} sees {record['count']} GPUs / offload recorded on "
                     f"{record['provenance_device']}")
        if len({r["uuid"] for r in by_worker.values()}) != len(by_worker):
            fail("binding: two workers share one GPU")


def eviction(models: list[str]) -> None:
    import torch

    from pytest_diffeval import settings
    from pytest_diffeval.generation import generate_images
    from pytest_diffeval.pipelines import PipelineCache, free_memory

    def peak_of(run: Any) -> float:
        free_memory()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        run()
        return (torch.cuda.max_memory_allocated() - base) / 2**30

    def use(cache: PipelineCache, model: str) -> None:
        pipe = cache.get(model, dtype="float16", device="cuda")
        generate_images(pipe, PROMPTS[:2], seeds=[0], batch_size=2, num_inference_steps=2, height=512, width=512)

    alone = {}
    for model in models:
        cache = PipelineCache()
        alone[model] = peak_of(lambda: use(cache, model))
        cache.clear()
    budget = max(alone.values()) * 1.05
    sequence = [*models, *models, *models[:1]]
    cache = PipelineCache(max_pipelines=1)
    peak = peak_of(lambda: [use(cache, m) for m in sequence])
    print(f"   eviction (max_pipelines=1): {' -> '.join(sequence)}: peak {peak:.2f} GiB, budget (largest model alone "
          f"+5%) {budget:.2f} GiB; evictions {cache.evictions}", flush=True)
    if peak > budget:
        fail(f"eviction: peak {peak:.2f} GiB over the budget {budget:.2f} GiB")
    cache.clear()
    # auto: a GPU with room for the largest model only (a ballast tensor takes the rest)
    free_memory()
    free, _ = torch.cuda.mem_get_info()
    room = int(max(alone.values()) * 1.3 * 2**30)
    ballast = torch.empty(max(0, free - room), dtype=torch.uint8, device="cuda")
    settings.configure(max_pipelines=None)
    cache = PipelineCache()
    try:
        peak = peak_of(lambda: [use(cache, m) for m in sequence])
        print(f"   eviction (auto, {room / 2**30:.1f} GiB free): peak {peak:.2f} GiB; evictions {cache.evictions}",
              flush=True)
        if len(models) > 1 and not cache.evictions:
            fail("eviction (auto): nothing was evicted on a GPU too small for both models")
    except torch.cuda.OutOfMemoryError as exc:
        fail(f"eviction (auto): out of memory with {room / 2**30:.1f} GiB free: {str(exc)[:200]}")
    finally:
        del ballast
        cache.clear()


def offload(model: str) -> None:
    import torch

    from pytest_diffeval.hardware import hardware_key
    from pytest_diffeval.generation import generate_images
    from pytest_diffeval.pipelines import PipelineCache

    device = f"cuda:{torch.cuda.device_count() - 1}"
    cache = PipelineCache()
    pipe = cache.get(model, dtype="float16", device=device, enable_model_cpu_offload=True)
    images = generate_images(pipe, PROMPTS[:1], num_inference_steps=2, height=512, width=512)
    key = hardware_key(images.provenance)
    print(f"   offload on {device}: pipe.device {pipe.device}, provenance device {images.provenance['device']}, "
          f"hardware key {key}", flush=True)
    if images.provenance["device"] != device or not key.startswith("cuda/"):
        fail(f"offload: recorded on {images.provenance['device']} ({key}), expected {device}")
    cache.clear()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--skip-sdxl", action="store_true", help="SD-1.5 only (about half the time)")
    parser.add_argument("--quick", action="store_true", help="4 steps, 8 images: a smoke run")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--images", type=int, default=16)
    args = parser.parse_args()
    try:
        import torch
    except ImportError:
        print("gpu_check: needs torch with CUDA (and a CUDA GPU)", file=sys.stderr)
        return 2
    if not torch.cuda.is_available():
        print(f"gpu_check: needs a CUDA GPU; torch {torch.__version__} sees none on this machine "
              "(run it where `nvidia-smi` lists a GPU)", file=sys.stderr)
        return 2
    steps, n = (4, 8) if args.quick else (args.steps, args.images)
    start = time.perf_counter()
    print(f"== GPU check: {torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}, torch {torch.__version__}",
          flush=True)
    with tempfile.TemporaryDirectory(prefix="gpucheck-") as tmp:
        hub_cache = Path(tmp) / "hub"
        os.environ.update(HF_HUB_CACHE=str(hub_cache), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
        import huggingface_hub.constants as hub_constants

        hub_constants.HF_HUB_CACHE = str(hub_cache)
        hub_constants.HF_HUB_OFFLINE = True
        print("-- building random-weight models of real size", flush=True)
        models = [build("sd15", hub_cache)] + ([] if args.skip_sdxl else [build("sdxl", hub_cache)])
        print("-- 1. throughput: plugin vs raw diffusers loop", flush=True)
        throughput(models[0], size=512, steps=steps, n=n, batch=4, cache_dir=Path(tmp) / "images")
        if len(models) > 1:
            throughput(models[1], size=1024, steps=steps, n=max(4, n // 4), batch=2, cache_dir=Path(tmp) / "images")
        print("-- 2. xdist workers on their own GPUs", flush=True)
        binding(hub_cache)
        print("-- 3. eviction keeps peak memory under a budget", flush=True)
        eviction(models)
        print("-- 4. offload records the CUDA device", flush=True)
        offload(models[0])
    print(f"== GPU check done in {time.perf_counter() - start:.0f} s: "
          + ("all checks passed" if not FAILURES else f"{len(FAILURES)} FAILED"), flush=True)
    return 1 if FAILURES else 0


if __name__ == "__main__":
    sys.exit(main())
