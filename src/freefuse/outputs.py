"""Writing a run's files: the image (settings in PNG text chunks), mask overlay, masks, manifest.

A run's files are written as one unit (`files.write_all`): all to temporary names, then renamed,
each image's manifest after its other files, so a manifest on disk means the rest is there, and a
failure leaves nothing new behind.
"""

from __future__ import annotations

import copy
import io
import json
import re
from pathlib import Path

from .errors import SettingsError
from .files import OutputExistsError, check_output_folder, relative_to, remove_stale_parts, write_all

#: An output name (`--name`): a plain file name in the output folder, never a path or a hidden file.
OUTPUT_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.+-]{0,99}$")


def output_paths(out: Path, stem: str, count: int) -> list[dict[str, Path]]:
    """The files one run writes, per image, named `stem` (checked against `OUTPUT_NAME`)."""
    if not isinstance(stem, str) or not OUTPUT_NAME.match(stem):
        raise SettingsError(
            f"--name {stem!r} cannot name the output files: use 1-100 letters, digits, '_', '-', '+' or '.', not "
            "starting with '.', '-' or '+' (the files go inside --out; pick the folder with --out)."
        )
    result = []
    for index in range(count):
        name = stem if count == 1 else f"{stem}-{index}"
        result.append(
            {
                "image": out / f"{name}.png",
                "overlay": out / f"{name}.masks.png",
                "masks": out / f"{name}.masks.json",
                "manifest": out / f"{name}.json",
            }
        )
    return result


def check_outputs(paths: list[dict[str, Path]], overwrite: bool) -> list[str]:
    """Before any model loads: the folders can be written, and no finished output would be replaced
    without `overwrite`. A run counts as finished when its manifest is there; files of a run that
    was killed before its manifest are leftovers and are replaced (said in the returned notes).
    Temporary files a killed run left beside these outputs are removed."""
    notes = []
    for folder in sorted({files["manifest"].parent for files in paths}):
        check_output_folder(folder)
    for files in paths:
        present = [path for path in files.values() if path.exists()]
        if not present:
            continue
        if files["manifest"].exists() and not overwrite:
            raise OutputExistsError(
                f"{files['manifest']} already exists (a finished run); pass --overwrite (overwrite=True) to replace it."
            )
        if not files["manifest"].exists():
            notes.append(
                f"{', '.join(str(p) for p in present)} are left from a run stopped before its manifest; replacing them."
            )
    for files in paths:
        remove_stale_parts(files["manifest"].parent, files["manifest"].stem)
    return notes


def encode_outputs(
    output,
    paths: list[dict[str, Path]],
    masks_only: bool = False,
    portable: bool = False,
    colours: dict[str, tuple[int, int, int]] | None = None,
) -> list[dict[Path, bytes]]:
    """Per image, every file it writes and its bytes: image (settings in PNG text chunks), mask
    overlay, masks, and the manifest last. `portable`: the manifest records no path outside its
    own folder (see `located`)."""
    from PIL.PngImagePlugin import PngInfo

    manifest = output.manifest
    encoded = []
    for index, files in enumerate(paths):
        image = output.images[index]
        masks = output.masks[index]
        record = copy.deepcopy({**manifest, "images": [manifest["images"][index]]})
        record["outputs"] = {key: path.name for key, path in files.items()}
        located(record, files["manifest"].parent, portable)
        data: dict[Path, bytes] = {}
        if not masks_only:
            info = PngInfo()
            info.add_text(
                "freefuse",
                json.dumps(
                    {
                        "settings": manifest["settings"],
                        # No file paths in a picture people share: names, words, weights, hashes.
                        "loras": [
                            {key: value for key, value in lora.items() if key != "path"}
                            for lora in manifest["loras"]
                        ],
                        "image": manifest["images"][index],
                    },
                    default=str,
                ),
            )
            info.add_text("parameters", a1111_parameters(manifest, index))
            data[files["image"]] = _png(image, info)
        if masks is not None:
            data[files["overlay"]] = _png(masks.overlay(image, colours=colours))
            data.update(masks.encode(files["masks"]))
        else:
            record["outputs"].pop("overlay")
            record["outputs"].pop("masks")
        data[files["manifest"]] = (json.dumps(record, indent=2, default=str) + "\n").encode()
        encoded.append(data)
    return encoded


def _png(image, info=None) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG", pnginfo=info)
    return buffer.getvalue()


def write_outputs(
    output,
    paths: list[dict[str, Path]],
    overwrite: bool,
    masks_only: bool = False,
    portable: bool = False,
    colours: dict[str, tuple[int, int, int]] | None = None,
) -> list[list[Path]]:
    """Write a run's files as one unit (all images; each image's manifest after its other files):
    on any failure (a full disk, a kill) nothing of the run is left. Returns, per image, its files.
    `portable`: the manifests record no path outside their folder (runs handed to other people).
    """
    check_outputs(paths, overwrite)
    encoded = encode_outputs(output, paths, masks_only, portable, colours)
    ordered = {path: data for files in encoded for path, data in files.items() if path.suffix != ".json"}
    ordered.update(
        {path: data for files in encoded for path, data in files.items() if path.suffix == ".json"}
    )
    write_all(ordered, overwrite=True)  # check_outputs decided what may be replaced
    return [list(files) for files in encoded]


def _quoted(text: str) -> str:
    return '"' + text.replace('"', "'") + '"'


