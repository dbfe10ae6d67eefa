"""What one run asks for before anything loads: a model, LoRA files, settings, masks.

The command line, a job-file line, the web page and a manifest replay all build a `RunSpec`.
`check()` reads the files a run names (the model folder's configs and tokenizer, each LoRA's
header and tensors, the mask file) and hands what it learnt to `freefuse.preflight`, so that a
mistake is reported before a multi-GB model loads. Loading and running are the run service's
(`freefuse.runner`).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Annotated, Literal, TypeVar

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    field_validator,
)

from .conditions import (
    ConditionFacts,
    ConditionsSpec,
    controlnet_facts,
    image_encoder_source,
    ip_adapter_file,
    redux_source,
)
from .core import MaskSet
from .embeddings import check_bundle_shape, is_bundle_key, split_bundle_key
from .errors import EmbeddingError, LoraFileError, SettingsError
from .files import cached_sha256
from .lora import (
    ADAPTER_NAME,
    adapter_name,
    check_lora_contents,
    check_lora_path,
    check_lora_weight,
    header_metadata,
    read_header,
    text_encoder_parts,
    trigger_words_from_metadata,
)
from .manifest import read_manifest
from .memory import MemoryOptions, check_memory_options
from .methods import METHODS
from .models import (
    BUILT_IN,
    SHAPESWORLD,
    SHAPESWORLD_DIR,
    TINY_MODELS,
    architecture_of,
    base_model_for,
    check_model_source,
    is_hub_id,
    is_single_file,
    pixels_per_token,
    source_facts,
)
from .preflight import Checked, MaskFacts, ModelFacts, SubjectFacts, preflight
from .settings import CLI_FLAGS, GenerationSettings, Number, check_text, describe_errors, parse_size
from .tokens import RememberingTokenizer

_T = TypeVar("_T")

# An activation word: one to a few words of text, not a paragraph.
Word = Annotated[
    str,
    StringConstraints(strip_whitespace=True, min_length=1, max_length=200),
    BeforeValidator(lambda value: check_text(value, "words", limit=None)),  # runs first: undecodable bytes
]


class LoraSpec(BaseModel):
    """One LoRA of a run, as a job file, the CLI or a manifest gives it.

    Attributes:
        path: the `.safetensors` file.
        words: activation words; None: the file's metadata trigger words.
        weight: LoRA strength.
        scope: "subject" (masked) or "global" (never masked).
        name: adapter name; None: the file's stem.
        sha256: the hash the file must have (manifest replays); None: not checked.
    """

    model_config = ConfigDict(extra="forbid")

    path: Annotated[str, StringConstraints(min_length=1, max_length=4096)]
    words: Annotated[list[Word], Field(max_length=16)] | None = None
    weight: Number = 1.0
    scope: Literal["subject", "global"] = "subject"
    name: Annotated[str, StringConstraints(pattern=ADAPTER_NAME.pattern)] | None = None
    sha256: Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")] | None = Field(
        None, description="expected file hash"
    )

    @field_validator("weight")
    @classmethod
    def _finite(cls, value: float) -> float:
        return check_lora_weight(value)

    @classmethod
    def parse(cls, values: dict, where: str) -> LoraSpec:
        """From a job file's or manifest's mapping; errors name `where`."""
        if isinstance(values, dict) and isinstance(values.get("words"), str):
            values = {**values, "words": [values["words"]]}
        try:
            return cls.model_validate(values)
        except ValidationError as error:
            raise SettingsError(f"{where}: LoRA {describe_errors(error)}") from None

    @property
    def adapter_name(self) -> str:
        return self.name or adapter_name(Path(self.path))


class FileFacts:
    """What `RunSpec.check` reads from files (a model folder's configs and tokenizer, LoRA headers
    and tensors, hashes, mask files), kept for the next spec that names the same files: a batch of
    100,000 jobs over a few files reads each once, not once per job. Each fact is keyed by its
    file's path, size and modification time, so a file changed meanwhile is read again."""

    def __init__(self) -> None:
        self._known: dict[tuple, object] = {}

    def get(self, kind: str, path: str | Path | None, compute: Callable[[], _T], *extra: Hashable) -> _T:
        """`compute()`, or what it gave for the same `kind`, file and `extra` before."""
        key = (kind, str(path), _stamp(path), *extra)
        if key not in self._known:
            self._known[key] = compute()
        return self._known[key]  # type: ignore[return-value]


