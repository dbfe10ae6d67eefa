"""Batch runs: job files, a grid form, resume after a crash, many processes through accelerate.

A job is one image: a model, LoRAs, a prompt and generate settings. Its id is a hash of all of
that, so a re-run recognises finished work by content, not by position. Each finished job's files
are written atomically, then one line is appended to this process's index shard
(`index.p<rank>.jsonl`, with the SHA-256 of every file). A job counts as done only when its index
line exists and its files still hash to it; anything else (a crash before the index line, a
truncated or edited file, a half-written index line) is redone. Processes write disjoint files and
their own shards, so `accelerate launch --num_processes N freefuse batch …` needs no locking.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import math
import os
import re
import socket
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import combinations, product
from pathlib import Path
from string import ascii_uppercase

from .errors import JobFileError, LoraFileError
from .files import atomic_write, cached_sha256, sha256_file
from .lora import header_metadata, read_header, trigger_words_from_metadata
from .models import BUILT_IN, is_hub_id, pixels_per_token
from .outputs import output_paths, write_outputs
from .runner import RunService
from .settings import GenerationSettings
from .spec import LoraSpec, RunSpec

INDEX_GLOB = "index.p*.jsonl"
MAX_JOB_FILE_BYTES = 64 << 20
JOB_KEYS = {"model", "base_model", "loras", "masks", "id"}


class BatchWarning(UserWarning):
    """Something in a job file was skipped (said on stderr)."""


@dataclass
class Job(RunSpec):
    """One image to make: a run spec, where it was defined, and the job file's folder."""

    source: str = ""  # where it was defined, for messages ("jobs.jsonl line 12")
    base: Path | None = None  # the job file's folder: paths in the id are relative to it

    def record(self) -> dict:
        """What the job's id is a hash of: paths relative to the job file, and each LoRA file's hash,
        so that moving the folder keeps finished work and replacing a LoRA file redoes it."""
        def relative(path: str) -> str:
            return os.path.relpath(path, self.base) if self.base is not None and Path(path).exists() else path

        loras = []
        for lora in self.loras:
            entry = {"words": lora.words, "weight": lora.weight, "scope": lora.scope, "name": lora.name}
            entry["path"] = relative(lora.path)
            entry["sha256"] = cached_sha256(Path(lora.path)) if Path(lora.path).is_file() else None
            loras.append(entry)
        record = {
            "model": relative(self.model),
            "loras": loras,
            "settings": self.settings.to_dict(),
            "masks": None if self.masks is None else relative(self.masks),
        }
        if self.base_model is not None:  # only when set: the ids of other jobs stay as they were
            record["base_model"] = relative(self.base_model)
        return record

    def check(self) -> None:
        """Everything that needs no weights; errors name the job's line."""
        try:
            super().check()
        except ValueError as error:
            raise JobFileError(f"{self.source}: {error}") from None

    @functools.cached_property
    def id(self) -> str:
        canonical = json.dumps(self.record(), sort_keys=True, default=str)
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]

    @property
    def stem(self) -> str:
        names = "+".join(lora.adapter_name for lora in self.loras if lora.scope == "subject")
        seed = self.settings.seed if isinstance(self.settings.seed, int) else self.settings.seed[0]
        return re.sub(r"[^A-Za-z0-9_.+-]+", "_", f"{names or 'nolora'}-{self.settings.method}-s{seed}")[
            :80
        ] + (f"-{self.id[:8]}")


def _name_of(lora: dict) -> str:
    """A grid entry's name (before it becomes a LoraSpec)."""
    return str(lora.get("name") or Path(str(lora["path"])).stem)


# -- reading jobs ---------------------------------------------------------------------------------------


def _fill(template: str, words: list[str], where: str) -> str:
    letters = set(re.findall(r"\{([A-Z])\}", template))
    needed = {ascii_uppercase[i] for i in range(len(words))}
    if letters - needed:
        raise JobFileError(
            f"{where}: prompt {template!r} uses {sorted(letters - needed)} but only "
            f"{len(words)} subject LoRA(s) give words ({{A}} is the first)."
        )
    for index, word in enumerate(words):
        letter = ascii_uppercase[index]
        if letter in letters and not word:
            raise JobFileError(
                f"{where}: LoRA {index + 1} has no words (and none in its metadata) for {{{letter}}}; "
                "give it `words`."
            )
        template = template.replace("{" + letter + "}", word)
    return template


