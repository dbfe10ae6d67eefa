"""Batch runs: job files, a grid form, resume after a crash, many processes through accelerate.

A job is one image: a model, LoRAs, a prompt and generate settings. Its id is a hash of all of
that, so a re-run recognises finished work by content, not by position. Each finished job's files
are written atomically, then one line is appended to this process's index shard
(`index.p<rank>.jsonl`, with the SHA-256 of every file). A job counts as done only when its index
line exists and its files still hash to it; anything else (a crash before the index line, a
truncated or edited file, a half-written index line) is redone. Processes write disjoint files and
their own shards, so `accelerate launch --num_processes N freefuse batch …` needs no locking.

Two separate `batch` commands on one folder share it through claims (`.claims/<id>.claim`, made
with O_EXCL, naming the process by pid and start time, so a pid the system reuses does not keep a
job claimed) and read the index again after each claim, so each job is made once. The batch's own
files in the folder (claims, shards, failure logs) are opened with O_NOFOLLOW: a symbolic link
planted there is refused, never written through.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import functools
import hashlib
import json
import math
import os
import re
import secrets
import socket
import stat
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from itertools import combinations, product
from pathlib import Path
from string import ascii_uppercase

from .conditions import ConditionsSpec
from .core import jsontext
from .errors import JobFileError, LoraFileError, OutputFolderError, describe_failure
from .files import atomic_write, cached_sha256, read_input, sha256_file
from .lora import header_metadata, read_header, trigger_words_from_metadata
from .models import BUILT_IN, is_hub_id, pixels_per_token
from .outputs import output_paths, write_outputs
from .runner import RunService
from .settings import GenerationSettings
from .spec import FileFacts, LoraSpec, RunSpec

INDEX_GLOB = "index.p*.jsonl"
MAX_JOB_FILE_BYTES = 64 << 20
JOB_KEYS = {"model", "base_model", "loras", "masks", "id", "conditions"}


class BatchWarning(UserWarning):
    """Something in a job file was skipped (said on stderr)."""


@dataclass
class Job(RunSpec):
    """One image to make: a run spec, where it was defined, and the job file's folder."""

    source: str = ""  # where it was defined, for messages ("jobs.jsonl line 12")
    base: Path | None = None  # the job file's folder: paths in the id are relative to it
    #: What the jobs of one file read from the files they name (each file read once for all of them).
    facts: FileFacts = field(default_factory=FileFacts, repr=False, compare=False)

    def record(self) -> dict:
        """What the job's id is a hash of: paths relative to the job file, and each LoRA file's hash,
        so that moving the folder keeps finished work and replacing a LoRA file redoes it."""

        def relative(path: str) -> str:
            return self.facts.get("relative path", None, partial(_relative, path, self.base), path, self.base)

        loras = []
        for lora in self.loras:
            entry = {"words": lora.words, "weight": lora.weight, "scope": lora.scope, "name": lora.name}
            entry["path"] = relative(lora.path)
            entry["sha256"] = self.facts.get("sha256", lora.path, partial(_file_sha256, lora.path))
            loras.append(entry)
        record = {
            "model": relative(self.model),
            "loras": loras,
            "settings": self.settings.to_dict(),
            "masks": None if self.masks is None else relative(self.masks),
        }
        if self.base_model is not None:  # only when set: the ids of other jobs stay as they were
            record["base_model"] = relative(self.base_model)
        if self.conditions is not None and not self.conditions.empty:  # likewise
            conditions = self.conditions.model_dump(mode="json")
            for ref in _image_refs(conditions):
                ref["sha256"] = self.facts.get("sha256", ref["path"], partial(_file_sha256, ref["path"]))
                ref["path"] = relative(ref["path"])
            conditions["controlnets"] = [relative(net) for net in conditions["controlnets"]]
            for key in ("ip_adapter_scale", "ip_adapter_model", "image_encoder", "redux", "redux_scale", "redux_model"):
                if conditions[key] is None:
                    del conditions[key]  # only when set: jobs without an IP-Adapter or Redux keep their ids
                elif key in ("ip_adapter_model", "image_encoder", "redux_model"):
                    conditions[key] = relative(conditions[key])
            record["conditions"] = conditions
        return record

    def check(self) -> None:
        """Everything that needs no weights; errors name the job's line. Jobs that differ only by
        their seeds are checked once (nothing checked before loading depends on the seed)."""
        try:
            notes = self.facts.get("job check", None, self._check_once, self._check_key())
        except ValueError as error:
            raise JobFileError(f"{self.source}: {error}") from None
        self.notes.extend(note for note in notes if note not in self.notes)

    def _check_once(self) -> list[str]:
        return list(super().check(self.facts).notes)

    def _check_key(self) -> tuple:
        loras = tuple(
            (lora.path, tuple(lora.words or ()), lora.weight, lora.scope, lora.name, lora.sha256) for lora in self.loras
        )
        settings = self.settings.model_dump_json(exclude={"seed"})
        conditions = None if self.conditions is None else self.conditions.model_dump_json()
        return self.model, self.base_model, self.masks, loras, settings, conditions

    @functools.cached_property
    def id(self) -> str:
        canonical = json.dumps(self.record(), sort_keys=True, default=str)
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]

    @functools.cached_property
    def stem(self) -> str:
        names = "+".join(lora.adapter_name for lora in self.loras if lora.scope == "subject")
        seed = self.settings.seed if isinstance(self.settings.seed, int) else self.settings.seed[0]
        return re.sub(r"[^A-Za-z0-9_.+-]+", "_", f"{names or 'nolora'}-{self.settings.method}-s{seed}")[
            :80
        ] + (f"-{self.id[:8]}")


