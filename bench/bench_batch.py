"""`freefuse batch` vs a loop of single `freefuse generate` calls: images per minute, from one run.

    python bench/bench_batch.py --jobs 8

Both make the same images of the tiny model (saved as a folder, as a user's model would be) with
two LoRA files. The loop starts one `freefuse generate` process per image, as a shell loop would;
the batch starts one process that loads the model once and switches LoRAs as adapters.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=8)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--size", default="256x256")
    args = parser.parse_args()

    from freefuse.testing import random_lora, tiny_flux_pipeline

    with tempfile.TemporaryDirectory(prefix="bench-batch-") as folder:
        root = Path(folder)
        pipe = tiny_flux_pipeline(seed=0)
        pipe.save_pretrained(root / "model")
        random_lora(pipe, "alice", seed=1, path=root / "alice.safetensors")
        random_lora(pipe, "bob", seed=2, path=root / "bob.safetensors")
        loras = [
            {"path": str(root / "alice.safetensors"), "words": ["Alice"]},
            {"path": str(root / "bob.safetensors"), "words": ["Bob"]},
        ]
        jobs = [
            {
                "model": str(root / "model"),
                "prompt": "Alice hugging Bob in the snow",
                "seed": seed,
                "steps": args.steps,
                "size": args.size,
                "max_sequence_length": 64,
                "loras": loras,
            }
            for seed in range(args.jobs)
        ]
        (root / "jobs.jsonl").write_text("".join(json.dumps(job) + "\n" for job in jobs))

        start = time.perf_counter()
        for job in jobs:
            subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "freefuse.cli",
                    "generate",
                    "--model",
                    job["model"],
                    "--lora",
                    f"{loras[0]['path']}=Alice",
                    "--lora",
                    f"{loras[1]['path']}=Bob",
                    "--prompt",
                    job["prompt"],
                    "--seed",
                    str(job["seed"]),
                    "--steps",
                    str(args.steps),
                    "--size",
                    args.size,
                    "--max-sequence-length",
                    "64",
                    "--out",
                    str(root / "loop"),
                    "--name",
                    f"img{job['seed']}",
                ],
                check=True,
                capture_output=True,
            )
        loop_s = time.perf_counter() - start

        start = time.perf_counter()
        subprocess.run(
            [
                sys.executable,
                "-m",
                "freefuse.cli",
                "batch",
                str(root / "jobs.jsonl"),
                "--out",
                str(root / "batch"),
            ],
            check=True,
            capture_output=True,
        )
        batch_s = time.perf_counter() - start

    loop_rate, batch_rate = 60 * args.jobs / loop_s, 60 * args.jobs / batch_s
    print(f"{args.jobs} images, tiny model, {args.size}, {args.steps} steps")
    print(f"loop of generate: {loop_s:6.1f}s  {loop_rate:6.1f} images/min")
    print(f"freefuse batch:   {batch_s:6.1f}s  {batch_rate:6.1f} images/min")
    print(f"ratio batch / loop: {batch_rate / loop_rate:.2f}x images/min")


if __name__ == "__main__":
    main()
