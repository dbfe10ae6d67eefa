"""`freefuse` command line: a thin layer over the library.

Each command parses its flags into settings, checks everything that needs no weights (files,
sizes, output paths), loads the model, calls one library function and writes its outputs
atomically. Mistakes exit with code 2 and one message; internal errors exit with 1; `--debug`
shows tracebacks.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import signal
import sys
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from . import __version__
from .outputs import output_paths, write_outputs
from .settings import parse_size

app = typer.Typer(
    name="freefuse",
    help="Several subject LoRAs in one image without the subjects bleeding into each other (FreeFuse).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)
console = Console(stderr=True)
STATE = {"debug": False}
EXIT_USER, EXIT_INTERNAL, EXIT_INTERRUPTED = 2, 1, 130


class UserError(Exception):
    """A mistake in what the user asked for; the message says how to fix it."""


def _user_errors() -> tuple[type[BaseException], ...]:
    from .files import OutputExistsError
    from .lora import LoraFileError
    from .models import ModelLoadError
    from .tokens import WordNotFoundError

    return (
        UserError,
        ValueError,
        FileNotFoundError,
        NotADirectoryError,
        IsADirectoryError,
        LoraFileError,
        ModelLoadError,
        OutputExistsError,
        WordNotFoundError,
    )


def _quiet_libraries() -> None:
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    for name in ("diffusers", "transformers", "accelerate", "peft", "huggingface_hub"):
        logging.getLogger(name).setLevel(logging.ERROR)
    with contextlib.suppress(ImportError):
        from diffusers.utils import logging as diffusers_logging

        diffusers_logging.set_verbosity_error()
        diffusers_logging.disable_progress_bar()
    with contextlib.suppress(ImportError):
        from transformers.utils import logging as transformers_logging

        transformers_logging.set_verbosity_error()
        transformers_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", module="diffusers")
    warnings.filterwarnings("ignore", module="transformers")
    warnings.filterwarnings("ignore", module="peft")


def _terminate(signum, frame):
    # SIGTERM becomes KeyboardInterrupt so that `finally` blocks remove temporary files.
    raise KeyboardInterrupt


def command(function: Callable) -> Callable:
    """Run a command with clean error handling: exit 2 for mistakes, 1 for bugs, 130 if interrupted."""

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        _quiet_libraries()
        if STATE["debug"]:
            logging.getLogger("freefuse").setLevel(logging.DEBUG)
        with contextlib.suppress(ValueError):  # not in the main thread (tests calling in-process)
            signal.signal(signal.SIGTERM, _terminate)
        try:
            return function(*args, **kwargs)
        except typer.Exit:
            raise
        except KeyboardInterrupt:
            console.print("[yellow]Interrupted; no partial output was written.[/]")
            raise typer.Exit(EXIT_INTERRUPTED) from None
        except _user_errors() as error:
            if STATE["debug"]:
                raise
            console.print(f"[bold red]error:[/] {error}", highlight=False, soft_wrap=True)
            raise typer.Exit(EXIT_USER) from None
        except Exception as error:
            if STATE["debug"]:
                raise
            import torch

            if isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error).lower():
                console.print(
                    "[bold red]error:[/] the device ran out of memory. Lower memory use with --offload (model CPU "
                    "offload), --dtype bfloat16, a smaller --size, fewer images per prompt, or --preview latent.",
                    highlight=False,
                )
                raise typer.Exit(EXIT_USER) from None
            console.print(
                f"[bold red]internal error:[/] {type(error).__name__}: {error}\nRun again with --debug for the "
                "traceback, and report it.",
                highlight=False,
                soft_wrap=True,
            )
            raise typer.Exit(EXIT_INTERNAL) from None

    return wrapper


def _version(value: bool) -> None:
    if value:
        typer.echo(f"freefuse {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(
    debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks and debug logs.")] = False,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")
    ] = False,
) -> None:
    STATE["debug"] = debug


# -- parsing helpers -----------------------------------------------------------------------------------


def parse_lora_spec(spec: str) -> tuple[str, list[str] | None, float]:
    """`PATH=WORD[,WORD][@WEIGHT]`, `PATH@WEIGHT` or `PATH` → (path, words or None, weight)."""
    if Path(spec).expanduser().exists():
        return spec, None, 1.0
    path, words, weight_text = spec, None, None
    if "=" in spec:
        path, rest = spec.rsplit("=", 1)
        if "@" in rest:
            rest, weight_text = rest.rsplit("@", 1)
        words = [word.strip() for word in rest.split(",") if word.strip()]
        if not words:
            raise UserError(
                f"--lora {spec!r}: no activation word after '='; write PATH=WORD[,WORD][@WEIGHT]."
            )
    elif "@" in spec:
        path, weight_text = spec.rsplit("@", 1)
    weight = 1.0
    if weight_text is not None:
        try:
            weight = float(weight_text)
        except ValueError:
            raise UserError(f"--lora {spec!r}: weight {weight_text!r} is not a number (e.g. @0.8).") from None
        if weight != weight or weight in (float("inf"), float("-inf")):
            raise UserError(f"--lora {spec!r}: weight must be a finite number.")
    return path, words, weight


def _progress() -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=False,
    )


def _check_outputs_free(paths: list[dict[str, Path]], overwrite: bool) -> None:
    if overwrite:
        return
    taken = [str(path) for files in paths for path in files.values() if path.exists()]
    if taken:
        raise UserError(
            f"{taken[0]} already exists (and {len(taken) - 1} more); pass --overwrite to replace."
        )


# -- shared run ------------------------------------------------------------------------------------------


class Run:
    """What one `generate` or `masks` invocation needs: settings, LoRA specs, model, user masks."""

    def __init__(self, settings, loras: list[dict], model: str, masks: str | None = None) -> None:
        self.settings = settings
        self.loras = loras
        self.model = model
        self.masks = masks

    def check(self) -> None:
        """Everything that needs no weights."""
        from .lora import check_lora_path
        from .models import check_model_source, pixels_per_token

        check_model_source(self.model)
        self.settings.validate(pixels_per_token(self.model))
        names, files = {}, {}
        for lora in self.loras:
            resolved = check_lora_path(lora["path"]).resolve()
            if resolved in files:
                raise UserError(f"LoRA file {lora['path']} is given twice; give each LoRA once.")
            files[resolved] = lora
            name = lora.get("name") or Path(lora["path"]).stem
            if name in names:
                raise UserError(
                    f"Two LoRAs get the name {name!r} ({names[name]} and {lora['path']}); rename one file."
                )
            names[name] = lora["path"]
        if not self.loras:
            raise UserError("No LoRA given; add --lora PATH=WORD (one per subject).")
        if self.masks is not None and not Path(self.masks).is_file():
            raise UserError(
                f"--masks {self.masks}: no such file (use a .masks.json or .safetensors from `freefuse masks`)."
            )

    def load(self, device, dtype, offload):
        from .models import load_pipeline
        from .pipeline import FreeFuse

        with console.status(f"Loading {self.model} ..."):
            pipeline = load_pipeline(self.model, device=device, dtype=dtype, offload=offload)
        freefuse = FreeFuse(pipeline)
        for lora in self.loras:
            subject = freefuse.add_lora(
                lora["path"],
                words=lora.get("words"),
                name=lora.get("name"),
                weight=lora.get("weight", 1.0),
                scope=lora.get("scope", "subject"),
            )
            expected = lora.get("sha256")
            if expected and subject.sha256 != expected:
                raise UserError(
                    f"LoRA {lora['path']} has changed since the manifest was written (sha256 {subject.sha256[:12]}… "
                    f"!= {expected[:12]}…); pass the right file with --lora."
                )
        return freefuse


def execute(freefuse, settings, masks=None, stop_after_masks: bool = False):
    """Run the library with a rich progress bar; FreeFuse notes are printed, not raised."""
    from .pipeline import FreeFuseWarning

    steps = settings.resolved_mask_step if stop_after_masks else settings.num_inference_steps
    with _progress() as progress:
        task = progress.add_task("stage 1" if stop_after_masks else "denoising", total=steps)

        def advance(step, total, info):
            progress.update(task, completed=min(step, steps))

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            output = freefuse.generate(
                settings, masks=masks, callback=advance, progress=False, stop_after_masks=stop_after_masks
            )
    for warning in caught:
        if issubclass(warning.category, FreeFuseWarning):
            console.print(f"[yellow]note:[/] {warning.message}", highlight=False, soft_wrap=True)
    return output


def _summary(output, paths) -> None:
    table = Table(title="FreeFuse", show_header=True)
    table.add_column("image")
    table.add_column("seed")
    table.add_column("subjects (mask area)")
    for record, files in zip(output.manifest["images"], paths, strict=True):
        areas = ", ".join(
            f"{name} {info['mask_area']:.0%}" if "mask_area" in info else name
            for name, info in record["subjects"].items()
        )
        table.add_row(str(files["image"]), str(record["seed"]), areas or "-")
    console.print(table)
    timings = output.manifest["timings"]
    console.print(
        f"total {timings['total_s']:.1f}s (stage 1 {timings.get('stage1_s', 0):.2f}s, decode {timings['decode_s']:.2f}s)"
    )


# -- options shared by commands ------------------------------------------------------------------------

ModelOpt = Annotated[
    str | None, typer.Option("--model", "-m", help="Diffusers folder or Hugging Face id (or 'tiny').")
]
LoraOpt = Annotated[
    list[str] | None,
    typer.Option("--lora", "-l", help="Subject LoRA: PATH=WORD[,WORD][@WEIGHT]. Repeat per subject."),
]
GlobalLoraOpt = Annotated[
    list[str] | None,
    typer.Option("--global-lora", help="Style/background LoRA, never masked: PATH[@WEIGHT]."),
]
PromptOpt = Annotated[
    str | None, typer.Option("--prompt", "-p", help="The prompt, with each LoRA's words in it.")
]
NegativeOpt = Annotated[str | None, typer.Option("--negative-prompt", help="Negative prompt (true CFG).")]
SeedOpt = Annotated[int, typer.Option("--seed", "-s", help="Seed (image j of a prompt uses seed + j).")]
StepsOpt = Annotated[int, typer.Option("--steps", help="Denoising steps.")]
SizeOpt = Annotated[str, typer.Option("--size", help="WIDTHxHEIGHT, multiples of 16.")]
GuidanceOpt = Annotated[
    float, typer.Option("--guidance", help="Guidance scale (FLUX.1-dev distilled guidance).")
]
TrueCfgOpt = Annotated[float, typer.Option("--true-cfg", help="True CFG scale (> 1 with --negative-prompt).")]
MaskStepOpt = Annotated[
    int | None,
    typer.Option("--mask-step", help="Step whose attention gives the masks (default 6 of 28, scaled)."),
]
BlockOpt = Annotated[
    int | None, typer.Option("--block", help="Double-stream block to tap (default 16 on FLUX.1).")
]
TextScopeOpt = Annotated[str, typer.Option("--text-scope", help="exclude-others | all")]
PreviewOpt = Annotated[str, typer.Option("--preview", help="x0 picture for superpixels: vae | latent")]
ImagesOpt = Annotated[int, typer.Option("--images", help="Images per prompt.")]
MaxSeqOpt = Annotated[int, typer.Option("--max-sequence-length", help="T5 token limit (<= 512).")]
OutOpt = Annotated[Path, typer.Option("--out", "-o", help="Output folder.")]
NameOpt = Annotated[str, typer.Option("--name", help="File name stem of the outputs.")]
OverwriteOpt = Annotated[bool, typer.Option("--overwrite", help="Replace existing output files.")]
DeviceOpt = Annotated[
    str | None, typer.Option("--device", help="cuda, cuda:1, mps or cpu (default: best available).")
]
DtypeOpt = Annotated[
    str | None, typer.Option("--dtype", help="bfloat16 | float16 | float32 (default: bf16 on GPU).")
]
OffloadOpt = Annotated[bool, typer.Option("--offload", help="Model CPU offload (less GPU memory, slower).")]
EmptyMaskOpt = Annotated[
    str, typer.Option("--empty-mask", help="A subject that wins no region: global | off")
]


def _loras_from_flags(loras: list[str] | None, global_loras: list[str] | None) -> list[dict]:
    result = []
    for spec in loras or []:
        path, words, weight = parse_lora_spec(spec)
        result.append({"path": path, "words": words, "weight": weight, "scope": "subject"})
    for spec in global_loras or []:
        path, words, weight = parse_lora_spec(spec)
        if words:
            raise UserError(f"--global-lora {spec!r}: global LoRAs take no words; write PATH[@WEIGHT].")
        result.append({"path": path, "words": None, "weight": weight, "scope": "global"})
    return result


def _inside(path: Path, folder: Path) -> bool:
    path, folder = path.resolve(), folder.resolve()
    return path == folder or folder in path.parents


def run_from_manifest(manifest_path: Path, model: str | None, loras: list[dict]) -> Run:
    """A replay. Paths from the manifest must stay inside the working directory; flags may override."""
    from .manifest import read_manifest
    from .settings import GenerationSettings

    manifest = read_manifest(manifest_path)
    settings = GenerationSettings.from_dict({k: v for k, v in manifest["settings"].items() if k != "block"})
    settings.block = manifest["settings"].get("block")
    here = Path.cwd()
    if not loras:
        for entry in manifest["loras"]:
            if not isinstance(entry, dict) or not isinstance(entry.get("path"), str):
                raise UserError(
                    f"Manifest {manifest_path} names a LoRA without a file path; pass it with --lora."
                )
            path = Path(entry["path"])
            if not _inside(path if path.is_absolute() else here / path, here):
                raise UserError(
                    f"Manifest LoRA path {entry['path']!r} is outside the working directory; for safety it is only "
                    "used when given on the command line (--lora PATH=WORD)."
                )
            loras.append(
                {key: entry.get(key) for key in ("path", "words", "weight", "scope", "name", "sha256")}
            )
    if model is None:
        recorded = manifest["model"].get("id_or_path")
        if not isinstance(recorded, str) or not recorded:
            raise UserError(f"Manifest {manifest_path} records no model path; pass --model.")
        from .models import TINY, is_hub_id

        if recorded != TINY and not is_hub_id(recorded) and not _inside(Path(recorded), here):
            raise UserError(
                f"Manifest model path {recorded!r} is outside the working directory; pass it with --model to use it."
            )
        model = recorded
    masks = manifest.get("masks")
    if isinstance(masks, str) and masks != "in-memory":
        if not _inside(Path(masks), here):
            raise UserError(
                f"Manifest mask path {masks!r} is outside the working directory; refusing to read it."
            )
    else:
        masks = None
    return Run(settings, loras, model, masks)


# -- commands --------------------------------------------------------------------------------------------


@app.command()
@command
def generate(
    model: ModelOpt = None,
    lora: LoraOpt = None,
    global_lora: GlobalLoraOpt = None,
    prompt: PromptOpt = None,
    negative_prompt: NegativeOpt = None,
    seed: SeedOpt = 0,
    steps: StepsOpt = 28,
    size: SizeOpt = "1024x1024",
    guidance: GuidanceOpt = 3.5,
    true_cfg: TrueCfgOpt = 1.0,
    method: Annotated[str, typer.Option("--method", help="freefuse | merge | masks")] = "freefuse",
    masks: Annotated[
        str | None, typer.Option("--masks", help="Mask set for --method masks (.masks.json).")
    ] = None,
    mask_step: MaskStepOpt = None,
    block: BlockOpt = None,
    text_scope: TextScopeOpt = "exclude-others",
    preview: PreviewOpt = "vae",
    empty_mask: EmptyMaskOpt = "global",
    images: ImagesOpt = 1,
    max_sequence_length: MaxSeqOpt = 512,
    manifest: Annotated[
        Path | None, typer.Option("--manifest", help="Replay the run a manifest describes.")
    ] = None,
    out: OutOpt = Path("out"),
    name: NameOpt = "freefuse",
    overwrite: OverwriteOpt = False,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
    offload: OffloadOpt = False,
) -> None:
    """Generate an image with several subject LoRAs, each kept to its own subject."""
    from .settings import GenerationSettings

    loras = _loras_from_flags(lora, global_lora)
    if manifest is not None:
        run = run_from_manifest(manifest, model, loras)
    else:
        if not prompt:
            raise UserError("--prompt is required (or --manifest to replay a run).")
        if model is None:
            raise UserError(
                "--model is required: a diffusers folder or a Hugging Face id (or 'tiny' to try it)."
            )
        width, height = parse_size(size)
        settings = GenerationSettings(
            prompt=prompt,
            negative_prompt=negative_prompt,
            seed=seed,
            height=height,
            width=width,
            num_inference_steps=steps,
            guidance_scale=guidance,
            true_cfg_scale=true_cfg,
            num_images_per_prompt=images,
            method=method,
            mask_step=mask_step,
            block=block,
            text_scope=text_scope,
            preview=preview,
            empty_mask=empty_mask,
            max_sequence_length=max_sequence_length,
        )
        run = Run(settings, loras, model, masks)
    run.check()
    paths = output_paths(out, name, len(run.settings.image_prompts))
    _check_outputs_free(paths, overwrite)
    freefuse = run.load(device, dtype, offload)
    output = execute(freefuse, run.settings, masks=run.masks)
    write_outputs(output, paths, overwrite)
    _summary(output, paths)


@app.command("masks")
@command
def masks_command(
    model: ModelOpt = None,
    lora: LoraOpt = None,
    prompt: PromptOpt = None,
    seed: SeedOpt = 0,
    steps: StepsOpt = 28,
    size: SizeOpt = "1024x1024",
    guidance: GuidanceOpt = 3.5,
    mask_step: MaskStepOpt = None,
    block: BlockOpt = None,
    preview: PreviewOpt = "vae",
    max_sequence_length: MaxSeqOpt = 512,
    out: OutOpt = Path("out"),
    name: NameOpt = "freefuse",
    overwrite: OverwriteOpt = False,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
    offload: OffloadOpt = False,
) -> None:
    """Stage 1 only: save the subject masks and their overlay, to preview, edit or reuse (--method masks)."""
    from .settings import GenerationSettings

    if not prompt or model is None:
        raise UserError("--model and --prompt are required.")
    width, height = parse_size(size)
    settings = GenerationSettings(
        prompt=prompt,
        seed=seed,
        height=height,
        width=width,
        num_inference_steps=steps,
        guidance_scale=guidance,
        method="freefuse",
        mask_step=mask_step,
        block=block,
        preview=preview,
        max_sequence_length=max_sequence_length,
    )
    run = Run(settings, _loras_from_flags(lora, None), model)
    run.check()
    paths = output_paths(out, name, 1)
    for files in paths:
        files.pop("image")
    _check_outputs_free(paths, overwrite)
    freefuse = run.load(device, dtype, offload)
    output = execute(freefuse, run.settings, stop_after_masks=True)
    write_outputs(output, paths, overwrite, masks_only=True)
    for files in paths:
        console.print(f"masks: {files['masks']}  overlay: {files['overlay']}")


@app.command()
@command
def batch(
    jobs: Annotated[
        Path, typer.Argument(help="Job file: JSONL (one job per line) or YAML/JSON list; with --grid a grid.")
    ],
    out: OutOpt = Path("out"),
    grid: Annotated[
        bool, typer.Option("--grid", help="JOBS is a grid: LoRA groups x prompts x seeds x methods.")
    ] = False,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="List the jobs and what is already done; run nothing.")
    ] = False,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
    offload: OffloadOpt = False,
) -> None:
    """Run many jobs; re-run the same command after a crash to finish what is missing.

    With `accelerate launch --multi_gpu --num_processes N -m freefuse.cli batch ...` the jobs are split
    between processes (one GPU each; gloo on CPUs); results and index shards share one folder.
    """
    from .batch import Session, expand_grid, is_done, load_jobs, process_state, read_index, run_batch
    from .lora import check_lora_path
    from .models import check_model_source

    job_list = expand_grid(jobs) if grid else load_jobs(jobs)
    for job in job_list:  # everything that needs no weights, before any model loads
        check_model_source(job.model)
        for lora in job.loras:
            check_lora_path(lora["path"])
    state = process_state()
    if dry_run:
        done = read_index(out) if out.is_dir() else {}
        finished = sum(is_done(done.get(job.id), out) for job in job_list)
        for job in job_list:
            mark = "done" if is_done(done.get(job.id), out) else "todo"
            typer.echo(f"{mark}  {job.stem}  {job.settings.prompt!r}")
        typer.echo(f"{len(job_list)} jobs, {finished} done, {len(job_list) - finished} to do")
        return
    progress = _progress() if state.is_local_main_process else None
    task = None

    def update(report, share):
        nonlocal task
        if progress is None:
            return
        if task is None:
            task = progress.add_task("batch", total=share)
        rate = f"{report.images_per_minute:.1f} img/min"
        progress.update(
            task, completed=report.done + report.skipped + len(report.failed), description=f"batch {rate}"
        )

    if progress is not None:
        progress.start()
    try:
        report = run_batch(
            job_list, out, Session(device=device, dtype=dtype, offload=offload), on_progress=update
        )
    finally:
        if progress is not None:
            progress.stop()
    console.print(
        f"[bold]process {state.process_index}[/]: {report.done} made, {report.skipped} already done, "
        f"{len(report.failed)} failed of {report.share} "
        f"({report.images_per_minute:.1f} images/min, model loaded {report.model_loads}x)",
        highlight=False,
    )
    for failure in report.failed:
        console.print(
            f"[red]failed[/] {failure['source']}: {failure['error']}", highlight=False, soft_wrap=True
        )
    if report.failed:
        console.print(
            f"Failures are listed in {out}/failed.p{state.process_index}.jsonl; fix them and run again."
        )
        raise typer.Exit(EXIT_USER)


@app.command()
@command
def inspect(
    files: Annotated[list[Path], typer.Argument(help="LoRA .safetensors files.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """Show a LoRA file's layout, rank, layers and trigger words (never unpickles anything)."""
    from .lora import describe_lora

    reports = [describe_lora(path) for path in files]
    if as_json:
        typer.echo(json.dumps(reports, indent=2))
        return
    for report in reports:
        table = Table(title=report["path"], show_header=False)
        for key in (
            "layout",
            "sha256",
            "size_bytes",
            "tensors",
            "rank",
            "layers",
            "trigger_words",
            "top_tags",
        ):
            value = report.get(key)
            table.add_row(key, ", ".join(map(str, value)) if isinstance(value, list) else str(value))
        for key, value in report.get("metadata", {}).items():
            table.add_row(f"meta: {key}", value)
        console.print(table)


