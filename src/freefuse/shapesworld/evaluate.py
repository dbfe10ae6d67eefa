"""Measuring subject bleeding in ShapesWorld: generate, detect, score.

For every group of subject LoRAs (pairs, triples, the quad) × interaction prompts × seeds, each
method makes an image and the detector reads it back. Per subject of the prompt:

- present: some detected object matches at least 2 of its 3 attributes (shape, colour, texture);
- identity correct: the best-matching object has exactly its shape, colour and texture;
- leakage: the object taken for it carries a colour, texture or shape that belongs to another
  subject of the prompt and not to it (one subject's look on the other).

`masks` is the ground-truth upper bound: the objects detected in the FreeFuse image are assigned to
subjects by their attributes, and their regions (dilated) are given as user masks for the same
seed. Mask quality is how much of each subject's detected object its FreeFuse mask covers.
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
from .model import MAX_TEXT_TOKENS, load_shapesworld, lora_path
from .scenes import SIZE, SUBJECTS, Subject, random_scene

PROMPTS = {
    2: ["a {A} and a {B}", "a {B} next to a {A}", "a {A}, a {B} and a red circle"],
    3: ["a {A}, a {B} and a {C}", "a {C} next to a {A} and a {B}"],
    4: ["a {A}, a {B}, a {C} and a {D}"],
}
METHODS = ("merge", "freefuse", "masks")


@dataclass
class EvalConfig:
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
        )


# -- scoring ----------------------------------------------------------------------------------------


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


def score_image(subjects: list[Subject], image: np.ndarray) -> dict:
    """Per-subject presence, identity and leakage for one picture."""
    objects = detect(image)
    assigned = assign(subjects, objects)
    per_subject = {}
    for subject in subjects:
        obj = assigned[subject.word]
        others = [s for s in subjects if s.word != subject.word]
        leaked = []
        if obj is not None:
            for attribute in ("colour", "texture", "shape"):
                value = getattr(obj, attribute)
                if value != getattr(subject, attribute) and any(
                    getattr(o, attribute) == value for o in others
                ):
                    leaked.append(attribute)
        per_subject[subject.word] = {
            "present": obj is not None and _matches(subject, obj) >= 2,
            "identity": obj is not None and _matches(subject, obj) == 3,
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
    """Loads the model and the four LoRAs once; switches adapters per prompt."""

    def __init__(
        self, model_dir: Path | None = None, lora_dir: Path | None = None, device: str = "cpu"
    ) -> None:
        self.pipeline = load_shapesworld(model_dir) if model_dir else load_shapesworld()
        self.pipeline.to(device)
        self.freefuse_class = FreeFuse
        loader = FreeFuse(self.pipeline)
        for word in SUBJECTS:
            path = lora_path(word, lora_dir) if lora_dir else lora_path(word)
            loader.add_lora(path, name=word)
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
    ):
        freefuse = self.freefuse_class(self.pipeline)
        for word in words:
            freefuse.use_adapter(word, words=[word], source=self.subjects[word])
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
            )


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
    samples = []
    plan = []
    for size in config.group_sizes:
        groups = list(combinations(SUBJECTS, size))[: config.groups_per_size]
        templates = PROMPTS[size][: config.prompts_per_group]
        plan += [
            (group, template, seed) for group in groups for template in templates for seed in config.seeds
        ]
    total = len(plan)
    started = time.perf_counter()
    for index, (group, template, seed) in enumerate(plan):
        subjects = [SUBJECTS[word] for word in group]
        prompt = template
        for letter, word in zip(ascii_uppercase, group, strict=False):
            prompt = prompt.replace("{" + letter + "}", word)
        key = store.key(list(group), prompt, seed) if store is not None else ""
        saved = store.load(key) if store is not None else None
        if saved is not None:
            samples.append(saved)
            if on_step is not None:
                on_step(index + 1, total)
            continue
        record = {"group": list(group), "prompt": prompt, "seed": seed, "methods": {}}
        outputs = {}
        for method in config.methods:
            if method == "masks":
                if "freefuse" not in outputs:
                    outputs["freefuse"] = evaluator.run(
                        list(group),
                        prompt,
                        seed,
                        "freefuse",
                        config.steps,
                        stage1=stage1_settings(config),
                    )
                gt = oracle_masks(
                    subjects, _to_uint8(outputs["freefuse"].images[0]), outputs["freefuse"].masks[0]
                )
                outputs[method] = evaluator.run(list(group), prompt, seed, "masks", config.steps, masks=gt)
            elif method not in outputs:
                outputs[method] = evaluator.run(
                    list(group),
                    prompt,
                    seed,
                    method,
                    config.steps,
                    stage1=stage1_settings(config),
                )
            image = _to_uint8(outputs[method].images[0])
            record["methods"][method] = score_image(subjects, image)
        if "freefuse" in outputs:
            objects = assign(subjects, detect(_to_uint8(outputs["freefuse"].images[0])))
            masks = outputs["freefuse"].masks[0]
            record["mask_coverage"] = {s.word: coverage(masks[s.word], objects[s.word]) for s in subjects}
            record["attention_share"] = attention_share(
                outputs["freefuse"].attention[0], list(group), objects
            )
            record["freefuse_fallbacks"] = outputs["freefuse"].manifest["images"][0]["fallbacks"]
        record["images"] = {m: outputs[m].images[0] for m in config.methods}
        record["masks"] = outputs["freefuse"].masks[0] if "freefuse" in outputs else None
        if store is not None:
            store.save(key, record)
        samples.append(record)
        if on_step is not None:
            on_step(index + 1, total)
    summary = summarise(samples, config.methods)
    summary["seconds"] = round(time.perf_counter() - started, 1)
    return {"samples": samples, "summary": summary}


def summarise(samples: list[dict], methods) -> dict:
    """identity_accuracy, both_present and leakage (fractions) per method, overall and per group size."""

    def rates(records: list[dict], method: str) -> dict:
        subjects = [s for r in records for s in r["methods"][method]["subjects"].values()]
        images = [r["methods"][method]["subjects"].values() for r in records]
        return {
            "identity_accuracy": round(float(np.mean([s["identity"] for s in subjects])), 4)
            if subjects
            else None,
            "both_present": round(float(np.mean([all(s["present"] for s in img) for img in images])), 4)
            if images
            else None,
            "leakage": round(float(np.mean([bool(s["leaked"]) for s in subjects])), 4) if subjects else None,
            "images": len(records),
            "subjects": len(subjects),
        }

    result: dict = {"methods": {}, "by_group_size": {}}
    for method in methods:
        result["methods"][method] = rates(samples, method)
    for size in sorted({len(r["group"]) for r in samples}):
        chosen = [r for r in samples if len(r["group"]) == size]
        result["by_group_size"][str(size)] = {m: rates(chosen, m) for m in methods}
    coverages = [c for r in samples for c in (r.get("mask_coverage") or {}).values() if c is not None]
    result["freefuse_mask_coverage"] = round(float(np.mean(coverages)), 4) if coverages else None
    with_fallback = [bool(r.get("freefuse_fallbacks")) for r in samples if "freefuse_fallbacks" in r]
    result["freefuse_fallback_rate"] = round(float(np.mean(with_fallback)), 4) if with_fallback else None
    # The same comparison split by whether FreeFuse found a region for every subject of the image.
    result["by_freefuse_masks"] = {}
    for label, wanted in (("every subject masked", False), ("a subject fell back", True)):
        chosen = [r for r in samples if "freefuse_fallbacks" in r and bool(r["freefuse_fallbacks"]) == wanted]
        if chosen:
            result["by_freefuse_masks"][label] = {m: rates(chosen, m) for m in methods}
    result["freefuse_attention_share"] = {}
    for size in sorted({len(r["group"]) for r in samples}):
        shares = [
            v
            for r in samples
            if len(r["group"]) == size
            for v in (r.get("attention_share") or {}).values()
            if v is not None
        ]
        result["freefuse_attention_share"][str(size)] = {
            "own_share": round(float(np.mean(shares)), 4) if shares else None,
            "chance": round(1.0 / size, 4),
        }
    return result


def single_lora_rates(evaluator: Evaluator, seeds, steps: int) -> dict:
    """Each LoRA alone (`merge` with one subject): how often its subject is drawn correctly."""
    result = {}
    for word, subject in SUBJECTS.items():
        hits = present = 0
        for seed in seeds:
            for prompt in (f"a {word}", f"a {word} and a green square"):
                out = evaluator.run([word], prompt, seed, "merge", steps)
                scored = score_image([subject], _to_uint8(out.images[0]))["subjects"][word]
                hits += scored["identity"]
                present += scored["present"]
        count = 2 * len(seeds)
        result[word] = {
            "identity_rate": round(hits / count, 4),
            "present_rate": round(present / count, 4),
            "samples": count,
        }
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
        scenes = [random_scene(rng, n_objects=count) for _ in range(samples)]
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


def result_record(config: EvalConfig, evaluation: dict, singles: dict, base: dict) -> dict:
    samples = [
        {k: v for k, v in record.items() if k not in ("images", "masks")} for record in evaluation["samples"]
    ]
    summary = evaluation["summary"]
    record = {
        "config": asdict(config),
        "summary": summary,
        "single_lora": singles,
        "base_model": base,
        "samples": samples,
    }
    for method, rates in summary["methods"].items():
        record[method] = rates
    return record


def _rate_row(label: str, method: str, rates: dict) -> str:
    return (
        f"| {label} | {method} | {rates['identity_accuracy']:.2f} | {rates['both_present']:.2f} | "
        f"{rates['leakage']:.2f} | {rates['images']} |"
    )


def markdown_table(record: dict, command: str) -> str:
    lines = [
        f"Command: `{command}`",
        "",
        "| subjects | method | identity accuracy | all present | leakage | images |",
        "|---|---|---|---|---|---|",
    ]
    for size, methods in record["summary"]["by_group_size"].items():
        lines += [_rate_row(size, method, rates) for method, rates in methods.items()]
    lines += [_rate_row("all", method, rates) for method, rates in record["summary"]["methods"].items()]
    coverage_value = record["summary"].get("freefuse_mask_coverage")
    share_lines = [
        f"{size} subjects: {v['own_share']:.3f} (chance {v['chance']:.3f})"
        for size, v in record["summary"].get("freefuse_attention_share", {}).items()
        if v["own_share"] is not None
    ]
    lines += [
        "",
        f"FreeFuse mask coverage of the detected subject objects: "
        f"{coverage_value if coverage_value is None else f'{coverage_value:.2f}'}",
        "",
        "Stage-1 cross-attention share on each subject's own object: " + ("; ".join(share_lines) or "n/a"),
        "",
        f"FreeFuse images where a subject won no region (its LoRA then acts everywhere): "
        f"{record['summary'].get('freefuse_fallback_rate')}",
    ]
    split = record["summary"].get("by_freefuse_masks") or {}
    if split:
        lines += [
            "",
            "| FreeFuse stage 1 | method | identity accuracy | all present | leakage | images |",
            "|---|---|---|---|---|---|",
        ]
        for label, methods in split.items():
            lines += [_rate_row(label, method, rates) for method, rates in methods.items()]
    lines += [
        "",
        "| single LoRA | identity rate | present rate | samples |",
        "|---|---|---|---|",
    ]
    for word, rates in record["single_lora"].items():
        lines.append(
            f"| {word} | {rates['identity_rate']:.2f} | {rates['present_rate']:.2f} | {rates['samples']} |"
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
    columns = list(methods) + (["freefuse masks"] if any(r["masks"] is not None for r in chosen) else [])
    cell, label = SIZE * 4, 14
    grid = Image.new("RGB", (cell * len(columns), label + cell * len(chosen)), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for column, name in enumerate(columns):
        draw.text((column * cell + 4, 1), name, fill=(0, 0, 0))
    for row, record in enumerate(chosen):
        for column, name in enumerate(columns):
            if name == "freefuse masks":
                picture = record["masks"].overlay(
                    record["images"]["freefuse"].resize((SIZE, SIZE)), legend=False
                )
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
    evaluator = Evaluator(model_dir, lora_dir)
    identity = [
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
    record = result_record(config, evaluation, singles, base)
    table = markdown_table(record, command_line)
    grid = picture_grid(evaluation["samples"], config.methods, config.grid_rows)
    atomic_save(files["grid"], lambda f: grid.save(f, "PNG"), overwrite)
    atomic_write(files["md"], table, overwrite)
    write_json(files["json"], record, overwrite)
    return record, files, table