def _first_word(lora: LoraSpec) -> str:
    """The word a {A}-style placeholder stands for: the job's first word, else the file's trigger word."""
    if lora.words:
        return str(lora.words[0])
    path = Path(lora.path)
    try:
        if path.exists() and not path.is_file() and not path.is_dir():
            raise LoraFileError(f"LoRA path {path} is not a regular file; pass the .safetensors file itself.")
        if not path.is_file():
            return ""  # missing or a folder: the file's own check says what is wrong
    except OSError:
        return ""  # a name the system refuses (too long, ...): the file's own check says so
    try:
        metadata = header_metadata(read_header(Path(lora.path)))
    except (OSError, LoraFileError):
        return ""  # the file's own check reports what is wrong with it
    words = trigger_words_from_metadata(metadata)
    return words[0] if words else ""


def _folder_or_hub_id(value: str, base: Path) -> str:
    """A path relative to the job file when it names something there; else a Hugging Face id when it
    looks like one (`owner/name`); else a path relative to the job file (its check says it is missing)."""
    try:
        if (base / Path(value).expanduser()).exists():
            return _resolve(value, base)
    except OSError:
        pass
    return value if is_hub_id(value) else _resolve(value, base)


def _resolve(path: str, base: Path) -> str:
    candidate = Path(path).expanduser()
    return str(candidate if candidate.is_absolute() else base / candidate)


def job_from_dict(entry: dict, base: Path, where: str) -> Job:
    """A job from one JSON object (a job-file line). Relative paths are relative to the job file."""
    if not isinstance(entry, dict):
        raise JobFileError(f"{where}: a job must be a JSON object, got {type(entry).__name__}.")
    if "model" not in entry or "prompt" not in entry:
        raise JobFileError(f"{where}: every job needs `model` and `prompt`.")
    raw_loras = entry.get("loras") or []
    if not isinstance(raw_loras, list) or not all(
        isinstance(lora, dict) and isinstance(lora.get("path"), str) for lora in raw_loras
    ):
        raise JobFileError(f"{where}: `loras` must be a list of objects with a `path` (a file name).")
    try:
        loras = [
            LoraSpec.parse({**lora, "path": _resolve(str(lora["path"]), base)}, f"{where}, LoRA {index + 1}")
            for index, lora in enumerate(raw_loras)
        ]
    except ValueError as error:
        raise JobFileError(str(error)) from None
    words = [_first_word(lora) for lora in loras if lora.scope == "subject"]
    if not isinstance(entry["prompt"], str):
        raise JobFileError(
            f"{where}: `prompt` must be one text (a job is one prompt; `images: N` makes N of it); put each prompt "
            "on its own line."
        )
    settings = {k: v for k, v in entry.items() if k not in JOB_KEYS}
    settings["prompt"] = _fill(str(settings["prompt"]), words, where)
    if not isinstance(entry["model"], str) or not entry["model"]:
        raise JobFileError(f"{where}: `model` must be a text: a model folder, a Hugging Face id or 'tiny'.")
    model = entry["model"] if entry["model"] in BUILT_IN else _folder_or_hub_id(entry["model"], base)
    base_model = entry.get("base_model")
    if base_model is not None:
        if not isinstance(base_model, str) or not base_model:
            raise JobFileError(
                f"{where}: `base_model` must be a text: a diffusers folder or a Hugging Face id."
            )
        base_model = _folder_or_hub_id(base_model, base)
    try:
        generation = GenerationSettings.from_dict(settings)
        multiple = pixels_per_token(model, base_model)
        if multiple is not None:
            generation.check_size(multiple)
    except ValueError as error:
        raise JobFileError(f"{where}: {error}") from None
    masks = _resolve(str(entry["masks"]), base) if entry.get("masks") else None
    return Job(
        model=model,
        loras=loras,
        settings=generation,
        masks=masks,
        source=where,
        base=base,
        base_model=base_model,
    )


MAX_STRUCTURE_ITEMS = 1_000_000
MAX_GRID_JOBS = 100_000


def _whole(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_structure_size(data, path: Path) -> None:
    """YAML aliases can make a few lines stand for billions of items ("billion laughs"): count the
    items as they would be read, and stop early."""
    seen = 0
    stack = [data]
    while stack:
        item = stack.pop()
        seen += 1
        if seen > MAX_STRUCTURE_ITEMS:
            raise JobFileError(
                f"{path} expands to more than {MAX_STRUCTURE_ITEMS:,} items (YAML aliases?); write the jobs out plainly."
            )
        if isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, str) and len(item) > 100_000:
            raise JobFileError(f"{path} holds a text of {len(item):,} characters; a job's fields are short.")


