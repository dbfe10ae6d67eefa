#!/usr/bin/env python
"""Train the ShapesWorld model and its subject LoRAs (CPU; resumable; seeded; logs loss).

    python scripts/train_shapesworld.py all                 # vae, base, words, ground, 4 LoRAs, export (~2 h, 2 cores)
    python scripts/train_shapesworld.py vae  --steps 1500
    python scripts/train_shapesworld.py base --steps 8000
    python scripts/train_shapesworld.py words               # the subjects' made-up words become new tokens
    python scripts/train_shapesworld.py ground --steps 2000 # attention on the right object (grounding loss)
    python scripts/train_shapesworld.py lora --word zorblax --steps 1000   # pivotal: LoRA + the word's embedding

`--from-model DIR` starts `ground` (or `lora`) from another model folder, e.g. the committed one
(src/freefuse/shapesworld/weights/model), instead of the previous stage's run.
    python scripts/train_shapesworld.py export              # copy results into the package (weights/)

Runs live in --runs (default runs/shapesworld); kill a stage and start it again to resume.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import torch

from freefuse.shapesworld.model import LORA_DIR, MODEL_DIR, add_subject_words
from freefuse.shapesworld.scenes import SUBJECTS
from freefuse.shapesworld.train import TrainConfig, train_base, train_grounding, train_lora, train_vae

# Each subject's embedding starts from the base colour word nearest its own colour (textual
# inversion's "initializer token"), one distinct word per subject.
INIT_WORDS = {"zorblax": "blue", "quiffle": "yellow", "blorp": "green", "snerk": "red"}
DEFAULT_STEPS = {"vae": 1500, "base": 8000, "ground": 2000, "lora": 1000}


def stage_config(args, stage: str, out: Path) -> TrainConfig:
    steps = args.steps or DEFAULT_STEPS[stage]
    if stage == "vae":
        return TrainConfig(out=out, steps=steps, batch_size=32, lr=1e-3, warmup=50, seed=args.seed)
    if stage == "base":
        return TrainConfig(
            out=out, steps=steps, batch_size=64, lr=5e-4, warmup=100, seed=args.seed, ema_decay=0.998
        )
    if stage == "ground":
        return TrainConfig(
            out=out, steps=steps, batch_size=32, lr=3e-4, warmup=50, seed=args.seed, ema_decay=0.99
        )
    return TrainConfig(out=out, steps=steps, batch_size=32, lr=1e-3, warmup=30, seed=args.seed)


def export(runs: Path) -> None:
    """Copy the trained pipeline (half precision) and the LoRAs into the package's weights folder."""
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(str(runs / "ground" / "model"))
    if MODEL_DIR.exists():
        shutil.rmtree(MODEL_DIR)
    pipe.to(torch.float16).save_pretrained(MODEL_DIR)
    LORA_DIR.mkdir(parents=True, exist_ok=True)
    for word in SUBJECTS:
        source = runs / f"lora-{word}" / f"{word}.safetensors"
        if source.is_file():
            shutil.copyfile(source, LORA_DIR / source.name)
    print(f"exported to {MODEL_DIR.parent}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("stage", choices=["vae", "base", "words", "ground", "lora", "all", "export"])
    parser.add_argument("--runs", type=Path, default=Path("runs/shapesworld"))
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--word", choices=sorted(SUBJECTS), action="append")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument(
        "--from-model", type=Path, default=None, help="start ground/lora from this model folder"
    )
    parser.add_argument(
        "--no-pivotal", action="store_true", help="LoRAs without the trigger word's embedding"
    )
    parser.add_argument(
        "--no-init-word", action="store_true", help="embeddings start from the word's own row"
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    runs: Path = args.runs
    stages = ["vae", "base", "words", "ground", "lora", "export"] if args.stage == "all" else [args.stage]
    for stage in stages:
        if stage == "vae":
            train_vae(stage_config(args, "vae", runs / "vae"))
        elif stage == "base":
            train_base(stage_config(args, "base", runs / "base"), runs / "vae" / "vae")
        elif stage == "words":
            from diffusers import FluxPipeline

            pipe = FluxPipeline.from_pretrained(str(runs / "base" / "model"))
            add_subject_words(pipe, seed=args.seed)
            pipe.save_pretrained(runs / "words" / "model")
        elif stage == "ground":
            source = args.from_model or runs / "words" / "model"
            train_grounding(stage_config(args, "ground", runs / "ground"), source)
        elif stage == "lora":
            source = args.from_model or runs / "ground" / "model"
            for word in args.word or list(SUBJECTS):
                config = stage_config(args, "lora", runs / f"lora-{word}")
                init = None if args.no_init_word else INIT_WORDS[word]
                train_lora(config, source, word, pivotal=not args.no_pivotal, init_word=init)
        else:
            export(runs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
