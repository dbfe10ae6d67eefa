"""`freefuse eval pairs`, put together: check, make the images, score them, report.

1. Before any model loads: every metric's library is installed, every reference folder has
   images, every job passes the checks a run makes before loading.
2. The images, by the batch runner (`out/images/`, an index of finished jobs: a re-run resumes;
   `accelerate launch` splits the jobs between processes).
3. The scores (`scoring.Scorer`: cached per image and metric; a re-run resumes; split between
   processes the same way).
4. The main process writes `scores.jsonl` (one line per image), `summary.json`, `report.md`,
   `report.html`, `charts/` and `grids/`.

`quick_setup` builds the `--quick` run: the tiny model, two random LoRAs, one drawn reference
folder, two of the paper's prompts, two seeds, tiny random metric backbones; seconds on a CPU.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageDraw
from safetensors.torch import save

from ..backends import backend_for
from ..batch import is_done, job_files, process_state, read_index, run_batch
from ..errors import SettingsError
from ..files import atomic_save, atomic_write, cached_sha256, write_json
from ..models import TINY, TINY_MODELS
from ..runner import RunService
from ..spec import LoraSpec
from ..tiny import TINY_PIPELINES, random_lora_weights
from .crops import build_detector
from .jobs import (
    DEFAULT_METHODS,
    ImageRunner,
    PairsConfig,
    PlannedImage,
    Subject,
    check_methods,
    plan_images,
    replay_plain,
)
from .metrics import PAPER_METRICS, TOY_METRICS, MetricOptions, MetricUnavailable, build_metrics
from .prompts import PAPER_NOTE, PAPER_PROMPTS, load_prompts
from .report import write_report
from .scoring import References, ScoreItem, Scorer, read_cache
from .summary import table

#: What the command line takes from here (one module import for it).
__all__ = [
    "DEFAULT_METHODS", "PAPER_METRICS", "EvalOptions", "MetricOptions", "build_config", "check_methods",
    "load_prompts", "parse_seeds", "parse_settings", "quick_setup", "replay_plain", "run_pairs",
]  # fmt: skip
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
Progress = Callable[[str, int | None, int | None], None]


@dataclass
class EvalOptions:
    """How the images are scored (the metrics, their options, the crops) and what the report says."""

    metrics: tuple[str, ...]
    metric_options: MetricOptions = field(default_factory=MetricOptions)
    crops: str = "masks"  # "masks": FreeFuse's masks of each seed, for every method; "detector"
    detector: str = "owlv2"
    detector_model: str | None = None
    skip_unavailable: bool = False
    quick: bool = False
    command: str = "freefuse eval pairs"


def reference_files(folder: Path) -> list[Path]:
    """The images of a reference folder (sorted), at least one."""
    if not folder.is_dir():
        raise SettingsError(f"Reference folder {folder} does not exist; give the folder of the LoRA's training images.")
    found = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not found:
        raise SettingsError(f"Reference folder {folder} has no images ({', '.join(IMAGE_SUFFIXES)}).")
    return found


def check_before_loading(config: PairsConfig, options: EvalOptions) -> tuple[list, dict[str, str], list[str]]:
    """The metrics (available ones), the unavailable ones and why, and notes; raises on a mistake."""
    notes = []
    for subject in config.subjects:
        if subject.references is not None:
            reference_files(subject.references)
    if any(s.references is None for s in config.subjects) and "single" not in config.methods:
        config.methods = check_methods((*config.methods, "single"))
        notes.append("a LoRA has no reference folder: its single-LoRA images serve as references, so `single` is added.")
    if options.crops == "masks" and not any(m.split(":")[0] == "freefuse" for m in config.methods):
        options.crops = "detector"
        notes.append("no FreeFuse method in this run, so subject crops come from the detector for every method.")
    metrics, unavailable = [], {}
    for metric in build_metrics(list(options.metrics), options.metric_options):
        try:
            metric.check()
            metrics.append(metric)
        except MetricUnavailable as error:
            if not options.skip_unavailable:
                raise
            unavailable[metric.name] = str(error)
    return metrics, unavailable, notes


def _failures(folder: Path) -> dict[str, str]:
    reasons = {}
    for log in sorted(folder.glob("failed.p*.jsonl")):
        for line in log.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                entry = json.loads(line)
                reasons[entry["id"]] = entry["error"]
            except (json.JSONDecodeError, KeyError, TypeError):
                continue
    return reasons


def score_items(planned: list[PlannedImage], folder: Path, out: Path) -> list[ScoreItem]:
    """The planned images as they came out of the batch (paths relative to `out`), FreeFuse's masks beside each."""
    index, reasons = read_index(folder), _failures(folder)
    prefix = folder.relative_to(out).as_posix()
    items: list[ScoreItem] = []
    for plan in planned:
        entry = index.get(plan.job.id)
        item = ScoreItem(plan.job.id, plan.method, plan.pair, plan.subjects, plan.words, plan.text, plan.prompt.text,
                         plan.prompt_index, plan.prompt.source, plan.seed)  # fmt: skip
        if is_done(entry, folder):
            item.image, item.manifest = f"{prefix}/{entry['image']}", f"{prefix}/{entry['manifest']}"
            item.image_sha256 = entry["files"][entry["image"]]
            masks = job_files(folder, plan.job)[0]["masks"].name  # eval jobs make one image each
            item.masks = f"{prefix}/{masks}" if masks in entry["files"] else None
        else:
            item.error = f"generation failed: {reasons.get(plan.job.id, 'no finished image')}"
        items.append(item)
    freefuse = {}
    for item in items:
        if item.method.split(":")[0] == "freefuse" and item.masks is not None:
            freefuse.setdefault((item.pair, item.prompt_index, item.seed), item.masks)
    for item in items:
        item.sample_masks = freefuse.get((item.pair, item.prompt_index, item.seed))
    return items


