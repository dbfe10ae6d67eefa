"""Loading base models: a local diffusers folder, a Hugging Face id (cache or download), or the tiny demo model.

Which architecture a model is comes from its `model_index.json` (`_class_name`), matched against
the registered backends; nothing here knows a particular architecture.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .backends import BACKENDS, Architecture, architectures, backend_for
from .core import jsontext
from .errors import ModelLoadError, SettingsError
from .files import MODEL_FILE_SUFFIXES, is_hub_id, read_input
from .lora import read_header
from .manifest import ModelSource
from .memory import (
    MemoryOptions,
    SourceFacts,
    check_memory_options,
    compile_blocks,
    component_classes,
    gguf_quant_type,
    gguf_tensor_types,
    offload,
    offload_name,
    pipeline_quantization,
    quantization_configs,
    quantize_in_memory,
    store_in_fp8,
)
from .shapesworld.model import LORA_DIR as SHAPESWORLD_LORAS
from .shapesworld.model import MODEL_DIR as SHAPESWORLD_DIR
from .shapesworld.model import load_shapesworld
from .tiny import TINY_PIPELINES

TINY = "tiny"
TINY_SDXL = "tiny-sdxl"
# The built-in random models, by name: the backend whose tiny pipeline each one is.
TINY_ZIMAGE = "tiny-zimage"
TINY_FLUX2 = "tiny-flux2"
TINY_MODELS = {TINY: "flux", TINY_SDXL: "sdxl", TINY_ZIMAGE: "zimage", TINY_FLUX2: "flux2"}
# The ShapesWorld model committed with FreeFuse (a FLUX.1-architecture pipeline).
SHAPESWORLD = "shapesworld"
BUILT_IN = (*TINY_MODELS, SHAPESWORLD)


def fitting_loras(model: str) -> str:
    """Where LoRAs that fit a built-in model come from ("" for other models): what to say when a
    LoRA for another model is given to one."""
    if model in TINY_MODELS:
        return (
            f" LoRAs that fit the built-in {model!r}: `freefuse demo --model {model} --out DIR` writes two random "
            "ones to DIR/demo-loras/ and prints a `freefuse generate` line that uses them."
        )
    if model == SHAPESWORLD:
        return (
            f" ShapesWorld's own LoRAs (zorblax, quiffle, blorp, snerk) are in {SHAPESWORLD_LORAS}; "
            "`freefuse demo --out DIR` copies two to DIR/demo-loras/ and prints a `freefuse generate` line that uses them."
        )
    return ""


#: The device types FreeFuse runs on (each when this machine and this PyTorch have it).
DEVICE_TYPES = ("cpu", "cuda", "mps", "xpu")


def pick_device(device: str | None = None) -> torch.device:
    """The device a run uses: `device` when it is one this machine can run on (else a
    `SettingsError` saying why, before anything loads), or the best available."""
    if device:
        try:
            chosen = torch.device(device)
        except (RuntimeError, ValueError) as error:
            reason = str(error).split("(")[0].strip() or type(error).__name__
            raise SettingsError(
                f"--device {device}: not a device name ({reason}); use {_usable_devices()}."
            ) from None
        problem = _device_problem(chosen)
        if problem:
            raise SettingsError(f"--device {device}: {problem}; use {_usable_devices()}.")
        return chosen
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def _device_count(kind: str) -> int:
    """How many devices of `kind` (cuda, mps, xpu) this machine and this PyTorch can use."""
    if kind == "cuda":
        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    if kind == "mps":
        mps = getattr(torch.backends, "mps", None)
        return 1 if mps is not None and mps.is_available() else 0
    module = getattr(torch, kind, None)
    try:
        return module.device_count() if module is not None and module.is_available() else 0
    except (AttributeError, RuntimeError):
        return 0


def _device_problem(device: torch.device) -> str | None:
    """Why a run cannot use `device` here, or None."""
    if device.type == "cpu":
        return None
    if device.type not in DEVICE_TYPES:
        return f"FreeFuse runs on {', '.join(DEVICE_TYPES)}, not on {device.type!r} devices"
    count = _device_count(device.type)
    names = {"cuda": "CUDA", "mps": "Apple's MPS", "xpu": "Intel's XPU"}
    if count == 0:
        return f"{names[device.type]} is not available here (no such device, or this PyTorch was built without it)"
    if device.index is not None and device.index >= count:
        return f"this machine has {count} {names[device.type]} device(s), {device.type}:0 to {device.type}:{count - 1}"
    return None


def _usable_devices() -> str:
    usable = ["cpu"] + [
        f"{kind}" + (f" or {kind}:0 to {kind}:{count - 1}" if count > 1 else "")
        for kind in DEVICE_TYPES[1:]
        if (count := _device_count(kind))
    ]
    return " or ".join(usable)


def pick_dtype(dtype: str | None, device: torch.device) -> torch.dtype:
    names = {
        "float32": torch.float32,
        "fp32": torch.float32,
        "bfloat16": torch.bfloat16,
        "bf16": torch.bfloat16,
        "float16": torch.float16,
        "fp16": torch.float16,
    }
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in names:
        raise ValueError(f"Unknown dtype {dtype!r}; use one of {sorted(names)}.")
    return names[dtype]


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")


def cached_model(architecture: str | None = None) -> str | None:
    """The id of a model a backend knows (of `architecture` only, when given) whose files are in
    the local Hugging Face cache, if any."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    for facts in architectures().values():
        if architecture is not None and facts.name != architecture:
            continue
        for repo in facts.known_model_ids:
            found = try_to_load_from_cache(repo, "model_index.json")
            if isinstance(found, str) and Path(found).is_file():
                return repo
    return None


