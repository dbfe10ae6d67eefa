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

ShapesWorld v3 (`--world v3`: 16×16 image tokens, 3+3 blocks, subjects "a zorblax star"; see
docs/shapesworld.md): `all` is vae, base (flow matching + the grounding loss from the first step),
words, and the four LoRAs; its export goes to weights/v3/.
    python scripts/train_shapesworld.py all --world v3 --threads 1

Runs live in --runs (default runs/shapesworld, v3: runs/shapesworld-v3); kill a stage and start it
again to resume.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import torch

from freefuse.shapesworld.model import LORA_DIR, MODEL_DIR, V3_LORA_DIR, V3_MODEL_DIR, add_subject_words
from freefuse.shapesworld.scenes import SUBJECTS, WORLDS
from freefuse.shapesworld.train import TrainConfig, train_base, train_grounding, train_lora, train_vae

# Each subject's embedding starts from the base colour word nearest its own colour (textual
# inversion's "initializer token"), one distinct word per subject.
INIT_WORDS = {"zorblax": "blue", "quiffle": "yellow", "blorp": "green", "snerk": "red"}
DEFAULT_STEPS = {"vae": 1500, "base": 8000, "ground": 2000, "lora": 1000}
# v3, sized to about 4.5 h on one CPU thread (s/step measured: docs/shapesworld.md, "v3").
DEFAULT_STEPS_V3 = {"vae": 1000, "base": 6000, "ground": 1000, "lora": 1000}
GROUND_WEIGHT_V3 = 0.1  # the v3 base's grounding loss weight (v2's fine-tune used 0.05)


def stage_config(args, stage: str, out: Path) -> TrainConfig:
    v3 = args.world == "v3"
    steps = args.steps or (DEFAULT_STEPS_V3 if v3 else DEFAULT_STEPS)[stage]
    common = {"out": out, "steps": steps, "seed": args.seed, "world": args.world}
    if args.checkpoint_every:
        common["checkpoint_every"] = args.checkpoint_every
    if stage == "vae":
        return TrainConfig(**common, batch_size=32, lr=1e-3, warmup=50)
    if stage == "base":
        return TrainConfig(**common, batch_size=32 if v3 else 64, lr=5e-4, warmup=100, ema_decay=0.998)
    if stage == "ground":
        return TrainConfig(**common, batch_size=32, lr=3e-4, warmup=50, ema_decay=0.99)
    return TrainConfig(**common, batch_size=16 if v3 else 32, lr=1e-3, warmup=30)


def export(runs: Path, world: str) -> None:
    """Copy the trained pipeline (half precision) and the LoRAs into the package's weights folder.

    v1: the `ground` run's model to weights/; v3: the `words` run's model (the grounded base with
    the subject words) to weights/v3/.
    """
    from diffusers import FluxPipeline

    model_dir, lora_dir = (V3_MODEL_DIR, V3_LORA_DIR) if world == "v3" else (MODEL_DIR, LORA_DIR)
    pipe = FluxPipeline.from_pretrained(str(runs / ("words" if world == "v3" else "ground") / "model"))
    if model_dir.exists():
        shutil.rmtree(model_dir)
    pipe.to(torch.float16).save_pretrained(model_dir)
    lora_dir.mkdir(parents=True, exist_ok=True)
    for word in SUBJECTS:
        source = runs / f"lora-{word}" / f"{word}.safetensors"
        if source.is_file():
            shutil.copyfile(source, lora_dir / source.name)
    print(f"exported to {model_dir.parent}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("stage", choices=["vae", "base", "words", "ground", "lora", "all", "export"])
    parser.add_argument("--world", choices=sorted(WORLDS), default="v1")
    parser.add_argument("--runs", type=Path, default=None, help="default runs/shapesworld[-v3]")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--word", choices=sorted(SUBJECTS), action="append")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--checkpoint-every", type=int, default=None, help="steps (default 250)")
    parser.add_argument(
        "--ground-weight",
        type=float,
        default=None,
        help=f"v3 base: grounding loss weight (default {GROUND_WEIGHT_V3}; 0: flow matching only)",
    )
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
    v3 = args.world == "v3"
    runs: Path = args.runs or Path("runs/shapesworld-v3" if v3 else "runs/shapesworld")
    if args.stage != "all":
        stages = [args.stage]
    elif v3:  # the base is grounded from its first step: no separate ground stage
        stages = ["vae", "base", "words", "lora"]
    else:
        stages = ["vae", "base", "words", "ground", "lora", "export"]
    ground_weight = (
        args.ground_weight if args.ground_weight is not None else (GROUND_WEIGHT_V3 if v3 else 0.0)
    )
    for stage in stages:
        if stage == "vae":
            train_vae(stage_config(args, "vae", runs / "vae"))
        elif stage == "base":
            train_base(
                stage_config(args, "base", runs / "base"), runs / "vae" / "vae", ground_weight=ground_weight
            )
        elif stage == "words":
            from diffusers import FluxPipeline

            pipe = FluxPipeline.from_pretrained(str(runs / "base" / "model"))
            add_subject_words(pipe, seed=args.seed, world=args.world)
            pipe.save_pretrained(runs / "words" / "model")
        elif stage == "ground":
            source = args.from_model or runs / "words" / "model"
            train_grounding(stage_config(args, "ground", runs / "ground"), source)
        elif stage == "lora":
            source = args.from_model or runs / ("words" if v3 else "ground") / "model"
            for word in args.word or list(SUBJECTS):
                config = stage_config(args, "lora", runs / f"lora-{word}")
                init = None if args.no_init_word else INIT_WORDS[word]
                train_lora(config, source, word, pivotal=not args.no_pivotal, init_word=init)
        else:
            export(runs, args.world)
    return 0


if __name__ == "__main__":
    sys.exit(main())