def read_structured(path: Path):
    if not path.is_file():
        raise FileNotFoundError(f"Job file {path} does not exist.")
    if path.stat().st_size > MAX_JOB_FILE_BYTES:
        raise JobFileError(f"Job file {path} is larger than {MAX_JOB_FILE_BYTES >> 20} MiB.")
    text = path.read_text(encoding="utf-8")
    if path.suffix in (".yaml", ".yml"):
        import yaml

        try:
            data = yaml.safe_load(text)  # safe_load: no Python objects from YAML tags
        except yaml.YAMLError as error:
            raise JobFileError(f"{path} is not valid YAML: {error}") from None
        check_structure_size(data, path)
        return data
    if path.suffix == ".json":
        try:
            return json.loads(text)
        except json.JSONDecodeError as error:
            raise JobFileError(f"{path} is not valid JSON: {error}") from None
    entries = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        try:
            entries.append((number, json.loads(line)))
        except json.JSONDecodeError as error:
            raise JobFileError(f"{path}:{number}: not a JSON object ({error.msg}).") from None
    return entries


def load_jobs(path: str | Path) -> list[Job]:
    """Jobs from JSONL (one object per line) or YAML/JSON (a list of objects, or {"jobs": [...]})."""
    path = Path(path)
    data = read_structured(path)
    base = path.parent
    if path.suffix in (".yaml", ".yml", ".json"):
        if isinstance(data, dict) and "jobs" in data:
            data = data["jobs"]
        if not isinstance(data, list):
            raise JobFileError(f"{path}: expected a list of jobs (or a mapping with `jobs:`).")
        numbered = [(index + 1, entry) for index, entry in enumerate(data)]
        where = "entry"
    else:
        numbered = data
        where = "line"
    jobs = [job_from_dict(entry, base, f"{path.name} {where} {number}") for number, entry in numbered]
    if not jobs:
        raise JobFileError(f"{path} has no jobs.")
    return unique_jobs(jobs)


def unique_jobs(jobs: list[Job]) -> list[Job]:
    """Drop repeats of a job (same id): two copies would write the same files. Each drop is warned."""
    seen: dict[str, Job] = {}
    for job in jobs:
        if job.id in seen:
            warnings.warn(
                f"{job.source} repeats {seen[job.id].source}; it is run once.", BatchWarning, stacklevel=2
            )
        else:
            seen[job.id] = job
    return list(seen.values())


