"""`freefuse demo`: the whole job offline, something worth looking at, and a manifest that replays.

Without real weights the demo runs on ShapesWorld, the small FLUX-architecture model committed
with FreeFuse (trained offline on pictures of shapes), with two of its subject LoRAs: the
zorblax (a purple striped star) and the quiffle (an orange dotted cross). It makes the same seed
twice, with plain joint LoRAs (merge) and with FreeFuse, and writes them side by side with
FreeFuse's masks. With real weights (`--model`, or a known model of `--arch` in the Hugging Face
cache: FLUX.1, SDXL, Z-Image, FLUX.2 [klein]) it runs FreeFuse with two random LoRAs, which shows
the pipeline, not a result; `--model tiny` (or `--arch sdxl|zimage|flux2` without cached weights)
runs a random tiny model. The LoRA files the demo used are written beside its outputs, so its manifest
replays from anywhere (`freefuse generate --manifest out/demo.json`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path

from safetensors.torch import save

from .backends import backend_for
from .core.maskset import below, legend_strip, subject_colour
from .files import atomic_save, check_free
from .models import SHAPESWORLD, TINY_MODELS, architecture_of, cached_model
from .outputs import check_outputs, output_paths, write_outputs
from .pipeline import FreeFuseOutput
from .runner import RunService, StepCallback
from .settings import GenerationSettings, parse_size
from .shapesworld.model import lora_path
from .shapesworld.scenes import COLOURS, SIZE, SUBJECTS
from .spec import LoraSpec, RunSpec
from .tiny import random_lora_weights

LORA_FOLDER = "demo-loras"
#: What the ShapesWorld demo writes besides a run's own files.
COMPARE_FILES = ("demo-merge.png", "demo-compare.png")


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
    #: One line: what to look at in the demo's picture.
    look_at: str = ""
    #: Each subject's mask colour in the compare picture (its own colour in ShapesWorld).
    colours: dict[str, tuple[int, int, int]] | None = None


def plan_demo(
    model: str | None = None,
    steps: int | None = None,
    size: str | None = None,
    seed: int = 0,
    architecture: str | None = None,
) -> DemoPlan:
    """ShapesWorld unless a model is given or real weights are in the cache; with `architecture`,
    a cached model of it, else its built-in tiny random model ("sdxl": `tiny-sdxl`, "zimage":
    `tiny-zimage`, "flux2": `tiny-flux2`)."""
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
        width, height = parse_size(size or str(SIZE))
        return DemoPlan(
            model=chosen,
            settings=GenerationSettings(
                prompt="a zorblax and a quiffle",
                seed=seed,
                width=width,
                height=height,
                num_inference_steps=steps or 20,  # the text length is the model's own (its tokenizer's)
            ),
            subjects=[("zorblax", "zorblax"), ("quiffle", "quiffle")],
            colours={name: COLOURS[SUBJECTS[name].colour] for name in ("zorblax", "quiffle")},
            look_at=(
                "left, merge (both LoRAs everywhere): do the purple striped zorblax and the orange dotted quiffle "
                "bleed into each other? middle, FreeFuse (each LoRA inside its mask): are they apart? right, where "
                "each LoRA acted (purple: the zorblax's, orange: the quiffle's)."
            ),
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
        look_at="the picture shows that every stage ran; random LoRAs make no subjects to keep apart.",
    )


def generate_command(plan: DemoPlan, out: Path) -> list[str]:
    """A `freefuse generate` command line (argv) that runs the demo's model with the LoRA files the demo
    wrote to `out`, at the next seed, into `out/generate`: something to paste and then change."""
    settings = plan.settings
    command = ["freefuse", "generate", "--model", plan.model]
    for name, word in plan.subjects:
        command += ["--lora", f"{out / LORA_FOLDER / f'{name}.safetensors'}={word}"]
    command += ["--prompt", str(settings.prompt), "--seed", str(int(settings.seed) + 1)]
    command += ["--steps", str(settings.num_inference_steps), "--size", f"{settings.width}x{settings.height}"]
    if settings.max_sequence_length is not None:
        command += ["--max-sequence-length", str(settings.max_sequence_length)]
    return [*command, "--out", str(out / "generate")]


def _lora_files(plan: DemoPlan, pipeline, folder: Path) -> list[Path]:
    """The demo's LoRA files in `folder`: ShapesWorld's committed ones, or random ones."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    backend = backend_for(pipeline)
    targets, within = backend.architecture.typical_lora_targets
    for seed, (name, word) in enumerate(plan.subjects, start=1):
        path = folder / f"{name}.safetensors"
        if plan.model == SHAPESWORLD:
            atomic_save(path, lambda handle, source=lora_path(name): handle.write(source.read_bytes()))
        else:
            state = random_lora_weights(
                backend.denoiser,
                targets=targets,
                within=within,
                prefix=backend.denoiser_name,
                seed=seed,
                scale=1.0 if plan.model in TINY_MODELS else 0.3,
            )
            data = save(state, metadata={"format": "pt", "modelspec.trigger_phrase": word})
            atomic_save(path, lambda handle, data=data: handle.write(data))
        paths.append(path)
    return paths


