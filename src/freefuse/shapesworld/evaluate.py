"""Measuring subject bleeding in ShapesWorld: the world's preconditions first, then the methods.

For every group of subject LoRAs (pairs, triples, the quad) × interaction prompts × seeds, each
method makes an image and the detector reads it back. Per subject of the prompt:

- present: some detected object matches at least 2 of its 3 attributes (shape, colour, texture);
- identity correct: the best-matching object has exactly the subject's identity attributes — in
  v1 its shape, colour and texture; in v3 its appearance (colour and texture; its shape is named
  in the prompt by a class noun, and reported apart as `shape_rate`);
- leakage: the object taken for it carries an identity attribute that belongs to another subject
  of the prompt and not to it (one subject's look on the other).

`masks` is the ground-truth upper bound: the objects detected in the FreeFuse image are assigned to
subjects by their attributes, and their regions (dilated) are given as user masks for the same
seed, from the step after FreeFuse's mask step (as FreeFuse's own masks act; `masks_from`).
`freefuse/<method>` rows run FreeFuse with another stage-1 mask method.

Before any of it means something, the world must meet four preconditions (`PRECONDITIONS`, each
measured and printed with its bar): the base draws (P1), each LoRA draws its subject alone (P2),
a LoRA confined to its subject's region keeps its identity (P3, locality), and the subjects'
words attend to their own objects at the tapped block and step (P4, localization).
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from itertools import combinations
from pathlib import Path
from string import ascii_uppercase

import numpy as np
import torch
from PIL import Image, ImageDraw
from scipy import ndimage

from .. import __version__
from ..core import MaskSet
from ..files import atomic_save, atomic_write, check_free, write_json
from ..pipeline import FreeFuse
from .detect import DetectedObject, detect
from .model import (
    LORA_DIR,
    MAX_TEXT_TOKENS,
    MODEL_DIR,
    V3_LORA_DIR,
    V3_MODEL_DIR,
    load_shapesworld,
    lora_path,
)
from .scenes import SIZE, WORLDS, Subject, World, random_scene

#: The committed weights of each world.
WEIGHT_DIRS = {"v1": (MODEL_DIR, LORA_DIR), "v3": (V3_MODEL_DIR, V3_LORA_DIR)}
#: The bar each precondition must reach: P1 per caption size, P2 per subject, P3 kept share, P4 pairs.
BARS = {"P1_one_object": 0.90, "P1_two_objects": 0.85, "P2": 0.85, "P3": 0.90, "P4": 0.70}

PROMPTS = {
    2: ["a {A} and a {B}", "a {B} next to a {A}", "a {A}, a {B} and a red circle"],
    3: ["a {A}, a {B} and a {C}", "a {C} next to a {A} and a {B}"],
    4: ["a {A}, a {B}, a {C} and a {D}"],
}
METHODS = ("merge", "freefuse", "masks")
#: `freefuse/<mask method>`: FreeFuse with that stage-1 method (`core.config.MAP_METHOD_NAMES`).
VARIANT = "freefuse/"
#: `<method>+bias<scale>`: FreeFuse (or a `freefuse/` variant, or the ground-truth masks) with stage
#: 2's attention bias at that scale (`attention_bias`; its other settings the model's), e.g. freefuse+bias5.
BIAS_VARIANT = "+bias"


def split_bias(method: str) -> tuple[str, dict]:
    """`"freefuse+bias5"` → `("freefuse", {"attention_bias": 5.0})`; a method without it → `(method, {})`.
    Raises ValueError for a scale that is no number >= 0, or a bias on `merge` (it masks nothing)."""
    base, marker, scale = method.partition(BIAS_VARIANT)
    if not marker:
        return method, {}
    try:
        value = float(scale)
    except ValueError:
        raise ValueError(f"{method!r}: the attention bias scale after '{BIAS_VARIANT}' must be a number.") from None
    if not 0 <= value < float("inf") or base == "merge":
        raise ValueError(f"{method!r}: use a scale >= 0 on freefuse, freefuse/<mask method> or masks.")
    return base, {"attention_bias": value}


@dataclass
class EvalConfig:
    #: The ShapesWorld version (`scenes.WORLDS`): its subjects, captions and committed weights.
    world: str = "v1"
    methods: tuple[str, ...] = METHODS
    group_sizes: tuple[int, ...] = (2, 3, 4)
    seeds: tuple[int, ...] = (0, 1, 2, 3)
    steps: int = 20
    prompts_per_group: int | None = None  # None: all templates of the group size
    groups_per_size: int | None = None  # None: every group
    single_seeds: tuple[int, ...] = (0, 1, 2, 3, 4, 5, 6, 7)
    base_samples: int = 32
    grid_rows: int = 8
    #: FreeFuse's stage-1 mask method (`MaskConfig.method`); None: the model's default.
    mask_method: str | None = None
    #: FreeFuse's mask step and tapped block; None: the defaults.
    mask_step: int | None = None
    block: int | None = None
    #: Seeds of the locality check (P3): each LoRA alone, then confined to its object's region.
    locality_seeds: tuple[int, ...] = (0, 1, 2, 3)
    #: When the ground-truth masks act: "mask-step" (after FreeFuse's mask step, as its own do) or
    #: "first-step".
    masks_from: str = "mask-step"

    @property
    def world_spec(self) -> World:
        return WORLDS[self.world]

    @property
    def resolved_mask_step(self) -> int:
        """FreeFuse's mask step in this evaluation (the paper's 6 of 28, scaled, unless set)."""
        return self.mask_step or max(1, round(6 / 28 * self.steps))

    @classmethod
    def quick(cls) -> EvalConfig:
        """A fixed small subset for CI and smoke checks (well under 20 s on a CPU)."""
        return cls(
            group_sizes=(2,),
            seeds=(0, 1),
            prompts_per_group=1,
            groups_per_size=2,
            single_seeds=(0, 1),
            base_samples=4,
            steps=12,
            grid_rows=4,
            locality_seeds=(0,),
        )


# -- scoring ----------------------------------------------------------------------------------------


def identity_attributes(world: World) -> tuple[str, ...]:
    """What a subject's identity is in `world`: its appearance when its shape is named in the prompt
    (v3's class nouns), else shape, colour and texture (v1)."""
    return ("colour", "texture") if any(s.noun for s in world.subject_list) else ("shape", "colour", "texture")


def _matches(subject: Subject, obj: DetectedObject) -> int:
    return (obj.shape == subject.shape) + (obj.colour == subject.colour) + (obj.texture == subject.texture)


def assign(subjects: list[Subject], objects: list[DetectedObject]) -> dict[str, DetectedObject | None]:
    """Each subject's detected object: greedy by attribute matches (then area), each object used once."""
    pairs = sorted(
        ((_matches(s, o), o.area, i, j) for i, s in enumerate(subjects) for j, o in enumerate(objects)),
        reverse=True,
    )
    taken_subjects, taken_objects, result = set(), set(), {s.word: None for s in subjects}
    for score, _, i, j in pairs:
        if score == 0 or i in taken_subjects or j in taken_objects:
            continue
        result[subjects[i].word] = objects[j]
        taken_subjects.add(i)
        taken_objects.add(j)
    return result


def score_image(
    subjects: list[Subject], image: np.ndarray, attributes: tuple[str, ...] = ("shape", "colour", "texture")
) -> dict:
    """Per-subject presence, identity (its `attributes` all right), shape and leakage for one picture."""
    objects = detect(image)
    assigned = assign(subjects, objects)
    per_subject = {}
    for subject in subjects:
        obj = assigned[subject.word]
        others = [s for s in subjects if s.word != subject.word]
        leaked = []
        if obj is not None:
            for attribute in attributes:
                value = getattr(obj, attribute)
                if value != getattr(subject, attribute) and any(getattr(o, attribute) == value for o in others):
                    leaked.append(attribute)
        per_subject[subject.word] = {
            "present": obj is not None and _matches(subject, obj) >= 2,
            "identity": obj is not None and all(getattr(obj, a) == getattr(subject, a) for a in attributes),
            "shape": obj is not None and obj.shape == subject.shape,
            "leaked": leaked,
            "detected": None if obj is None else list(obj.attributes()),
        }
    return {"subjects": per_subject, "objects": [list(o.attributes()) for o in objects]}


def attention_share(attention: dict | None, words: list[str], objects: dict) -> dict[str, float | None]:
    """How much of the stage-1 cross-attention on each subject's detected object is that subject's.

    Per token, a subject's share is its cross-attention map over the sum of all subjects' maps;
    averaged over the object's pixels. Chance is 1 / (number of subjects): above it, the attention
    knows where the subject is.
    """
    if not attention or any(word not in attention for word in words):
        return dict.fromkeys(words)
    maps = torch.stack([attention[word]["cross"].float() for word in words])
    share = maps / maps.sum(dim=0, keepdim=True).clamp_min(1e-12)
    share = torch.nn.functional.interpolate(share[None], size=(SIZE, SIZE), mode="nearest")[0]
    result = {}
    for index, word in enumerate(words):
        obj = objects.get(word)
        result[word] = (
            None if obj is None else float((share[index].numpy() * obj.mask).sum() / max(obj.mask.sum(), 1))
        )
    return result


def coverage(mask: torch.Tensor, obj: DetectedObject | None) -> float | None:
    """Fraction of the detected object's pixels that the subject's mask covers.

    None when there is no object, or when the mask is the whole image (a fallback, not a mask).
    """
    if obj is None or bool((mask >= 1).all()):
        return None
    resized = torch.nn.functional.interpolate(mask[None, None].float(), size=(SIZE, SIZE), mode="area")[0, 0]
    return float((resized.numpy() * obj.mask).sum() / max(obj.mask.sum(), 1))


# -- running ------------------------------------------------------------------------------------------


def _to_uint8(image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.uint8)


class Evaluator:
    """Loads a world's model and its four LoRAs once; switches adapters per prompt."""

    def __init__(
        self,
        model_dir: Path | None = None,
        lora_dir: Path | None = None,
        device: str = "cpu",
        world: str = "v1",
    ) -> None:
        self.world = WORLDS[world]
        default_model, default_loras = WEIGHT_DIRS[world]
        self.pipeline = load_shapesworld(model_dir or default_model)
        self.pipeline.to(device)
        self.freefuse_class = FreeFuse
        loader = FreeFuse(self.pipeline)
        for word in self.world.subjects:
            loader.add_lora(lora_path(word, lora_dir or default_loras), name=word)
        self.subjects = loader.subjects

    def run(
        self,
        words: list[str],
        prompt: str,
        seed: int,
        method: str,
        steps: int,
        masks=None,
        stage1: dict | None = None,
        settings: dict | None = None,
    ):
        """One picture: `words` are the subjects' made-up words; each acts through its trigger."""
        freefuse = self.freefuse_class(self.pipeline)
        for word in words:
            trigger = self.world.subjects[word].trigger
            freefuse.use_adapter(word, words=[trigger], source=self.subjects[word])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return freefuse(
                prompt,
                seed=seed,
                height=SIZE,
                width=SIZE,
                num_inference_steps=steps,
                method=method,
                masks=masks,
                max_sequence_length=MAX_TEXT_TOKENS,
                progress=False,
                **((stage1 or {}) if method == "freefuse" else {}),
                **(settings or {}),
            )


def prompt_for(template: str, subjects: list[Subject]) -> str:
    """A template (`{A}`, `{B}`, ...) with each subject's trigger ("zorblax" or "zorblax star")."""
    for letter, subject in zip(ascii_uppercase, subjects, strict=False):
        template = template.replace("{" + letter + "}", subject.trigger)
    return template


def oracle_masks(subjects: list[Subject], freefuse_image: np.ndarray, freefuse_masks: MaskSet) -> MaskSet:
    """Ground-truth masks: the detected objects of the FreeFuse picture, dilated by 2 px."""
    assigned = assign(subjects, detect(freefuse_image))
    masks = []
    for subject in subjects:
        obj = assigned[subject.word]
        if obj is None:  # nothing to go by: keep FreeFuse's own mask for it
            masks.append(freefuse_masks[subject.word])
        else:
            masks.append(torch.from_numpy(ndimage.binary_dilation(obj.mask, iterations=2).astype(np.float32)))
    stacked = torch.stack(masks)
    # Where dilated regions overlap, keep the pixel with its nearer object only: masks never overlap.
    owner = stacked.argmax(dim=0)
    stacked = stacked * (owner[None] == torch.arange(len(subjects))[:, None, None])
    return MaskSet([s.word for s in subjects], stacked)


def stage1_settings(config: EvalConfig) -> dict:
    """FreeFuse's stage-1 settings where the evaluation sets them (`mask_config`, `mask_step`, `block`)."""
    settings = {key: value for key in ("mask_step", "block") if (value := getattr(config, key)) is not None}
    if config.mask_method:
        settings["mask_config"] = {"method": config.mask_method}
    return settings


class SampleStore:
    """Finished samples on disk, so that an interrupted evaluation resumes where it stopped.

    Each sample is `<folder>/<key>.json` (its record, written last) with one PNG per method and
    FreeFuse's masks beside it; the key hashes what decides the sample (subjects, prompt, seed,
    steps, methods, and `identity`: the model, the LoRA files' hashes, FreeFuse's version), so a
    changed configuration or other weights recompute. Files are written atomically.
    """

    def __init__(self, folder: Path, config: EvalConfig, identity: list | None = None) -> None:
        self.folder = folder
        self.config = config
        self.identity = list(identity or [])

    def key(self, *parts) -> str:
        import hashlib
        import json

        fingerprint = json.dumps(
            [*parts, self.config.steps, list(self.config.methods), self.identity]
            + ([self.config.mask_method] if self.config.mask_method else [])
            + (
                [self.config.mask_step, self.config.block]
                if (self.config.mask_step, self.config.block) != (None, None)
                else []
            ),
            sort_keys=True,
            default=str,
        )
        return hashlib.sha256(fingerprint.encode()).hexdigest()[:16]

    def load(self, key: str) -> dict | None:
        import json

        path = self.folder / f"{key}.json"
        try:
            record = json.loads(path.read_text())
            record["images"] = {
                method: Image.open(self.folder / f"{key}.{method}.png").convert("RGB")
                for method in record["methods"]
            }
            masks = self.folder / f"{key}.masks.safetensors"
            record["masks"] = MaskSet.load(masks) if masks.is_file() else None
        except (OSError, ValueError, KeyError):
            return None  # missing, half-written or from another version: redo it
        return record

    def save(self, key: str, record: dict) -> None:
        import json

        for method, image in record["images"].items():
            atomic_save(self.folder / f"{key}.{method}.png", lambda handle, im=image: im.save(handle, "PNG"))
        if record.get("masks") is not None:
            record["masks"].save(self.folder / f"{key}.masks.safetensors")
        plain = {k: v for k, v in record.items() if k not in ("images", "masks")}
        write_json(self.folder / f"{key}.json", json.loads(json.dumps(plain, default=str)))


def _runs(config: EvalConfig, evaluator: Evaluator, group: list[str], prompt: str, seed: int) -> dict:
    """Every method's output for one sample (FreeFuse once, shared by the ground-truth masks)."""
    subjects = [config.world_spec.subjects[word] for word in group]
    outputs = {}

    def freefuse(method: str = "freefuse", bias: dict | None = None):
        stage1 = stage1_settings(config)
        if method.startswith(VARIANT):
            stage1 = {**stage1, "mask_config": {"method": method.removeprefix(VARIANT)}}
        return evaluator.run(group, prompt, seed, "freefuse", config.steps, stage1=stage1, settings=bias)

    for method in config.methods:
        base, bias = split_bias(method)
        if base == "masks":
            outputs["freefuse"] = outputs.get("freefuse") or freefuse()
            gt = oracle_masks(subjects, _to_uint8(outputs["freefuse"].images[0]), outputs["freefuse"].masks[0])
            late = {"user_masks_from": config.masks_from, "mask_step": config.resolved_mask_step, **bias}
            outputs[method] = evaluator.run(group, prompt, seed, "masks", config.steps, masks=gt, settings=late)
        elif method not in outputs:
            outputs[method] = freefuse(base, bias) if base.startswith("freefuse") else evaluator.run(
                group, prompt, seed, method, config.steps
            )
    return outputs


def _record(config: EvalConfig, group: list[str], prompt: str, seed: int, outputs: dict) -> dict:
    """One sample's scores: every method, FreeFuse's masks' coverage and attention share."""
    subjects = [config.world_spec.subjects[word] for word in group]
    attributes = identity_attributes(config.world_spec)
    record = {"group": list(group), "prompt": prompt, "seed": seed, "methods": {}}
    for method in config.methods:
        record["methods"][method] = score_image(subjects, _to_uint8(outputs[method].images[0]), attributes)
    if "freefuse" in outputs:
        objects = assign(subjects, detect(_to_uint8(outputs["freefuse"].images[0])))
        masks = outputs["freefuse"].masks[0]
        record["mask_coverage"] = {s.word: coverage(masks[s.word], objects[s.word]) for s in subjects}
        record["attention_share"] = attention_share(outputs["freefuse"].attention[0], list(group), objects)
        record["freefuse_fallbacks"] = outputs["freefuse"].manifest["images"][0]["fallbacks"]
    record["images"] = {m: outputs[m].images[0] for m in config.methods}
    record["masks"] = outputs["freefuse"].masks[0] if "freefuse" in outputs else None
    return record


def evaluate(
    config: EvalConfig,
    evaluator: Evaluator,
    on_step: Callable[[int, int], None] | None = None,
    store: SampleStore | None = None,
) -> dict:
    """All groups × prompts × seeds × methods; returns the per-sample records and the summary.

    With `store`, samples already on disk are read back instead of made again, and every new one
    is saved as soon as it is done.
    """
    world = config.world_spec
    plan = []
    for size in config.group_sizes:
        groups = list(combinations(world.subjects, size))[: config.groups_per_size]
        templates = PROMPTS[size][: config.prompts_per_group]
        plan += [(list(g), t, seed) for g in groups for t in templates for seed in config.seeds]
    samples = []
    started = time.perf_counter()
    for index, (group, template, seed) in enumerate(plan):
        prompt = prompt_for(template, [world.subjects[word] for word in group])
        key = store.key(group, prompt, seed) if store is not None else ""
        record = store.load(key) if store is not None else None
        if record is None:
            record = _record(config, group, prompt, seed, _runs(config, evaluator, group, prompt, seed))
            if store is not None:
                store.save(key, record)
        samples.append(record)
        if on_step is not None:
            on_step(index + 1, len(plan))
    summary = summarise(samples, config.methods, hard_pairs(world))
    summary["seconds"] = round(time.perf_counter() - started, 1)
    return {"samples": samples, "summary": summary}


def hard_pairs(world: World) -> list[list[str]]:
    """Pairs of subjects that share a class noun ("a zorblax star", "a snerk star"): the hard case."""
    return [
        [a.word, b.word] for a, b in combinations(world.subject_list, 2) if a.noun is not None and a.noun == b.noun
    ]


def _mean(values) -> float | None:
    values = list(values)
    return round(float(np.mean(values)), 4) if values else None


def rates(records: list[dict], method: str) -> dict:
    """identity_accuracy, shape_rate, both_present and leakage of `method` over `records`."""
    subjects = [s for r in records for s in r["methods"][method]["subjects"].values()]
    images = [r["methods"][method]["subjects"].values() for r in records]
    return {
        "identity_accuracy": _mean(s["identity"] for s in subjects),
        "shape_rate": _mean(s.get("shape", False) for s in subjects),
        "both_present": _mean(all(s["present"] for s in image) for image in images),
        "leakage": _mean(bool(s["leaked"]) for s in subjects),
        "images": len(records),
        "subjects": len(subjects),
    }


def summarise(samples: list[dict], methods, hard: list[list[str]] | None = None) -> dict:
    """Per method, overall, per group size, for the hard pairs apart, and split by whether FreeFuse's
    stage 1 masked every subject; mask coverage and attention share."""
    result: dict = {"methods": {m: rates(samples, m) for m in methods}, "by_group_size": {}}
    for size in sorted({len(r["group"]) for r in samples}):
        chosen = [r for r in samples if len(r["group"]) == size]
        result["by_group_size"][str(size)] = {m: rates(chosen, m) for m in methods}
    hard_samples = [r for r in samples if sorted(r["group"]) in [sorted(p) for p in hard or []]]
    if hard_samples:
        result["hard_pair"] = {m: rates(hard_samples, m) for m in methods}
    result["freefuse_mask_coverage"] = _mean(
        c for r in samples for c in (r.get("mask_coverage") or {}).values() if c is not None
    )
    result["freefuse_fallback_rate"] = _mean(
        bool(r.get("freefuse_fallbacks")) for r in samples if "freefuse_fallbacks" in r
    )
    result["by_freefuse_masks"] = {}
    for label, wanted in (("every subject masked", False), ("a subject fell back", True)):
        chosen = [r for r in samples if "freefuse_fallbacks" in r and bool(r["freefuse_fallbacks"]) == wanted]
        if chosen:
            result["by_freefuse_masks"][label] = {m: rates(chosen, m) for m in methods}
    result["freefuse_attention_share"] = {}
    for size in sorted({len(r["group"]) for r in samples}):
        shares = [
            v for r in samples if len(r["group"]) == size for v in (r.get("attention_share") or {}).values()
            if v is not None
        ]
        result["freefuse_attention_share"][str(size)] = {"own_share": _mean(shares), "chance": round(1.0 / size, 4)}
    return result


def _alone_prompts(subject: Subject) -> list[str]:
    return [subject.phrase, f"{subject.phrase} and a green square"]


def single_lora_rates(evaluator: Evaluator, seeds, steps: int) -> dict:
    """Each LoRA alone (`merge` with one subject): how often its subject is drawn correctly."""
    attributes = identity_attributes(evaluator.world)
    result = {}
    for word, subject in evaluator.world.subjects.items():
        scored = [
            score_image([subject], _to_uint8(evaluator.run([word], prompt, seed, "merge", steps).images[0]), attributes)
            for seed in seeds
            for prompt in _alone_prompts(subject)
        ]
        found = [one["subjects"][word] for one in scored]
        result[word] = {
            "identity_rate": _mean(s["identity"] for s in found),
            "present_rate": _mean(s["present"] for s in found),
            "shape_rate": _mean(s["shape"] for s in found),
            "samples": len(found),
        }
    return result


def locality_rates(evaluator: Evaluator, seeds, steps: int, mask_step: int) -> dict:
    """P3: each LoRA alone, then the same seed with the LoRA confined to its subject's object (as
    detected in the alone picture, dilated), from the step after `mask_step` and from the first
    step. `kept_*`: confined identity over alone identity, pooled over the samples."""
    attributes = identity_attributes(evaluator.world)
    result: dict = {"subjects": {}}
    totals = {"alone": 0, "from_mask_step": 0, "from_first_step": 0}
    for word, subject in evaluator.world.subjects.items():
        counts = dict.fromkeys(totals, 0)
        for seed in seeds:
            for prompt in _alone_prompts(subject):
                alone = evaluator.run([word], prompt, seed, "merge", steps)
                picture = _to_uint8(alone.images[0])
                counts["alone"] += score_image([subject], picture, attributes)["subjects"][word]["identity"]
                obj = assign([subject], detect(picture))[word]
                if obj is None:
                    continue  # nothing to confine it to: counts as lost below (alone identity was 0 too)
                region = torch.from_numpy(ndimage.binary_dilation(obj.mask, iterations=2).astype(np.float32))
                masks = MaskSet([word], region[None])
                for key, start in (("from_mask_step", "mask-step"), ("from_first_step", "first-step")):
                    late = {"user_masks_from": start, "mask_step": mask_step}
                    out = evaluator.run([word], prompt, seed, "masks", steps, masks=masks, settings=late)
                    scored = score_image([subject], _to_uint8(out.images[0]), attributes)
                    counts[key] += scored["subjects"][word]["identity"]
        result["subjects"][word] = counts
        totals = {key: totals[key] + counts[key] for key in totals}
    for key in ("from_mask_step", "from_first_step"):
        result[f"kept_{key}"] = round(totals[key] / totals["alone"], 4) if totals["alone"] else None
    result["samples"] = 2 * len(seeds) * len(evaluator.world.subjects)
    return result


def base_rate(evaluator: Evaluator, samples: int, steps: int, seed: int = 1234) -> dict:
    """The base model without LoRAs, on captions of 1, 2 and 3 base objects (`samples` each).

    `all_objects_found_rate`: every prompted object (shape and colour) is detected;
    `object_found_rate`: the share of prompted objects detected; `colour_found_rate`: by colour only.
    """
    rng = np.random.default_rng(seed)
    pipeline = evaluator.pipeline
    result = {}
    for count in (1, 2, 3):
        scenes = [random_scene(rng, n_objects=count, world=evaluator.world) for _ in range(samples)]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pipeline.disable_lora()
            try:
                images = pipeline(
                    [scene.caption for scene in scenes],
                    height=SIZE,
                    width=SIZE,
                    num_inference_steps=steps,
                    max_sequence_length=MAX_TEXT_TOKENS,
                    generator=[torch.Generator().manual_seed(index) for index in range(samples)],
                ).images
            finally:
                pipeline.enable_lora()
        complete = found = colours = wanted_total = 0
        for scene, image in zip(scenes, images, strict=True):
            detected = [(o.shape, o.colour) for o in detect(_to_uint8(image))]
            wanted = [(o.shape, o.colour) for o in scene.objects]
            complete += all(detected.count(w) >= wanted.count(w) for w in set(wanted))
            found += sum(w in detected for w in wanted)
            colours += sum(any(d[1] == w[1] for d in detected) for w in wanted)
            wanted_total += len(wanted)
        result[str(count)] = {
            "all_objects_found_rate": round(complete / samples, 4),
            "object_found_rate": round(found / wanted_total, 4),
            "colour_found_rate": round(colours / wanted_total, 4),
            "samples": samples,
        }
    return result


def _check(name: str, value: float | None, bar: float, what: str) -> dict:
    return {"name": name, "value": value, "bar": bar, "met": value is not None and value >= bar, "what": what}


def preconditions(summary: dict, singles: dict, base: dict, locality: dict) -> dict:
    """P1-P4, each with its value, its bar and whether it is met (`met`); see the module docstring."""
    weakest = min(
        ((word, rates["identity_rate"]) for word, rates in singles.items() if rates["identity_rate"] is not None),
        key=lambda item: item[1],
        default=(None, None),
    )
    share = (summary.get("freefuse_attention_share") or {}).get("2", {}).get("own_share")
    return {
        "P1_one_object": _check(
            "the base draws one object", base.get("1", {}).get("object_found_rate"), BARS["P1_one_object"],
            "shape and colour of a one-object caption found",
        ),
        "P1_two_objects": _check(
            "the base draws two objects", base.get("2", {}).get("object_found_rate"), BARS["P1_two_objects"],
            "share of the objects of two-object captions found",
        ),
        "P2": _check(
            "each LoRA draws its subject alone", weakest[1], BARS["P2"],
            f"identity of the weakest subject alone ({weakest[0]})",
        ),
        "P3": _check(
            "locality", locality.get("kept_from_mask_step"), BARS["P3"],
            "identity kept by a LoRA confined to its subject's region from the mask step (from the first "
            f"step: {locality.get('kept_from_first_step')})",
        ),
        "P4": _check(
            "localization", share, BARS["P4"],
            "share of a subject's words' stage-1 attention on its own object, pairs (chance 0.50)",
        ),
    }


def targets(summary: dict) -> dict:
    """What FreeFuse must reach once the preconditions hold."""
    by_size = summary.get("by_group_size", {})
    pairs, triples = by_size.get("2", {}), by_size.get("3", {})
    free, merge = pairs.get("freefuse", {}), pairs.get("merge", {})
    overall = summary.get("methods", {})
    leak_merge = (overall.get("merge") or {}).get("leakage")
    leak_free = (overall.get("freefuse") or {}).get("leakage")
    gt, ff = (overall.get("masks") or {}).get("identity_accuracy"), (overall.get("freefuse") or {}).get("identity_accuracy")
    found = {
        "pairs_identity": _check("FreeFuse identity, pairs", free.get("identity_accuracy"), 0.75, ""),
        "pairs_over_merge": _check(
            "FreeFuse identity minus merge's, pairs",
            None if None in (free.get("identity_accuracy"), merge.get("identity_accuracy"))
            else round(free["identity_accuracy"] - merge["identity_accuracy"], 4),
            0.25,
            "",
        ),
        "triples_identity": _check("FreeFuse identity, triples", (triples.get("freefuse") or {}).get("identity_accuracy"), 0.60, ""),
        "leakage_halved": _check(
            "merge's leakage over FreeFuse's (at least 2)",
            None if not leak_merge or leak_free is None else round(leak_merge / max(leak_free, 1e-9), 4),
            2.0,
            "",
        ),
        "masks_at_least_freefuse": _check(
            "ground-truth masks' identity minus FreeFuse's", None if None in (gt, ff) else round(gt - ff, 4), 0.0, ""
        ),
    }
    return found


def result_record(config: EvalConfig, evaluation: dict, singles: dict, base: dict, locality: dict) -> dict:
    samples = [
        {k: v for k, v in record.items() if k not in ("images", "masks")} for record in evaluation["samples"]
    ]
    summary = evaluation["summary"]
    summary["preconditions"] = preconditions(summary, singles, base, locality)
    summary["preconditions_met"] = all(check["met"] for check in summary["preconditions"].values())
    summary["targets"] = targets(summary)
    record = {
        "config": asdict(config),
        "summary": summary,
        "single_lora": singles,
        "locality": locality,
        "base_model": base,
        "samples": samples,
    }
    for method, method_rates in summary["methods"].items():
        record[method] = method_rates
    return record


def _number(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def _rate_row(label: str, method: str, rates: dict) -> str:
    return (
        f"| {label} | {method} | {_number(rates['identity_accuracy'])} | {_number(rates.get('shape_rate'))} | "
        f"{_number(rates['both_present'])} | {_number(rates['leakage'])} | {rates['images']} |"
    )


RATE_HEADER = [
    "| {} | method | identity accuracy | shape right | all present | leakage | images |",
    "|---|---|---|---|---|---|---|",
]


def _checks_table(title: str, checks: dict) -> list[str]:
    lines = [f"| {title} | value | bar | met | what |", "|---|---|---|---|---|"]
    for check in checks.values():
        mark = "yes" if check["met"] else "**no**"
        lines.append(f"| {check['name']} | {_number(check['value'])} | {check['bar']} | {mark} | {check['what']} |")
    return lines


def markdown_table(record: dict, command: str) -> str:
    summary = record["summary"]
    lines = [f"Command: `{command}`", "", *_checks_table("precondition", summary["preconditions"]), ""]
    if not summary["preconditions_met"]:
        lines += [
            "**A precondition is not met: the method numbers below are measured, but they are not a result "
            "about FreeFuse.**",
            "",
        ]
    lines += [RATE_HEADER[0].format("subjects"), RATE_HEADER[1]]
    for size, methods in summary["by_group_size"].items():
        lines += [_rate_row(size, method, rates) for method, rates in methods.items()]
    lines += [_rate_row("all", method, rates) for method, rates in summary["methods"].items()]
    lines += [_rate_row("hard pair", method, rates) for method, rates in (summary.get("hard_pair") or {}).items()]
    lines += ["", *_checks_table("target", summary["targets"]), ""]
    share_lines = [
        f"{size} subjects: {v['own_share']:.3f} (chance {v['chance']:.3f})"
        for size, v in summary.get("freefuse_attention_share", {}).items()
        if v["own_share"] is not None
    ]
    lines += [
        f"FreeFuse mask coverage of the detected subject objects: {_number(summary.get('freefuse_mask_coverage'))}",
        "",
        "Stage-1 cross-attention share on each subject's own object: " + ("; ".join(share_lines) or "n/a"),
        "",
        "FreeFuse images where a subject won no region (its LoRA then acts everywhere): "
        f"{summary.get('freefuse_fallback_rate')}",
    ]
    split = summary.get("by_freefuse_masks") or {}
    if split:
        lines += ["", RATE_HEADER[0].format("FreeFuse stage 1"), RATE_HEADER[1]]
        for label, methods in split.items():
            lines += [_rate_row(label, method, rates) for method, rates in methods.items()]
    lines += ["", "| single LoRA | identity rate | shape right | present rate | samples |", "|---|---|---|---|---|"]
    for word, rates in record["single_lora"].items():
        lines.append(
            f"| {word} | {_number(rates['identity_rate'])} | {_number(rates.get('shape_rate'))} | "
            f"{_number(rates['present_rate'])} | {rates['samples']} |"
        )
    lines += [
        "",
        "| base model, objects in the caption | all found | objects found | colours found | samples |",
        "|---|---|---|---|---|",
    ]
    for count, rates in record["base_model"].items():
        lines.append(
            f"| {count} | {rates['all_objects_found_rate']:.2f} | {rates['object_found_rate']:.2f} | "
            f"{rates['colour_found_rate']:.2f} | {rates['samples']} |"
        )
    return "\n".join(lines) + "\n"


def picture_grid(samples: list[dict], methods, rows: int) -> Image.Image:
    """Rows of samples; columns: each method's picture, then FreeFuse's mask overlay (4x upscaled)."""

    chosen = samples[:rows]
    # The masks go over FreeFuse's picture, or the first FreeFuse variant's (the bias acts after the
    # mask step: its variants' stage 1 is FreeFuse's own).
    under = next((m for m in methods if m == "freefuse"), next((m for m in methods if m.startswith("freefuse" + BIAS_VARIANT)), None))
    overlay = under is not None and any(r["masks"] is not None for r in chosen)
    columns = list(methods) + (["freefuse masks"] if overlay else [])
    cell, label = SIZE * 4, 14
    grid = Image.new("RGB", (cell * len(columns), label + cell * len(chosen)), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for column, name in enumerate(columns):
        draw.text((column * cell + 4, 1), name, fill=(0, 0, 0))
    for row, record in enumerate(chosen):
        for column, name in enumerate(columns):
            if name == "freefuse masks":
                picture = record["masks"].overlay(record["images"][under].resize((SIZE, SIZE)), legend=False)
            else:
                picture = record["images"][name]
            grid.paste(picture.resize((cell, cell), Image.NEAREST), (column * cell, label + row * cell))
        draw.text((2, label + row * cell + cell - 12), record["prompt"][:40], fill=(255, 255, 255))
    return grid


def _kept(store: SampleStore, name: str, sizes, compute: Callable[[], dict]) -> dict:
    """A part of the evaluation computed once and kept in the store (resumed runs read it back)."""
    import json

    path = (
        store.folder / f"{name}-{store.key(name, list(sizes) if not isinstance(sizes, int) else sizes)}.json"
    )
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        result = compute()
        write_json(path, result)
        return result


def run_evaluation(
    config: EvalConfig,
    out: Path,
    model_dir: Path | None = None,
    lora_dir: Path | None = None,
    overwrite: bool = False,
    command_line: str = "freefuse eval shapesworld",
    on_progress: Callable[[str, int | None, int | None], None] | None = None,
) -> tuple[dict, dict[str, Path], str]:
    """The whole evaluation: groups × prompts × seeds × methods, single LoRAs, the base model.

    Writes `results.json`, `results.md` and `grid.png` under `out`, each atomically; returns the
    record, the files and the Markdown table. `on_progress(stage, done, total)` reports progress.
    Every finished sample is kept under `out/samples/`; run the same command again after an
    interruption and it resumes.
    """
    files = {"json": out / "results.json", "md": out / "results.md", "grid": out / "grid.png"}
    check_free(list(files.values()), overwrite)
    report = on_progress or (lambda stage, done, total: None)
    evaluator = Evaluator(model_dir, lora_dir, world=config.world)
    identity = [
        config.world,
        str(model_dir or "committed"),
        sorted(subject.sha256 or "" for subject in evaluator.subjects.values()),
        __version__,
    ]
    if overwrite and (out / "samples").is_dir():
        import shutil

        shutil.rmtree(out / "samples")  # --overwrite: start again, keep nothing of an earlier run
    store = SampleStore(out / "samples", config, identity)
    evaluation = evaluate(
        config, evaluator, on_step=lambda done, total: report("evaluating", done, total), store=store
    )
    report("single LoRAs", None, None)
    singles = _kept(
        store,
        "single_lora",
        config.single_seeds,
        lambda: single_lora_rates(evaluator, config.single_seeds, config.steps),
    )
    report("base model", None, None)
    base = _kept(
        store,
        "base_model",
        config.base_samples,
        lambda: base_rate(evaluator, config.base_samples, config.steps),
    )
    report("locality", None, None)
    locality = _kept(
        store,
        "locality",
        config.locality_seeds,
        lambda: locality_rates(evaluator, config.locality_seeds, config.steps, config.resolved_mask_step),
    )
    record = result_record(config, evaluation, singles, base, locality)
    table = markdown_table(record, command_line)
    grid = picture_grid(evaluation["samples"], config.methods, config.grid_rows)
    atomic_save(files["grid"], lambda f: grid.save(f, "PNG"), overwrite)
    atomic_write(files["md"], table, overwrite)
    write_json(files["json"], record, overwrite)
    return record, files, table
