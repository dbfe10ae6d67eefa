"""Stage-1 cost and quality: every mask method's time and memory, and its IoU on planted scenes.

Cost: at FLUX.1 shapes (24 heads, head dim 128, 512 text tokens) for 1024² (N = 4096 image tokens)
and 2048² (N = 16384) images, each mask method of `freefuse.core`, and a naive full-matrix version
of the paper's method (the whole [T+N, N] map, then rows). Each measurement runs in a fresh
subprocess so that its peak memory is its own; all vote per token (no SLIC).

Quality (`--quality`): IoU of each subject's mask with its planted region
(`freefuse.testing.attention_scene`) for 2-5 subjects, large (the grid split among them) and
small (discs of 3.5 % of the image on a background), with no sinks, border sinks, and sinks
anywhere; mean, minimum and 10th percentile over subjects.

    python bench/bench_masks.py                 # cost, CPU, 1024² and 2048²
    python bench/bench_masks.py --device cuda   # GPU peak memory from the CUDA allocator
    python bench/bench_masks.py --quality       # IoU table
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from itertools import product

import torch

HEADS, DIM, TEXT_TOKENS, SUBJECTS = 24, 128, 512, 2
# Method variants: MaskConfig settings. "text-to-image" is the paper's method as published.
VARIANTS = {
    "text-to-image": {"method": "text-to-image"},
    "text-to-image+": {"method": "text-to-image", "sink_rule": "shared", "map_scale": "peak"},
    "image-to-text": {"method": "image-to-text"},
    "combined": {"method": "combined"},
    "routing": {"method": "routing"},
}


def inputs(image_side: int, device: str, dtype: torch.dtype) -> dict:
    side = image_side // 16  # FLUX: 8x VAE, then 2x2 patches
    generator = torch.Generator().manual_seed(0)
    n_img = side * side
    make = lambda n: torch.randn(HEADS, n, DIM, generator=generator).to(device, dtype)  # noqa: E731
    return {
        "q_text": make(TEXT_TOKENS),
        "q_img": make(n_img),
        "k_img": make(n_img),
        "k_text": make(TEXT_TOKENS),
        "o_img": torch.randn(n_img, HEADS * DIM, generator=generator).to(device, dtype),
        "token_sets": [[3, 4], [9]],
        "grid": (side, side),
    }


def naive_masks(q_text, q_img, k_img, token_sets, grid, **unused):
    """What attention-map code usually does: the whole [T+N, N] map per head, then pick rows."""
    from freefuse.core import MaskConfig
    from freefuse.core.attention import border_tokens, filter_sinks
    from freefuse.core.voting import vote_tokens

    config = MaskConfig()
    queries = torch.cat([q_text, q_img], dim=1)
    n_text, n_img = q_text.shape[1], q_img.shape[1]
    full = torch.zeros(queries.shape[1], n_img, device=queries.device)
    for head in range(queries.shape[0]):
        logits = queries[head].float() @ k_img[head].float().T / DIM**0.5
        full += torch.softmax(logits, dim=-1)
    full /= queries.shape[0]
    border = border_tokens(grid, config.sink_border, full.device)
    cross = torch.stack([filter_sinks(full[tokens], border, config.p_sink).mean(0) for tokens in token_sets])
    k = max(1, int(n_img * config.p_top))
    refined = torch.stack([full[n_text + cross[i].topk(k).indices].mean(0) for i in range(len(token_sets))])
    return vote_tokens(refined.reshape(len(token_sets), *grid))


def worker(variant: str, image_side: int, device: str) -> dict:
    from freefuse.core import MaskConfig, masks_from_attention

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    args = inputs(image_side, device, dtype)
    if variant == "naive":
        function = naive_masks
    else:
        config = MaskConfig(**VARIANTS[variant])

        def function(**kwargs):
            return masks_from_attention(**kwargs, config=config)

    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    start = time.perf_counter()
    result = function(**args)
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    masks = result if variant == "naive" else result.token_masks.bool()
    return {"seconds": seconds, "extra_peak_bytes": max(peak, 0), "mask_sum": int(masks.sum())}


def measure(variant: str, image_side: int, device: str) -> dict:
    command = [sys.executable, __file__, "--worker", variant, str(image_side), "--device", device]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        return {"error": (done.stderr.strip().splitlines() or ["killed"])[-1]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def quality(seeds: int) -> None:
    import numpy as np

    from freefuse.core import MaskConfig
    from freefuse.testing import attention_scene, scene_ious, scene_masks

    torch.set_num_threads(1)
    sizes = (("regions", "large"), ("discs", "small 3.5%"))
    difficulty = {"clean": {}, "noisy": {"noise": 1.0, "text_signal": 1.5}}
    print("| subjects | scene | sinks | method | mean IoU | min | 10th pct | subjects scored |")
    print("|---|---|---|---|---|---|---|---|")
    for (layout, label), (level, scene_options), sinks in product(
        sizes, difficulty.items(), ("none", "border", "anywhere")
    ):
        found: dict[str, list[float]] = {name: [] for name in VARIANTS}
        for n_subjects, seed in product((2, 3, 4, 5), range(seeds)):
            scene = attention_scene(n_subjects, layout=layout, sinks=sinks, seed=seed, **scene_options)
            for name, options in VARIANTS.items():
                config = MaskConfig(background=layout == "discs", **options)
                found[name].extend(scene_ious(scene, scene_masks(scene, config)))
        for name, values in found.items():
            print(
                f"| {label} | {level} | {sinks} | {name} | {np.mean(values):.3f} | {np.min(values):.3f} | "
                f"{np.percentile(values, 10):.3f} | {len(values)} |"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quality", action="store_true", help="IoU of every method on planted scenes")
    parser.add_argument("--seeds", type=int, default=5, help="scenes per subject count (--quality)")
    parser.add_argument("--worker", nargs=2, metavar=("VARIANT", "SIZE"))
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker[0], int(args.worker[1]), args.device)))
        return
    if args.quality:
        quality(args.seeds)
        return
    print(f"stage-1 cost: {HEADS} heads, D={DIM}, T={TEXT_TOKENS}, {SUBJECTS} subjects, device={args.device}")
    print("| size | N | method | time | extra peak memory | × naive time | × naive memory |")
    print("|---|---|---|---|---|---|---|")
    mib = 1 << 20
    for side in args.sizes:
        n_img = (side // 16) ** 2
        naive = measure("naive", side, args.device)
        for variant in [*VARIANTS, "naive"]:
            found = naive if variant == "naive" else measure(variant, side, args.device)
            if "error" in found:
                print(f"| {side}² | {n_img} | {variant} | failed: {found['error']} | | | |")
                continue
            time_ratio = memory_ratio = "-"
            if "error" not in naive:
                time_ratio = f"{found['seconds'] / naive['seconds']:.3f}"
                memory_ratio = f"{found['extra_peak_bytes'] / max(naive['extra_peak_bytes'], 1):.3f}"
            print(
                f"| {side}² | {n_img} | {variant} | {found['seconds']:.3f} s | "
                f"{found['extra_peak_bytes'] / mib:.0f} MiB | {time_ratio} | {memory_ratio} |"
            )


if __name__ == "__main__":
    main()
