"""Stage-1 cost: `masks_from_attention` (only the needed rows) vs a naive full-matrix version.

At FLUX.1 shapes (24 heads, head dim 128, 512 text tokens) for 1024² (N = 4096 image tokens) and
2048² (N = 16384) images. Each measurement runs in a fresh subprocess so that its peak memory is
its own; the ratios printed are naive / FreeFuse, from one run of this script.

    python bench/bench_masks.py                 # CPU, 1024² and 2048²
    python bench/bench_masks.py --device cuda   # GPU peak memory from the CUDA allocator

Both versions vote per token (no SLIC) so that only the attention part is compared.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch

HEADS, DIM, TEXT_TOKENS, SUBJECTS = 24, 128, 512, 2


def inputs(image_side: int, device: str, dtype: torch.dtype) -> dict:
    side = image_side // 16  # FLUX: 8x VAE, then 2x2 patches
    generator = torch.Generator().manual_seed(0)
    n_img = side * side
    make = lambda n: torch.randn(HEADS, n, DIM, generator=generator).to(device, dtype)  # noqa: E731
    return {
        "q_text": make(TEXT_TOKENS),
        "q_img": make(n_img),
        "k_img": make(n_img),
        "token_sets": [[3, 4], [9]],
        "grid": (side, side),
    }


def naive_masks(q_text, q_img, k_img, token_sets, grid):
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
    from freefuse.core import masks_from_attention

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    args = inputs(image_side, device, dtype)
    function = naive_masks if variant == "naive" else masks_from_attention
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--worker", nargs=2, metavar=("VARIANT", "SIZE"))
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker[0], int(args.worker[1]), args.device)))
        return
    print(
        f"masks_from_attention vs naive full matrix: {HEADS} heads, D={DIM}, T={TEXT_TOKENS}, device={args.device}"
    )
    print(
        f"{'size':>6} {'N':>6} {'freefuse s':>11} {'naive s':>9} {'time ratio':>11} "
        f"{'freefuse MiB':>13} {'naive MiB':>10} {'memory ratio':>13}"
    )
    for side in args.sizes:
        ours = measure("freefuse", side, args.device)
        naive = measure("naive", side, args.device)
        n_img = (side // 16) ** 2
        if "error" in ours or "error" in naive:
            print(f"{side:>6} {n_img:>6}  failed: {ours.get('error') or naive.get('error')}")
            continue
        mib = 1 << 20
        print(
            f"{side:>6} {n_img:>6} {ours['seconds']:>11.3f} {naive['seconds']:>9.3f} "
            f"{naive['seconds'] / ours['seconds']:>10.1f}x {ours['extra_peak_bytes'] / mib:>13.1f} "
            f"{naive['extra_peak_bytes'] / mib:>10.1f} "
            f"{naive['extra_peak_bytes'] / max(ours['extra_peak_bytes'], 1):>12.1f}x"
        )


if __name__ == "__main__":
    main()