def _stamp(path: str | Path | None) -> tuple[int, int] | None:
    if path is None:
        return None
    try:
        stat = os.stat(os.path.expanduser(path))
    except (OSError, ValueError, TypeError):
        return None
    return stat.st_size, stat.st_mtime_ns


@dataclass
class RunSpec:
    """A model, its LoRAs, the settings, and the caller's masks file (method 'masks')."""

    model: str
    loras: list[LoraSpec]
    settings: GenerationSettings
    masks: str | None = None
    notes: list[str] = field(default_factory=list)
    #: Configs (and missing parts) of a single-file checkpoint: a diffusers folder or hub id.
    base_model: str | None = None
    #: A replayed manifest's model record (file hashes, weights hash): the model must still be it.
    recorded_model: dict | None = None
    #: What the run is conditioned on besides its prompt (init image, inpainting mask, ControlNets).
    conditions: ConditionsSpec | None = None
    #: Quantization, offload and compile (`freefuse.memory`); None: the run service's.
    memory: MemoryOptions | None = None

    def check(self, facts: FileFacts | None = None) -> Checked:
        """Everything that needs no weights: model folder and architecture, LoRA files, sizes, masks,
        and then every rule of `freefuse.preflight`. Its notes are added to `notes`. `facts`: what
        checks of other specs read from the same files (a batch's jobs share one)."""
        facts = facts if facts is not None else FileFacts()
        model, base = self.model, self.base_model
        facts.get("model source", model, lambda: check_model_source(model))
        self._check_base_model()
        self._check_recorded_files()
        architecture = facts.get("architecture", model, lambda: architecture_of(model))
        if self.memory is not None:  # the device's rules wait for the run service, still before loading
            source = facts.get("source facts", model, lambda: source_facts(model))
            check_memory_options(self.memory, architecture, source, settings=self.settings)
        for lora in self.loras:
            facts.get("lora path", lora.path, partial(check_lora_path, lora.path, architecture), architecture)
        self._check_lora_files(facts)
        model_facts = ModelFacts(
            architecture=architecture,
            tokenizer=facts.get("tokenizer", model, lambda: self._tokenizer(architecture), base),
            size_multiple=facts.get("pixels per token", model, lambda: pixels_per_token(model, base), base),
        )
        subjects = [self._subject_facts(lora, facts) for lora in self.loras]
        masks = facts.get("masks", self.masks, self._masks, self.settings.method)
        checked = preflight(model_facts, self.settings, subjects, masks, self._condition_facts(facts))
        self.notes.extend(note for note in checked.notes if note not in self.notes)
        return checked

    def _condition_facts(self, facts: FileFacts) -> ConditionFacts | None:
        """The condition images read and checked (each file once per batch), and each ControlNet's
        config (its class, its union modes) read from its folder without its weights."""
        conditions = self.conditions
        if conditions is None or conditions.empty:
            return None
        stamps = tuple(_stamp(path) for path in conditions.paths())
        loaded = facts.get("conditions", None, conditions.load, conditions.model_dump_json(), stamps)
        nets = [facts.get("controlnet", source, partial(controlnet_facts, source)) for source in conditions.controlnets]
        memory = self.memory
        unfollowed = memory is not None and (memory.offload in ("sequential", "group") or memory.compile)
        if conditions.ip_adapter_model is not None and unfollowed:
            raise SettingsError(
                "An IP-Adapter swaps the transformer's attention processors after the model has loaded, which "
                f"{'--compile' if memory.compile else '--offload ' + memory.offload} does not follow (not supported): "
                "use --offload model, or leave it out."
            )
        if conditions.ip_adapter_model is not None:  # its file's header and its encoder's folder, no weights
            facts.get("ip-adapter", conditions.ip_adapter_model, partial(ip_adapter_file, conditions.ip_adapter_model))
            image_encoder_source(conditions.ip_encoder)
        if conditions.redux_model is not None:
            redux_source(conditions.redux_model)
        # The model the command line loads has an IP-Adapter exactly when one is named; Redux likewise.
        return ConditionFacts(
            loaded,
            nets,
            ip_adapter=conditions.ip_adapter_model is not None,
            redux=conditions.redux_model is not None,
        )

    def _check_base_model(self) -> None:
        if self.base_model is None:
            return
        if not is_single_file(self.model):
            raise SettingsError(
                "A base model only applies to a single-file checkpoint (a model FILE.safetensors or FILE.gguf); leave "
                "it out."
            )
        if not Path(self.base_model).expanduser().is_dir() and not is_hub_id(self.base_model):
            raise SettingsError(f"Base model {self.base_model} is neither a diffusers folder nor a Hugging Face id.")

    def _check_recorded_files(self) -> None:
        """A replay's model files, where they are on disk (a folder, a single file), still hash as the
        manifest recorded; what cannot be read before loading is compared once it has loaded."""
        files = (self.recorded_model or {}).get("files")
        if not isinstance(files, dict):
            return
        local = Path(self.model).expanduser()
        for name, digest in files.items():
            path = local if name == "checkpoint" else local / name
            if name != "checkpoint" and not local.is_dir():
                continue
            if not path.is_file():
                raise SettingsError(model_changed_message(self.model, [f"{name} (missing)"]))
            if cached_sha256(path) != digest:
                raise SettingsError(model_changed_message(self.model, [f"{name} (changed)"]))

    def _check_lora_files(self, facts: FileFacts) -> None:
        """Every tensor of every file read once (finite floats), each file and name given once."""
        names: dict[str, str] = {}
        files: dict[Path, str] = {}
        for lora in self.loras:
            resolved = Path(lora.path).expanduser().resolve()
            facts.get("lora contents", resolved, partial(check_lora_contents, resolved))
            if resolved in files:
                raise LoraFileError(f"LoRA file {lora.path} is given twice; give each LoRA once.")
            files[resolved] = lora.path
            if lora.adapter_name in names:
                raise LoraFileError(
                    f"Two LoRAs get the name {lora.adapter_name!r} ({names[lora.adapter_name]} and {lora.path}); "
                    "name one (CLI: --lora NAME::PATH; job files: `name`) or rename its file."
                )
            names[lora.adapter_name] = lora.path
            if lora.sha256 is not None:
                found = facts.get("sha256", resolved, partial(cached_sha256, resolved))
                if found != lora.sha256:
                    raise LoraFileError(changed_lora_message(lora.path, found, lora.sha256))

    @staticmethod
    def _subject_facts(lora: LoraSpec, facts: FileFacts) -> SubjectFacts:
        """What preflight checks of one LoRA, from its file's header alone."""
        path = Path(lora.path).expanduser()
        bundled, text_encoders, metadata_words = facts.get("header facts", path, partial(_header_facts, path, facts))
        return SubjectFacts(
            name=lora.adapter_name,
            words=tuple(lora.words or metadata_words or [b[0] for b in bundled]),
            scope=lora.scope,
            bundled=bundled,
            text_encoders=text_encoders,
            source=path.name,
        )

    def _masks(self) -> MaskFacts | None:
        """The mask file read whole and checked (names, size are preflight's)."""
        if self.masks is None:
            return None
        if not METHODS[self.settings.method].takes_masks:
            return MaskFacts()  # preflight says that this method takes none
        if not Path(self.masks).is_file():
            raise SettingsError(
                f"Mask file {self.masks} does not exist (use a .masks.json or .safetensors from `freefuse masks`)."
            )
        try:
            mask_set = MaskSet.load(self.masks)
        except ValueError as error:
            raise SettingsError(f"Mask file {self.masks}: {error}") from None
        return MaskFacts(names=tuple(mask_set.names), size=mask_set.size)

    def _tokenizer(self, architecture):
        """The activation-word tokenizer read from the model folder (no weights), remembering what it
        tokenized for the next check; None where it cannot be had before loading (a hub id, a
        single file without a local base)."""
        tokenizer = self._read_tokenizer(architecture)
        return None if tokenizer is None else RememberingTokenizer(tokenizer)

    def _read_tokenizer(self, architecture):
        if architecture is None:
            return None
        if self.model in TINY_MODELS:
            return architecture.load_tokenizer(None)
        if self.model == SHAPESWORLD:
            return architecture.load_tokenizer(SHAPESWORLD_DIR)
        if Path(self.model).expanduser().is_dir():
            return architecture.load_tokenizer(Path(self.model).expanduser())
        base = base_model_for(self.model, self.base_model) if is_single_file(self.model) else None
        if base and Path(base).expanduser().is_dir():
            return architecture.load_tokenizer(Path(base).expanduser())
        return None