def references_of(config: PairsConfig, items: list[ScoreItem], out: Path) -> tuple[References, dict[str, str]]:
    """Each subject's reference images (its folder, else its single-LoRA images) and how the report names them."""
    paths, described, own = {}, {}, set()
    for subject in config.subjects:
        if subject.references is not None:
            paths[subject.name] = reference_files(subject.references)
            described[subject.name] = f"folder {subject.references} ({len(paths[subject.name])} images)"
        else:
            mine = [out / i.image for i in items if i.method == "single" and i.pair == subject.name and i.image]
            paths[subject.name], own = mine, own | {subject.name}
            described[subject.name] = (
                f"no folder given: its own single-LoRA images ({len(mine)}, seeds {config.seeds[0]}–{config.seeds[-1]}) "
                "serve as references"
            )
    return References(paths, own), described


def _protocol(config, options, metrics, unavailable, described, records, notes) -> dict:
    settings = dict(config.settings)
    return {
        "command": options.command,
        "quick": options.quick,
        "model": config.model,
        "settings": ", ".join(f"{k} {v}" for k, v in settings.items()) or "the model's defaults",
        "seeds": list(config.seeds),
        "prompts": {"note": config.prompts_note, "list": [{"label": p.label, "text": p.text, "source": p.source} for p in config.prompts]},
        "subjects": [
            {"name": s.name, "word": s.word, "lora": str(s.lora.path), "sha256": cached_sha256(Path(s.lora.path)),
             "references": described[s.name]}
            for s in config.subjects
        ],  # fmt: skip
        "methods": list(config.methods),
        "metrics": [{**m.describe(), "measures": m.measures, "weakness": m.weakness} for m in metrics],
        "unavailable": unavailable,
        "crops": (
            "FreeFuse's masks of each pair, prompt and seed crop every method's image of that seed; where they leave a "
            f"subject without a region, the detector ({options.detector}) for every method of that sample"
            if options.crops == "masks"
            else f"the same detector ({options.detector}) on every image of every method; each metric takes the "
            "assignment of boxes to subjects that scores best"
        ),
        "crop_counts": dict(Counter(r["crops"] for r in records if r["crops"])),
        "notes": notes,
        "files_text": FILES_TEXT,
    }


