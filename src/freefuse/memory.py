"""Running on a small GPU: quantized weights, offload and compiled blocks.

`MemoryOptions` is how a model is loaded (`--quantize`, `--quantize-text-encoder`, `--offload`,
`--compile`); the manifest records it and a replay loads the same. `check_memory_options` refuses,
before any weights load, every combination known not to work, and says what to use instead.
`quantization_configs` is what diffusers quantizes while loading; `quantize_in_memory`,
`store_in_fp8`, `offload` and `compile_blocks` are what happens to a loaded pipeline.

Masked LoRAs run on every base here: the fused op takes PEFT's LoRA layers over GGUF, bitsandbytes
and torchao layers and over fp8-stored ones (`freefuse.masking`).
"""

from __future__ import annotations

import importlib.util
import inspect
from collections import Counter
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import SettingsError

if TYPE_CHECKING:
    import torch

    from .settings import GenerationSettings

# torch, diffusers and the quantization packages are imported where they are used: the command
# line reads the choices below for its help and its checks without them.

#: `--quantize`: the denoiser's weights.
QUANTIZE = {
    "nf4": "bitsandbytes 4-bit NF4 (GPU only)",
    "int8": "torchao int8 weight-only",
    "fp8": "float8 e4m3 storage, computed in the run's dtype (diffusers' layerwise casting)",
}
#: `--quantize-text-encoder`: the large text encoder's (T5, Qwen, ...) weights.
QUANTIZE_TEXT = {"nf4": "bitsandbytes 4-bit NF4 (GPU only)", "int8": "torchao int8 weight-only"}
#: `--offload`: where the weights wait between uses.
OFFLOAD = {
    "none": "every model on the GPU",
    "model": "each model on the GPU only while it runs (diffusers' model CPU offload)",
    "sequential": "each layer on the GPU only while it runs (slowest, least memory)",
    "group": "groups of layers streamed to the GPU ahead of use (leaf level)",
}
#: The Python package each choice needs (`pip install 'freefuse[quant]'`).
PACKAGES = {"nf4": "bitsandbytes", "int8": "torchao", "gguf": "gguf"}
#: Text encoders too small to be worth quantizing (and whose pooled output FLUX and SDXL read).
SMALL_TEXT_ENCODERS = ("CLIP",)


@dataclass(frozen=True)
class MemoryOptions:
    """How a model is loaded to fit in less GPU memory (all off by default).

    Attributes:
        quantize: the denoiser's weights: None, or a key of `QUANTIZE`.
        quantize_text_encoder: the large text encoder's weights: None, or a key of `QUANTIZE_TEXT`.
        offload: a key of `OFFLOAD`.
        compile: the denoiser's repeated blocks compiled (`torch.compile`, regional).
    """

    quantize: str | None = None
    quantize_text_encoder: str | None = None
    offload: str = "none"
    compile: bool = False

    def __post_init__(self) -> None:
        for value, choices, flag in (
            (self.quantize, QUANTIZE, "--quantize"),
            (self.quantize_text_encoder, QUANTIZE_TEXT, "--quantize-text-encoder"),
        ):
            if value is not None and value not in choices:
                raise SettingsError(f"{flag} {value!r}: use one of {', '.join(choices)}.")
        if self.offload not in OFFLOAD:
            raise SettingsError(f"--offload {self.offload!r}: use one of {', '.join(OFFLOAD)}.")
        if not isinstance(self.compile, bool):
            raise SettingsError(f"`compile` must be true or false, got {self.compile!r}.")

    @property
    def is_default(self) -> bool:
        return self == MemoryOptions()

    def to_record(self) -> dict:
        """What the manifest records (`model.load`)."""
        return asdict(self)

    @classmethod
    def from_record(cls, record: object) -> MemoryOptions:
        """From a manifest's `model.load` (untrusted: known keys only, checked)."""
        if record is None:
            return cls()
        if not isinstance(record, dict) or set(record) - set(cls.__dataclass_fields__):
            raise SettingsError(f"A manifest's `model.load` must hold {sorted(cls.__dataclass_fields__)}, got {record!r}.")
        return cls(**record)

    def updated(self, **given) -> MemoryOptions:
        """These options with the given fields (None: not given) replaced."""
        return replace(self, **{name: value for name, value in given.items() if value is not None})


def offload_name(offload: bool | str | None) -> str:
    """`--offload`'s value from the older boolean (True: model CPU offload)."""
    if offload is None or offload is False:
        return "none"
    return "model" if offload is True else str(offload)