def expand_grid(path: str | Path) -> list[Job]:
    """LoRA groups × prompts × seeds × methods, from a grid file (YAML or JSON).

    Keys: `model`, `loras` (list of {path, words, name?, weight?}), `group_size` (2 for pairs; a
    list such as [2, 3] for pairs and triples), `prompts` (templates with {A}, {B}, ...; a
    template is used for the groups whose size matches its placeholders), `seeds` (list, or
    {start, count}), `methods` (list), `global_loras` (list), and `settings` (any generate setting).
    """
    path = Path(path)
    spec = read_structured(path)
    if not isinstance(spec, dict):
        raise JobFileError(f"{path}: a grid is a mapping with model, loras, prompts, seeds, methods.")
    for key in ("model", "loras", "prompts"):
        if key not in spec:
            raise JobFileError(f"{path}: the grid needs `{key}`.")
    loras, prompts = spec["loras"], spec["prompts"]
    sizes = spec.get("group_size", 2)
    sizes = [sizes] if isinstance(sizes, int) else sizes
    seeds = spec.get("seeds", [0])
    methods = spec.get("methods", ["freefuse"])
    if not isinstance(loras, list) or not all(isinstance(lora, dict) and "path" in lora for lora in loras):
        raise JobFileError(f"{path}: `loras` must be a list of objects with a `path`.")
    if not isinstance(prompts, list) or not all(isinstance(prompt, str) for prompt in prompts):
        raise JobFileError(f"{path}: `prompts` must be a list of texts.")
    if not isinstance(sizes, list) or not all(_whole(size) for size in sizes):
        raise JobFileError(f"{path}: `group_size` must be a whole number or a list of them, e.g. [2, 3].")
    if not isinstance(methods, list) or not all(isinstance(method, str) for method in methods):
        raise JobFileError(f"{path}: `methods` must be a list of method names.")
    if isinstance(seeds, dict):
        start, count = seeds.get("start", 0), seeds.get("count", 1)
        if not (_whole(start) and _whole(count) and count >= 1):
            raise JobFileError(f"{path}: `seeds` as a mapping is {{start: N, count: M}} with whole numbers.")
        seed_count = count
    elif isinstance(seeds, list) and all(_whole(seed) for seed in seeds):
        seed_count = len(seeds)
    else:
        raise JobFileError(f"{path}: `seeds` must be a list of whole numbers or {{start, count}}.")
    settings = dict(spec.get("settings") or {})
    usable_by_size = {}
    total = 0
    for size in sizes:
        if size < 1 or size > len(loras):
            raise JobFileError(
                f"{path}: group_size {size} needs at least {size} LoRAs; the grid has {len(loras)}."
            )
        usable = [p for p in prompts if set(re.findall(r"\{([A-Z])\}", p)) == set(ascii_uppercase[:size])]
        if not usable:
            raise JobFileError(
                f"{path}: no prompt uses exactly {{A}}..{{{ascii_uppercase[size - 1]}}} for groups of {size}."
            )
        usable_by_size[size] = usable
        total += math.comb(len(loras), size) * len(usable) * seed_count * len(methods)
    if total > MAX_GRID_JOBS:
        raise JobFileError(
            f"{path} expands to {total:,} jobs; at most {MAX_GRID_JOBS:,} in one grid. Split it into several grids."
        )
    if isinstance(seeds, dict):
        seeds = list(range(seeds.get("start", 0), seeds.get("start", 0) + seeds["count"]))
    jobs = []
    for size, usable in usable_by_size.items():
        for group, prompt, seed, method in product(combinations(loras, size), usable, seeds, methods):
            entry = {
                **settings,
                "model": spec["model"],
                "prompt": prompt,
                "seed": seed,
                "method": method,
                "loras": [*group, *[{**g, "scope": "global"} for g in spec.get("global_loras", [])]],
            }
            label = f"{path.name} grid ({'+'.join(_name_of(g) for g in group)}, {prompt!r}, seed {seed}, {method})"
            jobs.append(job_from_dict(entry, path.parent, label))
    return unique_jobs(jobs)


# -- the index ------------------------------------------------------------------------------------------


def read_index(out: Path) -> dict[str, dict]:
    """Finished jobs from every process's index shard; malformed or half-written lines are skipped."""
    done: dict[str, dict] = {}
    for shard in sorted(out.glob(INDEX_GLOB)):
        for line in shard.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                continue
            if _valid_entry(entry):
                done[entry["id"]] = entry
    return done


def _valid_entry(entry) -> bool:
    if not isinstance(entry, dict) or not isinstance(entry.get("id"), str):
        return False
    files = entry.get("files")
    if not isinstance(files, dict) or not files:
        return False
    if not all(isinstance(name, str) and isinstance(digest, str) for name, digest in files.items()):
        return False
    return entry.get("image") in files and entry.get("manifest") in files


def is_done(entry: dict | None, out: Path) -> bool:
    """Every file the job wrote (image, overlay, masks, manifest) exists and still hashes as recorded."""
    if entry is None:
        return False
    root = out.resolve()
    for name, digest in entry["files"].items():
        path = out / name
        if root not in path.resolve().parents or not path.is_file() or sha256_file(path) != digest:
            return False
    return True


def append_index(shard: Path, entry: dict) -> None:
    """Append one line and fsync. A line cut short by a crash is terminated before the next one."""
    shard.parent.mkdir(parents=True, exist_ok=True)
    with open(shard, "a+b") as handle:
        handle.seek(0, os.SEEK_END)
        if handle.tell() > 0:
            handle.seek(-1, os.SEEK_END)
            if handle.read(1) != b"\n":
                handle.write(b"\n")
        handle.write((json.dumps(entry, default=str) + "\n").encode())
        handle.flush()
        os.fsync(handle.fileno())


# -- running --------------------------------------------------------------------------------------------


def job_files(out: Path, job: Job) -> list[dict[str, Path]]:
    """The files of each image a job makes: `STEM.png`…, or `STEM-0.png`, `STEM-1.png`… with `images: N`."""
    return output_paths(out, job.stem, job.settings.num_images_per_prompt)


