"""A set of named subject masks: resize, save/load (PNGs + JSON, or one .safetensors), overlay."""

from __future__ import annotations

import io
import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

from . import jsontext, storage

# Distinct, colour-blind-friendly subject colours (Okabe-Ito), then a fallback hue walk.
PALETTE = [
    (230, 159, 0),
    (86, 180, 233),
    (0, 158, 115),
    (240, 228, 66),
    (0, 114, 178),
    (213, 94, 0),
    (204, 121, 167),
]
MAX_SUBJECTS_IN_FILE = 256
MAX_NAME_CHARS = 100
MAX_MASK_PIXELS = 8192 * 8192
_SAFE_NAME = re.compile(r"[^A-Za-z0-9_.-]+")


def subject_colour(index: int) -> tuple[int, int, int]:
    if index < len(PALETTE):
        return PALETTE[index]
    hue = (index * 0.618034) % 1.0
    rgb = Image.new("HSV", (1, 1), (int(hue * 255), 200, 230)).convert("RGB").getpixel((0, 0))
    return tuple(rgb)


@dataclass
class MaskSet:
    """L named masks over an image.

    Attributes:
        names: L subject names (unique).
        masks: `[L, H, W]` float in [0, 1] (binary masks are 0/1).
    """

    names: list[str]
    masks: torch.Tensor

    def __post_init__(self) -> None:
        self.names = [str(name) for name in self.names]
        if self.masks.ndim != 3:
            raise ValueError(f"`masks` must have shape [subjects, H, W], got {tuple(self.masks.shape)}.")
        if len(self.names) != self.masks.shape[0]:
            raise ValueError(
                f"{len(self.names)} names for {self.masks.shape[0]} masks; pass one name per mask."
            )
        if len(set(self.names)) != len(self.names):
            raise ValueError(f"Subject names must be unique, got {self.names}.")
        self.masks = self.masks.detach().float().cpu()
        if not torch.isfinite(self.masks).all() or self.masks.min() < 0 or self.masks.max() > 1:
            raise ValueError("Mask values must be finite and within [0, 1].")

    @property
    def size(self) -> tuple[int, int]:
        """`(H, W)`."""
        return int(self.masks.shape[1]), int(self.masks.shape[2])

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.masks[self.names.index(name)]

    def resize(self, size: tuple[int, int], mode: str = "area") -> MaskSet:
        """Resample to `size` `(H, W)`: "area" averages (for shrinking onto a token grid), "nearest" copies."""
        if tuple(size) == self.size:
            return MaskSet(list(self.names), self.masks.clone())
        if mode == "area":
            resized = F.interpolate(self.masks[None], size=tuple(size), mode="area")[0]
        elif mode == "nearest":
            resized = F.interpolate(self.masks[None], size=tuple(size), mode="nearest-exact")[0]
        else:
            raise ValueError(f"Unknown resize mode {mode!r}; use 'area' or 'nearest'.")
        return MaskSet(list(self.names), resized.clamp(0, 1))

    def to_token_grid(self, grid: tuple[int, int]) -> torch.Tensor:
        """`[L, h, w]` area-averaged masks for stage 2."""
        return self.resize(grid, mode="area").masks

    # -- files -------------------------------------------------------------------------------

    def encode(self, path: str | Path) -> dict[Path, bytes]:
        """The files `save` writes and their bytes, the index (or the .safetensors file) last."""
        from safetensors.torch import save as save_safetensors

        path = Path(path)
        if path.suffix == ".safetensors":
            data = save_safetensors(
                {"masks": self.masks.contiguous()}, metadata={"names": json.dumps(self.names)}
            )
            return {path: data}
        if path.suffix != ".json":
            raise ValueError(
                f"Save masks to a `.json` (with PNGs) or `.safetensors` path, got {path.name!r}."
            )
        encoded: dict[Path, bytes] = {}
        for index, (name, mask) in enumerate(zip(self.names, self.masks, strict=True)):
            buffer = io.BytesIO()
            Image.fromarray((mask.numpy() * 255).round().astype(np.uint8), "L").save(buffer, "PNG")
            encoded[path.parent / f"{path.stem}.{index}-{_SAFE_NAME.sub('_', name)}.png"] = buffer.getvalue()
        index_json = {
            "format": "freefuse-masks/1",
            "names": self.names,
            "files": [file.name for file in encoded],
            "size": list(self.size),
        }
        encoded[path] = (json.dumps(index_json, indent=2) + "\n").encode()
        return encoded

    def save(self, path: str | Path, overwrite: bool = True) -> list[Path]:
        """Save as one `.safetensors` file, or as `<stem>.json` plus one 8-bit PNG per subject beside
        it, all or nothing. Returns every file written (the index or .safetensors file last)."""
        encoded = self.encode(path)
        if not overwrite:
            taken = [str(file) for file in encoded if file.exists()]
            if taken:
                raise FileExistsError(f"{taken[0]} already exists; pass overwrite=True to replace it.")
        return storage.write_all(encoded)

    @classmethod
    def load(cls, path: str | Path) -> MaskSet:
        """Load what `save` wrote. Untrusted input: every way a file can be wrong is a ValueError
        naming it (PNG paths in the JSON must stay inside its folder; sizes are bounded)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"Mask file {path} does not exist (or is not a regular file).")
        if path.suffix == ".safetensors":
            from safetensors import SafetensorError, safe_open

            try:
                with safe_open(str(path), framework="pt") as handle:
                    names = jsontext.loads((handle.metadata() or {}).get("names", "null") or "null")
                    if "masks" not in handle.keys():  # noqa: SIM118 (not a mapping)
                        raise ValueError(f"{path} holds no `masks` tensor; it was not written by FreeFuse.")
                    masks = handle.get_tensor("masks")
            except (SafetensorError, OSError, ValueError) as error:
                raise ValueError(f"{path} is not a readable mask file: {error}") from None
            if not isinstance(names, list):
                raise ValueError(
                    f"{path} has no subject names in its metadata; it was not written by FreeFuse."
                )
            _check_names(names, path)
            if masks.ndim != 3 or masks.shape[1] * masks.shape[2] > MAX_MASK_PIXELS:
                raise ValueError(f"{path}: masks of shape {tuple(masks.shape)}; expected [subjects, H, W].")
            return cls(names, masks)
        if path.suffix != ".json":
            raise ValueError(f"Load masks from a `.json` or `.safetensors` file, got {path.name!r}.")
        if path.stat().st_size > 1 << 20:
            raise ValueError(f"{path} is larger than 1 MiB; a mask index is a short JSON file.")
        try:
            text = path.read_bytes()
        except OSError as error:
            raise ValueError(f"Mask file {path} cannot be read ({error.strerror or error}).") from None
        try:
            index = jsontext.loads(text)
        except jsontext.NestingError as error:
            raise ValueError(f"{path} is {error}; a mask index is a short, flat JSON object.") from None
        except ValueError as error:
            raise ValueError(f"{path} is not valid JSON: {error}") from None
        if not isinstance(index, dict):
            raise ValueError(f"{path} must be a JSON object with `names` and `files`.")
        names, files = index.get("names"), index.get("files")
        if not isinstance(names, list) or not isinstance(files, list) or len(names) != len(files):
            raise ValueError(f"{path} must list `names` and `files` of equal length.")
        if len(names) > MAX_SUBJECTS_IN_FILE:
            raise ValueError(f"{path} lists {len(names)} masks; at most {MAX_SUBJECTS_IN_FILE} are accepted.")
        _check_names(names, path)
        folder = path.parent.resolve()
        masks = []
        for file in files:
            file_path = (folder / str(file)).resolve()
            if folder not in file_path.parents:
                raise ValueError(
                    f"Mask file {file!r} in {path} points outside its folder; refusing to read it."
                )
            masks.append(load_mask_image(file_path))
        sizes = sorted({tuple(mask.shape) for mask in masks})
        if len(sizes) > 1:
            raise ValueError(f"The mask images of {path} have different sizes {sizes}; they must share one.")
        return cls(names, torch.stack(masks) if masks else torch.zeros(0, 1, 1))

    # -- pictures ----------------------------------------------------------------------------

    def overlay(
        self,
        image: Image.Image | None = None,
        alpha: float = 0.55,
        legend: bool = True,
        colours: dict[str, tuple[int, int, int]] | None = None,
    ) -> Image.Image:
        """Subject colours blended over `image` (or over grey); with `legend`, a strip of names below
        the picture (never over it: on a 64-px picture a legend on top hides a third of it).

        `colours`: a colour per subject name (e.g. each subject's own, so that a mask is not read as
        another subject's); the others take the palette's, by position."""
        height, width = self.size
        base = (
            image.convert("RGB").resize((width, height))
            if image is not None
            else Image.new("RGB", (width, height), (96, 96, 96))
        )
        chosen = [(colours or {}).get(name, subject_colour(i)) for i, name in enumerate(self.names)]
        pixels = np.asarray(base).astype(np.float32)
        colour = np.zeros_like(pixels)
        weight = np.zeros(pixels.shape[:2], dtype=np.float32)
        for mask, rgb in zip(self.masks.numpy(), chosen, strict=True):
            colour += mask[..., None] * np.array(rgb, dtype=np.float32)
            weight += mask
        covered = np.clip(weight, 0, 1)[..., None] * alpha
        blended = (
            pixels * (1 - covered)
            + np.where(weight[..., None] > 0, colour / np.maximum(weight, 1e-6)[..., None], 0) * covered
        )
        result = Image.fromarray(blended.clip(0, 255).astype(np.uint8))
        if legend and self.names:
            return below(result, legend_strip(list(zip(self.names, chosen, strict=True)), width))
        return result


LEGEND_LINE = 14


def legend_strip(entries: list[tuple[str, tuple[int, int, int]]], width: int) -> Image.Image:
    """A `width`-wide strip of coloured squares with names, as many to a line as fit."""
    font = ImageFont.load_default()
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    lines: list[list[tuple[str, tuple[int, int, int], int]]] = [[]]
    used = 2
    for name, colour in entries:
        size = 14 + int(measure.textlength(name, font=font)) + 8  # square, gap, name, space
        if lines[-1] and used + size > width:
            lines.append([])
            used = 2
        lines[-1].append((name, colour, used))
        used += size
    strip = Image.new("RGB", (width, 2 + LEGEND_LINE * len(lines)), (24, 24, 24))
    draw = ImageDraw.Draw(strip)
    for row, line in enumerate(lines):
        top = 1 + row * LEGEND_LINE
        for name, colour, left in line:
            draw.rectangle([left, top + 2, left + 9, top + 11], fill=colour)
            draw.text((left + 13, top), name, fill=(255, 255, 255), font=font)
    return strip


def below(picture: Image.Image, strip: Image.Image) -> Image.Image:
    """`picture` with `strip` under it (as wide as the wider of the two)."""
    joined = Image.new("RGB", (max(picture.width, strip.width), picture.height + strip.height), (24, 24, 24))
    joined.paste(picture, (0, 0))
    joined.paste(strip, (0, picture.height))
    return joined


def _check_names(names: list, path: Path) -> None:
    """Subject names read from a file are shown in messages and legends and matched against the
    run's LoRA names: short printable texts, no control characters and no path separators."""
    for name in names:
        if not (
            isinstance(name, str) and 1 <= len(name) <= MAX_NAME_CHARS and name.isprintable() and not set(name) & {"/", "\\"}
        ):
            shown = repr(name)[:80] if isinstance(name, str) else type(name).__name__
            raise ValueError(
                f"{path} names a mask {shown}; subject names are 1-{MAX_NAME_CHARS} printable characters without "
                "'/' or '\\' (a run's masks are named by its LoRAs' adapter names)."
            )


def load_mask_image(path: str | Path) -> torch.Tensor:
    """A grey-level image file as an `[H, W]` float mask in [0, 1] (colour images are averaged).

    Refused with a ValueError: a file that is not an image, a damaged one, or one larger than
    MAX_MASK_PIXELS (a decompression bomb: small on disk, gigabytes in memory).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Mask image {path} does not exist (or is not a regular file).")
    try:
        with Image.open(path) as image:
            width, height = image.size
            if width * height > MAX_MASK_PIXELS:
                raise ValueError(
                    f"Mask image {path.name} is {width}x{height} pixels; masks are at most {MAX_MASK_PIXELS} pixels "
                    "(an image's size)."
                )
            grey = np.asarray(image.convert("L"), dtype=np.float32) / 255.0
    except (OSError, Image.DecompressionBombError, SyntaxError) as error:
        raise ValueError(f"Mask image {path.name} cannot be read: {error}") from None
    return torch.from_numpy(grey)
