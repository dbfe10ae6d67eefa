"""Scoring the evaluation's images, resumably: every (image, metric) score is kept as it is made.

Scores are appended, one JSON line each and fsynced, to this process's cache shard
(`scores.cache.p<rank>.jsonl`). A line's key hashes everything that decides the score: the
image's bytes (its hash from the batch index), the metric's library, version and weights, the
reference images' hashes, the crop boxes and the prompt. A re-run after a kill reads the shards,
skips what is there (a half-written last line is ignored) and scores the rest, so the scores are
the same as an uninterrupted run's. A metric that fails on an image records the failure (retried
by the next run) and the other images and metrics go on; a metric that cannot load at all
(`MetricUnavailable`) is left out of the run and said in the report.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from PIL import Image

from ..batch import append_index
from ..core import MaskSet
from ..files import sha256_file
from .crops import Box, Detector, Halves, best_assignment, crop, mask_boxes
from .metrics import ImageContext, ImageMetric, Metric, MetricUnavailable, SubjectMetric

CACHE_GLOB = "scores.cache.p*.jsonl"
NOT_APPLICABLE_SELF = "n/a: these single-LoRA images are this LoRA's references"
NOT_APPLICABLE_SINGLE = "n/a: a single-LoRA image has one subject and its own prompt"


@dataclass
class ScoreItem:
    """One image to score: what it is, where it is (relative to the output folder) and its hash."""

    id: str
    method: str
    pair: str
    subjects: tuple[str, ...]
    words: tuple[str, ...]
    prompt: str
    template: str
    prompt_index: int
    prompt_source: str
    seed: int
    image: str | None = None
    image_sha256: str | None = None
    manifest: str | None = None
    masks: str | None = None  # this image's own masks (FreeFuse, user masks)
    sample_masks: str | None = None  # FreeFuse's masks of the same pair, prompt and seed (crops)
    error: str | None = None  # why there is no image


@dataclass
class References:
    """Each subject's reference images, and which subjects' references are their single-LoRA images."""

    paths: dict[str, list[Path]]
    self_referenced: set[str] = field(default_factory=set)

    def fingerprint(self, names) -> list:
        return [[sha256_file(path) for path in self.paths.get(name, [])] for name in names]


def _key(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]


def read_cache(out: Path) -> dict[str, dict]:
    """Every cached line by key; a success is never replaced by a later failure. Bad lines are skipped."""
    cache: dict[str, dict] = {}
    for shard in sorted(out.glob(CACHE_GLOB)):
        for line in shard.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                continue  # cut short by a kill
            if not isinstance(entry, dict) or not isinstance(entry.get("key"), str):
                continue
            if "value" in entry or entry["key"] not in cache or "value" not in cache[entry["key"]]:
                cache[entry["key"]] = entry
    return cache


class Scorer:
    """Scores items with the given metrics, keeping every score in this process's cache shard."""

    def __init__(self, out: Path, metrics: list[Metric], references: References, detector: Detector,
                 crops: str = "masks", rank: int = 0, append: Callable[[Path, dict], None] | None = None) -> None:  # fmt: skip
        self.out, self.metrics, self.references, self.detector = out, metrics, references, detector
        self.crops = crops
        self.shard = out / f"scores.cache.p{rank}.jsonl"
        self.append = append or append_index  # one fsynced JSON line, as the batch index is written
        self.cache = read_cache(out)
        self.unavailable: dict[str, str] = {}
        self._images: dict[str, list[Image.Image]] = {}
        self._fingerprints: dict[str, list] = {}

    # -- inputs ---------------------------------------------------------------------------------------
    def reference_images(self, name: str) -> list[Image.Image]:
        if name not in self._images:
            self._images[name] = [Image.open(path).convert("RGB") for path in self.references.paths.get(name, [])]
            if not self._images[name]:
                raise ValueError(f"no reference images for {name}")
        return self._images[name]

    def _reference_fingerprint(self, names) -> list:
        joined = "+".join(names)
        if joined not in self._fingerprints:
            self._fingerprints[joined] = self.references.fingerprint(names)
        return self._fingerprints[joined]

    def boxes(self, item: ScoreItem, image: Image.Image) -> tuple[str, list[Box], bool]:
        """(source, boxes, named): named boxes are in subject order; a detector's are not."""
        if item.method == "single":
            return "whole image", [(0, 0, image.width, image.height)], True
        if self.crops == "masks" and item.sample_masks is not None:
            masks = MaskSet.load(self.out / item.sample_masks)
            found = mask_boxes(masks.masks[[masks.names.index(name) for name in item.subjects]], image.size)
            if all(box is not None for box in found):
                return "FreeFuse masks of this seed", [box for box in found if box is not None], True
        key = _key("boxes", item.image_sha256, self.detector.describe())
        if key not in self.cache:
            self._keep({"key": key, "value": [list(box) for box in self.detector.detect(image, len(item.subjects))]})
        boxes = [tuple(box) for box in self.cache[key]["value"]]
        if len(boxes) < len(item.subjects):
            halves = Halves().detect(image, len(item.subjects))
            return f"halves ({self.detector.name} found {len(boxes)})", halves, False
        return self.detector.describe(), boxes, False

    def _keep(self, entry: dict) -> None:
        self.append(self.shard, entry)
        self.cache[entry["key"]] = entry

    # -- scoring --------------------------------------------------------------------------------------
    def applicable(self, metric: Metric, item: ScoreItem) -> str | None:
        """Why `metric` does not apply to `item` (None: it does)."""
        if item.method != "single":
            return None
        if isinstance(metric, ImageMetric):
            return NOT_APPLICABLE_SINGLE
        return NOT_APPLICABLE_SELF if item.subjects[0] in self.references.self_referenced else None

    def _subject_score(self, metric: SubjectMetric, item: ScoreItem, image, boxes, named) -> tuple[float, dict]:
        crops = [crop(image, box) for box in boxes]
        if named:
            values = [
                metric.similarities([piece], self.reference_images(name), name)[0]
                for piece, name in zip(crops, item.subjects, strict=True)
            ]
            chosen = list(range(len(values)))
        else:
            table = [metric.similarities(crops, self.reference_images(name), name) for name in item.subjects]
            chosen, values = best_assignment(table)
        details = {"subjects": dict(zip(item.subjects, values, strict=True)), "boxes": [list(boxes[b]) for b in chosen]}
        return sum(values) / len(values), details

    def _image_score(self, metric: ImageMetric, item: ScoreItem, image) -> tuple[float, dict]:
        references = [self.reference_images(name) for name in item.subjects]
        context = ImageContext(image, self.out / item.image, item.prompt, item.words, references)
        return metric.score(context)

    def score(self, item: ScoreItem) -> None:
        """Every available metric's score of `item` that is not cached yet."""
        if item.image is None:
            return
        image = Image.open(self.out / item.image).convert("RGB")
        source, boxes, named = self.boxes(item, image)
        for metric in self.metrics:
            if metric.name in self.unavailable or self.applicable(metric, item):
                continue
            key = self.key(metric, item, boxes)
            if "value" in self.cache.get(key, {}):
                continue
            try:
                metric.load()
                if isinstance(metric, SubjectMetric):
                    value, details = self._subject_score(metric, item, image, boxes, named)
                else:
                    value, details = self._image_score(metric, item, image)
                entry = {"key": key, "value": float(value), "details": details, "crops": source}
            except MetricUnavailable as error:
                self.unavailable[metric.name] = str(error)
                continue
            except Exception as error:  # recorded for this image; the others go on
                entry = {"key": key, "error": f"{type(error).__name__}: {error}", "details": getattr(error, "details", {})}
            self._keep(entry)

    def key(self, metric: Metric, item: ScoreItem, boxes: list[Box]) -> str:
        inputs = [item.prompt, list(item.words)] if isinstance(metric, ImageMetric) else [[list(b) for b in boxes]]
        return _key(metric.name, metric.fingerprint(), item.image_sha256, self._reference_fingerprint(item.subjects), inputs)

    # -- records --------------------------------------------------------------------------------------
    def record(self, item: ScoreItem) -> dict:
        """`scores.jsonl`'s line for `item`: what it is, each metric's score (None when it has none),
        failures with their reasons, details (per-subject scores, boxes, the judge's answer)."""
        record = {k: v for k, v in asdict(item).items() if k not in ("error",)}
        record.update({"metrics": {}, "errors": {}, "not_applicable": {}, "details": {}, "crops": None})
        record["subjects"], record["words"] = list(item.subjects), list(item.words)
        if item.image is None:
            record["errors"]["image"] = item.error or "no image"
            return record
        image = Image.open(self.out / item.image)
        source, boxes, _ = self.boxes(item, image)
        record["crops"] = source
        for metric in self.metrics:
            reason = self.unavailable.get(metric.name) or self.applicable(metric, item)
            if reason is not None:
                record["metrics"][metric.name] = None
                if metric.name not in self.unavailable:
                    record["not_applicable"][metric.name] = reason
                continue
            entry = self.cache.get(self.key(metric, item, boxes), {})
            record["metrics"][metric.name] = entry.get("value")
            if "value" not in entry:
                record["errors"][metric.name] = entry.get("error", "not scored")
            if entry.get("details"):
                record["details"][metric.name] = entry["details"]
        return record