def _relative(path: str, base: Path | None) -> str:
    return os.path.relpath(path, base) if base is not None and os.path.exists(path) else path


def _image_refs(conditions: dict) -> list[dict]:
    """The image entries (`{path, sha256}`) of a dumped `ConditionsSpec`."""
    refs = [conditions.get(key) for key in ("init_image", "inpaint_mask", "ip_adapter", "redux")]
    refs += [control["image"] for control in conditions.get("controls", [])]
    return [ref for ref in refs if isinstance(ref, dict)]


def _conditions(entry, base: Path, where: str) -> ConditionsSpec | None:
    """A job's `conditions`, image paths relative to the job file, ControlNets (and an IP-Adapter
    with its image encoder) files, folders or hub ids."""
    if entry is None:
        return None
    conditions = ConditionsSpec.parse(entry, where)
    values = conditions.model_dump()
    for ref in _image_refs(values):
        ref["path"] = _resolve(ref["path"], base)
    values["controlnets"] = [_folder_or_hub_id(net, base) for net in values["controlnets"]]
    for key in ("ip_adapter_model", "image_encoder", "redux_model"):
        if values[key] is not None:
            values[key] = _folder_or_hub_id(values[key], base)
    return ConditionsSpec.parse(values, where)


def _file_sha256(path: str) -> str | None:
    return cached_sha256(Path(path)) if os.path.isfile(path) else None


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


def _first_word(lora: LoraSpec, facts: FileFacts) -> str:
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
        metadata = header_metadata(facts.get("header", path, partial(read_header, path)))
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


def _check_job_label(value, where: str) -> None:
    """A job's own `id`, when a job file gives one: a short label for the user (FreeFuse names jobs by
    their content), checked like any other name it might show."""
    if value is None:
        return
    if not (
        isinstance(value, str | int)
        and not isinstance(value, bool)
        and 1 <= len(str(value)) <= 100
        and str(value).isprintable()
        and not set(str(value)) & {"/", "\\"}
    ):
        raise JobFileError(
            f"{where}: `id` {str(value)[:60]!r} is not a usable label: give 1-100 printable characters without '/' "
            "or '\\' (FreeFuse names jobs by their content; `id` is yours)."
        )