# -- facts read before loading ------------------------------------------------------------------------


def component_classes(architecture) -> dict[str, type]:
    """The classes of an architecture's pipeline components, from its diffusers pipeline class's
    signature (no weights, no config files)."""
    import diffusers

    pipeline_class = getattr(diffusers, architecture.pipeline_classes[0])
    classes = {}
    for name, parameter in inspect.signature(pipeline_class.__init__).parameters.items():
        annotation = parameter.annotation
        if isinstance(annotation, str):
            annotation = getattr(diffusers, annotation, None)
        if isinstance(annotation, type):
            classes[name] = annotation
    return classes


def large_text_encoders(architecture) -> list[str]:
    """The text encoders `--quantize-text-encoder` quantizes: every one but the small CLIP ones."""
    return [
        name
        for name, kind in component_classes(architecture).items()
        if name.startswith("text_encoder") and not kind.__name__.startswith(SMALL_TEXT_ENCODERS)
    ]


def compile_refusal(architecture) -> str | None:
    """Why `--compile` cannot run on this architecture's denoiser, or None when it can: it must
    declare repeated blocks for regional compilation (`_repeated_blocks`)."""
    denoiser = component_classes(architecture).get(architecture.denoiser_name)
    if not getattr(denoiser, "_repeated_blocks", None):
        return f"the {architecture.name} denoiser declares no repeated blocks to compile"
    return None


def gguf_tensor_types(path: str | Path) -> dict[str, str]:
    """Tensor name → GGUF type name ("Q5_0", "F32", ...) of a GGUF file, from its header."""
    try:
        from gguf import GGUFReader
    except ImportError:
        raise SettingsError(f"Reading {Path(path).name} needs the `gguf` package: pip install 'freefuse[quant]'.") from None

    try:
        reader = GGUFReader(str(path))
    except (OSError, ValueError, IndexError, KeyError) as error:
        raise SettingsError(f"{path} is not a readable GGUF file: {error}") from None
    return {tensor.name: tensor.tensor_type.name for tensor in reader.tensors}


def gguf_quant_type(types: dict[str, str]) -> str:
    """A GGUF file's quantization, as its users name it: the type of most of its weights."""
    quantized = Counter(kind for name, kind in types.items() if name.endswith(".weight") and kind not in ("F32",))
    return quantized.most_common(1)[0][0] if quantized else "F32"


def describe_gguf(path: str | Path) -> dict:
    """What `freefuse inspect` shows of a GGUF model file."""
    types = gguf_tensor_types(path)
    return {
        "path": str(path),
        "format": "GGUF",
        "quant_type": gguf_quant_type(types),
        "tensor_types": dict(Counter(types.values()).most_common()),
        "tensors": len(types),
        "size_bytes": Path(path).stat().st_size,
    }


@dataclass(frozen=True)
class SourceFacts:
    """What `check_memory_options` knows of the model source before loading.

    Attributes:
        built_in: a model FreeFuse builds in memory (`tiny`, `shapesworld`).
        gguf: the quantization of a GGUF file ("Q5_0"), None for other sources.
        prequantized: the `quant_method` of an already quantized model folder, or None.
    """

    built_in: bool = False
    gguf: str | None = None
    prequantized: str | None = None


def check_memory_options(
    options: MemoryOptions,
    architecture,
    source: SourceFacts = SourceFacts(),
    device: torch.device | None = None,
    settings: GenerationSettings | None = None,
) -> None:
    """Every rule over the options that needs no weights; a `SettingsError` names what to use instead.

    `device`: where the run goes (None: not known yet, its rules wait for loading, still before any
    weights load); `settings`: the run's, when known (`lora_op`, the attention bias).
    """
    _check_packages(options, source)
    _check_sources(options, architecture, source)
    if options.compile:
        refusal = compile_refusal(architecture) if architecture is not None else None
        if refusal is not None:
            raise SettingsError(f"--compile does not run here: {refusal}; leave --compile out.")
        if options.offload in ("sequential", "group"):
            raise SettingsError(
                f"--compile with --offload {options.offload}: the offload hooks move weights inside the compiled blocks, "
                "which recompiles them; use --offload model (or none) with --compile."
            )
        if options.quantize == "fp8":
            raise SettingsError(
                "--compile with --quantize fp8: the fp8 cast before each layer breaks the compiled graph at every layer "
                "(a new graph per layer shape, recompiled); use --quantize int8 or a GGUF file with --compile."
            )
        if settings is not None and settings.lora_op == "peft":
            raise SettingsError("--compile runs masked LoRAs with the fused op only; leave --lora-op peft out.")
        if settings is not None and settings.attention_bias:
            raise SettingsError(
                "--compile with --attn-bias: the bias's attention processors change what the compiled blocks read at "
                "the stage switch (not made static yet); leave one of them out."
            )
    _check_offload(options, source)
    if device is not None:
        _check_device(options, source, device)