def _header_facts(path: Path, facts: FileFacts) -> tuple[tuple[tuple[str, str], ...], tuple[str, ...], list[str]]:
    """From a LoRA file's header: its bundled embeddings (placeholder, encoder), the text encoders
    it adapts, and its metadata's trigger words."""
    header = facts.get("header", path, partial(read_header, path))
    keys = [key for key in header if key != "__metadata__"]
    try:
        bundled = tuple(split_bundle_key(key) for key in keys if is_bundle_key(key))
        for key, (placeholder, encoder) in zip((k for k in keys if is_bundle_key(k)), bundled, strict=True):
            check_bundle_shape(placeholder, encoder, header[key]["shape"])
    except EmbeddingError as error:
        raise LoraFileError(f"{path.name}: {error}") from None
    return bundled, tuple(text_encoder_parts(keys)), trigger_words_from_metadata(header_metadata(header))


def model_changed_message(model: str, differences: list[str]) -> str:
    return (
        f"Model {model} is not the one the manifest recorded: {', '.join(differences)}. The run would not be the "
        "same; pass --model to replay with this model anyway."
    )


def changed_lora_message(path: str, found: str, recorded: str) -> str:
    return (
        f"LoRA {path} has changed since the manifest was written (sha256 {found[:12]}… != {recorded[:12]}…); pass "
        "the right file with --lora."
    )


