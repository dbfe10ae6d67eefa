"""`freefuse demo`: the whole job offline, on the built-in tiny model unless real weights are present.

Two LoRA files are written with their trigger word in the metadata and loaded the way a user's
LoRAs are (words from the metadata); then masks, the masked generation, and the outputs.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .files import check_free
from .models import TINY, architecture_of, cached_model, load_pipeline
from .outputs import output_paths, write_outputs
from .settings import GenerationSettings, parse_size

if TYPE_CHECKING:
    from .pipeline import FreeFuseOutput

PROMPT = "Alice hugging Bob in the snow"
SUBJECTS = (("alice", "Alice", 1), ("bob", "Bob", 2))
TINY_STEPS, TINY_SIZE, TINY_TOKENS = 8, "512", 64


@dataclass
class DemoPlan:
    """What `run_demo` will do: the model it found and the settings it uses."""

    model: str
    tiny: bool
    settings: GenerationSettings


def plan_demo(
    model: str | None = None, steps: int | None = None, size: str | None = None, seed: int = 0
) -> DemoPlan:
    """The model (the one given, a cached one a backend knows, else the tiny one) and the settings."""
    chosen = model or cached_model() or TINY
    tiny = chosen == TINY
    architecture = architecture_of(chosen)
    width, height = parse_size(
        size or (TINY_SIZE if tiny else str(getattr(architecture, "default_size", 1024)))
    )
    settings = GenerationSettings(
        prompt=PROMPT,
        seed=seed,
        height=height,
        width=width,
        num_inference_steps=steps or (TINY_STEPS if tiny else getattr(architecture, "default_steps", 28)),
        max_sequence_length=TINY_TOKENS if tiny else None,
    )
    return DemoPlan(model=chosen, tiny=tiny, settings=settings)


def run_demo(
    plan: DemoPlan,
    out: Path,
    run: Callable,
    overwrite: bool = False,
    device: str | None = None,
    dtype: str | None = None,
    offload: bool = False,
) -> tuple[dict[str, Path], FreeFuseOutput]:
    """Load, add the two demo LoRAs, generate with `run(freefuse, settings)`, write; return the
    files and the output."""
    from .pipeline import FreeFuse
    from .testing import random_lora

    paths = output_paths(out, "demo", 1)
    check_free(list(paths[0].values()), overwrite)
    pipeline = load_pipeline(plan.model, device=device, dtype=dtype, offload=offload)
    freefuse = FreeFuse(pipeline)
    with tempfile.TemporaryDirectory(prefix="freefuse-demo-") as folder:
        for name, word, lora_seed in SUBJECTS:
            path = Path(folder) / f"{name}.safetensors"
            random_lora(
                pipeline,
                name,
                seed=lora_seed,
                path=path,
                scale=1.0 if plan.tiny else 0.3,
                metadata={"modelspec.trigger_phrase": word},
            )
            freefuse.add_lora(path, name=name)
        output = run(freefuse, plan.settings)
    write_outputs(output, paths, overwrite)
    return paths[0], output
