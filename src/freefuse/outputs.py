"""Writing a run's files: the image (settings in a PNG text chunk), mask overlay, masks, manifest.

Every file is written atomically; the manifest goes last, so a manifest on disk means the rest is there.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

from .files import atomic_save, write_json


def output_paths(out: Path, stem: str, count: int) -> list[dict[str, Path]]:
    """The files one run writes, per image."""
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


def write_outputs(
    output, paths: list[dict[str, Path]], overwrite: bool, masks_only: bool = False
) -> list[list[Path]]:
    """Image (PNG with the settings in a text chunk), mask overlay, masks, then the manifest.

    Returns, per image, every file written (the manifest last).
    """
    from PIL.PngImagePlugin import PngInfo

    manifest = output.manifest
    written: list[list[Path]] = []
    for index, files in enumerate(paths):
        done: list[Path] = []
        image = output.images[index]
        masks = output.masks[index]
        record = copy.deepcopy({**manifest, "images": [manifest["images"][index]]})
        record["outputs"] = {key: path.name for key, path in files.items()}
        located(record, files["manifest"].parent)
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
            done.append(
                atomic_save(
                    files["image"], lambda f, im=image, i=info: im.save(f, "PNG", pnginfo=i), overwrite
                )
            )
        if masks is not None:
            overlay = masks.overlay(image)
            done.append(atomic_save(files["overlay"], lambda f, im=overlay: im.save(f, "PNG"), overwrite))
            done.extend(masks.save(files["masks"], overwrite=overwrite))
        else:
            record["outputs"].pop("overlay")
            record["outputs"].pop("masks")
        done.append(write_json(files["manifest"], record, overwrite=overwrite))
        written.append(done)
    return written


def _quoted(text: str) -> str:
    return '"' + text.replace('"', "'") + '"'


def a1111_parameters(manifest: dict, index: int) -> str:
    """The `parameters` text chunk A1111-style PNG-info readers show: the prompt, a negative prompt
    line when there is one, then `Key: value` pairs (steps, seed, size, model, LoRAs, FreeFuse)."""
    settings, image = manifest["settings"], manifest["images"][index]
    model = manifest.get("model", {}).get("id_or_path") or "unknown"
    if Path(model).expanduser().is_dir():
        model = Path(model).name  # a local folder: its name, not where it lives
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


def located(record: dict, folder: Path) -> None:
    """Add, beside each file path a manifest records, the path as seen from the manifest's folder,
    so that a replay finds the files from anywhere (and a folder moved whole still replays)."""
    from .manifest import relative_to

    for lora in record.get("loras", []):
        if isinstance(lora.get("path"), str) and Path(lora["path"]).exists():
            lora["path_from_manifest"] = relative_to(lora["path"], folder)
    model = record.get("model", {})
    path = model.get("id_or_path")
    if isinstance(path, str) and Path(path).expanduser().is_dir():
        model["path_from_manifest"] = relative_to(path, folder)
    if isinstance(record.get("masks"), str) and Path(record["masks"]).exists():
        record["masks_from_manifest"] = relative_to(record["masks"], folder)