def job_from_dict(entry: dict, base: Path, where: str, facts: FileFacts | None = None) -> Job:
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
    facts = facts if facts is not None else FileFacts()
    words = [_first_word(lora, facts) for lora in loras if lora.scope == "subject"]
    _check_job_label(entry.get("id"), where)
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
        multiple = facts.get("pixels per token", model, partial(pixels_per_token, model, base_model), base_model)
        if multiple is not None:
            generation.check_size(multiple)
    except ValueError as error:
        raise JobFileError(f"{where}: {error}") from None
    masks = _resolve(str(entry["masks"]), base) if entry.get("masks") else None
    try:
        conditions = _conditions(entry.get("conditions"), base, where)
    except ValueError as error:
        raise JobFileError(str(error)) from None
    return Job(
        model=model,
        loras=loras,
        settings=generation,
        masks=masks,
        source=where,
        base=base,
        base_model=base_model,
        facts=facts,
        conditions=conditions,
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
    text = _utf8(read_input(path, "Job file"), path)
    nested = f"{path}: nested more than {jsontext.MAX_DEPTH} levels deep; a job file is a list of flat jobs."
    if path.suffix in (".yaml", ".yml"):
        import yaml

        try:
            data = yaml.safe_load(text)  # safe_load: no Python objects from YAML tags
        except yaml.YAMLError as error:
            raise JobFileError(f"{path} is not valid YAML: {error}") from None
        except RecursionError:
            raise JobFileError(nested) from None
        check_structure_size(data, path)
        try:
            jsontext.check_depth(data)
        except jsontext.NestingError:
            raise JobFileError(nested) from None
        return data
    if path.suffix == ".json":
        try:
            return jsontext.loads(text)
        except jsontext.NestingError:
            raise JobFileError(nested) from None
        except ValueError as error:
            raise JobFileError(f"{path} is not valid JSON: {error}") from None
    entries = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        try:
            entries.append((number, jsontext.loads(line)))
        except jsontext.NestingError:
            raise JobFileError(f"{path}:{number}: nested more than {jsontext.MAX_DEPTH} levels deep.") from None
        except ValueError as error:
            raise JobFileError(f"{path}:{number}: not a JSON object ({getattr(error, 'msg', error)}).") from None
    return entries


def _utf8(data: bytes, path: Path) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data[: error.start].count(b"\n") + 1
        raise JobFileError(
            f"{path} line {line} is not UTF-8 text (byte 0x{data[error.start]:02x}); save the file as UTF-8."
        ) from None


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
    facts = FileFacts()
    jobs = [job_from_dict(entry, base, f"{path.name} {where} {number}", facts) for number, entry in numbered]
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
    {start, count}), `methods` (list), `global_loras` (list), `settings` (any generate setting) and
    `conditions` (an init image, an inpainting mask, controls: as a job's, for every job).
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
    facts = FileFacts()
    templates: dict[tuple, Job] = {}  # per group, prompt and method: the job of its first seed
    lora_names = [_name_of(lora) for lora in loras]
    for size, usable in usable_by_size.items():
        for group, prompt, seed, method in product(combinations(range(len(loras)), size), usable, seeds, methods):
            names = "+".join(lora_names[index] for index in group)
            label = f"{path.name} grid ({names}, {prompt!r}, seed {seed}, {method})"
            template = templates.get((group, prompt, method))
            if template is not None:  # the same job with another seed: only the seed is checked again
                try:
                    settings_ = template.settings.with_seed(seed)
                    jobs.append(dataclasses.replace(template, settings=settings_, source=label, notes=[]))
                except ValueError as error:
                    raise JobFileError(f"{label}: {error}") from None
                continue
            entry = {
                **settings,
                **({"conditions": spec["conditions"]} if spec.get("conditions") is not None else {}),
                "model": spec["model"],
                "prompt": prompt,
                "seed": seed,
                "method": method,
                "loras": [
                    *(loras[index] for index in group),
                    *[{**g, "scope": "global"} for g in spec.get("global_loras", [])],
                ],
            }
            templates[(group, prompt, method)] = job_from_dict(entry, path.parent, label, facts)
            jobs.append(templates[(group, prompt, method)])
    return unique_jobs(jobs)


# -- the index ------------------------------------------------------------------------------------------


def _link_message(path: Path) -> str:
    return (
        f"{path} is a symbolic link; FreeFuse never writes through a link planted in the output folder. Remove it "
        "(or pick another --out) and run again."
    )


def open_own(path: Path, flags: int, mode: int = 0o644) -> int:
    """A descriptor of one of the batch's own files in the output folder (index shards, failure logs,
    claims), never through a symbolic link planted there, and never a FIFO or device that would block."""
    try:
        fd = os.open(path, flags | _NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0), mode)
    except OSError as error:
        if error.errno == errno.ELOOP or (error.errno == errno.EEXIST and path.is_symlink()):
            raise OutputFolderError(_link_message(path)) from None
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OutputFolderError(f"{path} is not a regular file; remove it (or pick another --out) and run again.")
    return fd