FILES_TEXT = [
    "- `scores.jsonl`: one line per image: method, pair, prompt, seed, the image and its manifest, each metric's "
    "score, failures with their reasons, per-subject scores and boxes, the judge's answer.",
    "- `summary.json`: the tables above as numbers.",
    "- `images/`: every image with its manifest. A FreeFuse row replays with `freefuse generate --manifest "
    "images/NAME.json --out DIR`; a `diffusers` row with `freefuse eval replay images/NAME.json --out DIR`. "
    "Manifests are untrusted: run these from a folder that holds the LoRA files (or name them again with --lora).",
    "- Run the same command again to resume after an interruption: finished images and scores are kept. "
    "`accelerate launch --multi_gpu --num_processes N -m freefuse eval pairs …` splits images and scores between GPUs.",
]


def _score(state, items, scorer: Scorer, report: Progress) -> None:
    todo = [item for item in items if item.image is not None]
    with state.split_between_processes(todo) as mine:
        for done, item in enumerate(mine, start=1):
            scorer.score(item)
            report("scoring", done, len(mine))


def run_pairs(config: PairsConfig, options: EvalOptions, out: Path, service: RunService | None = None,
              on_progress: Progress | None = None) -> dict[str, Path]:  # fmt: skip
    """The whole evaluation into `out` (see the module docstring); returns the files written (main process)."""
    report = on_progress or (lambda stage, done, total: None)
    metrics, unavailable, notes = check_before_loading(config, options)
    out.mkdir(parents=True, exist_ok=True)
    folder = out / "images"
    planned = plan_images(config, out)
    for plan in planned:
        plan.job.check()
    state = process_state()
    started = time.perf_counter()
    run_batch([plan.job for plan in planned], folder, service, lambda r, share: report("images", r.done + r.skipped + len(r.failed), share), run_one=ImageRunner())
    items = score_items(planned, folder, out)
    references, described = references_of(config, items, out)
    options.metric_options.device = options.metric_options.device or str(state.device)
    detector = build_detector(options.detector, options.detector_model, options.metric_options.device)
    scorer = Scorer(out, metrics, references, detector, options.crops, state.process_index)
    _score(state, items, scorer, report)
    state.wait_for_everyone()
    if not state.is_main_process:
        return {}
    scorer.cache = read_cache(out)  # every process's scores
    unavailable.update(scorer.unavailable)
    available = [m for m in metrics if m.name not in unavailable]
    scorer.metrics = available
    records = [scorer.record(item) for item in items]
    summary = {"seeds": len(config.seeds), "table": table(records, [m.name for m in available], config.methods)}
    protocol = _protocol(config, options, available, unavailable, described, records, notes)
    summary["seconds"] = round(time.perf_counter() - started, 1)
    files = {"scores": out / "scores.jsonl", "summary": out / "summary.json"}
    atomic_write(files["scores"], "".join(json.dumps(record, sort_keys=True) + "\n" for record in records))
    write_json(files["summary"], {**summary, "protocol": protocol})
    files.update(write_report(out, summary, records, protocol))
    return files


# -- the quick run ------------------------------------------------------------------------------------------


def _drawn_references(folder: Path, count: int = 3) -> Path:
    """A few drawn pictures (a figure on a plain ground) standing in for a LoRA's training images."""
    for index in range(count):
        picture = Image.new("RGB", (64, 64), (40 + 60 * index, 90, 160))
        draw = ImageDraw.Draw(picture)
        draw.ellipse((20, 8, 44, 32), fill=(230, 190, 160))
        draw.rectangle((16, 32, 48, 64), fill=(200, 40 + 50 * index, 60))
        atomic_save(folder / f"ref-{index}.png", lambda handle, p=picture: p.save(handle, "PNG"))
    return folder


