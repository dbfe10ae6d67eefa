"""FreeFuse against plain multi-LoRA on a mid-size random SDXL-shaped UNet: time ratio from one run.

    python bench/bench_sdxl.py                 # CPU, 512², 12 steps
    python bench/bench_sdxl.py --repeats 5

The UNet has SDXL's layout at reduced width (3 levels, cross-attention on the two deepest with
1 and 2 transformer blocks, 64-dim heads, two CLIP encoders of 128 wide side by side) and two random
rank-16 LoRAs on every attention-block linear layer (the layers a kohya SDXL LoRA adapts). Runs,
same prompt, seed and steps, alternating after one warm-up round, medians compared:
- merge: diffusers' unfused joint adapters (`method="merge"`);
- FreeFuse: `method="freefuse"` (routing masks at the authors' relative block, fused LoRA op);
- stage 1 alone: `FreeFuse.masks`.
Random weights: the numbers measure cost, not image quality.
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch

UNET = {
    "block_out_channels": (128, 256, 384),
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "transformer_layers_per_block": (1, 1, 2),
    "attention_head_dim": (2, 4, 6),  # diffusers' name for the head count of SDXL-style UNets: 64 wide each
    "layers_per_block": 2,
    "norm_num_groups": 32,
}
PROMPT = "Alice hugging Bob in the snow, a photo"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from freefuse import FreeFuse, FreeFuseWarning
    from freefuse.testing import random_lora, tiny_sdxl_pipeline

    warnings.simplefilter("ignore")
    pipe = tiny_sdxl_pipeline(seed=0, unet_config=UNET, clip_width=128)
    pipe.set_progress_bar_config(disable=True)
    parameters = sum(p.numel() for p in pipe.unet.parameters())
    for index, name in enumerate(("alice", "bob")):
        random_lora(pipe, name, rank=16, seed=index + 1, scale=0.3)
    freefuse = FreeFuse(pipe)
    freefuse.use_adapter("alice", words=["Alice"])
    freefuse.use_adapter("bob", words=["Bob"])
    common = {
        "height": args.size,
        "width": args.size,
        "num_inference_steps": args.steps,
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
        for round_index in range(args.repeats + 1):
            for name, run in runs.items():
                tick = time.perf_counter()
                run()
                if round_index:  # the first round warms up
                    times[name].append(time.perf_counter() - tick)
    medians = {name: statistics.median(values) for name, values in times.items()}
    print(
        f"SDXL-shaped UNet, {parameters / 1e6:.0f}M parameters, {args.size}², {args.steps} steps, "
        f"two rank-16 LoRAs, CPU ({torch.get_num_threads()} threads), medians of {args.repeats}"
    )
    print(f"{'run':<16}{'s':>8}{'× merge':>10}")
    for name, value in medians.items():
        print(f"{name:<16}{value:8.2f}{value / medians['merge']:10.2f}")


if __name__ == "__main__":
    main()
