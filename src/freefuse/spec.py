"""What one run asks for before anything loads: a model, LoRA files, settings, masks.

The command line, a job-file line, the web page and a manifest replay all build a `RunSpec`.
`check()` reads the files a run names (the model folder's configs and tokenizer, each LoRA's
header and tensors, the mask file) and hands what it learnt to `freefuse.preflight`, so that a
mistake is reported before a multi-GB model loads. Loading and running are the run service's
(`freefuse.runner`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError, field_validator

from .core import MaskSet
from .embeddings import is_bundle_key, split_bundle_key
from .errors import EmbeddingError, LoraFileError, SettingsError
from .files import cached_sha256
from .lora import (
    ADAPTER_NAME,
    adapter_name,
    check_lora_contents,
    check_lora_path,
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
from .settings import GenerationSettings, Number, describe_errors

# An activation word: one to a few words of text, not a paragraph.
Word = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=200)]


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
        if not math.isfinite(value):
            raise ValueError(f"`weight` must be a finite number, got {value!r}.")
        return value

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
    #: Quantization, offload and compile (`freefuse.memory`); None: the run service's.
    memory: MemoryOptions | None = None

    def check(self) -> Checked:
        """Everything that needs no weights: model folder and architecture, LoRA files, sizes, masks,
        and then every rule of `freefuse.preflight`. Its notes are added to `notes`."""
        check_model_source(self.model)
        self._check_base_model()
        self._check_recorded_files()
        architecture = architecture_of(self.model)
        if self.memory is not None:  # the device's rules wait for the run service, still before loading
            check_memory_options(self.memory, architecture, source_facts(self.model), lora_op=self.settings.lora_op)
        for lora in self.loras:
            check_lora_path(lora.path, architecture)
        self._check_lora_files()
        model = ModelFacts(
            architecture=architecture,
            tokenizer=self._tokenizer(architecture),
            size_multiple=pixels_per_token(self.model, self.base_model),
        )
        checked = preflight(model, self.settings, [self._subject_facts(lora) for lora in self.loras], self._masks())
        self.notes.extend(note for note in checked.notes if note not in self.notes)
        return checked

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

    def _check_lora_files(self) -> None:
        """Every tensor of every file read once (finite floats), each file and name given once."""
        names: dict[str, str] = {}
        files: dict[Path, str] = {}
        for lora in self.loras:
            resolved = Path(lora.path).expanduser().resolve()
            check_lora_contents(resolved)
            if resolved in files:
                raise LoraFileError(f"LoRA file {lora.path} is given twice; give each LoRA once.")
            files[resolved] = lora.path
            if lora.adapter_name in names:
                raise LoraFileError(
                    f"Two LoRAs get the name {lora.adapter_name!r} ({names[lora.adapter_name]} and {lora.path}); "
                    "rename one file."
                )
            names[lora.adapter_name] = lora.path
            if lora.sha256 is not None:
                found = cached_sha256(resolved)
                if found != lora.sha256:
                    raise LoraFileError(changed_lora_message(lora.path, found, lora.sha256))

    @staticmethod
    def _subject_facts(lora: LoraSpec) -> SubjectFacts:
        """What preflight checks of one LoRA, from its file's header alone."""
        header = read_header(Path(lora.path).expanduser())
        keys = [key for key in header if key != "__metadata__"]
        try:
            bundled = tuple(split_bundle_key(key) for key in keys if is_bundle_key(key))
        except EmbeddingError as error:
            raise LoraFileError(f"{Path(lora.path).name}: {error}") from None
        words = lora.words or trigger_words_from_metadata(header_metadata(header)) or [b[0] for b in bundled]
        return SubjectFacts(
            name=lora.adapter_name,
            words=tuple(words),
            scope=lora.scope,
            bundled=bundled,
            text_encoders=tuple(text_encoder_parts(keys)),
            source=Path(lora.path).name,
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
        """The activation-word tokenizer read from the model folder (no weights), or None where
        it cannot be had before loading (a hub id, a single file without a local base)."""
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
    if overrides:
        changed = ", ".join(
            f"{key} {recorded.get(key)!r} -> {value!r}" for key, value in sorted(overrides.items())
        )
        notes.append(f"replaying {manifest_path} with settings given on the command line: {changed}.")
    if "size" in overrides:
        recorded.pop("width", None)
        recorded.pop("height", None)
    if "num_inference_steps" in overrides and "mask_step" not in overrides:
        recorded.pop("mask_step", None)  # the default scales with the new step count
        notes.append(
            "the mask step follows the new step count (the paper's 6 of 28, scaled); pass --mask-step to fix it."
        )
    if isinstance(overrides.get("mask_config"), dict) and isinstance(recorded.get("mask_config"), dict):
        overrides["mask_config"] = {**recorded["mask_config"], **overrides["mask_config"]}
    return GenerationSettings.from_dict({**recorded, **overrides})


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


def _replay_model(manifest: dict, manifest_path, manifest_dir: Path, here: Path) -> tuple[str, str | None]:
    record = manifest["model"]
    model = record.get("id_or_path")
    base_model = record["base_model"] if isinstance(record.get("base_model"), str) else None
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
    memory: dict | None = None,
) -> RunSpec:
    """The run a manifest describes, with what the caller gives instead.

    What is given wins over the manifest: `model`, `base_model`, `loras` (all of them), `masks`, each
    setting in `settings` (field names) and each of `memory` (`MemoryOptions` fields, None: not
    given) over how the manifest's model was loaded; the returned spec's `notes` say which ones changed.
    Files a manifest names are looked up from the manifest's own folder first, then from the
    working folder; manifests are untrusted, so those files must lie inside one of the two, or be
    given by the caller.
    """
    manifest = read_manifest(manifest_path)
    manifest_dir = Path(manifest_path).resolve().parent
    here = Path.cwd() if here is None else here
    notes: list[str] = []
    run_settings = _replay_settings(manifest["settings"], settings or {}, manifest_path, notes)
    run_memory, loaded_otherwise = _replay_memory(manifest, memory or {}, manifest_path, notes)
    if loras:
        notes.append(f"replaying {manifest_path} with the LoRAs given on the command line instead of its own.")
    else:
        loras = _replay_loras(manifest, manifest_path, manifest_dir, here)
    recorded_model = None
    if model is None:
        model, recorded_base = _replay_model(manifest, manifest_path, manifest_dir, here)
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
    return RunSpec(
        model=model,
        loras=list(loras),
        settings=run_settings,
        masks=masks,
        notes=notes,
        base_model=base_model,
        recorded_model=recorded_model or None,
        memory=run_memory,
    )