def _model_index(model: str) -> dict | None:
    """`model_index.json` of a local folder or of a cached hub model, without loading anything."""
    path = Path(model).expanduser() / "model_index.json"
    if not path.is_file() and is_hub_id(model):
        try:
            from huggingface_hub import try_to_load_from_cache
        except ImportError:
            return None
        found = try_to_load_from_cache(model, "model_index.json")
        path = Path(found) if isinstance(found, str) else path
    if not path.is_file():
        return None
    try:
        index = jsontext.loads(path.read_bytes())
    except (OSError, ValueError):  # check_model_source says what is wrong with it
        return None
    return index if isinstance(index, dict) else None


# Single-file checkpoints are safetensors files, under the suffix diffusers reads as safetensors
# (any other it would hand to torch.load, which unpickles), or GGUF files (quantized transformers).
SINGLE_FILE_SUFFIXES = (".safetensors", ".gguf")


def is_single_file(model: str) -> bool:
    """A single-file checkpoint (`.safetensors`, `.gguf`), as civitai-style downloads store models."""
    path = Path(model).expanduser()
    return path.is_file() and path.suffix in SINGLE_FILE_SUFFIXES


def is_gguf(model: str) -> bool:
    return is_single_file(model) and Path(model).suffix == ".gguf"


def single_file_keys(path: str | Path) -> list[str]:
    """The tensor names of a single-file checkpoint, from its header (no weights read)."""
    if Path(path).suffix == ".gguf":
        return list(gguf_tensor_types(Path(path).expanduser()))
    try:
        return [key for key in read_header(Path(path).expanduser()) if key != "__metadata__"]
    except (OSError, ValueError) as error:
        raise ModelLoadError(f"{path} is not a readable safetensors file: {error}") from None


def single_file_architecture(path: str | Path, keys: list[str] | None = None) -> type[Architecture]:
    """The architecture whose original layout a checkpoint's tensor names are in (header only, no
    weights; `keys`: the names when the caller has read them already)."""
    keys = single_file_keys(path) if keys is None else keys
    for facts in architectures().values():
        if facts.single_file_matches(keys):
            return facts
    raise ModelLoadError(
        f"{path} is a single-file checkpoint of no architecture FreeFuse runs (first tensor {keys[0] if keys else None!r}); "
        f"it reads SDXL checkpoints (conditioner.embedders…, model.diffusion_model.input_blocks…), FLUX.1 and "
        "FLUX.2 [klein] transformers (double_blocks…; FLUX.2 with single_stream_modulation…) and Z-Image "
        "transformers (layers…, noise_refiner…)."
    )


def base_model_for(model: str, base: str | None) -> str | None:
    """Where a single-file checkpoint's configs (and any component it lacks) come from: `base`, or
    the architecture's choice for the file (a hub id; None: diffusers tells the model type from the
    file). None for other model sources."""
    if not is_single_file(model):
        return None
    if base is not None:
        return base
    keys = single_file_keys(model)
    return single_file_architecture(model, keys).default_single_file_base(keys)


