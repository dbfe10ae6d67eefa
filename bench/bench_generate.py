"""FreeFuse vs plain multi-LoRA (merge): time and peak memory ratios for the same steps, from one run.

    python bench/bench_generate.py                       # mid-size random FLUX-shaped model, CPU
    python bench/bench_generate.py --preset flux --device cuda   # FLUX.1 shapes, 1024², 28 steps, bf16

Time: merge and FreeFuse runs alternate (`--repeats` each, after one warm-up of each) and the
medians are compared. Memory: on CUDA the allocator's peak per run; on CPU each method runs in its
own fresh process and the processes' peak RSS are compared (same model, same LoRAs, one run).
Random weights: the numbers measure cost, not image quality.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
import warnings

import torch

PRESETS = {
    # 44M-parameter transformer: 6 heads x 64, 4 double + 8 single blocks, 1024 image tokens at 512².
    # The VAE is sized so that one decode costs what FLUX.1's does relative to a whole run: 0.45% of
    # 12 steps here vs 0.50% of 28 steps for FLUX.1 at 1024² (FLOPs counted with torch's
    # FlopCounterMode on meta tensors); a wider VAE would make the stage-1 preview look dearer
    # than it is on the real model.
    "mid": {
        "transformer": {
            "in_channels": 64,
            "num_layers": 4,
            "num_single_layers": 8,
            "attention_head_dim": 64,
            "num_attention_heads": 6,
            "joint_attention_dim": 256,
            "pooled_projection_dim": 128,
            "axes_dims_rope": (8, 28, 28),
        },
        "vae": {"block_out_channels": (8, 8, 16, 16), "norm_num_groups": 4, "latent_channels": 16},
        "size": 512,
        "steps": 12,
        "text_tokens": 128,
        "dtype": "float32",
    },
    # FLUX.1-dev transformer and VAE shapes (12B parameters), small random text encoders.
    "flux": {
        "transformer": {
            "in_channels": 64,
            "num_layers": 19,
            "num_single_layers": 38,
            "attention_head_dim": 128,
            "num_attention_heads": 24,
            "joint_attention_dim": 4096,
            "pooled_projection_dim": 768,
            "axes_dims_rope": (16, 56, 56),
        },
        "vae": {
            "block_out_channels": (128, 256, 512, 512),
            "layers_per_block": 2,
            "norm_num_groups": 32,
            "latent_channels": 16,
            "mid_block_add_attention": True,
        },
        "size": 1024,
        "steps": 28,
        "text_tokens": 512,
        "dtype": "bfloat16",
    },
}
PROMPT = "Alice hugging Bob in the snow, a photo"


def build(preset: dict, device: str):
    from freefuse import FreeFuse
    from freefuse.testing import random_lora, tiny_flux_pipeline

    dtype = getattr(torch, preset["dtype"])
    pipe = tiny_flux_pipeline(
        seed=0, transformer_config=preset["transformer"], vae_config=preset["vae"], dtype=dtype, device=device
    )
    pipe.set_progress_bar_config(disable=True)
    freefuse = FreeFuse(pipe)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for index, (name, word) in enumerate((("alice", "Alice"), ("bob", "Bob"))):
            random_lora(pipe, name, rank=16, seed=index + 1, scale=0.3)
            freefuse.use_adapter(name, words=[word])
    return freefuse


def run_once(freefuse, preset: dict, method: str, preview: str) -> float:
    device = freefuse.backend.device
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        freefuse(
            PROMPT,
            method=method,
            seed=0,
            height=preset["size"],
            width=preset["size"],
            num_inference_steps=preset["steps"],
            max_sequence_length=preset["text_tokens"],
            preview=preview,
            progress=False,
            output_type="pil",
        )
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def memory_worker(preset_name: str, method: str, preview: str, device: str) -> dict:
    preset = PRESETS[preset_name]
    freefuse = build(preset, device)
    if device.startswith("cuda"):
        run_once(freefuse, preset, method, preview)  # warm-up (cuDNN/cuBLAS workspaces)
        torch.cuda.reset_peak_memory_stats()
        run_once(freefuse, preset, method, preview)
        return {"peak_bytes": torch.cuda.max_memory_allocated()}
    run_once(freefuse, preset, method, preview)
    return {"peak_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def measure_memory(preset: str, method: str, preview: str, device: str) -> int:
    command = [
        sys.executable,
        __file__,
        "--preset",
        preset,
        "--device",
        device,
        "--memory-worker",
        method,
        "--preview",
        preview,
    ]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"memory worker failed: {done.stderr.strip()[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])["peak_bytes"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="mid")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--preview", choices=["vae", "latent"], default="vae")
    parser.add_argument("--memory-worker", choices=["merge", "freefuse"])
    args = parser.parse_args()
    if args.memory_worker:
        print(json.dumps(memory_worker(args.preset, args.memory_worker, args.preview, args.device)))
        return

    preset = PRESETS[args.preset]
    torch.set_grad_enabled(False)
    freefuse = build(preset, args.device)
    params = sum(p.numel() for p in freefuse.pipeline.transformer.parameters())
    print(
        f"preset={args.preset} device={args.device} transformer={params / 1e6:.0f}M params "
        f"size={preset['size']}² steps={preset['steps']} text_tokens={preset['text_tokens']} "
        f"dtype={preset['dtype']} preview={args.preview}"
    )
    times = {"merge": [], "freefuse": []}
    for method in times:  # warm-up
        run_once(freefuse, preset, method, args.preview)
    for _ in range(args.repeats):
        for method in times:
            times[method].append(run_once(freefuse, preset, method, args.preview))
    merge_s, freefuse_s = statistics.median(times["merge"]), statistics.median(times["freefuse"])
    print(f"time    merge {merge_s:8.2f}s   freefuse {freefuse_s:8.2f}s   ratio {freefuse_s / merge_s:.3f}x")
    del freefuse
    merge_mem = measure_memory(args.preset, "merge", args.preview, args.device)
    freefuse_mem = measure_memory(args.preset, "freefuse", args.preview, args.device)
    mib = 1 << 20
    print(
        f"memory  merge {merge_mem / mib:8.0f}MiB freefuse {freefuse_mem / mib:8.0f}MiB "
        f"ratio {freefuse_mem / merge_mem:.3f}x  (extra {(freefuse_mem - merge_mem) / mib:+.0f} MiB)"
    )


if __name__ == "__main__":
    main()
