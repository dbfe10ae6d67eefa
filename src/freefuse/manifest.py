"""What a run used, as a JSON-able dict: versions, model and LoRA hashes, every setting, seeds, timings.

A manifest is enough to replay a run (`freefuse generate --manifest M`). Manifests handed to
FreeFuse are untrusted input: they are size-bounded JSON, only known keys are read, and the
paths in them are checked by the caller (see `cli.py`).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import platform
import sys
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import torch

from . import __version__
from .backends.base import ip_adapter_loaded
from .core import jsontext
from .files import cached_sha256, read_input

FORMAT = "freefuse-manifest/1"
MAX_MANIFEST_BYTES = 4 << 20
PACKAGES = (
    "torch",
    "diffusers",
    "transformers",
    "peft",
    "accelerate",
    "safetensors",
    "scikit-image",
    "numpy",
)
WEIGHT_SUFFIXES = (".safetensors", ".json", ".txt", ".model")
IN_MEMORY_HASH_LIMIT = 200_000_000  # parameters; bigger in-memory models are not hashed


def versions() -> dict[str, str]:
    found = {"python": platform.python_version(), "freefuse": __version__}
    for package in PACKAGES:
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            found[package] = "not installed"
    return found


def device_description(device: torch.device) -> str:
    if device.type == "cuda" and torch.cuda.is_available():
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return str(device)


@dataclass(frozen=True)
class ModelSource:
    """Where a pipeline came from when its components' folders do not say: a single-file
    checkpoint, and the diffusers folder or hub id its configs (and missing parts) came from; and
    how it was loaded when not plainly (`load`: `freefuse.memory.MemoryOptions.to_record()`)."""

    single_file: str | None = None
    base_model: str | None = None
    load: dict | None = None


#: Pipeline components `load_ip_adapter` adds, which belong to the IP-Adapter rather than the model.
IP_ADAPTER_COMPONENTS = ("image_encoder", "feature_extractor")


def model_record(pipeline, denoiser: torch.nn.Module, source: ModelSource | None = None) -> dict:
    """Model id/path, class, and a hash per weight/config file (or of the denoiser's weights when in memory)."""
    record = {"id_or_path": getattr(pipeline, "name_or_path", None) or None, "class": type(pipeline).__name__}
    files: dict[str, str] = {}
    if source is not None and source.single_file is not None:
        # A single-file checkpoint: the file itself, and where its configs came from (if not from it).
        files["checkpoint"] = cached_sha256(Path(source.single_file))
        if source.base_model:
            record["base_model"] = source.base_model
    if source is not None and source.load:
        record["load"] = dict(source.load)
    for name, component in pipeline.components.items():
        if name in IP_ADAPTER_COMPONENTS and ip_adapter_loaded(denoiser):
            continue  # the IP-Adapter's own, recorded with it (`conditions.ip_adapter`), not the model's
        folder = getattr(getattr(component, "config", None), "_name_or_path", None)
        if isinstance(folder, str) and folder and Path(folder).is_dir():
            for file in sorted(Path(folder).iterdir()):
                if file.is_file() and file.suffix in WEIGHT_SUFFIXES:
                    files[f"{name}/{file.name}"] = cached_sha256(file)
    if files:
        record["files"] = files
        return record
    n_params = sum(p.numel() for p in denoiser.parameters())
    if any(p.device.type == "meta" for p in denoiser.parameters()):
        # Sequential CPU offload keeps the weights in accelerate's hooks, not in the model.
        record["base_weights_sha256"] = None
        record["base_weights_note"] = "not hashed: the weights are offloaded (sequential CPU offload)"
        return record
    if n_params <= IN_MEMORY_HASH_LIMIT:
        record["base_weights_sha256"] = base_weights_sha256(denoiser)
    return record


def base_weights_sha256(denoiser: torch.nn.Module) -> str:
    """A hash of the denoiser's own weights, whatever LoRA adapters are loaded into it (PEFT moves a
    layer's weight to `<layer>.base_layer.weight` and adds `lora_A`/`lora_B`: both left out)."""
    digest = hashlib.sha256()
    ip_adapter = ip_adapter_loaded(denoiser)
    own = {
        key.replace(".base_layer.", "."): tensor
        for key, tensor in denoiser.state_dict().items()
        if ".lora_" not in key
        and ".lora_magnitude_vector" not in key
        and not (ip_adapter and (".processor." in key or key.startswith("encoder_hid_proj.")))
    }
    for key, tensor in sorted(own.items()):
        digest.update(key.encode())
        tensor = tensor.detach()
        if type(tensor) not in (torch.Tensor, torch.nn.Parameter) and hasattr(tensor, "dequantize"):
            tensor = tensor.dequantize()  # torchao's quantized tensors have no bytes of their own to read
        digest.update(tensor.float().cpu().numpy().tobytes())
    return digest.hexdigest()


def controlnet_record(net: torch.nn.Module, source: str | None = None) -> dict:
    """A ControlNet's record: where it came from, its class, and a hash per file of its folder (or
    of its weights when it was built in memory)."""
    record: dict = {"id_or_path": source, "class": type(net).__name__}
    folder = getattr(getattr(net, "config", None), "_name_or_path", None)
    if isinstance(folder, str) and folder and Path(folder).is_dir():
        record["files"] = {
            file.name: cached_sha256(file)
            for file in sorted(Path(folder).iterdir())
            if file.is_file() and file.suffix in WEIGHT_SUFFIXES
        }
    elif sum(p.numel() for p in net.parameters()) <= IN_MEMORY_HASH_LIMIT:
        record["weights_sha256"] = base_weights_sha256(net)
    return record


def model_differences(recorded: dict, current: dict) -> list[str]:
    """What differs between a manifest's model record and the model loaded now: each file whose
    hash changed or is missing, and the in-memory weights' hash; empty when they agree."""
    found = []
    for name, digest in (recorded.get("files") or {}).items():
        now = (current.get("files") or {}).get(name)
        if now != digest:
            found.append(f"{name} ({'missing' if now is None else 'changed'})")
    expected = recorded.get("base_weights_sha256")
    if isinstance(expected, str) and current.get("base_weights_sha256") not in (None, expected):
        found.append("the denoiser's weights (changed)")
    return found


def build_manifest(
    freefuse,
    settings,
    *,
    positions,
    mask_sets,
    fallbacks,
    notes,
    timings,
    masks_source,
    seeds,
    conditions=None,
    controlnets=(),
) -> dict:
    """The record of one run. `seeds`: per image, or None when the noise came from the caller.
    `conditions`: the run's (`freefuse.conditions.Conditions`, strength resolved), recorded with the
    path and hash of every image and each ControlNet's files, or None."""
    pipeline, backend = freefuse.pipeline, freefuse.backend
    images = []
    for index, prompt in enumerate(settings.image_prompts):
        subjects = {}
        for name, tokens in positions[index].items():
            subjects[name] = {"tokens": list(tokens)}
        masks = mask_sets[index] if index < len(mask_sets) else None
        if masks is not None:
            for name, mask in zip(masks.names, masks.masks, strict=True):
                subjects.setdefault(name, {})["mask_area"] = round(float(mask.mean()), 6)
        images.append(
            {
                "index": index,
                "prompt": prompt,
                "seed": None if seeds is None else seeds[index],
                "subjects": subjects,
                "fallbacks": list(fallbacks[index]),
            }
        )
    if masks_source is None or isinstance(masks_source, str | Path):
        masks_record = None if masks_source is None else str(masks_source)
    else:
        masks_record = "in-memory"
    record = {
        "format": FORMAT,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "versions": versions(),
        "command": list(sys.argv),
        "device": device_description(backend.device),
        "dtype": str(backend.denoiser.dtype).removeprefix("torch."),
        "backend": backend.name,
        "model": model_record(pipeline, backend.denoiser, freefuse.source),
        "loras": [subject.to_dict() for subject in freefuse.subjects.values()],
        "settings": settings.to_dict(),
        "masks": masks_record,
        "images": images,
        "notes": list(notes),
        "timings": {
            k: (round(v, 4) if isinstance(v, float) else [round(x, 4) for x in v]) for k, v in timings.items()
        },
    }
    if conditions is not None and not conditions.empty:
        record["conditions"] = conditions.record()
        if controlnets:
            sources = list(conditions.controlnets)
            record["conditions"]["controlnets"] = [
                controlnet_record(net, sources[i] if i < len(sources) else None) for i, net in enumerate(controlnets)
            ]
    return record


def read_manifest(path: str | Path) -> dict:
    """Load a manifest file (bounded size, JSON only, known format)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Manifest {path} does not exist.")
    if path.stat().st_size > MAX_MANIFEST_BYTES:
        raise ValueError(
            f"Manifest {path} is larger than {MAX_MANIFEST_BYTES >> 20} MiB; refusing to read it."
        )
    try:
        manifest = jsontext.loads(read_input(path, "Manifest").decode("utf-8"))
    except jsontext.NestingError as error:
        raise ValueError(f"Manifest {path} is {error}; a manifest nests a few levels.") from None
    except ValueError as error:  # not UTF-8, not JSON
        raise ValueError(f"Manifest {path} is not valid JSON: {error}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ValueError(f"{path} is not a FreeFuse manifest (expected format {FORMAT!r}).")
    for key, kind in (("settings", dict), ("loras", list), ("model", dict)):
        if not isinstance(manifest.get(key), kind):
            raise ValueError(f"Manifest {path} has no valid `{key}`.")
    return manifest
