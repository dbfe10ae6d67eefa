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
import socket
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from inspect import Parameter, Signature
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Literal, get_args, get_origin

import typer
from pydantic_core import PydanticUndefined
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from . import __version__, stages
from .core.config import MAP_METHOD_NAMES
from .errors import INTERRUPTED, USER_ERRORS, SettingsError, describe_failure, is_interrupt
from .memory import MemoryOptions, describe_gguf
from .methods import METHODS
from .outputs import check_outputs, output_paths, write_outputs
from .settings import CLI_FLAGS, GenerationSettings

if TYPE_CHECKING:
    from .spec import RunSpec

app = typer.Typer(
    name="freefuse",
    help="Several subject LoRAs in one image without the subjects bleeding into each other (FreeFuse).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)
# Not a terminal (a log, a pipe): wide enough that tables of paths do not wrap at 80 columns.
console = Console(stderr=True, width=None if sys.stderr.isatty() or os.environ.get("COLUMNS") else 1000)
STATE = {"debug": False}
EXIT_USER, EXIT_INTERNAL, EXIT_INTERRUPTED = 2, 1, 130


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


def _interrupted() -> None:
    """Say so once and exit 130; further signals are ignored from here (when in the main thread)."""
    with contextlib.suppress(ValueError):
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, signal.SIG_IGN)
    console.print(f"[yellow]{INTERRUPTED}[/]")
    raise typer.Exit(EXIT_INTERRUPTED) from None


def _say_error(message: str, internal: bool = False) -> None:
    label = "internal error" if internal else "error"
    console.print(f"[bold red]{label}:[/] {escape(message)}", highlight=False, soft_wrap=True)


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
            _interrupted()
        except Exception as error:
            if is_interrupt(error):
                _interrupted()
            if STATE["debug"]:
                raise
            failure = describe_failure(error)
            if failure.kind == "internal":
                _say_error(f"{failure.message}\nRun again with --debug for the traceback, and report it.", True)
                raise typer.Exit(EXIT_INTERNAL) from None
            _say_error(failure.message)
            raise typer.Exit(EXIT_USER) from None

    return wrapper


