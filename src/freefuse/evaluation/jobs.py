"""The evaluation's images: every method on the same seeds, as batch jobs, and the plain diffusers baseline.

Each pair of LoRAs × prompt × seed × method is one `batch.Job`, so the batch runner makes them:
finished jobs are found by content after a crash, and `accelerate launch` splits them between
GPUs. The methods:

- `diffusers`: the baseline row, FreeFuse not involved: the diffusers pipeline's own
  `load_lora_weights` + `set_adapters`, then its `__call__` with the same settings and a CPU
  generator seeded as FreeFuse seeds (`PlainJob`);
- `merge`: FreeFuse's plain joint LoRAs (equal to `diffusers` on FLUX.1, a test pins it);
- `freefuse`, `freefuse:<mask method>`: FreeFuse with the model's default or the named stage-1 method;
- `masks`: user masks: each subject's LoRA in its half of the image (left `<A>`, right `<B>`),
  the rectangles a user would draw (as Mix-of-Show's regions);
- `single`: each LoRA alone on a single-subject prompt, on the same seeds: the reference row, and
  the references themselves for a LoRA without a folder of training images.
"""

from __future__ import annotations

import hashlib
import inspect
import io
import json
import time
from dataclasses import dataclass, field, fields
from itertools import combinations
from pathlib import Path

import diffusers
import peft
import torch

from .. import __version__
from ..backends import backend_for
from ..batch import Job, job_from_dict, run_job
from ..core import MaskSet
from ..core.config import MAP_METHOD_NAMES
from ..errors import SettingsError
from ..files import cached_sha256, sha256_file, write_all
from ..manifest import MAX_MANIFEST_BYTES
from ..outputs import located
from ..runner import RunService
from ..settings import GenerationSettings
from ..spec import LoraSpec, RunSpec, replay_record
from .prompts import Prompt, batch_template

PAPER_SEEDS = tuple(range(42, 52))
METHOD_ORDER = ("diffusers", "merge", "freefuse", "masks", "single")
DEFAULT_METHODS = METHOD_ORDER
SINGLE_PROMPT = "a portrait photo of <A>, face clearly visible"
BASELINE_FORMAT = "freefuse-eval-baseline/1"


@dataclass
class Subject:
    """An evaluated LoRA: its file and words, and the folder of its training images (None: its
    single-LoRA generations serve as references)."""

    lora: LoraSpec
    references: Path | None = None

    @property
    def name(self) -> str:
        return self.lora.adapter_name

    @property
    def word(self) -> str:
        return str(self.lora.words[0]) if self.lora.words else self.name


@dataclass
class PairsConfig:
    """What the evaluation makes: subjects paired two by two, prompts, seeds, methods, settings.

    `settings` are generate settings for every job, in job-file form (`steps`, `size`, ...).
    """

    model: str
    subjects: list[Subject]
    prompts: tuple[Prompt, ...]
    prompts_note: str = ""
    seeds: tuple[int, ...] = PAPER_SEEDS
    methods: tuple[str, ...] = DEFAULT_METHODS
    settings: dict = field(default_factory=dict)
    single_prompt: str = SINGLE_PROMPT
    base_model: str | None = None

    def size(self) -> tuple[int, int]:
        """(width, height) of every image."""
        settings = GenerationSettings.from_dict({**self.settings, "prompt": "x"})
        return settings.width, settings.height


@dataclass
class PlannedImage:
    """One image of the evaluation: its job and what it is (method, pair, prompt, seed)."""

    job: Job
    method: str
    pair: str  # "alice+bob"; a single-LoRA image: the LoRA's name
    subjects: tuple[str, ...]  # adapter names, `<A>` first
    words: tuple[str, ...]
    prompt: Prompt
    prompt_index: int  # position in the prompt list (-1: the single-LoRA prompt)
    seed: int

    @property
    def text(self) -> str:
        return self.job.settings.prompt