def compare_picture(
    merge,
    freefuse,
    masks,
    labels=("merge", "FreeFuse", "FreeFuse masks"),
    scale: int = 4,
    colours: dict[str, tuple[int, int, int]] | None = None,
):
    """merge | FreeFuse | masks over FreeFuse in grey, each `scale`× (nearest), a caption above each and
    the masks' legend below all three (never over a picture). `colours`: each subject's mask colour
    (the demo gives each subject's own, so that no mask reads as another subject)."""
    from PIL import Image, ImageDraw, ImageOps

    width, height = freefuse.size
    cell_w, cell_h, caption = width * scale, height * scale, 14
    big = [image.convert("RGB").resize((cell_w, cell_h), Image.NEAREST) for image in (merge, freefuse)]
    panels = [*big, big[1]]
    if masks is not None:
        grey = ImageOps.grayscale(big[1]).convert("RGB")  # colour in this panel is the masks' alone
        panels[2] = masks.resize((cell_h, cell_w), mode="nearest").overlay(grey, legend=False, colours=colours)
    picture = Image.new("RGB", (3 * cell_w, cell_h + caption), (255, 255, 255))
    draw = ImageDraw.Draw(picture)
    for column, (image, label) in enumerate(zip(panels, labels, strict=True)):
        picture.paste(image, (column * cell_w, caption))
        draw.text((column * cell_w + 4, 1), label, fill=(0, 0, 0))
    if masks is None:
        return picture
    chosen = [(colours or {}).get(name, subject_colour(i)) for i, name in enumerate(masks.names)]
    entries = [(f"{name}'s mask: where its LoRA acts", colour) for name, colour in zip(masks.names, chosen, strict=True)]
    return below(picture, legend_strip(entries, picture.width))


def run_demo(
    plan: DemoPlan,
    out: Path,
    service: RunService,
    overwrite: bool = False,
    on_step: StepCallback | None = None,
) -> tuple[dict[str, Path], FreeFuseOutput, list[str]]:
    """Load, write the demo LoRAs (under `out/demo-loras`), run FreeFuse (and merge beside it) on
    the run service, write everything; return the files, FreeFuse's output and the run's notes."""
    paths = output_paths(out, "demo", 1)[0]
    extra = {"merge": out / COMPARE_FILES[0], "compare": out / COMPARE_FILES[1]} if plan.compare else {}
    loras = [out / LORA_FOLDER / f"{name}.safetensors" for name, _ in plan.subjects]
    notes = []
    if not overwrite and is_previous_demo(out):
        overwrite = True  # the demo's own files, from its last run: run it again, it replaces them
        notes.append(f"replacing the previous demo's files in {out}.")
        for stale in COMPARE_FILES:
            if stale not in {path.name for path in extra.values()}:
                (out / stale).unlink(missing_ok=True)
    check_outputs([paths], overwrite)
    check_free([*extra.values(), *loras], overwrite)
    pipeline = service.pipeline(plan.model)
    files = _lora_files(plan, pipeline, out / LORA_FOLDER)
    spec = RunSpec(
        model=plan.model,
        loras=[
            LoraSpec(path=str(path), name=name, words=[word])
            for path, (name, word) in zip(files, plan.subjects, strict=True)
        ],
        settings=plan.settings,
    )
    result = service.run(spec, on_step=on_step)
    result.output.manifest["demo"] = True  # what lets the next demo replace these files
    write_outputs(result.output, [paths], overwrite, colours=plan.colours)
    if plan.compare:
        merge = service.run(replace(spec, settings=plan.settings.model_copy(update={"method": "merge"})), on_step=on_step)
        atomic_save(extra["merge"], lambda handle: merge.output.images[0].save(handle, "PNG"), overwrite)
        picture = compare_picture(
            merge.output.images[0], result.output.images[0], result.output.masks[0], colours=plan.colours
        )
        atomic_save(extra["compare"], lambda handle: picture.save(handle, "PNG"), overwrite)
    return {**paths, **extra}, result.output, notes + result.notes


def is_previous_demo(out: Path) -> bool:
    """`out` holds what an earlier `freefuse demo` wrote: its `demo.json` says it is a demo run (or,
    from before demos said so, names the demo's files and LoRAs under `demo-loras/`)."""
    try:
        record = json.loads((out / "demo.json").read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(record, dict):
        return False
    if record.get("demo") is True:
        return True
    outputs, loras = record.get("outputs"), record.get("loras")
    return (
        isinstance(outputs, dict)
        and outputs.get("image") == "demo.png"
        and isinstance(loras, list)
        and bool(loras)
        and all(
            isinstance(lora, dict) and str(lora.get("path_from_manifest", "")).startswith(f"{LORA_FOLDER}/")
            for lora in loras
        )
    )


__all__ = ["DemoPlan", "compare_picture", "generate_command", "plan_demo", "run_demo"]
