"""What a run used, as a JSON-able dict: versions, model and LoRA hashes, every setting, seeds, timings.

A manifest is enough to replay a run (`freefuse generate --manifest M`). Manifests handed to
FreeFuse are untrusted input: they are size-bounded JSON, only known keys are read, and the
paths in them are checked by the caller (see `cli.py`).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import platform
import sys
from importlib import metadata
from pathlib import Path

import torch

from . import __version__
from .files import sha256_file, write_json

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


def _cache_path() -> Path:
    root = os.environ.get("FREEFUSE_CACHE") or Path.home() / ".cache" / "freefuse"
    return Path(root) / "hashes.json"


def cached_sha256(path: Path) -> str:
    """SHA-256 of a file, remembered by (size, mtime) so that big model files are read once."""
    path = path.resolve()
    stat = path.stat()
    cache_file = _cache_path()
    try:
        cache = json.loads(cache_file.read_text()) if cache_file.is_file() else {}
    except (OSError, json.JSONDecodeError):
        cache = {}
    entry = cache.get(str(path))
    if (
        isinstance(entry, dict)
        and entry.get("size") == stat.st_size
        and entry.get("mtime_ns") == stat.st_mtime_ns
    ):
        return str(entry["sha256"])
    digest = sha256_file(path)
    cache[str(path)] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": digest}
    with contextlib.suppress(OSError):  # a read-only home only costs re-hashing next time
        write_json(cache_file, cache)
    return digest


def model_record(pipeline, denoiser: torch.nn.Module) -> dict:
    """Model id/path, class, and a hash per weight/config file (or of the denoiser's weights when in memory)."""
    record = {"id_or_path": getattr(pipeline, "name_or_path", None) or None, "class": type(pipeline).__name__}
    files: dict[str, str] = {}
    single_file = getattr(pipeline, "freefuse_single_file", None)
    if single_file is not None:
        # A single-file checkpoint: the file itself, and where its configs came from (if not from it).
        files["checkpoint"] = cached_sha256(Path(single_file))
        if getattr(pipeline, "freefuse_base_model", None):
            record["base_model"] = pipeline.freefuse_base_model
    for name, component in pipeline.components.items():
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
        record["denoiser_weights_sha256"] = None
        record["denoiser_weights_note"] = "not hashed: the weights are offloaded (sequential CPU offload)"
        return record
    if n_params <= IN_MEMORY_HASH_LIMIT:
        import hashlib

        digest = hashlib.sha256()
        for key, tensor in sorted(denoiser.state_dict().items()):
            digest.update(key.encode())
            digest.update(tensor.detach().float().cpu().numpy().tobytes())
        record["denoiser_weights_sha256"] = digest.hexdigest()
    return record


def build_manifest(
    freefuse, settings, *, positions, mask_sets, fallbacks, notes, timings, masks_source, seeds
) -> dict:
    """The record of one run. `seeds`: per image, or None when the noise came from the caller."""
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
    return {
        "format": FORMAT,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "versions": versions(),
        "command": list(sys.argv),
        "device": device_description(backend.device),
        "dtype": str(backend.denoiser.dtype).removeprefix("torch."),
        "backend": backend.name,
        "model": model_record(pipeline, backend.denoiser),
        "loras": [subject.to_dict() for subject in freefuse.subjects.values()],
        "settings": settings.to_dict(),
        "masks": masks_record,
        "images": images,
        "notes": list(notes),
        "timings": {
            k: (round(v, 4) if isinstance(v, float) else [round(x, 4) for x in v]) for k, v in timings.items()
        },
    }


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
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"Manifest {path} is not valid JSON: {error}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ValueError(f"{path} is not a FreeFuse manifest (expected format {FORMAT!r}).")
    for key, kind in (("settings", dict), ("loras", list), ("model", dict)):
        if not isinstance(manifest.get(key), kind):
            raise ValueError(f"Manifest {path} has no valid `{key}`.")
    return manifest


# -- replay ----------------------------------------------------------------------------------------------


def _inside(path: Path, folder: Path) -> bool:
    path, folder = path.resolve(), folder.resolve()
    return path == folder or folder in path.parents


def relative_to(path: str | Path, folder: Path) -> str:
    """`path` as seen from `folder` (what a manifest in `folder` records, so a folder moved whole replays)."""
    return os.path.relpath(Path(path).expanduser().resolve(), folder.resolve())


def _resolve_recorded(
    entry: dict, key: str, manifest_dir: Path, here: Path, what: str, manifest_path, flag: str
) -> str:
    """A file a manifest names: from the manifest's folder first (`<key>_from_manifest`), then as
    recorded (relative to the working folder). Untrusted: it must lie inside one of the two."""
    from .settings import SettingsError

    recorded = entry.get(key)
    candidates = []
    relative = entry.get(f"{key}_from_manifest")
    if isinstance(relative, str):
        candidates.append(manifest_dir / relative)
    if isinstance(recorded, str):
        candidates.append(Path(recorded) if Path(recorded).is_absolute() else here / recorded)
    for candidate in candidates:
        if candidate.exists():
            if not (_inside(candidate, manifest_dir) or _inside(candidate, here)):
                raise SettingsError(
                    f"Manifest {what} {str(candidate.resolve())!r} is outside both the manifest's folder and the working "
                    f"directory; for safety it is only used when given on the command line ({flag})."
                )
            return str(candidate)
    looked = ", ".join(str(c) for c in candidates) or "nowhere: no path recorded"
    raise SettingsError(
        f"Manifest {manifest_path} names a {what} that does not exist (looked at {looked}); pass it with {flag}."
    )


def replay_spec(
    manifest_path: str | Path,
    model: str | None = None,
    loras: list | None = None,
    settings: dict | None = None,
    masks: str | None = None,
    here: Path | None = None,
    base_model: str | None = None,
):
    """The run a manifest describes, with what the caller gives instead.

    What is given wins over the manifest: `model`, `base_model`, `loras` (all of them), `masks`, and each
    setting in `settings` (field names); the returned spec's `notes` say which ones changed.
    Files a manifest names are looked up from the manifest's own folder first, then from the
    working folder; manifests are untrusted, so those files must lie inside one of the two, or be
    given by the caller.
    """
    from .models import BUILT_IN, is_hub_id
    from .settings import GenerationSettings, SettingsError
    from .spec import LoraSpec, RunSpec

    manifest = read_manifest(manifest_path)
    manifest_dir = Path(manifest_path).resolve().parent
    here = Path.cwd() if here is None else here
    recorded = dict(manifest["settings"])
    overrides = dict(settings or {})
    notes = []
    if overrides:
        changed = ", ".join(
            f"{key} {recorded.get(key)!r} -> {value!r}" for key, value in sorted(overrides.items())
        )
        notes.append(f"replaying {manifest_path} with settings given on the command line: {changed}.")
    if "size" in overrides:
        recorded.pop("width", None)
        recorded.pop("height", None)
    if "num_inference_steps" in overrides and "mask_step" not in overrides:
        recorded.pop("mask_step", None)  # the default scales with the new step count
        notes.append(
            "the mask step follows the new step count (the paper's 6 of 28, scaled); pass --mask-step to fix it."
        )
    if isinstance(overrides.get("mask_config"), dict) and isinstance(recorded.get("mask_config"), dict):
        overrides["mask_config"] = {**recorded["mask_config"], **overrides["mask_config"]}
    run_settings = GenerationSettings.from_dict({**recorded, **overrides})
    if not loras:
        loras = []
        for index, entry in enumerate(manifest["loras"]):
            if not isinstance(entry, dict):
                raise SettingsError(
                    f"Manifest {manifest_path} has a malformed LoRA entry; pass the LoRAs with --lora."
                )
            path = _resolve_recorded(
                entry, "path", manifest_dir, here, "LoRA", manifest_path, "--lora PATH=WORD"
            )
            known = {key: entry.get(key) for key in ("words", "weight", "scope", "name", "sha256")}
            loras.append(LoraSpec.parse({**known, "path": path}, f"{manifest_path} LoRA {index + 1}"))
    else:
        notes.append(
            f"replaying {manifest_path} with the LoRAs given on the command line instead of its own."
        )
    if model is None:
        record = manifest["model"]
        model = record.get("id_or_path")
        if base_model is None and isinstance(record.get("base_model"), str):
            base_model = record["base_model"]
        if not isinstance(model, str) or not model:
            raise SettingsError(f"Manifest {manifest_path} records no model path; pass --model.")
        if model not in BUILT_IN and not is_hub_id(model):
            model = _resolve_recorded(
                {"path": model, "path_from_manifest": record.get("path_from_manifest")},
                "path",
                manifest_dir,
                here,
                "model folder",
                manifest_path,
                "--model",
            )
    if masks is None and isinstance(manifest.get("masks"), str) and manifest["masks"] != "in-memory":
        masks = _resolve_recorded(
            {"path": manifest["masks"], "path_from_manifest": manifest.get("masks_from_manifest")},
            "path",
            manifest_dir,
            here,
            "mask file",
            manifest_path,
            "--masks",
        )
    if base_model is not None and not Path(base_model).is_dir() and not is_hub_id(base_model):
        raise SettingsError(
            f"Manifest {manifest_path} loaded its checkpoint with configs from {base_model}, which is not here; "
            "pass --model and --base-model."
        )
    return RunSpec(
        model=model, loras=list(loras), settings=run_settings, masks=masks, notes=notes, base_model=base_model
    )