def _version(value: bool) -> None:
    if value:
        typer.echo(f"freefuse {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(
    debug: Annotated[
        bool, typer.Option("--debug", metavar="", help="Show full tracebacks and debug logs.")
    ] = False,
    version: Annotated[
        bool,
        typer.Option("--version", metavar="", callback=_version, is_eager=True, help="Print the version."),
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
            raise SettingsError(
                f"--lora {spec!r}: no activation word after '='; write PATH=WORD[,WORD][@WEIGHT]."
            )
    elif "@" in spec:
        path, weight_text = spec.rsplit("@", 1)
    weight = 1.0
    if weight_text is not None:
        try:
            weight = float(weight_text)
        except ValueError:
            raise SettingsError(f"--lora {spec!r}: weight {weight_text!r} is not a number (e.g. @0.8).") from None
        if weight != weight or weight in (float("inf"), float("-inf")):
            raise SettingsError(f"--lora {spec!r}: weight must be a finite number.")
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
    for note in check_outputs(paths, overwrite):
        console.print(f"[yellow]note:[/] {escape(note)}", highlight=False, soft_wrap=True)


def _progress_for(progress: Progress, description: str):
    """A run's `on_step(done, total)` that drives one task of `progress` (made at the first step, so
    that a mistake found when the run starts is said before any bar is drawn)."""
    task = None

    def on_step(done: int, total: int) -> None:
        nonlocal task
        stages.report(f"step {done}/{total}")
        if task is None:
            task = progress.add_task(description, total=total)
        progress.update(task, completed=done)

    return on_step


def _notes(notes: list[str]) -> None:
    for note in notes:
        console.print(f"[yellow]note:[/] {escape(note)}", highlight=False, soft_wrap=True)


def execute(service, spec, stop_after_masks: bool = False):
    """Run `spec` on the run service with a rich progress bar; its notes are printed, not raised."""
    with _progress() as progress:
        result = service.run(
            spec,
            check=False,
            on_step=_progress_for(progress, "stage 1" if stop_after_masks else "denoising"),
            stop_after_masks=stop_after_masks,
        )
    _notes(result.notes)
    return result.output


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
        table.add_row(escape(str(files["image"])), str(record["seed"]), escape(areas) or "-")
    console.print(table)
    timings = output.manifest["timings"]
    console.print(
        f"total {timings['total_s']:.1f}s (stage 1 {timings.get('stage1_s', 0):.2f}s, decode {timings['decode_s']:.2f}s)"
    )


# -- options ---------------------------------------------------------------------------------------------

ModelOpt = Annotated[
    str | None,
    typer.Option(
        "--model",
        "-m",
        help="Diffusers folder, Hugging Face id, single .safetensors or .gguf checkpoint, or 'tiny', 'tiny-sdxl'.",
    ),
]
OutOpt = Annotated[Path, typer.Option("--out", "-o", help="Output folder.")]
OverwriteOpt = Annotated[bool, typer.Option("--overwrite", metavar="", help="Replace existing output files.")]
SeedOpt = Annotated[int, typer.Option("--seed", "-s", help="Seed (image j of a prompt uses seed + j).")]
DeviceOpt = Annotated[
    str | None, typer.Option("--device", help="cuda, cuda:1, mps or cpu (default: best available).")
]
DtypeOpt = Annotated[
    str | None, typer.Option("--dtype", help="bfloat16 | float16 | float32 (default: bf16 on GPU).")
]
OffloadOpt = Annotated[
    str | None,
    typer.Option(
        "--offload",
        help="Keep weights in CPU memory until used: model (each model while it runs), sequential (each layer; "
        "least memory, slowest) or group (layers streamed ahead of use).",
    ),
]
QuantizeOpt = Annotated[
    str | None,
    typer.Option(
        "--quantize",
        help="Quantize the denoiser while loading: nf4 (bitsandbytes, GPU), int8 (torchao) or fp8 (float8 storage). "
        "A .gguf --model is quantized already.",
    ),
]
QuantizeTextOpt = Annotated[
    str | None,
    typer.Option("--quantize-text-encoder", help="Quantize the large text encoder (T5, Qwen): nf4 (GPU) or int8."),
]
CompileOpt = Annotated[
    bool | None,
    typer.Option(
        "--compile/--no-compile",
        help="Compile the denoiser's repeated blocks (slow first image, faster after).",
        show_default=False,
    ),
]

# Options of a run besides its settings: (name, annotation, default). Settings options come from
# `GenerationSettings` (`settings.CLI_FLAGS`), so `generate` and `masks` cannot drift apart.
RUN_OPTIONS: list[tuple[str, object, object]] = [
    ("model", ModelOpt, None),
    (
        "base_model",
        Annotated[
            str | None,
            typer.Option(
                "--base-model",
                help="For --model FILE.safetensors or FILE.gguf: a diffusers folder or id with its configs and the "
                "parts the file lacks (default: the architecture's reference model).",
            ),
        ],
        None,
    ),
    (
        "lora",
        Annotated[
            list[str] | None,
            typer.Option(
                "--lora", "-l", help="Subject LoRA: PATH=WORD\\[,WORD]\\[@WEIGHT]. Repeat per subject."
            ),
        ],
        None,
    ),
    (
        "global_lora",
        Annotated[
            list[str] | None,
            typer.Option("--global-lora", help="Style/background LoRA, never masked: PATH\\[@WEIGHT]."),
        ],
        None,
    ),
    ("size", Annotated[str | None, typer.Option("--size", help="WIDTHxHEIGHT (default 1024x1024).")], None),
    (
        "mask_method",
        Annotated[
            str | None,
            typer.Option(
                "--mask-method",
                help=f"How stage 1 reads attention: {', '.join(MAP_METHOD_NAMES)} (the first is the paper's; "
                "default: the model's).",
            ),
        ],
        None,
    ),
    (
        "masks",
        Annotated[str | None, typer.Option("--masks", help="Mask set for --method masks (.masks.json).")],
        None,
    ),
    (
        "manifest",
        Annotated[
            Path | None,
            typer.Option("--manifest", help="Replay the run a manifest describes; options given here win."),
        ],
        None,
    ),
    ("out", OutOpt, Path("out")),
    ("name", Annotated[str, typer.Option("--name", help="File name stem of the outputs.")], "freefuse"),
    ("overwrite", OverwriteOpt, False),
    ("device", DeviceOpt, None),
    ("dtype", DtypeOpt, None),
    ("offload", OffloadOpt, None),
    ("quantize", QuantizeOpt, None),
    ("quantize_text_encoder", QuantizeTextOpt, None),
    ("compile", CompileOpt, None),
]


@dataclass
class RunOptions:
    """What `generate` and `masks` were given: run options, and the settings flags that were set."""

    values: dict
    settings: dict

    def memory(self) -> dict:
        """The quantization, offload and compile flags given (None: not given)."""
        return {name: self.values[name] for name in ("quantize", "quantize_text_encoder", "offload", "compile")}

    def spec(self) -> RunSpec:
        """The run: from the flags, or from `--manifest` with the flags given winning (and said)."""
        from .spec import LoraSpec, RunSpec, replay_spec  # torch: not for --help or a flag's mistake

        loras = [
            LoraSpec(**lora) for lora in _loras_from_flags(self.values["lora"], self.values["global_lora"])
        ]
        if self.values["manifest"] is not None:
            return replay_spec(
                self.values["manifest"],
                self.values["model"],
                loras,
                self.settings,
                self.values["masks"],
                base_model=self.values["base_model"],
                memory=self.memory(),
            )
        if "prompt" not in self.settings:
            raise SettingsError("--prompt is required (or --manifest to replay a run).")
        if self.values["model"] is None:
            raise SettingsError(
                "--model is required: a diffusers folder or a Hugging Face id (or 'tiny' to try it)."
            )
        settings = GenerationSettings(**self.settings)
        return RunSpec(
            self.values["model"],
            loras,
            settings,
            self.values["masks"],
            base_model=self.values["base_model"],
            memory=MemoryOptions().updated(**self.memory()),
        )


def settings_help(field_name: str) -> str:
    """A setting's help line: its description, its choices, and the settings model's default."""
    field = GenerationSettings.model_fields[field_name]
    text = field.description or ""
    choices = get_args(field.annotation) if get_origin(field.annotation) is Literal else ()
    if field_name == "method":
        choices = tuple(sorted(METHODS))
    if choices:
        text += f" One of: {', '.join(choices)}."
    if field.default not in (None, PydanticUndefined):
        text += f" [default: {field.default}]"
    return text


def run_options(function: Callable[[RunOptions], None]) -> Callable[..., None]:
    """Give a command every run option and one option per setting; it receives a `RunOptions`.

    Settings options default to None (unset), so that the settings model's defaults apply and a
    replay knows which settings the user really gave.
    """
    parameters = [
        Parameter(name, Parameter.KEYWORD_ONLY, annotation=annotation, default=default)
        for name, annotation, default in RUN_OPTIONS
    ]
    for field_name, (flags, kind) in CLI_FLAGS.items():
        help_text = escape(settings_help(field_name))
        annotation = Annotated[kind | None, typer.Option(*flags, help=help_text)]
        parameters.append(Parameter(field_name, Parameter.KEYWORD_ONLY, annotation=annotation, default=None))

    @functools.wraps(function)
    def wrapper(**given):
        settings = {name: given.pop(name) for name in CLI_FLAGS}
        settings = {name: value for name, value in settings.items() if value not in (None, [], ())}
        if given.get("size") is not None:
            settings["size"] = given["size"]
        if given.get("mask_method") is not None:
            settings["mask_config"] = {"method": given["mask_method"]}
        return function(RunOptions(values=given, settings=settings))

    wrapper.__signature__ = Signature(parameters)
    wrapper.__annotations__ = {}
    return wrapper


def _loras_from_flags(loras: list[str] | None, global_loras: list[str] | None) -> list[dict]:
    result = []
    for spec in loras or []:
        path, words, weight = parse_lora_spec(spec)
        result.append({"path": path, "words": words, "weight": weight, "scope": "subject"})
    for spec in global_loras or []:
        path, words, weight = parse_lora_spec(spec)
        if words:
            raise SettingsError(f"--global-lora {spec!r}: global LoRAs take no words; write PATH[@WEIGHT].")
        result.append({"path": path, "words": None, "weight": weight, "scope": "global"})
    return result


def _prepare(options: RunOptions, count_images: bool = True) -> tuple[RunSpec, list[dict[str, Path]]]:
    """The run spec, checked before any weights load, and its free output paths."""
    spec = options.spec()
    for note in spec.notes:
        console.print(f"[yellow]note:[/] {escape(note)}", highlight=False, soft_wrap=True)
    spec.check()
    count = len(spec.settings.image_prompts) if count_images else 1
    paths = output_paths(options.values["out"], options.values["name"], count)
    return spec, paths


def _service(options: RunOptions):
    from .runner import RunService  # torch and diffusers: not for --help or a flag's mistake

    return RunService(options.values["device"], options.values["dtype"])


# -- commands --------------------------------------------------------------------------------------------


@app.command()
@command
@run_options
def generate(options: RunOptions) -> None:
    """Generate an image with several subject LoRAs, each kept to its own subject."""
    spec, paths = _prepare(options)
    _check_outputs_free(paths, options.values["overwrite"])
    service = _service(options)
    stages.report("loading")
    with console.status(escape(f"Loading {spec.model} ...")):
        service.pipeline(spec.model, spec.base_model, spec.memory)
    output = execute(service, spec)
    stages.report("writing")
    write_outputs(output, paths, options.values["overwrite"])
    stages.report("done")
    _summary(output, paths)


@app.command("masks")
@command
@run_options
def masks_command(options: RunOptions) -> None:
    """Stage 1 only: save the subject masks and their overlay, to preview, edit or reuse (--method masks)."""
    if options.values["masks"] is not None:
        raise SettingsError(
            "--masks gives masks to generate with; `freefuse masks` makes them. Leave --masks out."
        )
    spec, paths = _prepare(options)
    if not METHODS[spec.settings.method].reads_attention:
        raise SettingsError(
            f"`freefuse masks` needs a method that reads attention, not {spec.settings.method!r}."
        )
    for files in paths:
        files.pop("image")
    _check_outputs_free(paths, options.values["overwrite"])
    service = _service(options)
    with console.status(escape(f"Loading {spec.model} ...")):
        service.pipeline(spec.model, spec.base_model, spec.memory)
    output = execute(service, spec, stop_after_masks=True)
    write_outputs(output, paths, options.values["overwrite"], masks_only=True)
    for files in paths:
        console.print(escape(f"masks: {files['masks']}  overlay: {files['overlay']}"), highlight=False)


@app.command()
@command
def batch(
    jobs: Annotated[
        Path, typer.Argument(help="Job file: JSONL (one job per line) or YAML/JSON list; with --grid a grid.")
    ],
    out: OutOpt = Path("out"),
    grid: Annotated[
        bool,
        typer.Option("--grid", metavar="", help="JOBS is a grid: LoRA groups x prompts x seeds x methods."),
    ] = False,
    dry_run: Annotated[
        bool,
        typer.Option("--dry-run", metavar="", help="List the jobs and what is already done; run nothing."),
    ] = False,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
    offload: OffloadOpt = None,
) -> None:
    """Run many jobs; re-run the same command after a crash to finish what is missing.

    With `accelerate launch --multi_gpu --num_processes N -m freefuse batch ...` the jobs are split
    between processes (one GPU each; gloo on CPUs); results and index shards share one folder.
    """
    # Here, not at the top: torch and diffusers take seconds that --help and a flag's mistake need not wait.
    from .batch import expand_grid, is_done, load_jobs, process_state, read_index, run_batch  # start-up
    from .runner import RunService  # start-up time

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        job_list = expand_grid(jobs) if grid else load_jobs(jobs)
    for warning in caught:
        console.print(f"[yellow]note:[/] {escape(str(warning.message))}", highlight=False, soft_wrap=True)
    for job in job_list:  # everything that needs no weights, before any model loads
        job.check()
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
            job_list, out, RunService(device=device, dtype=dtype, offload=offload), on_progress=update
        )
    finally:
        if progress is not None:
            progress.stop()
    console.print(
        f"[bold]process {state.process_index}[/]: {report.done} made, {report.skipped} already done, "
        f"{len(report.failed)} failed, {report.claimed_elsewhere} made by another batch of {report.share} "
        f"({report.images_per_minute:.1f} images/min, model loaded {report.model_loads}x)",
        highlight=False,
    )
    for failure in report.failed:
        console.print(
            f"[red]failed[/] {escape(str(failure['source']))}: {escape(str(failure['error']))}",
            highlight=False,
            soft_wrap=True,
        )
    if report.failed:
        console.print(
            escape(
                f"Failures are listed in {out}/failed.p{state.process_index}.jsonl; fix them and run again."
            )
        )
        raise typer.Exit(EXIT_USER)


@app.command()
@command
def inspect(
    files: Annotated[list[Path], typer.Argument(help="LoRA .safetensors files (or .gguf model files).")],
    as_json: Annotated[
        bool, typer.Option("--json", metavar="", help="Print JSON instead of a table.")
    ] = False,
) -> None:
    """Show each LoRA file's layout, what it is for, rank, layers and trigger words (never unpickles).

    Trigger words are read from `modelspec.trigger_phrase`, `trigger_phrase`, `trigger_words`,
    `trigger_word`, `ss_trigger_word`; else kohya's dataset folder names (`10_ohwx woman`); else
    kohya's most frequent caption tag. A .gguf model file: its quantization type and tensor types.
    Every file is reported; the exit code is 2 if any could not be read.
    """
    from .lora import describe_lora  # start-up time: torch

    reports = []
    for path in files:
        try:
            reports.append(describe_gguf(path) if path.suffix == ".gguf" else describe_lora(path))
        except USER_ERRORS as error:
            reports.append({"path": str(path), "error": str(error)})
    if as_json:
        typer.echo(json.dumps(reports, indent=2))
    else:
        for report in reports:
            table = Table(title=escape(report["path"]), show_header=False)
            if "error" in report:
                table.add_row("error", escape(report["error"]))
            for key in (
                "format",
                "quant_type",
                "tensor_types",
                "layout",
                "for",
                "sha256",
                "size_bytes",
                "tensors",
                "rank",
                "layers",
                "text_encoder",
                "trigger_words",
                "trigger_words_from",
                "top_tags",
            ):
                if key in report:
                    value = report[key]
                    if isinstance(value, dict):
                        value = [f"{name} {count}" for name, count in value.items()]
                    table.add_row(
                        key, escape(", ".join(map(str, value)) if isinstance(value, list) else str(value))
                    )
            for key, value in report.get("metadata", {}).items():
                table.add_row(escape(f"meta: {key}"), escape(value))
            console.print(table)
    if any("error" in report for report in reports):
        raise typer.Exit(EXIT_USER)


@app.command()
@command
def demo(
    out: OutOpt = Path("out"),
    model: Annotated[
        str | None,
        typer.Option(
            "--model",
            "-m",
            help="A diffusers folder or Hugging Face id; 'tiny' or 'tiny-sdxl' (random); default: ShapesWorld.",
        ),
    ] = None,
    steps: Annotated[
        int | None, typer.Option("--steps", help="Steps (default 20 ShapesWorld, 28 real).")
    ] = None,
    size: Annotated[
        str | None, typer.Option("--size", help="WIDTHxHEIGHT (default 64 ShapesWorld, 1024 real).")
    ] = None,
    seed: SeedOpt = 0,
    overwrite: OverwriteOpt = False,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
    offload: OffloadOpt = None,
    arch: Annotated[
        str | None,
        typer.Option(
            "--arch",
            help="flux or sdxl: a cached model of it, else its built-in tiny random model (sdxl: tiny-sdxl).",
        ),
    ] = None,
) -> None:
    """Run the whole job offline: merge beside FreeFuse on ShapesWorld, or a real model when its weights are here."""
    from .demo import plan_demo, run_demo  # start-up time: torch and diffusers
    from .runner import RunService  # start-up time

    plan = plan_demo(model, steps, size, seed, arch)
    console.print(escape(f"demo: {plan.description}"), highlight=False, soft_wrap=True)
    service = RunService(device=device, dtype=dtype, offload=offload)
    with _progress() as progress:
        files, output, notes = run_demo(plan, out, service, overwrite=overwrite, on_step=_progress_for(progress, "demo"))
    _notes(notes)
    _summary(output, [files])
    shown = files.get("compare", files["image"])
    console.print(
        escape(f"look at {shown}; all files: {', '.join(str(path) for path in files.values())}"),
        highlight=False,
        soft_wrap=True,
    )
    console.print(escape(f"replay it: freefuse generate --manifest {files['manifest']} --out OTHER_FOLDER"))


LOOPBACK = ("127.0.0.1", "localhost", "::1")


def _port(host: str, port: int | None) -> int:
    """`port` if it is free on `host` (a clear error if not), else the first free one from 7860."""
    candidates = [port] if port is not None else range(7860, 7960)
    for candidate in candidates:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
            try:
                probe.bind((host, candidate))
            except OSError as error:
                if port is not None:
                    raise SettingsError(
                        f"Port {port} on {host} cannot be used ({error.strerror}); pick another with --port, or leave "
                        "--port out for the first free one."
                    ) from None
                continue
            return candidate
    raise SettingsError("No free port from 7860 to 7959; pick one with --port.")


def _auth(auth: str | None) -> tuple[str, str] | None:
    auth = auth or os.environ.get("FREEFUSE_UI_AUTH")
    if not auth:
        return None
    user, sep, password = auth.partition(":")
    if not sep or not user or not password:
        raise SettingsError("--auth takes USER:PASSWORD (or set FREEFUSE_UI_AUTH=USER:PASSWORD).")
    return user, password


@app.command()
@command
def ui(
    model: Annotated[
        list[str] | None,
        typer.Option(
            "--model",
            "-m",
            help="Model the page starts with ('tiny', 'shapesworld', a folder or a Hugging Face id); repeat to "
            "offer several. Visitors of a page served beyond this machine pick only among these.",
        ),
    ] = None,
    host: Annotated[
        str,
        typer.Option("--host", help="Address to bind (127.0.0.1: this machine only; 0.0.0.0: the network)."),
    ] = "127.0.0.1",
    port: Annotated[
        int | None, typer.Option("--port", help="Port (default: the first free one from 7860).")
    ] = None,
    root: Annotated[
        Path | None,
        typer.Option("--root", help="Folder for the sessions' files (default: a temporary folder)."),
    ] = None,
    auth: Annotated[
        str | None,
        typer.Option(
            "--auth", help="USER:PASSWORD visitors must give (or set FREEFUSE_UI_AUTH); needed beyond this machine."
        ),
    ] = None,
    no_auth: Annotated[
        bool,
        typer.Option("--no-auth", metavar="", help="Serve beyond this machine without a login (said on the page)."),
    ] = False,
    max_upload_mb: Annotated[
        int, typer.Option("--max-upload-mb", help="Largest LoRA file a visitor may upload, MiB.")
    ] = 2048,
    max_session_mb: Annotated[
        int, typer.Option("--max-session-mb", help="Storage one session may use, MiB.")
    ] = 4096,
    max_total_mb: Annotated[
        int, typer.Option("--max-total-mb", help="Storage all sessions may use together, MiB.")
    ] = 20480,
    session_hours: Annotated[
        float, typer.Option("--session-hours", help="An unused session's files are removed after this long.")
    ] = 24.0,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
) -> None:
    """A web page: add LoRAs, find and paint masks, generate beside merge, download and replay runs."""
    try:
        from .ui import build_app, launch  # an optional extra: Gradio
        from .workspace import PageLimits  # start-up time: torch
    except ImportError as error:
        raise SettingsError(f"freefuse ui needs Gradio: pip install 'freefuse[ui]' ({error}).") from None
    local = host in LOOPBACK
    credentials = _auth(auth)
    if not local and credentials is None and not no_auth:
        raise SettingsError(
            f"--host {host} serves the page beyond this machine, and it has no login: give --auth USER:PASSWORD "
            "(or FREEFUSE_UI_AUTH), or --no-auth to serve it to anyone who can reach it."
        )
    chosen = _port(host, port)
    limits = PageLimits(
        max_upload_bytes=max_upload_mb << 20,
        max_session_bytes=max_session_mb << 20,
        max_total_bytes=max_total_mb << 20,
        session_ttl_s=session_hours * 3600,
    )
    models = list(model or ["tiny"])
    # Paths on this machine only for a page this machine alone can reach.
    app_ = build_app(
        model=models[0],
        models=models if len(models) > 1 or not local else None,
        root=root,
        device=device,
        dtype=dtype,
        local_paths=local,
        public_without_login=not local and credentials is None,
        limits=limits,
    )
    shown_host = "localhost" if local else host
    console.print(
        escape(f"FreeFuse UI: http://{shown_host}:{chosen}/  (sessions under {app_.freefuse_root}; Ctrl-C stops it)"),
        highlight=False,
    )
    launch(app_, host=host, port=chosen, auth=credentials, max_upload=f"{max_upload_mb}mb")


eval_app = typer.Typer(help="Measure subject bleeding offline.", no_args_is_help=True)
app.add_typer(eval_app, name="eval")


@eval_app.command("shapesworld")
@command
def eval_shapesworld(
    method: Annotated[
        list[str] | None,
        typer.Option(
            "--method",
            help="merge | freefuse | masks (ground truth) | freefuse/<mask method>, e.g. freefuse/routing (repeat).",
        ),
    ] = None,
    world: Annotated[
        str, typer.Option("--world", help="The ShapesWorld version: v1 or v3 (its committed weights).")
    ] = "v1",
    quick: Annotated[
        bool, typer.Option("--quick", metavar="", help="A fixed small subset (CI, smoke checks).")
    ] = False,
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
    mask_method: Annotated[
        str | None,
        typer.Option(
            "--mask-method",
            help=f"FreeFuse's stage-1 method: {' | '.join(MAP_METHOD_NAMES)}.",
        ),
    ] = None,
    mask_step: Annotated[
        int | None, typer.Option("--mask-step", help="FreeFuse's mask step (default: the paper's share).")
    ] = None,
    block: Annotated[int | None, typer.Option("--block", help="FreeFuse's tapped block.")] = None,
    out: OutOpt = Path("out/shapesworld"),
    overwrite: OverwriteOpt = False,
) -> None:
    """Pairs, triples and the quad of the 4 ShapesWorld LoRAs x prompts x seeds: identity, presence, leakage."""
    from .shapesworld.evaluate import METHODS, VARIANT, EvalConfig, run_evaluation  # start-up time
    from .shapesworld.scenes import WORLDS  # start-up time

    methods = tuple(method or METHODS)
    variants = {f"{VARIANT}{name}" for name in MAP_METHOD_NAMES}
    unknown = sorted(set(methods) - set(METHODS) - variants)
    if unknown:
        raise SettingsError(f"Unknown method(s) {unknown}; use {list(METHODS)} or freefuse/<mask method>.")
    if world not in WORLDS:
        raise SettingsError(f"--world {world!r}: use one of {sorted(WORLDS)}.")
    config = EvalConfig.quick() if quick else EvalConfig()
    config.methods, config.world = methods, world
    if mask_method is not None:
        if mask_method not in MAP_METHOD_NAMES:
            raise SettingsError(f"--mask-method {mask_method!r}: use one of {list(MAP_METHOD_NAMES)}.")
        config.mask_method = mask_method
    config.mask_step, config.block = mask_step, block
    if seeds is not None:
        if seeds < 1:
            raise SettingsError(f"--seeds {seeds}: give at least 1 seed per prompt.")
        config.seeds = tuple(range(seeds))
    if steps is not None:
        if steps < 2:
            raise SettingsError(f"--steps {steps}: ShapesWorld needs at least 2 denoising steps.")
        config.steps = steps
    if sizes:
        bad = [size for size in sizes if size not in (2, 3, 4)]
        if bad:
            raise SettingsError(f"--subjects {bad}: ShapesWorld has 4 subjects; use 2, 3 or 4.")
        config.group_sizes = tuple(sizes)
    command_line = (
        "freefuse " + " ".join(sys.argv[1:])
        if sys.argv and "freefuse" in sys.argv[0]
        else "freefuse eval shapesworld"
    )
    with _progress() as progress:
        task = progress.add_task("loading", total=None)

        def report(stage: str, done: int | None, total: int | None) -> None:
            progress.update(task, description=stage, completed=done or 0, total=total)

        try:
            _, files, table = run_evaluation(config, out, model, loras, overwrite, command_line, report)
        except KeyboardInterrupt:
            progress.stop()
            console.print(
                escape(
                    f"Interrupted; the finished samples are kept in {out / 'samples'}. Run the same command again "
                    "to resume; no result file was written."
                ),
                style="yellow",
            )
            raise typer.Exit(EXIT_INTERRUPTED) from None
    console.print(table, highlight=False, markup=False)
    console.print(escape(f"wrote {files['json']}, {files['md']}, {files['grid']}"), highlight=False)


def main() -> None:
    signal.signal(signal.SIGINT, signal.default_int_handler)  # also when started with SIGINT ignored
    signal.signal(signal.SIGTERM, _terminate)
    try:
        app()
    except BaseException as error:  # between commands' own handling, e.g. while importing
        if not is_interrupt(error):
            raise
        with contextlib.suppress(ValueError):
            for signum in (signal.SIGINT, signal.SIGTERM):
                signal.signal(signum, signal.SIG_IGN)
        console.print(f"[yellow]{INTERRUPTED}[/]")
        sys.exit(EXIT_INTERRUPTED)


if __name__ == "__main__":
    sys.exit(main())