_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)


def refuse_links(*paths: Path) -> None:
    """Before a batch writes anything: none of its own paths is a link someone planted."""
    for path in paths:
        if path.is_symlink():
            raise OutputFolderError(_link_message(path))


class IndexReader:
    """Finished jobs from every process's index shard, read incrementally: each call reads only what
    was appended since the last one, so a batch can look again after every claim at no real cost.
    Malformed or half-written lines are skipped; links and non-files among the shards are not read."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.done: dict[str, dict] = {}
        self._read: dict[Path, int] = {}  # shard -> bytes consumed (whole lines only)

    def refresh(self) -> dict[str, dict]:
        for shard in sorted(self.out.glob(INDEX_GLOB)):
            self._read_shard(shard)
        return self.done

    def _read_shard(self, shard: Path) -> None:
        try:
            fd = open_own(shard, os.O_RDONLY)
        except (OSError, OutputFolderError):
            return  # a shard that is not a plain file: not an index someone wrote
        with os.fdopen(fd, "rb") as handle:
            start = self._read.get(shard, 0)
            if os.fstat(handle.fileno()).st_size < start:
                start = 0  # replaced or truncated: read it again
            handle.seek(start)
            data = handle.read()
        whole = data[: data.rfind(b"\n") + 1]  # a line still being written is read next time
        self._read[shard] = start + len(whole)
        for line in whole.decode("utf-8", errors="replace").splitlines():
            try:
                entry = json.loads(line)
            except (json.JSONDecodeError, RecursionError):
                continue
            if _valid_entry(entry):
                self.done[entry["id"]] = entry


def read_index(out: Path) -> dict[str, dict]:
    """Finished jobs from every process's index shard; malformed or half-written lines are skipped."""
    return IndexReader(out).refresh()


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
    """Append one line and fsync, in one write (two batches on one folder may append to one shard).
    A line cut short by a crash is terminated first. Never through a link planted in the folder."""
    shard.parent.mkdir(parents=True, exist_ok=True)
    line = (json.dumps(entry, default=str) + "\n").encode()
    fd = open_own(shard, os.O_RDWR | os.O_APPEND | os.O_CREAT)
    try:
        size = os.fstat(fd).st_size
        if size > 0 and os.pread(fd, 1, size - 1) != b"\n":
            line = b"\n" + line
        os.write(fd, line)
        os.fsync(fd)
    finally:
        os.close(fd)


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
_TOKEN = secrets.token_hex(8)  # this process's claims, told apart from an earlier process with our pid


def _process_start(pid: int) -> str | None:
    """When process `pid` started (clock ticks since boot, /proc/<pid>/stat field 22), or None where
    it cannot be read. A pid the system gave to a new process has another start time."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
        return text[text.rindex(")") + 2 :].split()[19]  # fields after the command name start at field 3
    except (OSError, ValueError, IndexError):
        return None


def _my_claim() -> dict:
    pid = os.getpid()
    return {"pid": pid, "host": socket.gethostname(), "start": _process_start(pid), "token": _TOKEN}


def _claim_is_live(owner: dict) -> bool:
    """The process that wrote a claim still runs: same host, its pid alive, and (where the system
    says when processes started) that pid's process is the one that wrote it, not a later one."""
    if owner.get("host") != socket.gethostname():
        return True  # another machine's process: it cannot be checked from here
    pid = owner.get("pid")
    if owner.get("token") == _TOKEN and pid == os.getpid():
        return True
    if not _alive(pid):
        return False
    recorded, now = owner.get("start"), _process_start(pid)
    return recorded is None or now is None or str(recorded) == now