def _check_packages(options: MemoryOptions, source: SourceFacts) -> None:
    wanted = [options.quantize, options.quantize_text_encoder, "gguf" if source.gguf is not None else None]
    wanted += ["nf4"] if source.prequantized == "bitsandbytes" else []
    for choice in dict.fromkeys(choice for choice in wanted if choice in PACKAGES):
        if importlib.util.find_spec(PACKAGES[choice]) is None:
            raise SettingsError(
                f"{'GGUF files' if choice == 'gguf' else f'--quantize {choice}'} need the `{PACKAGES[choice]}` package: "
                "pip install 'freefuse[quant]'."
            )


def _check_sources(options: MemoryOptions, architecture, source: SourceFacts) -> None:
    already = f"GGUF {source.gguf}" if source.gguf is not None else source.prequantized
    if options.quantize is not None and already is not None:
        raise SettingsError(f"The model is already quantized ({already}); leave --quantize out.")
    if source.built_in and "nf4" in (options.quantize, options.quantize_text_encoder):
        raise SettingsError(
            "bitsandbytes quantizes while weights load, and the built-in models are made in memory; use --quantize "
            "int8 or fp8 with them, or save the model as a folder first."
        )
    if options.quantize_text_encoder is not None and architecture is not None and not large_text_encoders(architecture):
        raise SettingsError(
            f"The {architecture.name} pipeline has only small CLIP text encoders; leave --quantize-text-encoder out."
        )


def _check_offload(options: MemoryOptions, source: SourceFacts) -> None:
    if options.offload == "sequential":
        base = (
            f"GGUF {source.gguf}"
            if source.gguf is not None
            else "bitsandbytes NF4"
            if "nf4" in (options.quantize, options.quantize_text_encoder) or source.prequantized == "bitsandbytes"
            else "fp8 storage"
            if options.quantize == "fp8"
            else None
        )
        if base is not None:
            hint = "--offload group" if source.gguf is not None else "--offload model"
            raise SettingsError(
                f"--offload sequential rebuilds each weight as it moves, which {base} weights do not survive "
                f"(diffusers issues #10800, #14691); use {hint}."
            )
    if options.offload == "group" and (
        "nf4" in (options.quantize, options.quantize_text_encoder) or source.prequantized == "bitsandbytes"
    ):
        raise SettingsError(
            "--offload group moves each weight's data alone, not bitsandbytes' quantization state that goes with it; "
            "use --offload model with NF4."
        )


def _check_device(options: MemoryOptions, source: SourceFacts, device: torch.device) -> None:
    if device.type != "cuda":
        if "nf4" in (options.quantize, options.quantize_text_encoder) or source.prequantized == "bitsandbytes":
            raise SettingsError(
                f"bitsandbytes NF4 loads only onto a GPU (diffusers refuses without one); on {device.type} use --quantize "
                "int8 or fp8."
            )
        if options.offload != "none":
            raise SettingsError(
                f"--offload {options.offload} keeps the weights in CPU memory and moves them to a GPU when used; on "
                f"{device.type} there is nothing to offload. Leave --offload out (or pass --device cuda on a machine "
                "with a GPU)."
            )


# -- applying them ------------------------------------------------------------------------------------


def _int8_config(library: str):
    from torchao.quantization import Int8WeightOnlyConfig

    if library == "diffusers":
        from diffusers import TorchAoConfig
    else:
        from transformers import TorchAoConfig
    return TorchAoConfig(Int8WeightOnlyConfig())


def _nf4_config(library: str, dtype: torch.dtype):
    if library == "diffusers":
        from diffusers import BitsAndBytesConfig
    else:
        from transformers import BitsAndBytesConfig
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype)