# -- replay ----------------------------------------------------------------------------------------------


def _inside(path: Path, folder: Path) -> bool:
    path, folder = path.resolve(), folder.resolve()
    return path == folder or folder in path.parents


def _resolve_recorded(
    entry: dict, key: str, manifest_dir: Path, here: Path, what: str, manifest_path, flag: str
) -> str:
    """A file a manifest names: from the manifest's folder first (`<key>_from_manifest`), then as
    recorded (relative to the working folder). Untrusted: it must lie inside one of the two."""
    recorded = entry.get(key)
    candidates = []
    relative = entry.get(f"{key}_from_manifest")
    if isinstance(relative, str):
        candidates.append(manifest_dir / relative)
    if isinstance(recorded, str):
        candidates.append(Path(recorded) if Path(recorded).is_absolute() else here / recorded)
    for candidate in candidates:
        if candidate.exists():
            if not (_inside(candidate, manifest_dir) or _inside(candidate, here)):
                raise SettingsError(
                    f"Manifest {what} {str(candidate.resolve())!r} is outside both the manifest's folder and the working "
                    f"directory; for safety it is only used when given on the command line ({flag})."
                )
            return str(candidate)
    looked = ", ".join(str(c) for c in candidates) or "nowhere: no path recorded"
    raise SettingsError(
        f"Manifest {manifest_path} names a {what} that does not exist (looked at {looked}); pass it with {flag}."
    )