def architecture_of(model: str) -> type[Architecture] | None:
    """The architecture of a model source, from its `model_index.json` (or a single file's tensor
    names); None when it cannot be told before loading (a hub id not in the cache)."""
    known = architectures()
    if is_single_file(model):
        return single_file_architecture(model)
    if model in TINY_MODELS:
        return known[TINY_MODELS[model]]
    if model == SHAPESWORLD:
        return known["flux"]
    index = _model_index(model)
    if index is None:
        return next((facts for facts in known.values() if model in facts.known_model_ids), None)
    class_name = index.get("_class_name")
    for facts in known.values():
        if class_name in facts.pipeline_classes:
            return facts
    supported = sorted(name for facts in known.values() for name in facts.pipeline_classes)
    raise ModelLoadError(f"{model} is a {class_name}; FreeFuse runs {supported}.")


#: Names that are files, not Hugging Face repositories (weights, configs, pickles).
def check_model_source(model: str) -> None:
    """Checks that need no weights: a local folder must be a complete diffusers pipeline folder."""
    if model in BUILT_IN or is_hub_id(model):
        return
    path = Path(model).expanduser()
    if not path.exists():
        kind = "file" if path.suffix.lower() in MODEL_FILE_SUFFIXES else "folder"
        raise ModelLoadError(f"Model {kind} {path} does not exist.")
    if path.is_file():
        if path.suffix == ".sft":
            raise ModelLoadError(
                f"{path} is a safetensors file under ComfyUI's short suffix; rename it to "
                f"{path.with_suffix('.safetensors').name} (diffusers reads only that suffix as safetensors)."
            )
        if path.suffix not in SINGLE_FILE_SUFFIXES:
            raise ModelLoadError(
                f"{path} is a single file but not .safetensors or .gguf; FreeFuse never unpickles a model file. Use the "
                ".safetensors or .gguf download, a diffusers pipeline folder (with model_index.json) or a Hugging Face id."
            )
        single_file_architecture(path)
        return
    index = path / "model_index.json"
    if not index.is_file():
        raise ModelLoadError(f"Model folder {path} is incomplete: model_index.json is missing.")
    try:
        components = jsontext.loads(read_input(index, "Model index"))
    except ValueError as error:  # not UTF-8, not JSON, nested too deeply
        raise ModelLoadError(f"{index} is not valid JSON ({error}).") from None
    if not isinstance(components, dict):
        raise ModelLoadError(f"{index} is not a JSON object; the model folder is damaged.")
    for name, value in components.items():
        if name.startswith("_") or not isinstance(value, list) or value[0] is None:
            continue
        folder = path / name
        if not folder.is_dir():
            raise ModelLoadError(f"Model folder {path} is incomplete: the `{name}` folder is missing.")
        if (folder / "config.json").is_file() and not any(folder.glob("*.safetensors")):
            pickled = sorted(p.name for p in folder.glob("*.bin")) + sorted(
                p.name for p in folder.glob("*.pt")
            )
            hint = (
                f" It has {pickled[0]}, a pickle file, which FreeFuse does not load; convert it to safetensors."
                if pickled
                else ""
            )
            raise ModelLoadError(
                f"Model folder {path} is incomplete: `{name}/` has no weights (*.safetensors, e.g. "
                f"{name}/diffusion_pytorch_model.safetensors or {name}/model.safetensors).{hint}"
            )
        method = quantized_method(folder)
        if method is not None and method not in PREQUANTIZED:
            raise ModelLoadError(
                f"`{name}/` of {path} is quantized with {method}, which FreeFuse does not run; use the unquantized model "
                "with --quantize nf4|int8|fp8, or a GGUF file of it."
            )
    architecture_of(model)  # a pipeline class no backend runs is refused here


# Already quantized model folders FreeFuse runs (`quant_method` of their configs).
PREQUANTIZED = ("bitsandbytes",)


def quantized_method(folder: Path) -> str | None:
    """The `quant_method` of a model folder's component (`<component>/config.json`), or None."""
    config = folder / "config.json"
    if not config.is_file():
        return None
    try:
        quantization = jsontext.loads(config.read_bytes()).get("quantization_config")
    except (OSError, ValueError, AttributeError):
        return None
    if not quantization:
        return None
    return str(quantization.get("quant_method", "unknown")) if isinstance(quantization, dict) else "unknown"


def source_facts(model: str) -> SourceFacts:
    """What the memory options' rules need of a model source (its files' headers, no weights)."""
    if model in BUILT_IN:
        return SourceFacts(built_in=True)
    if is_gguf(model):
        return SourceFacts(gguf=gguf_quant_type(gguf_tensor_types(Path(model).expanduser())))
    local = Path(model).expanduser()
    if local.is_dir():
        methods = [quantized_method(folder) for folder in sorted(local.iterdir()) if folder.is_dir()]
        return SourceFacts(prequantized=next((method for method in methods if method), None))
    return SourceFacts()


