"""`freefuse demo`: the whole job offline, something worth looking at, and a manifest that replays.

Without real weights the demo runs on ShapesWorld, the small FLUX-architecture model committed
with FreeFuse (trained offline on pictures of shapes), with two of its subject LoRAs: the
zorblax (a purple striped star) and the quiffle (an orange dotted cross). It makes the same seed
twice, with plain joint LoRAs (merge) and with FreeFuse, and writes them side by side with
FreeFuse's masks. With real FLUX.1 weights (`--model`, or in the Hugging Face cache) it runs
FreeFuse with two random LoRAs, which shows the pipeline, not a result; `--model tiny` runs the
random tiny model. The LoRA files the demo used are written beside its outputs, so its manifest
replays from anywhere (`freefuse generate --manifest out/demo.json`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from .files import atomic_save, check_free
from .models import SHAPESWORLD, TINY_MODELS, architecture_of, cached_model, load_pipeline
from .outputs import check_outputs, output_paths, write_outputs
from .settings import GenerationSettings, parse_size

if TYPE_CHECKING:
    from .pipeline import FreeFuseOutput

LORA_FOLDER = "demo-loras"


@dataclass
class DemoPlan:
    """What `run_demo` will do: the model, the settings, the LoRAs (name, trigger word) and what the
    user is looking at."""

    model: str
    settings: GenerationSettings
    subjects: list[tuple[str, str]]
    description: str
    compare: bool = False
    notes: list[str] = field(default_factory=list)


def plan_demo(
    model: str | None = None,
    steps: int | None = None,
    size: str | None = None,
    seed: int = 0,
    architecture: str | None = None,
) -> DemoPlan:
    """ShapesWorld unless a model is given or real weights are in the cache; with `architecture`,
    a cached model of it, else its built-in tiny random model ("sdxl": `tiny-sdxl`)."""
    if model is not None and architecture is not None:
        found = architecture_of(model)
        if found is not None and found.name != architecture:
            raise ValueError(f"--arch {architecture} but {model} is a {found.name} model; leave one out.")
    fallback = SHAPESWORLD
    if architecture is not None:
        tiny_of = {arch: name for name, arch in TINY_MODELS.items()}
        if architecture not in tiny_of:
            raise ValueError(f"Unknown architecture {architecture!r}; use one of {sorted(tiny_of)}.")
        fallback = SHAPESWORLD if architecture == "flux" else tiny_of[architecture]
    chosen = model or cached_model(architecture) or fallback
    if chosen == SHAPESWORLD:
        from .shapesworld.model import MAX_TEXT_TOKENS
        from .shapesworld.scenes import SIZE

        width, height = parse_size(size or str(SIZE))
        return DemoPlan(
            model=chosen,
            settings=GenerationSettings(
                prompt="a zorblax and a quiffle",
                seed=seed,
                width=width,
                height=height,
                num_inference_steps=steps or 20,
                max_sequence_length=MAX_TEXT_TOKENS,
            ),
            subjects=[("zorblax", "zorblax"), ("quiffle", "quiffle")],
            description=(
                "ShapesWorld, a small FLUX-architecture model trained offline on shapes, with two subject LoRAs: "
                "the zorblax (a purple striped star) and the quiffle (an orange dotted cross). demo-compare.png: "
                "left, both LoRAs everywhere (plain multi-LoRA, 'merge'); middle, FreeFuse, each LoRA inside its "
                "mask; right, FreeFuse's masks. Same seed for both."
            ),
            compare=True,
        )
    tiny = chosen in TINY_MODELS
    architecture = architecture_of(chosen)
    width, height = parse_size(size or ("512" if tiny else str(getattr(architecture, "default_size", 1024))))
    return DemoPlan(
        model=chosen,
        settings=GenerationSettings(
            prompt="Alice hugging Bob in the snow",
            seed=seed,
            height=height,
            width=width,
            num_inference_steps=steps or (8 if tiny else getattr(architecture, "default_steps", 28)),
            max_sequence_length=64 if tiny else None,
        ),
        subjects=[("alice", "Alice"), ("bob", "Bob")],
        description=(
            "the built-in tiny random model with two random LoRAs: coloured noise, which shows that the whole "
            "pipeline runs, not what FreeFuse does (run `freefuse demo` without --model for that)."
            if tiny
            else f"{chosen} with two random LoRAs (weight 0.3): the pipeline at full size, not a result."
        ),
    )


def _lora_files(plan: DemoPlan, pipeline, folder: Path) -> list[Path]:
    """The demo's LoRA files in `folder`: ShapesWorld's committed ones, or random ones."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for seed, (name, word) in enumerate(plan.subjects, start=1):
        path = folder / f"{name}.safetensors"
        if plan.model == SHAPESWORLD:
            from .shapesworld.model import lora_path

            atomic_save(path, lambda handle, source=lora_path(name): handle.write(source.read_bytes()))
        else:
            from safetensors.torch import save

            from .testing import typical_lora_state_dict

            state = typical_lora_state_dict(
                pipeline, seed=seed, scale=1.0 if plan.model in TINY_MODELS else 0.3
            )
            data = save(state, metadata={"format": "pt", "modelspec.trigger_phrase": word})
            atomic_save(path, lambda handle, data=data: handle.write(data))
        paths.append(path)
    return paths