def _replay_settings(recorded: dict, overrides: dict, manifest_path, notes: list[str]) -> GenerationSettings:
    """The manifest's settings with the caller's winning; the notes say what changed."""
    recorded = dict(recorded)
    overrides = dict(overrides)
    changed = _setting_differences(recorded, overrides)
    if changed:
        notes.append(f"replaying {manifest_path} with settings that differ from it: {'; '.join(changed)}.")
    if "size" in overrides:
        recorded.pop("width", None)
        recorded.pop("height", None)
    if "num_inference_steps" in overrides and "mask_step" not in overrides:
        recorded.pop("mask_step", None)  # the default scales with the new step count
        notes.append(
            "the mask step follows the new step count (the model's share of the steps); pass --mask-step to fix it."
        )
    if isinstance(overrides.get("mask_config"), dict) and isinstance(recorded.get("mask_config"), dict):
        overrides["mask_config"] = {**recorded["mask_config"], **overrides["mask_config"]}
    return GenerationSettings.from_dict({**recorded, **overrides})


def _setting_differences(recorded: dict, overrides: dict) -> list[str]:
    """`--flag recorded -> given` for each setting given that differs from what the manifest recorded."""
    changed = []
    for key, value in sorted(overrides.items()):
        if key == "size":
            before = f"{recorded.get('width')}x{recorded.get('height')}"
            width, height = parse_size(value)
            value = f"{width}x{height}"
        elif key == "mask_config" and isinstance(value, dict):
            before = {name: (recorded.get(key) or {}).get(name) for name in value}
        else:
            before = recorded.get(key)
        if before != value:
            flag = CLI_FLAGS[key][0][0] if key in CLI_FLAGS else key
            changed.append(f"{flag} {before!r} -> {value!r}")
    return changed


def _lora_differences(given: list[LoraSpec], manifest: dict, manifest_dir: Path) -> list[str]:
    """For LoRAs given instead of a manifest's: every field of each that differs from what the manifest
    recorded for the same LoRA (by name, else by file), and the LoRAs only one side has."""
    recorded = [entry for entry in manifest.get("loras") or [] if isinstance(entry, dict)]
    unmatched = list(recorded)
    changes = []
    for lora in given:
        entry = _recorded_entry(lora, unmatched, manifest_dir)
        if entry is None:
            changes.append(f"LoRA {lora.adapter_name!r} is not in the manifest")
            continue
        unmatched.remove(entry)
        fields = {
            "name": (lora.adapter_name, entry.get("name")),
            "weight": (lora.weight, entry.get("weight")),
            "words": (_words_of(lora), entry.get("words")),
            "scope": (lora.scope, entry.get("scope", "subject")),
            "file sha256": (_sha256_of(lora.path), entry.get("sha256")),
        }
        for what, (now, then) in fields.items():
            if then is not None and now is not None and now != then:
                shown = (now[:12] + "…", then[:12] + "…") if what == "file sha256" else (now, then)
                changes.append(f"LoRA {lora.adapter_name!r} {what} {shown[0]!r} (the manifest: {shown[1]!r})")
    changes.extend(f"LoRA {entry.get('name')!r} of the manifest is left out" for entry in unmatched)
    return changes


def _recorded_entry(lora: LoraSpec, entries: list[dict], manifest_dir: Path) -> dict | None:
    """The manifest's entry for `lora`: the same name, else the same file (hash or path)."""
    for entry in entries:
        if entry.get("name") == lora.adapter_name:
            return entry
    digest = _sha256_of(lora.path)
    for entry in entries:
        if digest is not None and entry.get("sha256") == digest:
            return entry
        recorded = [entry.get("path"), str(manifest_dir / str(entry.get("path_from_manifest")))]
        here = Path(lora.path).expanduser().resolve()
        if any(isinstance(path, str) and Path(path).expanduser().resolve() == here for path in recorded):
            return entry
    return None


def _sha256_of(path: str) -> str | None:
    resolved = Path(path).expanduser()
    return cached_sha256(resolved) if resolved.is_file() else None


