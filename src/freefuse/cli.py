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
import re
import shlex
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
from rich.markup import escape as escape_markup
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from typer.core import TyperCommand, TyperGroup

from . import __version__, stages
from .conditions import ConditionsSpec
from .core.config import MAP_METHOD_NAMES
from .errors import INTERRUPTED, USER_ERRORS, SettingsError, describe_failure, is_interrupt
from .lora import check_adapter_name
from .memory import MemoryOptions, describe_gguf
from .methods import METHODS
from .outputs import check_outputs, output_paths, write_outputs
from .settings import CLI_FLAGS, GenerationSettings, parse_size

if TYPE_CHECKING:
    from .spec import RunSpec

class _FlagHelp:
    """`-h`/`--help` shown as the flag it is: no `<bool>` type beside it (Typer prints one)."""

    def get_help_option(self, ctx):
        option = super().get_help_option(ctx)
        if option is not None:
            option.metavar = ""  # as the other flags: metavar="" hides the type column
        return option


class Command(_FlagHelp, TyperCommand):
    pass


class Group(_FlagHelp, TyperGroup):
    pass


#: `-h` as well as `--help`, for every command (Click passes it down to subcommands).
HELP = {"help_option_names": ["-h", "--help"]}

app = typer.Typer(
    name="freefuse",
    cls=Group,
    context_settings=HELP,
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


# Characters a terminal acts on rather than shows: C0 and C1 controls but tab and newline (escape
# sequences, bell, carriage return) and the text-direction marks and overrides.
_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def escape(text: str) -> str:
    """Text FreeFuse did not write (LoRA metadata, paths, prompts, manifests' strings), made safe to print:
    control characters shown as escapes (`\\x1b`), rich markup shown as written."""
    return escape_markup(_CONTROL.sub(lambda match: match.group().encode("unicode_escape").decode(), str(text)))


def _quiet_libraries() -> None:
    """Library logs at ERROR and their warnings off, without importing them: `--help`, `inspect` and a
    flag's mistake must not wait seconds for diffusers (and torch) to import."""
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")  # read when diffusers first logs
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    for name in ("diffusers", "transformers", "accelerate", "peft", "huggingface_hub"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module="diffusers")
    warnings.filterwarnings("ignore", module="transformers")
    warnings.filterwarnings("ignore", module="peft")


def _quiet_model_libraries() -> None:
    """diffusers' and transformers' own verbosity and progress bars off; for the commands that load
    models, once those libraries are imported anyway."""
    with contextlib.suppress(ImportError):
        from diffusers.utils import logging as diffusers_logging

        diffusers_logging.set_verbosity_error()
        diffusers_logging.disable_progress_bar()
    with contextlib.suppress(ImportError):
        from transformers.utils import logging as transformers_logging

        transformers_logging.set_verbosity_error()
        transformers_logging.disable_progress_bar()


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


#: `NAME::PATH…` names a LoRA's adapter. Neither a Windows path (one `:`, after the drive letter) nor
#: a usual Unix path has `::`; a file whose own name has it is read as a path when it exists.
NAME_SEPARATOR = "::"


def split_lora_name(spec: str) -> tuple[str | None, str]:
    """`NAME::REST` → (NAME, REST), the name checked as an adapter name; else (None, spec)."""
    if NAME_SEPARATOR not in spec or Path(spec).expanduser().exists():
        return None, spec
    name, rest = spec.split(NAME_SEPARATOR, 1)
    if not name or not rest:
        raise SettingsError(f"--lora {spec!r}: write NAME::PATH[=WORD][@WEIGHT], e.g. carol::carol_v2.safetensors.")
    return check_adapter_name(name), rest


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
        help="Diffusers folder, Hugging Face id, single .safetensors or .gguf checkpoint, or 'tiny', 'tiny-sdxl', "
        "'tiny-zimage', 'tiny-flux2'.",
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
                "--lora",
                "-l",
                help="Subject LoRA: \\[NAME::]PATH=WORD\\[,WORD]\\[@WEIGHT]. Repeat per subject. NAME: its name in "
                "masks and manifests (default: the file's stem).",
            ),
        ],
        None,
    ),
    (
        "global_lora",
        Annotated[
            list[str] | None,
            typer.Option(
                "--global-lora", help="Style/background LoRA, never masked: \\[NAME::]PATH\\[@WEIGHT]."
            ),
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
        "init_image",
        Annotated[
            str | None,
            typer.Option("--init-image", help="Start from this picture (img2img; RGB PNG/JPEG/WebP of the run's size)."),
        ],
        None,
    ),
    (
        "strength",
        Annotated[
            float | None,
            typer.Option(
                "--strength",
                help="How much of --init-image is redrawn, in (0, 1] (default: the model's img2img/inpainting default).",
            ),
        ],
        None,
    ),
    (
        "inpaint_mask",
        Annotated[
            str | None,
            typer.Option(
                "--inpaint-mask", help="Repaint --init-image only where this grey (L) mask is white; keep the rest."
            ),
        ],
        None,
    ),
    (
        "control",
        Annotated[
            list[str] | None,
            typer.Option(
                "--control",
                help=r"ControlNet input TYPE=IMAGE\[@SCALE] (repeatable; TYPE: a union ControlNet's mode, e.g. canny, "
                "depth, pose). Each is read by the one --controlnet, or by the --controlnet in the same place.",
            ),
        ],
        None,
    ),
    (
        "controlnet",
        Annotated[
            list[str] | None,
            typer.Option("--controlnet", help="ControlNet model for --control: a diffusers folder or Hugging Face id."),
        ],
        None,
    ),
    (
        "ip_adapter",
        Annotated[
            str | None,
            typer.Option(
                "--ip-adapter",
                help=r"Reference IMAGE\[@SCALE] for --ip-adapter-model (FLUX.1; SCALE default 1.0).",
            ),
        ],
        None,
    ),
    (
        "ip_adapter_model",
        Annotated[
            str | None,
            typer.Option(
                "--ip-adapter-model",
                help="FLUX.1 IP-Adapter for --ip-adapter: a .safetensors file, its folder, or a Hugging Face id "
                "(e.g. XLabs-AI/flux-ip-adapter).",
            ),
        ],
        None,
    ),
    (
        "redux",
        Annotated[
            str | None,
            typer.Option(
                "--redux", help=r"Reference IMAGE\[@SCALE] for --redux-model (FLUX.1; SCALE: prompt_embeds_scale, default 1.0)."
            ),
        ],
        None,
    ),
    (
        "redux_model",
        Annotated[
            str | None,
            typer.Option(
                "--redux-model",
                help="FLUX Redux model for --redux: a FluxPriorReduxPipeline folder or Hugging Face id "
                "(e.g. black-forest-labs/FLUX.1-Redux-dev).",
            ),
        ],
        None,
    ),
    (
        "image_encoder",
        Annotated[
            str | None,
            typer.Option(
                "--image-encoder",
                help="CLIP image encoder of --ip-adapter-model: a folder or Hugging Face id "
                "(default openai/clip-vit-large-patch14).",
            ),
        ],
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
    (
        "name",
        Annotated[
            str | None,
            typer.Option(
                "--name",
                help="File name stem of the outputs (default: freefuse; with --manifest, the manifest's own: demo "
                "for demo.json).",
            ),
        ],
        None,
    ),
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
        """The run: from the flags, or from `--manifest` with the flags given winning (and said).
        Mistakes in the flags alone are said before torch is imported."""
        loras = _loras_from_flags(self.values["lora"], self.values["global_lora"])
        memory = MemoryOptions().updated(**self.memory())  # a mistake in these flags, said before torch loads
        settings = None
        if self.values["manifest"] is None:
            if "prompt" not in self.settings:
                raise SettingsError("--prompt is required (or --manifest to replay a run).")
            if self.values["model"] is None:
                raise SettingsError(
                    "--model is required: a diffusers folder or a Hugging Face id (or 'tiny' to try it)."
                )
            settings = GenerationSettings(**self.settings)
        from .spec import LoraSpec, RunSpec, replay_spec  # torch: not for --help or a flag's mistake

        lora_specs = []
        for lora in loras:
            flag, given = "--lora" if lora["scope"] == "subject" else "--global-lora", lora.pop("given")
            lora_specs.append(LoraSpec.parse(lora, f"{flag} {given!r}"))
        conditions = conditions_from_flags(self.values)
        if settings is None:
            return replay_spec(
                self.values["manifest"],
                self.values["model"],
                lora_specs,
                self.settings,
                self.values["masks"],
                base_model=self.values["base_model"],
                conditions=conditions,
                memory=self.memory(),
            )
        return RunSpec(
            self.values["model"],
            lora_specs,
            settings,
            self.values["masks"],
            base_model=self.values["base_model"],
            conditions=conditions,
            memory=memory,
        )


def parse_control(text: str) -> dict:
    """`TYPE=IMAGE[@SCALE]` → `{"type", "image", "scale"}` (a `ControlSpec`'s fields)."""
    kind, sep, rest = text.partition("=")
    if not sep or not kind or not rest:
        raise SettingsError(f"--control {text!r} is not TYPE=IMAGE[@SCALE], e.g. --control depth=depth.png@0.7.")
    image, scale = split_scale(rest)
    return {"type": kind, "image": image, "scale": scale}


def split_scale(text: str) -> tuple[str, float]:
    """`IMAGE[@SCALE]` → `(IMAGE, SCALE)` (1.0 when none is given; an @ in a file name stays in it)."""
    head, at, tail = text.rpartition("@")
    if at:
        try:
            return head, float(tail)
        except ValueError:
            pass  # an @ in the file name
    return text, 1.0


def conditions_from_flags(values: dict):
    """The condition flags as a `ConditionsSpec` (only the ones given, so that a replay knows), or None."""
    given = {}
    for key in ("init_image", "strength", "inpaint_mask"):
        if values.get(key) is not None:
            given[key] = values[key]
    if values.get("ip_adapter") is not None:
        given["ip_adapter"], given["ip_adapter_scale"] = split_scale(values["ip_adapter"])
    if values.get("redux") is not None:
        given["redux"], given["redux_scale"] = split_scale(values["redux"])
    for key in ("ip_adapter_model", "image_encoder", "redux_model"):
        if values.get(key) is not None:
            given[key] = values[key]
    controls = [parse_control(text) for text in values.get("control") or []]
    nets = list(values.get("controlnet") or [])
    if controls or nets:
        if len(nets) > 1 and len(nets) != len(controls):
            raise SettingsError(
                f"{len(nets)} --controlnet for {len(controls)} --control: give one ControlNet for all the controls, or one "
                "per control (the first --controlnet reads the first --control, ...)."
            )
        for index, control in enumerate(controls):
            control["controlnet"] = index if len(nets) > 1 else 0
        given["controls"], given["controlnets"] = controls, nets
    if not given:
        return None
    return ConditionsSpec.parse(given, "the condition flags")


def settings_help(field_name: str) -> str:
    """A setting's help line: its description, its choices, and the settings model's default."""
    field = GenerationSettings.model_fields[field_name]
    text = field.description or ""
    # The choices of a Literal field, also of one that may be left unset (`Literal[...] | None`).
    kinds = [field.annotation, *get_args(field.annotation)]
    choices = next((get_args(kind) for kind in kinds if get_origin(kind) is Literal), ())
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
        quiet = {"metavar": ""} if kind is bool else {}  # an on/off pair of flags takes no value
        annotation = Annotated[kind | None, typer.Option(*flags, help=help_text, **quiet)]
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
        name, rest = split_lora_name(spec)
        path, words, weight = parse_lora_spec(rest)
        result.append(
            {"path": path, "words": words, "weight": weight, "scope": "subject", "name": name, "given": spec}
        )
    for spec in global_loras or []:
        name, rest = split_lora_name(spec)
        path, words, weight = parse_lora_spec(rest)
        if words:
            raise SettingsError(
                f"--global-lora {spec!r}: global LoRAs take no words; write [NAME::]PATH[@WEIGHT]."
            )
        result.append({"path": path, "words": None, "weight": weight, "scope": "global", "name": name, "given": spec})
    return result


def _prepare(options: RunOptions, count_images: bool = True) -> tuple[RunSpec, list[dict[str, Path]]]:
    """The run spec, checked before any weights load, and its free output paths."""
    spec = options.spec()
    for note in spec.notes:
        console.print(f"[yellow]note:[/] {escape(note)}", highlight=False, soft_wrap=True)
    spec.check()
    count = len(spec.settings.image_prompts) if count_images else 1
    paths = output_paths(options.values["out"], _stem(options.values), count)
    return spec, paths


def _stem(values: dict) -> str:
    """The outputs' file name stem: --name, else a replayed manifest's own (`demo.json` → demo)."""
    if values["name"] is not None:
        return values["name"]
    return Path(values["manifest"]).stem if values["manifest"] is not None else "freefuse"


def _service(options: RunOptions):
    from .runner import RunService  # torch and diffusers: not for --help or a flag's mistake

    _quiet_model_libraries()
    return RunService(options.values["device"], options.values["dtype"])


# -- commands --------------------------------------------------------------------------------------------


@app.command(cls=Command)
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


@app.command("masks", cls=Command)
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


@app.command(cls=Command)
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
    if not jobs.is_file():  # said before torch and diffusers are imported (seconds)
        raise SettingsError(f"Job file {jobs} does not exist.")
    # Here, not at the top: torch and diffusers take seconds that --help and a flag's mistake need not wait.
    from .batch import expand_grid, is_done, load_jobs, process_state, read_index, run_batch  # start-up
    from .runner import RunService  # start-up time

    _quiet_model_libraries()
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
        finished = 0
        lines = []
        for job in job_list:
            finished += (mark := is_done(done.get(job.id), out))
            lines.append(f"{'done' if mark else 'todo'}  {job.stem}  {job.settings.prompt!r}")
        typer.echo("\n".join(lines))
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
        f"[bold]process {state.process_index}[/]: {report.done} made"
        + (f" ({report.images} images)" if report.images != report.done else "")
        + f", {report.skipped} already done, "
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


@app.command(cls=Command)
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


@app.command(cls=Command)
@command
def demo(
    out: OutOpt = Path("out"),
    model: Annotated[
        str | None,
        typer.Option(
            "--model",
            "-m",
            help="A diffusers folder or Hugging Face id; 'tiny', 'tiny-sdxl', 'tiny-zimage' or 'tiny-flux2' "
            "(random); default: ShapesWorld.",
        ),
    ] = None,
    steps: Annotated[
        int | None, typer.Option("--steps", help="Steps (default 20 ShapesWorld, 28 real).")
    ] = None,
    size: Annotated[
        str | None, typer.Option("--size", help="WIDTHxHEIGHT (default 64 ShapesWorld, 1024 real).")
    ] = None,
    seed: SeedOpt = 0,
    overwrite: Annotated[
        bool,
        typer.Option(
            "--overwrite",
            metavar="",
            help="Replace files that are not a previous demo's (the demo replaces its own without it).",
        ),
    ] = False,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
    offload: OffloadOpt = None,
    arch: Annotated[
        str | None,
        typer.Option(
            "--arch",
            help="flux, sdxl, zimage or flux2: a cached model of it, else its built-in tiny random model "
            "(tiny-sdxl, tiny-zimage, tiny-flux2; flux: ShapesWorld).",
        ),
    ] = None,
) -> None:
    """Run the whole job offline: merge beside FreeFuse on ShapesWorld, or a real model when its weights are here."""
    if size is not None:  # a flag's mistake is said before torch and diffusers are imported
        parse_size(size)
    if steps is not None and steps < 1:
        raise SettingsError(f"--steps {steps}: give at least 1 denoising step.")
    from .demo import generate_command, plan_demo, run_demo  # start-up time: torch and diffusers
    from .runner import RunService  # start-up time

    _quiet_model_libraries()
    plan = plan_demo(model, steps, size, seed, arch)
    console.print(escape(f"demo: {plan.description}"), highlight=False, soft_wrap=True)
    service = RunService(device=device, dtype=dtype, offload=offload)
    with _progress() as progress:
        files, output, notes = run_demo(plan, out, service, overwrite=overwrite, on_step=_progress_for(progress, "demo"))
    _notes(notes)
    _summary(output, [files])
    shown = files.get("compare", files["image"])
    console.print(escape(f"look at {shown}: {plan.look_at}"), highlight=False, soft_wrap=True)
    console.print(
        escape(f"all files: {', '.join(str(path) for path in files.values())}"), highlight=False, soft_wrap=True
    )
    console.print(escape(f"replay it: freefuse generate --manifest {files['manifest']} --out OTHER_FOLDER"))
    console.print("make your own (change the prompt, --seed, --lora weights):", highlight=False)
    console.print(escape(shlex.join(generate_command(plan, out))), highlight=False, soft_wrap=True)


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


#: What `freefuse ui` offers for reference pictures (beside its ControlNets).
OfferedIpAdapters = Annotated[
    list[str] | None,
    typer.Option(
        "--ip-adapter-model",
        metavar="ADAPTER",
        help="FLUX.1 IP-Adapter the page offers for reference pictures (file, folder or id); repeatable.",
    ),
]
OfferedReduxes = Annotated[
    list[str] | None,
    typer.Option(
        "--redux-model",
        metavar="MODEL",
        help="FLUX Redux model the page offers for reference pictures (folder or id); repeatable.",
    ),
]


@app.command(cls=Command)
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
    controlnet: Annotated[
        list[str] | None,
        typer.Option(
            "--controlnet",
            metavar="MODEL",
            help="ControlNet the page offers (a folder or Hugging Face id); repeat to offer several. A page served "
            "to this machine alone also takes any typed one.",
        ),
    ] = None,
    ip_adapter_model: OfferedIpAdapters = None,
    redux_model: OfferedReduxes = None,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
) -> None:
    """A web page: add LoRAs, find and paint masks, generate beside merge, download and replay runs."""
    try:
        from .ui import build_app, launch  # an optional extra: Gradio
        from .workspace import PageLimits  # start-up time: torch
    except ImportError as error:
        raise SettingsError(f"freefuse ui needs Gradio: pip install 'freefuse[ui]' ({error}).") from None
    _quiet_model_libraries()
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
        controlnets=list(controlnet or []),
        ip_adapters=list(ip_adapter_model or []),
        reduxes=list(redux_model or []),
    )
    shown_host = "localhost" if local else host
    console.print(
        escape(f"FreeFuse UI: http://{shown_host}:{chosen}/  (sessions under {app_.freefuse_root}; Ctrl-C stops it)"),
        highlight=False,
    )
    launch(app_, host=host, port=chosen, auth=credentials, max_upload=f"{max_upload_mb}mb")