@app.command()
@command
def demo(
    out: OutOpt = Path("out"),
    model: ModelOpt = None,
    steps: Annotated[int | None, typer.Option("--steps", help="Steps (default 8 tiny, 28 real).")] = None,
    size: Annotated[
        str | None, typer.Option("--size", help="WIDTHxHEIGHT (default 512 tiny, 1024 real).")
    ] = None,
    seed: SeedOpt = 0,
    overwrite: OverwriteOpt = False,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
    offload: OffloadOpt = False,
) -> None:
    """Run the whole job offline: the built-in tiny model unless real FLUX.1 weights are present."""
    from .models import TINY, cached_flux_model, load_pipeline
    from .pipeline import FreeFuse
    from .settings import GenerationSettings
    from .testing import random_lora

    chosen = model or cached_flux_model() or TINY
    tiny = chosen == TINY
    width, height = parse_size(size or ("512" if tiny else "1024"))
    settings = GenerationSettings(
        prompt="Alice hugging Bob in the snow",
        seed=seed,
        height=height,
        width=width,
        num_inference_steps=steps or (8 if tiny else 28),
        max_sequence_length=64 if tiny else 512,
    )
    paths = output_paths(out, "demo", 1)
    _check_outputs_free(paths, overwrite)
    console.print(f"model: {'built-in tiny random FLUX (no weights found)' if tiny else chosen}")
    with console.status(f"Loading {chosen} ..."):
        pipeline = load_pipeline(chosen, device=device, dtype=dtype, offload=offload)
    freefuse = FreeFuse(pipeline)
    with tempfile.TemporaryDirectory(prefix="freefuse-demo-") as folder:
        # Random LoRAs written as files with their trigger word in the metadata, then loaded the
        # way a user's LoRAs are (words come from the metadata).
        for name, word, lora_seed in (("alice", "Alice", 1), ("bob", "Bob", 2)):
            path = Path(folder) / f"{name}.safetensors"
            random_lora(
                pipeline,
                name,
                seed=lora_seed,
                path=path,
                scale=1.0 if tiny else 0.3,
                metadata={"modelspec.trigger_phrase": word},
            )
            freefuse.add_lora(path, name=name)
        output = execute(freefuse, settings)
    write_outputs(output, paths, overwrite)
    _summary(output, paths)
    console.print(f"wrote {paths[0]['image']}, {paths[0]['overlay']}, {paths[0]['manifest']}")