def _words_of(lora: LoraSpec) -> list[str] | None:
    """The words a LoRA runs with: given, else its file's trigger words (None when unreadable)."""
    if lora.words:
        return list(lora.words)
    try:
        return trigger_words_from_metadata(header_metadata(read_header(Path(lora.path).expanduser()))) or None
    except (OSError, LoraFileError):
        return None


def _replay_loras(manifest: dict, manifest_path, manifest_dir: Path, here: Path) -> list[LoraSpec]:
    loras = []
    for index, entry in enumerate(manifest["loras"]):
        if not isinstance(entry, dict):
            raise SettingsError(f"Manifest {manifest_path} has a malformed LoRA entry; pass the LoRAs with --lora.")
        path = _resolve_recorded(entry, "path", manifest_dir, here, "LoRA", manifest_path, "--lora PATH=WORD")
        known = {key: entry.get(key) for key in ("words", "weight", "scope", "name", "sha256")}
        loras.append(LoraSpec.parse({**known, "path": path}, f"{manifest_path} LoRA {index + 1}"))
    return loras


def _replay_memory(manifest: dict, given: dict, manifest_path, notes: list[str]) -> tuple[MemoryOptions, bool]:
    """How the manifest's model was loaded, with each option the caller gives winning (and said),
    and whether that changed anything."""
    try:
        recorded = MemoryOptions.from_record(manifest["model"].get("load"))
    except SettingsError as error:
        raise SettingsError(f"Manifest {manifest_path}: {error}") from None
    chosen = recorded.updated(**given)
    if chosen != recorded:
        before, after = recorded.to_record(), chosen.to_record()
        changed = ", ".join(f"{key} {before[key]!r} -> {after[key]!r}" for key in before if before[key] != after[key])
        notes.append(f"replaying {manifest_path} with the model loaded otherwise: {changed}.")
    return chosen, chosen != recorded


def _replay_model(
    manifest: dict, manifest_path, manifest_dir: Path, here: Path, base_given: bool
) -> tuple[str, str | None]:
    """The model a manifest names and, unless the caller gives one, the base model its checkpoint's
    configs came from; local paths of either must lie inside the manifest's or the working folder."""
    record = manifest["model"]
    model = record.get("id_or_path")
    base_model = record["base_model"] if isinstance(record.get("base_model"), str) and not base_given else None
    if base_model is not None and not is_hub_id(base_model):
        base_model = _resolve_recorded(
            {"path": base_model, "path_from_manifest": record.get("base_model_from_manifest")},
            "path",
            manifest_dir,
            here,
            "base model folder",
            manifest_path,
            "--base-model",
        )
    if not isinstance(model, str) or not model:
        raise SettingsError(f"Manifest {manifest_path} records no model path; pass --model.")
    if model not in BUILT_IN and not is_hub_id(model):
        model = _resolve_recorded(
            {"path": model, "path_from_manifest": record.get("path_from_manifest")},
            "path",
            manifest_dir,
            here,
            "model folder",
            manifest_path,
            "--model",
        )
    return model, base_model


def replay_spec(
    manifest_path: str | Path,
    model: str | None = None,
    loras: list | None = None,
    settings: dict | None = None,
    masks: str | None = None,
    here: Path | None = None,
    base_model: str | None = None,
    conditions: ConditionsSpec | None = None,
    memory: dict | None = None,
) -> RunSpec:
    """The run a manifest describes, with what the caller gives instead.

    What is given wins over the manifest: `model`, `base_model`, `loras` (all of them), `masks`, each
    setting in `settings` (field names), each condition `conditions` sets (an init image, the
    controls...) and each of `memory` (`MemoryOptions` fields, None: not given) over how the
    manifest's model was loaded; the returned spec's `notes` say which ones changed. Condition
    images must still have the hashes the manifest recorded.
    Files a manifest names are looked up from the manifest's own folder first, then from the
    working folder; manifests are untrusted, so those files must lie inside one of the two, or be
    given by the caller.
    """
    return replay_record(
        read_manifest(manifest_path), manifest_path, model, loras, settings, masks, here, base_model, conditions, memory
    )


