"""Where each subject is in an image, for the subject metrics: boxes from FreeFuse's masks or a detector.

The rule is the same for every method, so that no method is scored on easier crops:

- `masks` (the default where FreeFuse is among the methods): the boxes of FreeFuse's own masks of
  that pair, prompt and seed crop every method's image of that seed. Every method starts from the
  same noise, and FreeFuse's first steps are plain joint inference, so the subjects stand in much
  the same places. A sample whose FreeFuse masks leave a subject without a region falls back to
  the detector for every method of that sample.
- `detector`: one detector, run on every image of every method; it does not say which box is
  which subject, so each metric takes the assignment that scores best (the same rule for all).

Detectors: `halves` (no model: the left and the right half, the layout the user-masks method
gives) and `owlv2` (zero-shot "a person" boxes, transformers' OWLv2; weights on first use). When
a detector finds fewer people than subjects, that image falls back to `halves` (recorded).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from itertools import permutations

import numpy as np
import torch
from PIL import Image
from scipy import ndimage

from ..errors import SettingsError

Box = tuple[int, int, int, int]  # left, top, right, bottom (pixels, right and bottom exclusive)


def mask_boxes(masks: torch.Tensor, size: tuple[int, int]) -> list[Box | None]:
    """The box of each mask's largest connected region (`masks`: `[L, H, W]` in [0, 1]) at image
    `size` (W, H); None for an empty mask. Stray superpixels far from the subject do not widen it."""
    width, height = size
    if tuple(masks.shape[1:]) != (height, width):
        masks = torch.nn.functional.interpolate(masks[None].float(), size=(height, width), mode="nearest-exact")[0]
    boxes: list[Box | None] = []
    for mask in (masks >= 0.5).numpy():
        labels, count = ndimage.label(mask)
        if count == 0:
            boxes.append(None)
            continue
        largest = 1 + int(np.argmax(ndimage.sum_labels(mask, labels, index=range(1, count + 1))))
        rows, columns = np.nonzero(labels == largest)
        boxes.append((int(columns.min()), int(rows.min()), int(columns.max()) + 1, int(rows.max()) + 1))
    return boxes


def crop(image: Image.Image, box: Box, margin: float = 0.05) -> Image.Image:
    """`image` inside `box`, widened by `margin` of its size on each side (kept inside the image)."""
    left, top, right, bottom = box
    pad_x, pad_y = round((right - left) * margin), round((bottom - top) * margin)
    return image.crop(
        (max(0, left - pad_x), max(0, top - pad_y), min(image.width, right + pad_x), min(image.height, bottom + pad_y))
    )


def best_assignment(scores: list[list[float]]) -> tuple[list[int], list[float]]:
    """`scores[s][b]`: subject s against box b. The boxes, one per subject and each used once, that
    give the highest total; returns the box of each subject and its score."""
    subjects, boxes = len(scores), len(scores[0]) if scores else 0
    if boxes < subjects:
        raise ValueError(f"{boxes} boxes for {subjects} subjects")
    best = max(permutations(range(boxes), subjects), key=lambda chosen: sum(scores[s][b] for s, b in enumerate(chosen)))
    return list(best), [scores[s][b] for s, b in enumerate(best)]


class Detector(ABC):
    """Finds up to `count` people in an image."""

    name: str = ""

    @abstractmethod
    def detect(self, image: Image.Image, count: int) -> list[Box]: ...

    def describe(self) -> str:
        return self.name


class Halves(Detector):
    """No model: `count` vertical strips, left to right (the user-masks method's layout)."""

    name = "halves"

    def detect(self, image: Image.Image, count: int) -> list[Box]:
        edges = [round(index * image.width / count) for index in range(count + 1)]
        return [(edges[i], 0, edges[i + 1], image.height) for i in range(count)]

    def describe(self) -> str:
        return "halves (no model: left and right half of the image)"


class Owlv2(Detector):
    """Zero-shot person boxes (transformers' OWLv2), the `count` most confident that do not overlap much."""

    name = "owlv2"
    default_model = "google/owlv2-base-patch16-ensemble"

    def __init__(self, model_id: str | None = None, device: str = "cpu", query: str = "a photo of a person",
                 threshold: float = 0.1) -> None:  # fmt: skip
        self.model_id = model_id or self.default_model
        self.device, self.query, self.threshold = device, query, threshold
        self.model = self.processor = None

    def load(self) -> None:
        if self.model is None:
            from transformers import Owlv2ForObjectDetection, Owlv2Processor

            try:
                self.processor = Owlv2Processor.from_pretrained(self.model_id)
                self.model = Owlv2ForObjectDetection.from_pretrained(self.model_id).to(self.device).eval()
            except OSError as error:
                raise SettingsError(
                    f"detector owlv2: its weights {self.model_id} could not be loaded ({error}); transformers fetches "
                    "them on first use (network once, or the Hugging Face cache). --detector halves needs none."
                ) from None

    @torch.no_grad()
    def detect(self, image: Image.Image, count: int) -> list[Box]:
        self.load()
        image = image.convert("RGB")
        inputs = self.processor(text=[[self.query]], images=image, return_tensors="pt").to(self.device)
        outputs = self.model(**inputs)
        side = max(image.size)  # OWLv2 pads to a square: boxes come back in the padded square's pixels
        [found] = self.processor.post_process_grounded_object_detection(
            outputs, threshold=self.threshold, target_sizes=torch.tensor([[side, side]])
        )
        order = torch.argsort(found["scores"], descending=True)
        kept: list[Box] = []
        for box in found["boxes"][order].tolist():
            clipped = (max(0, round(box[0])), max(0, round(box[1])), min(image.width, round(box[2])), min(image.height, round(box[3])))
            if clipped[2] > clipped[0] and clipped[3] > clipped[1] and all(_iou(clipped, other) < 0.5 for other in kept):
                kept.append(clipped)
            if len(kept) == count:
                break
        return sorted(kept)

    def describe(self) -> str:
        return f"owlv2 ({self.model_id}, query {self.query!r})"


def _iou(a: Box, b: Box) -> float:
    width = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    height = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = width * height
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


DETECTORS = {"halves": Halves, "owlv2": Owlv2}


def build_detector(name: str, model_id: str | None = None, device: str = "cpu") -> Detector:
    if name not in DETECTORS:
        raise SettingsError(f"Unknown detector {name!r}; use one of {', '.join(DETECTORS)}.")
    return Halves() if name == "halves" else Owlv2(model_id, device)