def compare_picture(merge, freefuse, masks, labels=("merge", "FreeFuse", "FreeFuse masks"), scale: int = 4):
    """merge | FreeFuse | masks over FreeFuse, each `scale`× (nearest), with a caption above each."""
    from PIL import Image, ImageDraw

    width, height = freefuse.size
    cell_w, cell_h, caption = width * scale, height * scale, 14
    big = [image.convert("RGB").resize((cell_w, cell_h), Image.NEAREST) for image in (merge, freefuse)]
    overlay = masks.resize((cell_h, cell_w), mode="nearest").overlay(big[1]) if masks is not None else big[1]
    picture = Image.new("RGB", (3 * cell_w, cell_h + caption), (255, 255, 255))
    draw = ImageDraw.Draw(picture)
    for column, (image, label) in enumerate(zip((*big, overlay), labels, strict=True)):
        picture.paste(image, (column * cell_w, caption))
        draw.text((column * cell_w + 4, 1), label, fill=(0, 0, 0))
    return picture


def run_demo(
    plan: DemoPlan,
    out: Path,
    run: Callable,
    overwrite: bool = False,
    device: str | None = None,
    dtype: str | None = None,
    offload: bool = False,
) -> tuple[dict[str, Path], FreeFuseOutput]:
    """Load, add the demo LoRAs (written under `out/demo-loras`), generate with
    `run(freefuse, settings)`, write everything; return the files and FreeFuse's output."""
    from .pipeline import FreeFuse

    paths = output_paths(out, "demo", 1)[0]
    extra = {"merge": out / "demo-merge.png", "compare": out / "demo-compare.png"} if plan.compare else {}
    loras = [out / LORA_FOLDER / f"{name}.safetensors" for name, _ in plan.subjects]
    check_outputs([paths], overwrite)
    check_free([*extra.values(), *loras], overwrite)
    pipeline = load_pipeline(plan.model, device=device, dtype=dtype, offload=offload)
    freefuse = FreeFuse(pipeline)
    for path, (name, word) in zip(_lora_files(plan, pipeline, out / LORA_FOLDER), plan.subjects, strict=True):
        freefuse.add_lora(path, name=name, words=[word])
    output = run(freefuse, plan.settings)
    write_outputs(output, [paths], overwrite)
    if plan.compare:
        merge = run(freefuse, plan.settings.model_copy(update={"method": "merge"}))
        atomic_save(extra["merge"], lambda handle: merge.images[0].save(handle, "PNG"), overwrite)
        picture = compare_picture(merge.images[0], output.images[0], output.masks[0])
        atomic_save(extra["compare"], lambda handle: picture.save(handle, "PNG"), overwrite)
    return {**paths, **extra}, output


__all__ = ["DemoPlan", "compare_picture", "plan_demo", "run_demo"]
