"""FreeFuse against plain multi-LoRA on mid-size random Z-Image and FLUX.2 [klein] models: time
ratios from one run, one process, CPU.

    python bench/bench_backends.py                  # both, 256², Z-Image 8 steps, FLUX.2 4 steps
    python bench/bench_backends.py --arch zimage --size 512 --repeats 5

Each model has its architecture's layout at reduced width (64-dim heads) and two random rank-16
LoRAs on the layers a typical character LoRA of it adapts (attention and feed-forward of every
block). Runs, same prompt, seed and steps, alternating after one warm-up round, medians compared:
- merge: diffusers' unfused joint adapters (PEFT's own forward, `method="merge"`);
- FreeFuse: `method="freefuse"` (masks at the authors' relative block and step, fused LoRA op);
- stage 1 alone: `FreeFuse.masks` (the steps up to the mask step, the tap, the masks).
Random weights: the numbers measure cost, not image quality.
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch

MODELS = {
    # Z-Image: 12 single-stream layers over [image ‖ text], one noise and one context refiner.
    "zimage": {
        "dim": 512,
        "n_heads": 8,
        "n_kv_heads": 8,
        "n_layers": 12,
        "n_refiner_layers": 1,
        "cap_feat_dim": 256,
        "axes_dims": [16, 24, 24],
    },
    # FLUX.2 [klein]: 2 double-stream and 8 single-stream blocks; text three hidden states of 128.
    "flux2": {
        "num_layers": 2,
        "num_single_layers": 8,
        "attention_head_dim": 64,
        "num_attention_heads": 8,
        "joint_attention_dim": 384,
        "timestep_guidance_channels": 256,
        "axes_dims_rope": (16, 16, 16, 16),
    },
}
STEPS = {"zimage": 8, "flux2": 4}  # each model's own short schedule
PROMPT = "Alice hugging Bob in the snow, a photo"


def bench(arch: str, size: int, steps: int, repeats: int, tokens: int) -> None:
    from freefuse import FreeFuse, FreeFuseWarning
    from freefuse.testing import TINY_PIPELINES, random_lora

    pipe = TINY_PIPELINES[arch](seed=0, transformer_config=MODELS[arch])
    pipe.set_progress_bar_config(disable=True)
    parameters = sum(p.numel() for p in pipe.transformer.parameters())
    for index, name in enumerate(("alice", "bob")):
        random_lora(pipe, name, rank=16, seed=index + 1, scale=0.3)
    freefuse = FreeFuse(pipe)
    freefuse.use_adapter("alice", words=["Alice"])
    freefuse.use_adapter("bob", words=["Bob"])
    common = {
        "height": size,
        "width": size,
        "num_inference_steps": steps,
        "max_sequence_length": tokens,
        "seed": 0,
        "progress": False,
    }
    runs = {
        "merge": lambda: freefuse(PROMPT, method="merge", **common),
        "freefuse": lambda: freefuse(PROMPT, **common),
        "stage 1 alone": lambda: freefuse.masks(PROMPT, **common),
    }
    times: dict[str, list[float]] = {name: [] for name in runs}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FreeFuseWarning)
        for round_index in range(repeats + 1):
            for name, run in runs.items():
                tick = time.perf_counter()
                out = run()
                if round_index:  # the first round warms up
                    times[name].append(time.perf_counter() - tick)
    medians = {name: statistics.median(values) for name, values in times.items()}
    settings = out.manifest["settings"]
    print(
        f"{arch}: {parameters / 1e6:.0f}M-parameter transformer, {size}², {steps} steps (masks at step "
        f"{settings['mask_step']}, block {settings['block']}), {tokens} text tokens, two rank-16 LoRAs, CPU "
        f"({torch.get_num_threads()} threads), medians of {repeats}"
    )
    print(f"{'run':<16}{'s':>8}{'× merge':>10}")
    for name, value in medians.items():
        print(f"{name:<16}{value:8.2f}{value / medians['merge']:10.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", choices=[*MODELS, "both"], default="both")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=0, help="steps (0: the model's own, Z-Image 8, FLUX.2 4)")
    parser.add_argument("--tokens", type=int, default=128, help="text tokens (max_sequence_length)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    for arch in MODELS if args.arch == "both" else [args.arch]:
        bench(arch, args.size, args.steps or STEPS[arch], args.repeats, args.tokens)


if __name__ == "__main__":
    main()