eval_app = typer.Typer(help="Measure subject bleeding offline.", no_args_is_help=True)
app.add_typer(eval_app, name="eval")


@eval_app.command("shapesworld")
@command
def eval_shapesworld(
    method: Annotated[
        list[str] | None, typer.Option("--method", help="merge | freefuse | masks (repeat).")
    ] = None,
    quick: Annotated[bool, typer.Option("--quick", help="A fixed small subset (CI, smoke checks).")] = False,
    seeds: Annotated[int | None, typer.Option("--seeds", help="Seeds per prompt (default 4).")] = None,
    steps: Annotated[int | None, typer.Option("--steps", help="Denoising steps (default 20).")] = None,
    sizes: Annotated[
        list[int] | None, typer.Option("--subjects", help="Group sizes: 2, 3, 4 (repeat).")
    ] = None,
    model: Annotated[
        Path | None, typer.Option("--model", help="ShapesWorld model folder (default: committed).")
    ] = None,
    loras: Annotated[
        Path | None, typer.Option("--loras", help="Folder of the subject LoRAs (default: committed).")
    ] = None,
    out: OutOpt = Path("out/shapesworld"),
    overwrite: OverwriteOpt = False,
) -> None:
    """Pairs, triples and the quad of the 4 ShapesWorld LoRAs x prompts x seeds: identity, presence, leakage."""
    from .files import atomic_save, atomic_write, write_json
    from .shapesworld.evaluate import (
        METHODS,
        EvalConfig,
        Evaluator,
        base_rate,
        evaluate,
        markdown_table,
        picture_grid,
        result_record,
        single_lora_rates,
    )

    methods = tuple(method or METHODS)
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise UserError(f"Unknown method(s) {unknown}; use {list(METHODS)}.")
    config = EvalConfig.quick() if quick else EvalConfig()
    config.methods = methods
    if seeds is not None:
        config.seeds = tuple(range(seeds))
    if steps is not None:
        config.steps = steps
    if sizes:
        bad = [size for size in sizes if size not in (2, 3, 4)]
        if bad:
            raise UserError(f"--subjects {bad}: ShapesWorld has 4 subjects; use 2, 3 or 4.")
        config.group_sizes = tuple(sizes)
    files = {"json": out / "results.json", "md": out / "results.md", "grid": out / "grid.png"}
    _check_outputs_free([files], overwrite)
    with console.status("Loading the ShapesWorld model and LoRAs ..."):
        evaluator = Evaluator(model, loras)
    with _progress() as progress:
        task = progress.add_task("evaluating", total=None)
        evaluation = evaluate(
            config, evaluator, on_step=lambda done, total: progress.update(task, completed=done, total=total)
        )
        progress.update(task, description="single LoRAs")
        singles = single_lora_rates(evaluator, config.single_seeds, config.steps)
        progress.update(task, description="base model")
        base = base_rate(evaluator, config.base_samples, config.steps)
    record = result_record(config, evaluation, singles, base)
    command_line = (
        "freefuse " + " ".join(sys.argv[1:])
        if sys.argv and "freefuse" in sys.argv[0]
        else "freefuse eval shapesworld"
    )
    grid = picture_grid(evaluation["samples"], methods, config.grid_rows)
    atomic_save(files["grid"], lambda f: grid.save(f, "PNG"), overwrite)
    atomic_write(files["md"], markdown_table(record, command_line), overwrite)
    write_json(files["json"], record, overwrite)
    console.print(markdown_table(record, command_line), highlight=False)
    console.print(f"wrote {files['json']}, {files['md']}, {files['grid']}")


def main() -> None:
    signal.signal(signal.SIGTERM, _terminate)
    try:
        app()
    except KeyboardInterrupt:  # between commands' own handling, e.g. while importing
        console.print("[yellow]Interrupted; no partial output was written.[/]")
        sys.exit(EXIT_INTERRUPTED)


if __name__ == "__main__":
    sys.exit(main())