def run_job(service: RunService, job: Job, out: Path) -> dict:
    """Generate one job (its `images` images) and write their files; return its index entry (file names
    and hashes; `image` and `manifest` are the first image's, `images` all of them)."""
    result = service.run(job, check=False)  # every job was checked before the first model loaded
    output, notes = result.output, result.notes
    files = job_files(out, job)
    output.manifest["job"] = {"id": job.id, "source": job.source}
    written = write_outputs(output, files, overwrite=True)  # this job's own names: overwriting is redoing
    return {
        "id": job.id,
        "stem": job.stem,
        "source": job.source,
        "image": files[0]["image"].name,
        "manifest": files[0]["manifest"].name,
        "images": [image["image"].name for image in files],
        "files": {path.name: sha256_file(path) for paths in written for path in paths},
        "seconds": round(output.manifest["timings"]["total_s"], 3),
        "notes": notes,
    }


CLAIMS = ".claims"


def claim(out: Path, job_id: str) -> bool:
    """Take job `job_id` for this process: a claim file made with O_EXCL, so that two batches on one
    folder do not make the same image. A claim whose process is gone (on this machine) is taken over."""
    folder = out / CLAIMS
    folder.mkdir(exist_ok=True)
    path = folder / f"{job_id}.claim"
    mine = json.dumps({"pid": os.getpid(), "host": socket.gethostname()})
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        try:
            owner = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            owner = {}
        if owner.get("host") == socket.gethostname() and _alive(owner.get("pid")):
            return False
        path.write_text(mine)  # its process is gone: a crash left it
        return True
    with os.fdopen(fd, "w") as handle:
        handle.write(mine)
    return True


def release(out: Path, job_id: str) -> None:
    with contextlib.suppress(OSError):
        (out / CLAIMS / f"{job_id}.claim").unlink()


def _alive(pid) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def process_state():
    """accelerate's view of this process. Without a GPU, a multi-process launch uses gloo on the CPU
    (`accelerate launch --multi_gpu --num_processes 2 …` starts the processes through torchrun)."""
    import torch
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())


@dataclass
class BatchReport:
    total: int
    share: int = 0  # jobs given to this process
    skipped: int = 0
    done: int = 0  # jobs made here
    images: int = 0  # images made here (a job with `images: N` makes N)
    failed: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    model_loads: int = 0
    claimed_elsewhere: int = 0  # jobs another process on the same folder was making

    @property
    def images_per_minute(self) -> float:
        return 60.0 * self.images / self.seconds if self.seconds > 0 else 0.0


def run_batch(
    jobs: list[Job],
    out: str | Path,
    service: RunService | None = None,
    on_progress: Callable[[BatchReport, int], None] | None = None,
    run_one: Callable[[RunService, Job, Path], dict] | None = None,
) -> BatchReport:
    """Run this process's share of `jobs` (all of them without accelerate); skip finished ones.

    The share is a fixed split of the whole list (not of what is left), so every process agrees
    on it without talking to the others, whatever each has finished. `run_one(service, job, out)`
    makes one job and returns its index entry (default `run_job`); an evaluation's baseline jobs,
    which are not FreeFuse runs, pass their own.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    state = process_state()
    service = service or RunService()
    if service.device is None and state.device.type != "cpu":
        service.device = str(state.device)
    shard = out / f"index.p{state.process_index}.jsonl"
    failed_log = out / f"failed.p{state.process_index}.jsonl"
    report = BatchReport(total=len(jobs))
    started = time.perf_counter()
    with state.split_between_processes(list(range(len(jobs)))) as mine:
        report.share = len(mine)
        done = read_index(out)
        for position in mine:
            job = jobs[position]
            if is_done(done.get(job.id), out):
                report.skipped += 1
            elif not claim(out, job.id):
                report.claimed_elsewhere += 1  # another batch on the same folder is making it
            else:
                try:
                    entry = (run_one or run_job)(service, job, out)
                    append_index(shard, entry)
                    done[job.id] = entry
                    report.done += 1
                    report.images += len(entry["images"])
                except KeyboardInterrupt:
                    raise
                except Exception as error:  # recorded and reported; the other jobs go on
                    failure = {
                        "id": job.id,
                        "source": job.source,
                        "error": f"{type(error).__name__}: {error}",
                    }
                    append_index(failed_log, failure)
                    report.failed.append(failure)
                finally:
                    release(out, job.id)
            report.seconds = time.perf_counter() - started
            if on_progress is not None:
                on_progress(report, len(mine))
    report.model_loads = service.model_loads
    state.wait_for_everyone()
    if state.is_main_process:
        merged = read_index(out)
        ordered = [merged[job.id] for job in jobs if job.id in merged]
        atomic_write(out / "index.jsonl", "".join(json.dumps(entry) + "\n" for entry in ordered))
    return report