# What a Hugging Face id looks like: `owner/name`, and neither part a path's `.` or `..`.
_HUB_ID = re.compile(r"^(?!\.\.?/)[A-Za-z0-9_.-]+/(?!\.\.?$)[A-Za-z0-9_.-]+$")
_MODEL_FILE_SUFFIXES = (".safetensors", ".sft", ".ckpt", ".pt", ".pth", ".bin", ".gguf")


def _shown_model(model: str) -> str:
    """The model as a picture people share may name it: a built-in name or a Hugging Face id as
    it is, a local folder or file (a single-file checkpoint) by its own name, never where it lives."""
    path = Path(model).expanduser()
    looks_like_a_file = model.lower().endswith(_MODEL_FILE_SUFFIXES)
    try:
        local = path.exists()
    except OSError:
        local = False
    if local or looks_like_a_file or ("/" in model or "\\" in model) and not _HUB_ID.match(model):
        return re.split(r"[\\/]", model.rstrip("\\/"))[-1] or model
    return model


def a1111_parameters(manifest: dict, index: int) -> str:
    """The `parameters` text chunk A1111-style PNG-info readers show: the prompt, a negative prompt
    line when there is one, then `Key: value` pairs (steps, seed, size, model, LoRAs, FreeFuse)."""
    settings, image = manifest["settings"], manifest["images"][index]
    model = _shown_model(manifest.get("model", {}).get("id_or_path") or "unknown")
    loras = manifest.get("loras", [])
    pairs = [
        ("Steps", settings["num_inference_steps"]),
        ("Sampler", "Euler (flow match)" if manifest.get("backend") == "flux" else "default"),
        ("CFG scale", settings.get("true_cfg_scale")),
        ("Distilled CFG Scale", settings.get("guidance_scale")),
        ("Seed", image.get("seed") if image.get("seed") is not None else "from the caller's generator"),
        ("Size", f"{settings['width']}x{settings['height']}"),
        ("Model", model),
        (
            "Lora hashes",
            _quoted(", ".join(f"{lora['name']}: {(lora.get('sha256') or '')[:12]}" for lora in loras)),
        ),
        (
            "LoRAs",
            _quoted(
                ", ".join(
                    f"{lora['name']}={'|'.join(lora.get('words') or [])}@{lora['weight']}"
                    + (" (global)" if lora.get("scope") == "global" else "")
                    for lora in loras
                )
            ),
        ),
        (
            "FreeFuse",
            _quoted(
                f"method {settings['method']}, mask step {settings['mask_step']}, version "
                f"{manifest.get('versions', {}).get('freefuse', '?')}"
            ),
        ),
    ]
    lines = [image["prompt"]]
    if settings.get("negative_prompt"):
        lines.append(f"Negative prompt: {settings['negative_prompt']}")
    lines.append(", ".join(f"{key}: {value}" for key, value in pairs if value is not None))
    return "\n".join(lines)


def located(record: dict, folder: Path, portable: bool = False) -> None:
    """Add, beside each file path a manifest records, the path as seen from the manifest's folder,
    so that a replay finds the files from anywhere (and a folder moved whole still replays).

    `portable`: record no path outside the manifest's folder at all (a run given to someone else,
    e.g. downloaded from the web page): paths inside it become relative, others keep their name
    only, and the command line is left out. Such a manifest replays from its folder alone.
    """
    for lora in record.get("loras", []):
        _locate(lora, "path", "path_from_manifest", folder, portable)
    model = record.get("model", {})
    if isinstance(model.get("id_or_path"), str) and Path(model["id_or_path"]).expanduser().is_dir():
        _locate(model, "id_or_path", "path_from_manifest", folder, portable)
    if isinstance(model.get("base_model"), str) and Path(model["base_model"]).expanduser().is_dir():
        _locate(model, "base_model", "base_model_from_manifest", folder, portable)
    _locate(record, "masks", "masks_from_manifest", folder, portable)
    conditions = record.get("conditions") or {}
    images = [conditions.get("init_image"), conditions.get("inpaint_mask")]
    images += [control.get("image") for control in conditions.get("controls", []) if isinstance(control, dict)]
    for kind, keys in (("ip_adapter", ("model", "image_encoder")), ("redux", ("model",))):
        reference = conditions.get(kind)
        if isinstance(reference, dict):
            images.append(reference.get("image"))
            for key in keys:  # files and folders here; hub ids stay as they are
                _locate(reference, key, f"{key}_from_manifest", folder, portable)
    for image in images:
        if isinstance(image, dict):
            _locate(image, "path", "path_from_manifest", folder, portable)
    for net in conditions.get("controlnets", []):
        if isinstance(net, dict) and isinstance(net.get("id_or_path"), str) and Path(net["id_or_path"]).expanduser().is_dir():
            _locate(net, "id_or_path", "path_from_manifest", folder, portable)
    if portable:
        record["command"] = []


def _locate(entry: dict, key: str, relative_key: str, folder: Path, portable: bool) -> None:
    """`entry[relative_key]`: `entry[key]` (an existing file or folder) as seen from `folder`."""
    path = entry.get(key)
    if not isinstance(path, str) or not Path(path).expanduser().exists():
        return
    resolved, folder = Path(path).expanduser().resolve(), folder.resolve()
    entry[relative_key] = relative_to(resolved, folder)
    if portable:
        inside = resolved.is_relative_to(folder)
        entry[key] = entry[relative_key] if inside else resolved.name
        if not inside:
            del entry[relative_key]  # "../../…" would tell where the server keeps it