eval_app = typer.Typer(
    help="Measure subject bleeding (ShapesWorld, offline) and the paper's evaluation on your LoRAs.",
    no_args_is_help=True,
    cls=Group,
    context_settings=HELP,
)
app.add_typer(eval_app, name="eval")


@eval_app.command("shapesworld", cls=Command)
@command
def eval_shapesworld(
    method: Annotated[
        list[str] | None,
        typer.Option(
            "--method",
            help="merge | freefuse | masks (ground truth) | freefuse/<mask method>, e.g. freefuse/routing; "
            "+bias<scale> adds the attention bias, e.g. freefuse+bias5 (repeat).",
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
    from .shapesworld.evaluate import EvalConfig, run_evaluation  # start-up time
    from .shapesworld.scenes import WORLDS  # start-up time

    _quiet_model_libraries()
    methods = _eval_methods(method)
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


def _eval_methods(given: list[str] | None) -> tuple[str, ...]:
    """The evaluation's methods: merge, freefuse, masks, freefuse/<mask method>, each but merge with
    an optional +bias<scale>; the defaults when none is given."""
    from .shapesworld.evaluate import METHODS, VARIANT, split_bias  # start-up time

    methods = tuple(given or METHODS)
    variants = {f"{VARIANT}{name}" for name in MAP_METHOD_NAMES}
    try:
        bases = {name: split_bias(name)[0] for name in methods}
    except ValueError as error:
        raise SettingsError(str(error)) from None
    unknown = sorted(name for name, base in bases.items() if base not in set(METHODS) | variants)
    if unknown:
        raise SettingsError(
            f"Unknown method(s) {unknown}; use {list(METHODS)} or freefuse/<mask method>, each with +bias<scale> "
            "for the attention bias (not merge)."
        )
    return methods

@eval_app.command("pairs", cls=Command)
@command
def eval_pairs(
    lora: Annotated[
        list[str] | None,
        typer.Option("--lora", "-l", help="A character LoRA: PATH=WORD\\[@WEIGHT]. Two or more; paired two by two."),
    ] = None,
    refs: Annotated[
        list[str] | None,
        typer.Option(
            "--refs",
            help="NAME=FOLDER: a LoRA's training images (NAME: its file name or word). Without one, its single-LoRA "
            "images on the same seeds serve, and the report says so.",
        ),
    ] = None,
    model: ModelOpt = None,
    base_model: Annotated[
        str | None, typer.Option("--base-model", help="For --model FILE.safetensors: its diffusers configs.")
    ] = None,
    prompts: Annotated[
        str, typer.Option("--prompts", help="'paper' (Appendix B, built in) or a text file, one <A>/<B> prompt a line.")
    ] = "paper",
    prompt_count: Annotated[
        int | None, typer.Option("--prompt-count", help="Only the first N prompts (a smaller run).")
    ] = None,
    seeds: Annotated[str, typer.Option("--seeds", help="A range (42-51, the paper's) or a list (42,43).")] = "42-51",
    method: Annotated[
        list[str] | None,
        typer.Option(
            "--method",
            help="diffusers | merge | freefuse | freefuse:MASK_METHOD | masks | single (repeat; default: all but "
            "the freefuse:* variants).",
        ),
    ] = None,
    metric: Annotated[
        list[str] | None,
        typer.Option("--metric", help="dinov3 | dreamsim | lvface | hpsv3 | vlm | clip (repeat; default: the paper's five)."),
    ] = None,
    metric_model: Annotated[
        list[str] | None,
        typer.Option("--metric-model", help="METRIC=MODEL_ID, e.g. vlm=Qwen/Qwen2.5-VL-7B-Instruct (the judge)."),
    ] = None,
    judge_references: Annotated[
        int, typer.Option("--judge-references", help="Reference images per character shown to the judge.")
    ] = 1,
    crops: Annotated[
        str, typer.Option("--crops", help="masks (FreeFuse's masks of each seed, for every method) | detector.")
    ] = "masks",
    detector: Annotated[str, typer.Option("--detector", help="owlv2 | halves (no model).")] = "owlv2",
    detector_model: Annotated[str | None, typer.Option("--detector-model", help="The detector's model id.")] = None,
    setting: Annotated[
        list[str] | None,
        typer.Option("--set", help="A generate setting for every image, KEY=VALUE (steps=28, size=1024x1024, guidance=3.5)."),
    ] = None,
    single_prompt: Annotated[
        str, typer.Option("--single-prompt", help="The single-LoRA images' prompt, with <A>.")
    ] = "a portrait photo of <A>, face clearly visible",
    skip_unavailable: Annotated[
        bool, typer.Option("--skip-unavailable", metavar="", help="Leave out metrics whose library is missing.")
    ] = False,
    quick: Annotated[
        bool,
        typer.Option("--quick", metavar="", help="End to end offline in seconds: tiny model, tiny random metric backbones."),
    ] = False,
    out: OutOpt = Path("out/eval-pairs"),
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
) -> None:
    """The paper's evaluation (Table 2) on your LoRAs: pairs x prompts x seeds x methods, scored, reported.

    Re-run the same command to resume. With `accelerate launch --multi_gpu --num_processes N -m freefuse eval
    pairs ...` the images and the scores are split between GPUs.
    """
    from .evaluation import run as evaluation  # start-up time: torch, diffusers, transformers
    from .runner import RunService  # start-up time

    if quick:
        if lora or model or refs:
            raise SettingsError("--quick runs its own tiny model and LoRAs; leave out --lora, --model and --refs.")
        config, options = evaluation.quick_setup(out)
    else:
        config = _pairs_config(evaluation, model, base_model, lora, refs, prompts, prompt_count, seeds, method, setting,
                               single_prompt)  # fmt: skip
        options = _pairs_options(evaluation, metric, metric_model, judge_references, crops, detector, detector_model,
                                 skip_unavailable, device)  # fmt: skip
    with _progress() as progress:
        task = progress.add_task("checking", total=None)

        def report(stage: str, done: int | None, total: int | None) -> None:
            progress.update(task, description=stage, completed=done or 0, total=total)

        try:
            files = evaluation.run_pairs(config, options, out, RunService(device=device, dtype=dtype), report)
        except KeyboardInterrupt:
            progress.stop()
            console.print(escape(f"Interrupted; finished images and scores are kept in {out}. Run the same command again to resume."), style="yellow")
            raise typer.Exit(EXIT_INTERRUPTED) from None
    if files:
        console.print(escape(f"wrote {files['md']}, {files['html']}, {files['scores']}"), highlight=False, soft_wrap=True)


def _pairs_config(evaluation, model, base_model, lora, refs, prompts, prompt_count, seeds, method, setting, single_prompt):
    """`eval pairs`' generation plan from its options (`evaluation`: the module, imported by the command)."""
    if model is None or len(lora or []) < 2:
        raise SettingsError("Give --model and at least two --lora PATH=WORD (or --quick to try it).")
    chosen, note = evaluation.load_prompts(prompts)
    if prompt_count is not None:
        if prompt_count < 1:
            raise SettingsError(f"--prompt-count {prompt_count}: give at least 1.")
        chosen = chosen[:prompt_count]
        note = f"the first {len(chosen)} of: {note}"
    folders = dict(_pair(item, "--refs", "NAME=FOLDER") for item in refs or [])
    return evaluation.build_config(
        model, [parse_lora_spec(item) for item in lora], folders, chosen, note, evaluation.parse_seeds(seeds),
        evaluation.check_methods(method or evaluation.DEFAULT_METHODS), evaluation.parse_settings(setting or []),
        single_prompt, base_model,
    )  # fmt: skip


def _pairs_options(evaluation, metric, metric_model, judge_references, crops, detector, detector_model,
                   skip_unavailable, device):  # fmt: skip
    """`eval pairs`' scoring options from its options (metrics keep their own dtypes: float32 features, the
    judge in bfloat16 on a GPU; --dtype is the image model's)."""
    if crops not in ("masks", "detector"):
        raise SettingsError(f"--crops {crops!r}: use masks or detector.")
    return evaluation.EvalOptions(
        metrics=tuple(metric or evaluation.PAPER_METRICS),
        metric_options=evaluation.MetricOptions(
            device=device, models=dict(_pair(item, "--metric-model", "METRIC=ID") for item in metric_model or []),
            judge_references=judge_references,
        ),
        crops=crops, detector=detector, detector_model=detector_model, skip_unavailable=skip_unavailable,
        command="freefuse " + " ".join(sys.argv[1:]) if sys.argv and "freefuse" in sys.argv[0] else "freefuse eval pairs",
    )  # fmt: skip


def _pair(item: str, flag: str, form: str) -> tuple[str, str]:
    key, sep, value = item.partition("=")
    if not sep or not key.strip() or not value.strip():
        raise SettingsError(f"{flag} {item!r}: write {form}.")
    return key.strip(), value.strip()


@eval_app.command("replay", cls=Command)
@command
def eval_replay(
    manifest: Annotated[Path, typer.Argument(help="A `diffusers` row's manifest from `freefuse eval pairs` (images/NAME.json).")],
    out: OutOpt = Path("out/replay"),
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
) -> None:
    """Make a `diffusers` baseline row's image again (FreeFuse rows replay with `freefuse generate --manifest`)."""
    from .evaluation import run as evaluation  # start-up time
    from .runner import RunService  # start-up time

    written = evaluation.replay_plain(manifest, RunService(device=device, dtype=dtype), out)
    console.print(escape(f"wrote {', '.join(str(path) for path in written)}"), highlight=False, soft_wrap=True)


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
