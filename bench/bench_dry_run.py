"""`freefuse batch --grid --dry-run` of a big grid: seconds for this checkout, and for another one.

    python bench/bench_dry_run.py                                   # 100,000 jobs, this checkout
    python bench/bench_dry_run.py --reference /path/to/old/src --reference-jobs 2000

The grid is one pair of LoRA files (one with its trigger word in its metadata) over the tiny model
saved as a folder, one prompt, N seeds. Each run is a fresh `python -m freefuse batch` process, so
its time includes start-up (imports, about 5 s), measured apart with a 1-job grid. A reference that
would take minutes is run on `--reference-jobs` jobs and its per-job time extrapolated to N (said so).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def make_grid(root: Path, jobs: int) -> Path:
    grid = root / f"grid-{jobs}.yaml"
    grid.write_text(
        f"model: {root / 'model'}\n"
        f"loras: [{{path: {root / 'alice.safetensors'}}}, {{path: {root / 'bob.safetensors'}, words: [Bob]}}]\n"
        f"prompts: ['{{A}} hugging {{B}} in the snow']\nseeds: {{start: 0, count: {jobs}}}\n"
        "settings: {steps: 3, size: 64x64}\n"
    )
    return grid


def dry_run(grid: Path, out: Path, source: Path | None) -> float:
    env = dict(os.environ)
    if source is not None:
        env["PYTHONPATH"] = str(source)
    command = [sys.executable, "-m", "freefuse", "batch", str(grid), "--grid", "--dry-run", "--out", str(out)]
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"dry run failed ({done.returncode}): {done.stderr[-2000:]}")
    return seconds


def measure(root: Path, jobs: int, source: Path | None) -> tuple[float, float]:
    """(seconds for `jobs` jobs, seconds per job beyond start-up)."""
    start_up = dry_run(make_grid(root, 1), root / "out", source)
    total = dry_run(make_grid(root, jobs), root / "out", source)
    return total, (total - start_up) / max(jobs - 1, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=100_000)
    parser.add_argument("--reference", type=Path, help="the `src` folder of another checkout")
    parser.add_argument("--reference-jobs", type=int, default=2000)
    args = parser.parse_args()

    from freefuse.testing import random_lora, tiny_flux_pipeline

    with tempfile.TemporaryDirectory(prefix="bench-dry-run-") as folder:
        root = Path(folder)
        pipe = tiny_flux_pipeline(seed=0)
        pipe.save_pretrained(root / "model")
        random_lora(pipe, "alice", seed=1, path=root / "alice.safetensors", metadata={"modelspec.trigger_phrase": "Alice"})
        random_lora(pipe, "bob", seed=2, path=root / "bob.safetensors")
        total, per_job = measure(root, args.jobs, None)
        print(f"this checkout: {args.jobs:,} jobs in {total:.1f} s ({per_job * 1e3:.2f} ms per job after start-up)")
        if args.reference is not None:
            ref_total, ref_per_job = measure(root, args.reference_jobs, args.reference.resolve())
            estimate = total - per_job * (args.jobs - 1) + ref_per_job * (args.jobs - 1)
            print(
                f"reference: {args.reference_jobs:,} jobs in {ref_total:.1f} s ({ref_per_job * 1e3:.2f} ms per job); "
                f"{args.jobs:,} jobs extrapolated: {estimate / 60:.1f} min"
            )
            print(f"per job: reference / this checkout = {ref_per_job / max(per_job, 1e-9):.0f}x; "
                  f"{args.jobs:,} jobs: {estimate / total:.0f}x")


if __name__ == "__main__":
    main()