def replay_record(
    manifest: dict,
    manifest_path: str | Path,
    model: str | None = None,
    loras: list | None = None,
    settings: dict | None = None,
    masks: str | None = None,
    here: Path | None = None,
    base_model: str | None = None,
    conditions: ConditionsSpec | None = None,
    memory: dict | None = None,
) -> RunSpec:
    """`replay_spec` for a manifest already read (and checked by its reader) from `manifest_path`;
    other records of a run in the manifest's shape (an evaluation's baseline rows) replay through it."""
    manifest_dir = Path(manifest_path).resolve().parent
    here = Path.cwd() if here is None else here
    notes: list[str] = []
    run_settings = _replay_settings(manifest["settings"], settings or {}, manifest_path, notes)
    run_memory, loaded_otherwise = _replay_memory(manifest, memory or {}, manifest_path, notes)
    if loras:
        differences = _lora_differences(list(loras), manifest, manifest_dir)
        notes.append(
            f"replaying {manifest_path} with the LoRAs given instead of its own: {'; '.join(differences)}."
            if differences
            else f"replaying {manifest_path} with the LoRAs given instead of its own (the same as recorded)."
        )
    else:
        loras = _replay_loras(manifest, manifest_path, manifest_dir, here)
    recorded_model = None
    recorded_id = manifest["model"].get("id_or_path") if isinstance(manifest.get("model"), dict) else None
    if model is not None and recorded_id is not None and model != recorded_id:
        notes.append(f"replaying {manifest_path} with model {model} (the manifest: {recorded_id}).")
    if model is None:
        model, recorded_base = _replay_model(manifest, manifest_path, manifest_dir, here, base_model is not None)
        base_model = base_model if base_model is not None else recorded_base
        # Weights loaded otherwise (another quantization) hash otherwise: only the files are compared.
        recorded_model = {
            key: manifest["model"][key]
            for key in ("files",) + (() if loaded_otherwise else ("base_weights_sha256",))
            if isinstance(manifest["model"].get(key), dict | str)
        }
    if masks is None and isinstance(manifest.get("masks"), str) and manifest["masks"] != "in-memory":
        masks = _resolve_recorded(
            {"path": manifest["masks"], "path_from_manifest": manifest.get("masks_from_manifest")},
            "path",
            manifest_dir,
            here,
            "mask file",
            manifest_path,
            "--masks",
        )
    if base_model is not None and not Path(base_model).is_dir() and not is_hub_id(base_model):
        raise SettingsError(
            f"Manifest {manifest_path} loaded its checkpoint with configs from {base_model}, which is not here; "
            "pass --model and --base-model."
        )
    recorded_conditions = _replay_conditions(manifest, manifest_path, manifest_dir, here, conditions)
    return RunSpec(
        model=model,
        loras=list(loras),
        settings=run_settings,
        masks=masks,
        notes=notes,
        base_model=base_model,
        recorded_model=recorded_model or None,
        conditions=_given_conditions(recorded_conditions, conditions, manifest_path, notes),
        memory=run_memory,
    )