def quantization_configs(options: MemoryOptions, architecture, dtype: torch.dtype, denoiser: bool = True) -> dict:
    """Component name → the quantization config it loads with (diffusers' for the denoiser,
    transformers' for text encoders); fp8 is applied after loading instead. `denoiser=False`:
    the text encoders' only (the denoiser comes from a file)."""
    configs = {}
    if denoiser and options.quantize in ("nf4", "int8"):
        make = _nf4_config if options.quantize == "nf4" else lambda library, _: _int8_config(library)
        configs[architecture.denoiser_name] = make("diffusers", dtype)
    if options.quantize_text_encoder is not None:
        for name in large_text_encoders(architecture):
            if options.quantize_text_encoder == "nf4":
                configs[name] = _nf4_config("transformers", dtype)
            else:
                configs[name] = _int8_config("transformers")
    return configs


def pipeline_quantization(configs: dict):
    """`from_pretrained`'s `quantization_config` for `configs` (None when empty)."""
    if not configs:
        return None
    from diffusers import PipelineQuantizationConfig

    return PipelineQuantizationConfig(quant_mapping=configs)


def quantize_in_memory(pipeline, options: MemoryOptions, architecture) -> None:
    """int8 on a model built in memory (the built-ins): what `TorchAoConfig` does while loading."""
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    targets = [architecture.denoiser_name] if options.quantize == "int8" else []
    targets += large_text_encoders(architecture) if options.quantize_text_encoder == "int8" else []
    for name in targets:
        quantize_(getattr(pipeline, name), Int8WeightOnlyConfig())


def store_in_fp8(denoiser: torch.nn.Module, compute_dtype: torch.dtype) -> None:
    """The denoiser's weights stored in float8 and cast to `compute_dtype` layer by layer as each
    runs (diffusers' layerwise casting; norms and embeddings stay as they are).

    LoRAs load later, one run at a time: each cast layer also says its compute dtype
    (`compute_dtype`, read by PEFT as for bitsandbytes layers), so that the LoRA layers PEFT adds
    to it are made in the compute dtype, never rounded to float8.
    """
    import torch

    denoiser.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=compute_dtype)
    for module in denoiser.modules():
        weight = getattr(module, "weight", None)
        if isinstance(weight, torch.Tensor) and weight.dtype == torch.float8_e4m3fn:
            module.compute_dtype = compute_dtype


def offload(pipeline, options: MemoryOptions, device: torch.device) -> None:
    """`options.offload` onto `device` (not "none")."""
    import torch

    if options.offload == "model":
        pipeline.enable_model_cpu_offload(device=device)
    elif options.offload == "sequential":
        pipeline.enable_sequential_cpu_offload(device=device)
    else:
        # torchao's int8 tensors cannot be pinned for streamed transfers (diffusers #13281, #14433).
        streamed = device.type == "cuda" and options.quantize != "int8"
        pipeline.enable_group_offload(
            onload_device=device, offload_device=torch.device("cpu"), offload_type="leaf_level", use_stream=streamed
        )


def _dense(item):
    """`item` with the strides of a fresh tensor of its shape (a copy only where they differ: a
    view with a batch of one counts as contiguous, yet its batch stride is the whole tensor's)."""
    import torch

    if not isinstance(item, torch.Tensor):
        return item
    strides, step = [], 1
    for size in reversed(item.shape):
        strides.append(step)
        step *= size
    return item if item.stride() == tuple(reversed(strides)) else item.clone(memory_format=torch.contiguous_format)


def _dense_outputs(module, inputs, output):
    # Outside the compiled code (see `compile_blocks`): FLUX's single-stream blocks return views of
    # one [text | image] tensor, so each block after the first would see inputs with other strides
    # than the first one did, and be compiled again.
    return tuple(_dense(item) for item in output) if isinstance(output, tuple) else _dense(output)


def compile_blocks(denoiser: torch.nn.Module, **compile_options) -> None:
    """The denoiser's repeated blocks compiled (diffusers' regional compilation), once per block
    class and token count: FreeFuse's masks enter them as buffers overwritten in place
    (`LoraMasker(static=True)`), and each block's outputs get a fresh tensor's strides, so neither the
    steps, the stage-1 → stage-2 switch, the images of a batch nor the block order recompile."""
    import torch

    names = set(getattr(denoiser, "_repeated_blocks", None) or ())
    hook = torch.compiler.disable(_dense_outputs)
    for module in denoiser.modules():
        if type(module).__name__ in names:
            module.register_forward_hook(hook)
    denoiser.compile_repeated_blocks(**{"fullgraph": False, "dynamic": False, **compile_options})