@contextlib.contextmanager
def _claims_locked(folder: Path):
    """One process at a time decides about claims in `folder` (taking over a stale one is two steps)."""
    try:
        import fcntl
    except ImportError:  # not on this system: O_EXCL alone still keeps two fresh claims apart
        yield
        return
    fd = open_own(folder / ".lock", os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _read_claim(path: Path) -> dict:
    try:
        fd = open_own(path, os.O_RDONLY)
    except FileNotFoundError:
        return {}
    with os.fdopen(fd, "rb") as handle:
        data = handle.read(4096)
    try:
        owner = json.loads(data)
    except (ValueError, RecursionError):
        return {}
    return owner if isinstance(owner, dict) else {}


def _claims_folder(out: Path) -> Path:
    folder = out / CLAIMS
    refuse_links(folder)
    folder.mkdir(exist_ok=True)
    refuse_links(folder)
    return folder


def claim(out: Path, job_id: str) -> bool:
    """Take job `job_id` for this process: a claim file made with O_EXCL, so that two batches on one
    folder do not make the same image. A claim whose process is gone (on this machine), or whose pid
    now belongs to another process, is taken over."""
    folder = _claims_folder(out)
    path = folder / f"{job_id}.claim"
    mine = json.dumps(_my_claim()).encode()
    with _claims_locked(folder):
        try:
            fd = open_own(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            if _claim_is_live(_read_claim(path)):
                return False
            atomic_write(path, mine)  # a crash left it: replaced by a new file, never written through
            return True
        with os.fdopen(fd, "wb") as handle:
            handle.write(mine)
    return True


def release(out: Path, job_id: str) -> None:
    """Remove this process's claim on `job_id` (not one another process has taken since)."""
    folder = out / CLAIMS
    path = folder / f"{job_id}.claim"
    with contextlib.suppress(OSError, OutputFolderError), _claims_locked(folder):
        if _read_claim(path).get("token") == _TOKEN:
            path.unlink()


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


def _run_claimed(
    service: RunService,
    job: Job,
    out: Path,
    index: IndexReader,
    report: BatchReport,
    shard: Path,
    failed_log: Path,
    run_one: Callable[[RunService, Job, Path], dict],
) -> None:
    """Make one claimed job, unless another batch on this folder finished it since this one read the
    index (a manifest of it is there: the index is read again to be sure)."""
    made = any(files["manifest"].exists() for files in job_files(out, job))
    if made and is_done(index.refresh().get(job.id), out):
        report.skipped += 1
        return
    try:
        entry = run_one(service, job, out)
        append_index(shard, entry)
        index.done[job.id] = entry
        report.done += 1
        report.images += len(entry.get("images") or [entry["image"]])
    except (KeyboardInterrupt, OutputFolderError):
        raise
    except Exception as error:  # recorded and reported; the other jobs go on
        failure = describe_failure(error)
        message = failure.message if failure.is_users else f"internal error: {failure.message}"
        record = {"id": job.id, "source": job.source, "error": message}
        append_index(failed_log, record)
        report.failed.append(record)


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
    refuse_links(out / CLAIMS, shard, failed_log, out / "index.jsonl")
    report = BatchReport(total=len(jobs))
    started = time.perf_counter()
    with state.split_between_processes(list(range(len(jobs)))) as mine:
        report.share = len(mine)
        index = IndexReader(out)
        index.refresh()
        for position in mine:
            job = jobs[position]
            if is_done(index.done.get(job.id), out):
                report.skipped += 1
            elif not claim(out, job.id):
                report.claimed_elsewhere += 1  # another batch on the same folder is making it
            else:
                try:
                    _run_claimed(service, job, out, index, report, shard, failed_log, run_one or run_job)
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