def pixels_per_token(model: str, base: str | None = None) -> int | None:
    """Image pixels per token for a model source, from its configs (None when not known before loading)."""
    architecture = architecture_of(model)
    if architecture is None:
        return None
    local = Path(model).expanduser()
    if is_single_file(model):
        config = base_model_for(model, base)
        folder = Path(config).expanduser() if config else None
        return architecture.pixels_per_token(folder if folder is not None and folder.is_dir() else None)
    if model == SHAPESWORLD:
        local = SHAPESWORLD_DIR
    return architecture.pixels_per_token(local if model not in TINY_MODELS and local.is_dir() else None)


def load_pipeline(
    model: str,
    device: str | None = None,
    dtype: str | None = None,
    offload: bool | str = False,
    base: str | None = None,
    memory: MemoryOptions | None = None,
):
    """A diffusers pipeline on `device` (auto: cuda, mps, cpu); "tiny" builds the in-memory demo model.

    A single-file checkpoint loads through diffusers' `from_single_file`, its configs (and any
    component the file lacks, e.g. the text encoders of a FLUX transformer-only file) from `base`:
    a diffusers folder or hub id, by default the architecture's reference model. A GGUF file is
    such a transformer-only file, quantized. `memory`: quantization, offload and compile
    (`freefuse.memory`); without it, `offload` (True or an `--offload` name) alone.
    """
    chosen = pick_device(device)
    torch_dtype = pick_dtype(dtype, chosen)
    options = memory if memory is not None else MemoryOptions(offload=offload_name(offload))
    architecture = architecture_of(model) if model in BUILT_IN or Path(model).expanduser().exists() else None
    check_memory_options(options, architecture, source_facts(model), chosen)  # before any weights load
    if model in TINY_MODELS or model == SHAPESWORLD:
        # Built on the CPU in float32 and moved, so the tiny model's weights are the same on every
        # device; then the same dtype and offload as a real model.
        pipeline = load_shapesworld() if model == SHAPESWORLD else TINY_PIPELINES[TINY_MODELS[model]](seed=0)
        pipeline.register_to_config(_name_or_path=model)
        pipeline.to(dtype=torch_dtype)
        if options.quantize == "int8" or options.quantize_text_encoder == "int8":
            quantize_in_memory(pipeline, options, architecture)
        return _place(pipeline, chosen, torch_dtype, options)
    check_model_source(model)
    if is_single_file(model):
        return _place(_load_single_file(model, base, torch_dtype, options), chosen, torch_dtype, options)
    from diffusers import DiffusionPipeline

    local = Path(model).expanduser()
    configs = quantization_configs(options, architecture, torch_dtype) if architecture is not None else {}
    try:
        pipeline = DiffusionPipeline.from_pretrained(
            str(local) if local.exists() else model,
            torch_dtype=torch_dtype,
            local_files_only=offline(),
            use_safetensors=True,  # never fall back to unpickling .bin files
            **({"quantization_config": pipeline_quantization(configs)} if configs else {}),
        )
    except (OSError, ValueError) as error:
        raise ModelLoadError(load_failure(model, error)) from None
    return _place(pipeline, chosen, torch_dtype, options)


def _root_cause(error: BaseException) -> BaseException:
    """The innermost exception `error` was raised from (a network error under diffusers' own)."""
    seen = {id(error)}
    while (inner := error.__cause__ or error.__context__) is not None and id(inner) not in seen:
        seen.add(id(inner))
        error = inner
    return error


def load_failure(model: str, error: BaseException) -> str:
    """Our own words for a model that did not load: what is missing, the real cause (not diffusers'
    "root cause in the stacktrace above", which no one is shown), and what to do."""
    root = _root_cause(error)
    cause = f"{type(root).__name__}: {str(root).strip().splitlines()[0] if str(root).strip() else 'no message'}"
    if not is_hub_id(model):
        return f"Could not load model {model!r}: {cause}."
    cached = _model_index(model) is not None
    where = "partly in" if cached else "not in"
    try:
        from huggingface_hub.constants import HF_HUB_CACHE as cache
    except ImportError:
        cache = "the Hugging Face cache"
    missing = f"Model {model!r} is {where} the local Hugging Face cache ({cache})"
    if offline():
        fix = f"downloading is off (HF_HUB_OFFLINE=1): download it where there is a network (`hf download {model}`)"
    elif root is error:
        fix = f"it could not be fetched: {cause}. Check the id, your network, and `hf auth login` for gated models"
    else:
        fix = (
            f"it could not be fetched from the Hub ({cause}). Check the id and your network; gated models (FLUX.1-dev) "
            "also need `hf auth login` and the licence accepted on the model's page"
        )
    return f"{missing}, and {fix}. Or pass a local diffusers folder (no folder named {model!r} exists here)."


