"""What one run asks for before anything loads: a model, LoRA files, settings, masks.

The command line, a job-file line and a manifest replay all build a `RunSpec`. `check()` does
every check that needs no weights (files, architecture, sizes), so that a mistake is reported
before a multi-GB model loads; `load()` loads the model and the LoRAs into a `FreeFuse`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError, field_validator

from .settings import GenerationSettings, Number, SettingsError, describe_errors

# An activation word: one to a few words of text, not a paragraph.
Word = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=200)]

if TYPE_CHECKING:
    from .pipeline import FreeFuse


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
    name: Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}$")] | None = None
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
        from .pipeline import default_adapter_name

        return self.name or default_adapter_name(self.path)


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

    def check(self) -> None:
        """Everything that needs no weights: model folder and architecture, LoRA files, sizes, masks."""
        from .lora import check_lora_contents, check_lora_path
        from .methods import get_method
        from .models import architecture_of, check_model_source, is_hub_id, is_single_file, pixels_per_token

        check_model_source(self.model)
        if self.base_model is not None:
            if not is_single_file(self.model):
                raise SettingsError(
                    "--base-model only applies to a single-file checkpoint (--model FILE.safetensors); leave it out."
                )
            base = Path(self.base_model).expanduser()
            if not base.is_dir() and not is_hub_id(self.base_model):
                raise SettingsError(
                    f"--base-model {self.base_model} is neither a diffusers folder nor a Hugging Face id."
                )
        architecture = architecture_of(self.model)
        multiple = pixels_per_token(self.model, self.base_model)
        if multiple is not None:
            self.settings.check_size(multiple)
        if architecture is not None:
            self.notes.extend(architecture.check_settings(self.settings))
            if get_method(self.settings.method).reads_attention:
                architecture.check_mask_config(self.settings)
        if not self.loras:
            raise SettingsError(
                "No LoRA given; a run needs at least one (CLI: --lora PATH=WORD; job files: `loras`)."
            )
        names: dict[str, str] = {}
        files: dict[Path, str] = {}
        for lora in self.loras:
            resolved = check_lora_path(lora.path, architecture).resolve()
            check_lora_contents(resolved)
            if resolved in files:
                raise SettingsError(f"LoRA file {lora.path} is given twice; give each LoRA once.")
            files[resolved] = lora.path
            if lora.adapter_name in names:
                raise SettingsError(
                    f"Two LoRAs get the name {lora.adapter_name!r} ({names[lora.adapter_name]} and {lora.path}); "
                    "rename one file."
                )
            names[lora.adapter_name] = lora.path
        method = get_method(self.settings.method)
        if method.needs_words:
            words = self._subject_words()
            self._check_words(words)
            if architecture is not None:
                self._check_prompt_words(architecture, words)
        if self.masks is not None and not method.takes_masks:
            raise SettingsError(
                f"--masks is only used with --method masks (method is {self.settings.method!r}); add --method masks "
                "or leave --masks out."
            )
        if method.takes_masks and self.masks is None:
            raise SettingsError(
                "--method masks needs --masks FILE (a .masks.json or .safetensors from `freefuse masks`)."
            )
        if self.masks is not None and not Path(self.masks).is_file():
            raise SettingsError(
                f"--masks {self.masks}: no such file (use a .masks.json or .safetensors from `freefuse masks`)."
            )
        if self.masks is not None:
            self._check_masks(multiple)

    def _check_masks(self, multiple: int | None) -> None:
        """The mask file read whole, its names and size checked, before any model loads."""
        from .core import MaskSet

        try:
            mask_set = MaskSet.load(self.masks)
        except ValueError as error:
            raise SettingsError(f"--masks: {error}") from None
        subjects = [lora.adapter_name for lora in self.loras if lora.scope == "subject"]
        missing = [name for name in subjects if name not in mask_set.names]
        if missing:
            raise SettingsError(f"--masks {self.masks} has no mask for {missing}; it has {mask_set.names}.")
        size = (self.settings.height, self.settings.width)
        sizes = [size] + ([(size[0] // multiple, size[1] // multiple)] if multiple else [])
        if mask_set.size not in sizes:
            wanted = " or ".join(f"{h}x{w}" for h, w in sizes)
            raise SettingsError(
                f"--masks {self.masks} has {mask_set.size[0]}x{mask_set.size[1]} masks; this run needs {wanted} "
                "(H x W: the image, or its token grid)."
            )

    def _subject_words(self) -> dict[str, list[str]]:
        """Each subject LoRA's words: given, or from its file's metadata (header only)."""
        from .lora import header_metadata, read_header, trigger_words_from_metadata

        return {
            lora.adapter_name: lora.words
            or trigger_words_from_metadata(header_metadata(read_header(Path(lora.path))))
            for lora in self.loras
            if lora.scope == "subject"
        }

    def _check_prompt_words(self, architecture, words: dict[str, list[str]]) -> None:
        """Every subject's words found in some prompt, with the model's own tokenizer (read from its
        folder, no weights): a missing word is said before a multi-GB load."""
        from .models import SHAPESWORLD, TINY_MODELS, base_model_for, is_single_file
        from .tokens import WordNotFoundError, find_word

        if self.model in TINY_MODELS:
            folder = None
        elif self.model == SHAPESWORLD:
            from .shapesworld.model import MODEL_DIR

            folder = MODEL_DIR
        elif Path(self.model).expanduser().is_dir():
            folder = Path(self.model).expanduser()
        elif is_single_file(self.model) and _local_folder(base_model_for(self.model, self.base_model)):
            folder = _local_folder(base_model_for(self.model, self.base_model))
        else:
            return  # a hub id or a single file's own tokenizer: checked once it loads
        tokenizer = architecture.load_tokenizer(folder)
        if tokenizer is None:
            return
        limit = self.settings.max_sequence_length or architecture.max_sequence_length
        for name, subject_words in words.items():
            first_error = None
            found = False
            for prompt in self.settings.prompts:
                for word in subject_words:
                    try:
                        find_word(tokenizer, prompt, word, limit)
                        found = True
                    except WordNotFoundError as error:
                        first_error = first_error or error
            if subject_words and not found:
                raise WordNotFoundError(f"LoRA {name!r}: {first_error}")

    @staticmethod
    def _check_words(words: dict[str, list[str]]) -> None:
        """Subjects sharing a word (given, or from their files' metadata) cannot be told apart."""
        from .pipeline import shared_word_message
        from .tokens import shared_word

        clash = shared_word(words)
        if clash:
            raise SettingsError(shared_word_message(*clash))

    def load(
        self,
        device: str | None = None,
        dtype: str | None = None,
        offload: bool = False,
        status: Callable[[str], object] | None = None,
    ) -> FreeFuse:
        """Load the model and every LoRA; a LoRA whose file changed since a manifest is refused."""
        from .models import load_pipeline
        from .pipeline import FreeFuse

        if status is not None:
            status(f"Loading {self.model} ...")
        freefuse = FreeFuse(
            load_pipeline(self.model, device=device, dtype=dtype, offload=offload, base=self.base_model)
        )
        for lora in self.loras:
            subject = freefuse.add_lora(
                lora.path, words=lora.words, name=lora.name, weight=lora.weight, scope=lora.scope
            )
            if lora.sha256 and subject.sha256 != lora.sha256:
                raise SettingsError(
                    f"LoRA {lora.path} has changed since the manifest was written (sha256 {subject.sha256[:12]}… != "
                    f"{lora.sha256[:12]}…); pass the right file with --lora."
                )
        return freefuse


def _local_folder(source: str | None) -> Path | None:
    """`source` as a local folder, or None (unset, or a hub id)."""
    if not source:
        return None
    path = Path(source).expanduser()
    return path if path.is_dir() else None