def _replay_conditions(
    manifest: dict, manifest_path, manifest_dir: Path, here: Path, given: ConditionsSpec | None
) -> ConditionsSpec | None:
    """The conditions a manifest recorded, each image found again (from the manifest's folder first)
    with the hash it had; the fields `given` sets are not looked for (the caller's win)."""
    record = manifest.get("conditions")
    if not isinstance(record, dict) or not record:
        return None
    taken = given.model_fields_set if given is not None else set()

    def image(entry, what: str, flag: str):
        if not isinstance(entry, dict):
            raise SettingsError(f"Manifest {manifest_path} has a malformed {what} record; pass it with {flag}.")
        if entry.get("path") is None:
            raise SettingsError(
                f"Manifest {manifest_path} records a {what} given in memory (no file); pass it with {flag}."
            )
        path = _resolve_recorded(entry, "path", manifest_dir, here, what, manifest_path, flag)
        return {"path": path, "sha256": entry.get("sha256")}

    values: dict = {}
    if "init_image" in record and "init_image" not in taken:
        values["init_image"] = image(record["init_image"], "init image", "--init-image")
        values["strength"] = record.get("strength")
    if "inpaint_mask" in record and "inpaint_mask" not in taken:
        values["inpaint_mask"] = image(record["inpaint_mask"], "inpainting mask", "--inpaint-mask")
    if record.get("controls") and "controls" not in taken:
        controls = record["controls"] if isinstance(record["controls"], list) else []
        values["controls"] = [
            {
                "type": entry.get("type"),
                "image": image(entry.get("image"), "control image", "--control TYPE=IMAGE"),
                "scale": entry.get("scale", 1.0),
                "controlnet": entry.get("controlnet", 0),
            }
            for entry in controls
            if isinstance(entry, dict)
        ]
    if record.get("controlnets") and "controlnets" not in taken:
        values["controlnets"] = [
            _recorded_controlnet(entry, manifest_path, manifest_dir, here) for entry in record["controlnets"]
        ]
    # Reference images, each with the models that read it (the second, the IP-Adapter's image
    # encoder, is looked for only when the first is: another adapter given comes with its own).
    for kind, what, models in (
        ("ip_adapter", "IP-Adapter", (("ip_adapter_model", "model", "IP-Adapter"), ("image_encoder", "image_encoder", "image encoder"))),
        ("redux", "Redux", (("redux_model", "model", "Redux model"),)),
    ):
        entry = record.get(kind)
        if not isinstance(entry, dict):
            continue
        if kind not in taken:
            values[kind] = image(entry.get("image"), f"{what} image", _flag(kind))
            values[f"{kind}_scale"] = entry.get("scale")
        for field_name, key, label in models:
            if field_name in taken or models[0][0] in taken:
                break
            values[field_name] = _recorded_source(entry, key, manifest_path, manifest_dir, here, label, _flag(field_name))
    return ConditionsSpec.parse(values, f"Manifest {manifest_path}")


def _flag(field_name: str) -> str:
    return "--" + field_name.replace("_", "-")


def _recorded_source(entry: dict, key: str, manifest_path, manifest_dir: Path, here: Path, what: str, flag: str) -> str:
    """A model a manifest's entry names under `key`: a hub id as it is, a file or folder found again."""
    source = entry.get(key)
    if not isinstance(source, str) or not source:
        raise SettingsError(
            f"Manifest {manifest_path} records an {what} the caller loaded (no source); pass it with {flag}."
        )
    if is_hub_id(source) and not Path(source).expanduser().exists():
        return source
    return _resolve_recorded(entry, key, manifest_dir, here, what, manifest_path, flag)


def _recorded_controlnet(entry, manifest_path, manifest_dir: Path, here: Path) -> str:
    source = entry.get("id_or_path") if isinstance(entry, dict) else None
    if not isinstance(source, str) or not source:
        raise SettingsError(f"Manifest {manifest_path} records a ControlNet without its source; pass --controlnet.")
    if is_hub_id(source) and not Path(source).expanduser().is_dir():
        return source
    return _resolve_recorded(entry, "id_or_path", manifest_dir, here, "ControlNet folder", manifest_path, "--controlnet")


def _given_conditions(
    recorded: ConditionsSpec | None, given: ConditionsSpec | None, manifest_path, notes: list[str]
) -> ConditionsSpec | None:
    """The manifest's conditions with each one the caller gives instead (and said)."""
    if given is None or not given.model_fields_set:
        return recorded
    changed = sorted(given.model_fields_set)
    notes.append(f"replaying {manifest_path} with conditions given instead of its own: {', '.join(changed)}.")
    merged = (recorded or ConditionsSpec()).model_dump()
    merged.update(given.model_dump(include=given.model_fields_set))
    return ConditionsSpec.parse(merged, "the conditions given")
