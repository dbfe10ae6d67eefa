"""Read a ShapesWorld picture back into objects: shape, colour, texture, position. Deterministic.

Background: the median of the border. Objects: connected regions far from it. Colour: the nearest
palette colour to the bright pixels. Shape: the best-overlapping silhouette drawn in the region's
box. Texture: where and how the darker pattern pixels repeat.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from .scenes import COLOURS, SHAPES, SIZE, TEXTURE_DARKEN, shape_mask_for

FOREGROUND_DISTANCE = 55.0  # RGB distance from the background that counts as object
MIN_AREA = 30  # pixels; smaller blobs are noise
MAX_COLOUR_DISTANCE = 110.0  # farther from every palette colour: "unknown"


@dataclass(frozen=True)
class DetectedObject:
    shape: str
    colour: str
    texture: str
    x: float
    y: float
    area: int
    bbox: tuple[int, int, int, int]  # top, left, bottom, right (exclusive)
    shape_score: float
    mask: np.ndarray  # [H, W] bool

    def attributes(self) -> tuple[str, str, str]:
        return self.shape, self.colour, self.texture


def _texture(dark: np.ndarray, mask: np.ndarray) -> str:
    """Classify the darker pattern pixels `dark` inside `mask`."""
    core = ndimage.binary_erosion(mask, iterations=1)
    if core.sum() < 20:
        core = mask
    dark = dark & core
    fraction = dark.sum() / max(core.sum(), 1)
    if fraction < 0.06:
        return "plain"
    rows = np.flatnonzero(core.sum(axis=1) >= 3)
    cols = np.flatnonzero(core.sum(axis=0) >= 3)
    row_spread = np.array([dark[r][core[r]].mean() for r in rows]).std() if len(rows) else 0.0
    col_spread = np.array([dark[:, c][core[:, c]].mean() for c in cols]).std() if len(cols) else 0.0
    if row_spread > 0.25 and row_spread > 1.8 * col_spread:
        return "stripes"
    if fraction < 0.3:
        return "dots"
    return "checker"


def _shape(mask: np.ndarray) -> tuple[str, float]:
    """The silhouette that overlaps `mask` best (IoU), fitted over sizes and small shifts."""
    ys, xs = np.nonzero(mask)
    top, bottom, left, right = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    cy, cx = (top + bottom) / 2, (left + right) / 2
    extent = max(bottom - top, right - left)
    best, best_score = "unknown", 0.0
    for shape in SHAPES:
        for size in extent * np.array([0.95, 1.05, 1.15, 1.25]):
            for dy in (-1.0, 0.0, 1.0):
                for dx in (-1.0, 0.0, 1.0):
                    template = shape_mask_for(shape, cx + dx, cy + dy, size, canvas=mask.shape[0])
                    union = (template | mask).sum()
                    score = (template & mask).sum() / union if union else 0.0
                    if score > best_score:
                        best, best_score = shape, float(score)
    return best, best_score


def _pixel_labels(pixels: np.ndarray, background: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per pixel: index into COLOURS (or -1 for background/unknown), and whether it is the dark shade."""
    names = list(COLOURS)
    full = np.array([COLOURS[name] for name in names], dtype=np.float32)
    entries = np.concatenate([full, full * TEXTURE_DARKEN, background[None]])  # [2C + 1, 3]
    distance = np.linalg.norm(pixels[:, :, None, :] - entries[None, None], axis=3)
    nearest = distance.argmin(axis=2)
    n = len(names)
    colour = np.where(nearest < 2 * n, nearest % n, -1)
    colour = np.where(distance.min(axis=2) <= MAX_COLOUR_DISTANCE, colour, -1)
    far_from_background = np.linalg.norm(pixels - background, axis=2) > FOREGROUND_DISTANCE * 0.5
    colour = np.where(far_from_background, colour, -1)
    return colour, (nearest >= n) & (nearest < 2 * n)


def detect(image: np.ndarray) -> list[DetectedObject]:
    """Objects in an `[H, W, 3]` uint8 (or float in [0, 1]) ShapesWorld picture, largest first."""
    pixels = np.asarray(image, dtype=np.float32)
    if pixels.max() <= 1.0:
        pixels = pixels * 255.0
    if pixels.shape[:2] != (SIZE, SIZE):
        from PIL import Image

        resized = Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).resize((SIZE, SIZE), Image.BILINEAR)
        pixels = np.asarray(resized, dtype=np.float32)
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    background = np.median(border, axis=0)
    colour_index, dark = _pixel_labels(pixels, background)
    names = list(COLOURS)
    objects = []
    for index, name in enumerate(names):
        present = ndimage.binary_opening(colour_index == index, iterations=1)
        if present.sum() < MIN_AREA:
            continue
        labels, count = ndimage.label(present, structure=np.ones((3, 3)))
        for component in range(1, count + 1):
            region = labels == component
            area = int(region.sum())
            if area < MIN_AREA:
                continue
            filled = ndimage.binary_closing(region, iterations=1) | region
            shape, score = _shape(filled)
            ys, xs = np.nonzero(region)
            objects.append(
                DetectedObject(
                    shape=shape,
                    colour=name,
                    texture=_texture(dark, region),
                    x=float(xs.mean()),
                    y=float(ys.mean()),
                    area=area,
                    bbox=(int(ys.min()), int(xs.min()), int(ys.max()) + 1, int(xs.max()) + 1),
                    shape_score=score,
                    mask=region,
                )
            )
    return sorted(objects, key=lambda obj: -obj.area)