def model_source(model: str, base: str | None = None, memory: MemoryOptions | None = None) -> ModelSource | None:
    """What the manifest records of a single-file checkpoint (the file, and where its configs came
    from, as `load_pipeline` resolves it) and of how the model was loaded (`memory`, when not the
    default), so that a replay loads the same; None when there is nothing of either."""
    load = memory.to_record() if memory is not None and not memory.is_default else None
    if not is_single_file(model):
        return ModelSource(load=load) if load else None
    config = base_model_for(model, base)
    if config is not None and Path(config).expanduser().is_dir():
        config = str(Path(config).expanduser().resolve())
    return ModelSource(single_file=str(Path(model).expanduser()), base_model=config, load=load)


def _load_single_file(model: str, base: str | None, torch_dtype: torch.dtype, options: MemoryOptions):
    if base is not None and not Path(base).expanduser().is_dir() and not is_hub_id(base):
        raise ModelLoadError(f"--base-model {base} is neither a diffusers folder nor a Hugging Face id.")
    path = Path(model).expanduser()
    keys = single_file_keys(path)  # the header once: architecture, default base, and the loader's checks
    architecture = single_file_architecture(path, keys)
    config = base if base is not None else architecture.default_single_file_base(keys)
    local = config is not None and Path(config).expanduser().is_dir()
    if local:
        config = str(Path(config).expanduser().resolve())
    try:
        if path.suffix == ".gguf" or quantization_configs(options, architecture, torch_dtype):
            pipeline = _load_denoiser_file(path, architecture, config, torch_dtype, options, offline() or local)
        else:
            pipeline = BACKENDS[architecture.name].load_single_file(
                path, keys, config, torch_dtype=torch_dtype, local_files_only=offline() or local
            )
    except Exception as error:
        text = str(error).strip().splitlines()[0] if str(error).strip() else ""
        source = f"configs from {config}" if config else "the model type diffusers read from the file"
        raise ModelLoadError(
            f"Could not load single-file checkpoint {model} with {source}: {type(error).__name__} {text}. Pass "
            "--base-model with a diffusers folder (or Hugging Face id) of the same model family: its configs, and "
            "the parts the file lacks, are read from there."
        ) from None
    pipeline.register_to_config(_name_or_path=str(path))
    return pipeline


def _load_denoiser_file(
    path: Path, architecture, config: str | None, torch_dtype: torch.dtype, options: MemoryOptions, local_only: bool
):
    """A denoiser-only file quantized while it loads (a GGUF file, or `--quantize nf4|int8`), the
    rest of the pipeline from `config` (text encoders quantized there when asked)."""
    import diffusers

    if path.suffix == ".gguf":
        quantization = diffusers.GGUFQuantizationConfig(compute_dtype=torch_dtype)
    else:
        quantization = quantization_configs(options, architecture, torch_dtype)[architecture.denoiser_name]
    name = architecture.denoiser_name
    denoiser = component_classes(architecture)[name].from_single_file(
        str(path),
        config=config,
        subfolder=name,
        torch_dtype=torch_dtype,
        quantization_config=quantization,
        local_files_only=local_only,
    )
    text = pipeline_quantization(quantization_configs(options, architecture, torch_dtype, denoiser=False))
    return getattr(diffusers, architecture.pipeline_classes[0]).from_pretrained(
        config,
        **{name: denoiser},
        torch_dtype=torch_dtype,
        use_safetensors=True,
        local_files_only=local_only,
        **({"quantization_config": text} if text is not None else {}),
    )


def _place(pipeline, device: torch.device, dtype: torch.dtype, options: MemoryOptions):
    """Eval mode, fp8 storage, then on the device or offloaded, then compiled blocks."""
    for component in pipeline.components.values():
        if isinstance(component, torch.nn.Module):
            component.eval()
    denoiser = backend_for(pipeline).denoiser
    if options.quantize == "fp8":
        store_in_fp8(denoiser, dtype)
    if options.offload != "none":
        offload(pipeline, options, device)
    else:
        pipeline.to(device)
    if options.compile:
        compile_blocks(denoiser)
    return pipeline