def check_methods(methods: list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """Known method names, each once, in the report's order."""
    known = [*METHOD_ORDER, *(f"freefuse:{name}" for name in MAP_METHOD_NAMES)]
    for method in methods:
        if method not in known:
            raise SettingsError(f"Unknown method {method!r}; use {', '.join(known)}.")
    if len(set(methods)) != len(methods) or not methods:
        raise SettingsError("Give each method once, and at least one.")
    return tuple(sorted(methods, key=known.index))


def _method_settings(method: str, settings: dict) -> dict:
    if method.startswith("freefuse:"):
        mask_config = {**(settings.get("mask_config") or {}), "method": method.split(":", 1)[1]}
        return {"method": "freefuse", "mask_config": mask_config}
    return {"method": "merge" if method in ("diffusers", "single") else method}


def user_masks(out: Path, pair: tuple[Subject, Subject], size: tuple[int, int]) -> Path:
    """The user-masks method's masks for a pair: `<A>` the left half, `<B>` the right half (written once)."""
    width, height = size
    masks = torch.zeros(2, height, width)
    masks[0, :, : width // 2] = 1
    masks[1, :, width // 2 :] = 1
    path = out / "user-masks" / f"{pair[0].name}+{pair[1].name}-{width}x{height}.masks.json"
    if not path.is_file():
        MaskSet([pair[0].name, pair[1].name], masks).save(path)
    return path


def _lora_entry(subject: Subject) -> dict:
    lora = subject.lora
    return {"path": str(Path(lora.path).resolve()), "words": lora.words, "name": subject.name, "weight": lora.weight}


def single_template(text: str) -> str:
    """The single-LoRA prompt: `<A>` (the LoRA's word) and no `<B>`."""
    text = text.strip().replace("{A}", "<A>")
    if "<A>" not in text or "<B>" in text or "{B}" in text:
        raise SettingsError(f"--single-prompt {text!r}: name the one subject as <A>, and no <B>.")
    return text


def _job(config: PairsConfig, subjects: list[Subject], template: str, seed: int, method: str, where: str,
         masks: Path | None, out: Path) -> Job:  # fmt: skip
    entry = {
        **config.settings,
        "model": config.model,
        "prompt": batch_template(template),
        "seed": seed,
        "loras": [_lora_entry(subject) for subject in subjects],
        **_method_settings(method, config.settings),
    }
    if config.base_model is not None:
        entry["base_model"] = config.base_model
    if masks is not None:
        entry["masks"] = str(masks)
    job = job_from_dict(entry, out, where)  # ids hold paths relative to the output folder
    if method == "diffusers":
        job = PlainJob(**{item.name: getattr(job, item.name) for item in fields(Job)})
    return job


def plan_images(config: PairsConfig, out: Path) -> list[PlannedImage]:
    """Every image of the evaluation, pairs first (pair × prompt × seed × method, methods side by
    side on each seed), then the single-LoRA images; writes the user masks it needs under `out`."""
    if len(config.subjects) < 2:
        raise SettingsError("An evaluation of pairs needs at least two subject LoRAs (--lora, twice or more).")
    methods = check_methods(config.methods)
    planned = []
    for a, b in combinations(config.subjects, 2):
        pair = f"{a.name}+{b.name}"
        masks = user_masks(out, (a, b), config.size()) if "masks" in methods else None
        for index, prompt in enumerate(config.prompts):
            for seed in config.seeds:
                for method in (m for m in methods if m != "single"):
                    where = f"{pair}, {prompt.label} ({index + 1}), seed {seed}, {method}"
                    job = _job(config, [a, b], prompt.text, seed, method, where, masks if method == "masks" else None, out)
                    planned.append(PlannedImage(job, method, pair, (a.name, b.name), (a.word, b.word), prompt, index, seed))
    if "single" in methods:
        single = Prompt(single_template(config.single_prompt), source="single")
        for subject in config.subjects:
            for seed in config.seeds:
                where = f"{subject.name} alone, seed {seed}"
                job = _job(config, [subject], single.text, seed, "single", where, None, out)
                planned.append(PlannedImage(job, "single", subject.name, (subject.name,), (subject.word,), single, -1, seed))
    return planned


# -- the plain diffusers baseline ---------------------------------------------------------------------


@dataclass
class PlainJob(Job):
    """A job made by the diffusers pipeline alone (`load_lora_weights` + `set_adapters`), no FreeFuse."""

    def record(self) -> dict:
        return {**super().record(), "baseline": "diffusers"}

    @property
    def stem(self) -> str:
        return super().stem.replace(f"-{self.settings.method}-", "-diffusers-", 1)


def call_arguments(pipeline, settings: GenerationSettings) -> dict:
    """The diffusers pipeline's `__call__` arguments for `settings` (one image, its seed on a CPU
    generator as FreeFuse seeds; the guidance the architecture defaults to when unset)."""
    accepted = inspect.signature(pipeline.__call__).parameters
    architecture = backend_for(pipeline).architecture
    guidance = architecture.default_guidance if settings.guidance_scale is None else settings.guidance_scale
    arguments = {
        "prompt": settings.image_prompts[0],
        "height": settings.height,
        "width": settings.width,
        "num_inference_steps": settings.num_inference_steps,
        "guidance_scale": float(guidance),
    }
    if settings.max_sequence_length is not None and "max_sequence_length" in accepted:
        arguments["max_sequence_length"] = settings.max_sequence_length
    if settings.negative_prompt and "negative_prompt" in accepted:
        arguments["negative_prompt"] = settings.negative_prompt
    if settings.true_cfg_scale != 1.0 and "true_cfg_scale" in accepted:
        arguments["true_cfg_scale"] = settings.true_cfg_scale
    return arguments


def plain_image(pipeline, spec: RunSpec, names: list[str]):
    """One image by the diffusers pipeline alone, with its adapters `names` (loaded by the pipeline's
    own `load_lora_weights`, one per LoRA of `spec`) active at the LoRAs' weights."""
    arguments = call_arguments(pipeline, spec.settings)
    progress = dict(getattr(pipeline, "_progress_bar_config", {}))
    pipeline.set_progress_bar_config(disable=True)
    try:
        pipeline.set_adapters(names, adapter_weights=[lora.weight for lora in spec.loras])
        generator = torch.Generator("cpu").manual_seed(int(spec.settings.image_seeds[0]))
        image = pipeline(**arguments, generator=generator).images[0]
    finally:
        pipeline._progress_bar_config = progress  # the caller's progress bar setting back
    return image, arguments


class PlainAdapters:
    """The baseline's LoRAs, loaded by the pipeline's own `load_lora_weights` under names of their
    own (`diffusers_<name>`) and kept between baseline images of the same LoRAs, as the run service
    keeps FreeFuse's; another set of LoRAs, or another pipeline, replaces them. FreeFuse's runs
    activate only their own adapters, so these sit unused beside them."""

    def __init__(self) -> None:
        self.pipeline = None
        self.loaded: dict[str, tuple] = {}  # adapter name -> (file, size, mtime)

    def names(self, pipeline, spec: RunSpec) -> list[str]:
        wanted = {}
        for lora in spec.loras:
            stat = Path(lora.path).stat()
            wanted[f"diffusers_{lora.adapter_name}"] = (str(Path(lora.path).resolve()), stat.st_size, stat.st_mtime_ns)
        if pipeline is not self.pipeline:
            self.pipeline, self.loaded = pipeline, {}
        if wanted != self.loaded:
            if self.loaded:
                pipeline.delete_adapters(list(self.loaded))
                self.loaded = {}
            for (name, identity), lora in zip(wanted.items(), spec.loras, strict=True):
                pipeline.load_lora_weights(str(lora.path), adapter_name=name)
                self.loaded[name] = identity
        return list(wanted)


def _baseline_manifest(job: RunSpec, arguments: dict, folder: Path, seconds: float, source: str, job_id: str) -> dict:
    record = {
        "format": BASELINE_FORMAT,
        "baseline": "diffusers: the pipeline's own load_lora_weights + set_adapters, no FreeFuse",
        "model": {"id_or_path": job.model, "base_model": job.base_model},
        "loras": [
            {"name": lora.adapter_name, "path": str(lora.path), "sha256": cached_sha256(Path(lora.path)),
             "words": lora.words, "weight": lora.weight, "scope": lora.scope}
            for lora in job.loras
        ],  # fmt: skip
        "settings": job.settings.to_dict(),
        "call": {**arguments, "generator": f"torch.Generator('cpu').manual_seed({job.settings.image_seeds[0]})"},
        "images": [{"prompt": job.settings.image_prompts[0], "seed": job.settings.image_seeds[0]}],
        "versions": {"freefuse": __version__, "diffusers": diffusers.__version__, "peft": peft.__version__,
                     "torch": torch.__version__},  # fmt: skip
        "timings": {"total_s": round(seconds, 3)},
        "job": {"id": job_id, "source": source},
        "replay": "freefuse eval replay THIS_FILE --out FOLDER",
    }
    located(record, folder)
    return record


def write_plain(service: RunService, adapters: PlainAdapters, spec: RunSpec, image_path: Path, manifest_path: Path,
                source: str, job_id: str) -> list[Path]:  # fmt: skip
    """Make a plain diffusers image of `spec` and write it and its manifest (the manifest last), as one unit."""
    started = time.perf_counter()
    with service.lock:
        pipeline = service.pipeline(spec.model, spec.base_model)
        image, arguments = plain_image(pipeline, spec, adapters.names(pipeline, spec))
    manifest = _baseline_manifest(spec, arguments, manifest_path.parent, time.perf_counter() - started, source, job_id)
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    data = (json.dumps(manifest, indent=2, default=str) + "\n").encode()
    return write_all({image_path: buffer.getvalue(), manifest_path: data}, overwrite=True)


class ImageRunner:
    """The batch runner's `run_one` for an evaluation: FreeFuse jobs as usual, `PlainJob`s by diffusers alone."""

    def __init__(self) -> None:
        self.adapters = PlainAdapters()

    def __call__(self, service: RunService, job: Job, out: Path) -> dict:
        if not isinstance(job, PlainJob):
            return run_job(service, job, out)
        image, manifest = out / f"{job.stem}.png", out / f"{job.stem}.json"
        written = write_plain(service, self.adapters, job, image, manifest, job.source, job.id)
        return {
            "id": job.id,
            "stem": job.stem,
            "source": job.source,
            "image": image.name,
            "manifest": manifest.name,
            "files": {path.name: sha256_file(path) for path in written},
            "seconds": json.loads(manifest.read_text())["timings"]["total_s"],
            "notes": [],
        }


def read_baseline_manifest(path: Path) -> dict:
    """A baseline row's manifest (bounded size, JSON, this format)."""
    if not path.is_file():
        raise SettingsError(f"Manifest {path} does not exist.")
    if path.stat().st_size > MAX_MANIFEST_BYTES:
        raise SettingsError(f"Manifest {path} is too large to be a manifest.")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise SettingsError(f"Manifest {path} is not valid JSON: {error}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != BASELINE_FORMAT:
        raise SettingsError(f"{path} is not an evaluation baseline manifest ({BASELINE_FORMAT!r}).")
    for key, kind in (("settings", dict), ("loras", list), ("model", dict)):
        if not isinstance(manifest.get(key), kind):
            raise SettingsError(f"Manifest {path} has no valid `{key}`.")
    return manifest


def replay_plain(manifest_path: Path, service: RunService, out: Path) -> list[Path]:
    """Make a baseline row's image again from its manifest (LoRA hashes checked), into `out`."""
    spec = replay_record(read_baseline_manifest(manifest_path), manifest_path)
    spec.check()
    digest = hashlib.sha256(manifest_path.read_bytes()).hexdigest()[:8]
    stem = f"{manifest_path.stem}-replay-{digest}"
    return write_plain(service, PlainAdapters(), spec, out / f"{stem}.png", out / f"{stem}.json", f"replay of {manifest_path}", "")