def quick_setup(out: Path) -> tuple[PairsConfig, EvalOptions]:
    """The `--quick` run's inputs, written under `out`: two random LoRAs for the tiny model (`alice`
    without references, so its single-LoRA images serve; `bob` with drawn ones)."""
    pipeline = TINY_PIPELINES[TINY_MODELS[TINY]](seed=0)
    backend = backend_for(pipeline)
    targets, within = backend.architecture.typical_lora_targets
    subjects = []
    for seed, word in enumerate(("alice", "bob"), start=1):
        path = out / "quick-loras" / f"{word}.safetensors"
        if not path.is_file():
            state = random_lora_weights(backend.denoiser, targets, within, backend.denoiser_name, seed=seed)
            data = save(state, metadata={"modelspec.trigger_phrase": word})  # one key: safetensors writes several in no fixed order
            atomic_save(path, lambda handle, data=data: handle.write(data))
        references = _drawn_references(out / "quick-references" / word) if word == "bob" else None
        subjects.append(Subject(LoraSpec(path=str(path), words=[word]), references))
    prompts = tuple(p for p in PAPER_PROMPTS if p.number in (6, 31))
    config = PairsConfig(
        model=TINY,
        subjects=subjects,
        prompts=prompts,
        prompts_note=f"2 of the built-in paper prompts (#6, #31); the full set is {PAPER_NOTE}",
        seeds=(42, 43),
        settings={"steps": 4, "size": "64x64", "max_sequence_length": 64},
    )
    options = EvalOptions(metrics=TOY_METRICS, metric_options=MetricOptions(device="cpu", toy=True), detector="halves",
                          quick=True, command="freefuse eval pairs --quick")  # fmt: skip
    return config, options


# -- from the command line --------------------------------------------------------------------------------


def parse_seeds(text: str) -> tuple[int, ...]:
    """`42-51` (a range, both ends in) or `42,43,50`."""
    try:
        if "-" in text.strip()[1:]:
            first, last = (int(part) for part in text.split("-", 1))
            seeds = tuple(range(first, last + 1))
        else:
            seeds = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise SettingsError(f"--seeds {text!r}: give a range (42-51) or a list (42,43,50).") from None
    if not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0:
        raise SettingsError(f"--seeds {text!r}: give at least one seed, each once, none negative.")
    return seeds


def parse_settings(items: list[str]) -> dict:
    """`--set KEY=VALUE` (job-file names: steps, size, guidance, ...); a value is read as JSON when it can be."""
    settings = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise SettingsError(f"--set {item!r}: write KEY=VALUE, e.g. --set steps=28.")
        try:
            settings[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            settings[key.strip()] = value
    for key in ("prompt", "seed", "method", "loras", "model", "masks"):
        if key in settings:
            raise SettingsError(f"--set {key}=…: the evaluation sets `{key}` itself; use its own option.")
    return settings


def build_config(model: str, loras: list[tuple[str, list[str] | None, float]], references: dict[str, str],
                 prompts, prompts_note: str, seeds: tuple[int, ...], methods: tuple[str, ...], settings: dict,
                 single_prompt: str, base_model: str | None = None) -> PairsConfig:  # fmt: skip
    """The evaluation from command-line values; `references` maps a LoRA's name or word to its folder."""
    subjects = []
    for path, words, weight in loras:
        lora = LoraSpec.parse({"path": path, "words": words, "weight": weight}, f"--lora {path}")
        subjects.append(Subject(lora))
    for subject in subjects:
        if not subject.lora.words:
            raise SettingsError(f"--lora {subject.lora.path}: give its activation word (PATH=WORD); prompts need it.")
    unknown = set(references) - {s.name for s in subjects} - {s.word for s in subjects}
    if unknown:
        raise SettingsError(
            f"--refs {sorted(unknown)[0]}=…: no LoRA has that name or word; names are {[s.name for s in subjects]}."
        )
    for subject in subjects:
        folder = references.get(subject.name) or references.get(subject.word)
        subject.references = Path(folder).expanduser() if folder else None
    return PairsConfig(model=model, subjects=subjects, prompts=tuple(prompts), prompts_note=prompts_note, seeds=seeds,
                       methods=methods, settings=settings, single_prompt=single_prompt, base_model=base_model)  # fmt: skip
