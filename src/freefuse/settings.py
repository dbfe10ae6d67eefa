"""Every setting of a generation run: one typed model, checked before any weights load.

`GenerationSettings` is what the library call takes (`ff(prompt, **settings)`), what the CLI's
options are built from (`CLI_FLAGS`, the help text being each field's description), what a
job-file line holds, and what the manifest records and replays. Unknown settings are errors.
Checks that need the model (size multiples, token limits, block range) are the backend's and run
in `FreeFuse.check_inputs`, still before any denoising.
"""

from __future__ import annotations

import math
import re
from typing import Annotated, Any, Literal

from pydantic import (
    AliasChoices,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    ValidationError,
    field_validator,
    model_validator,
)

from .core.config import BIAS_BLOCKS, MaskConfig
from .errors import SettingsError
from .methods import get_method

PAPER_MASK_STEP, PAPER_STEPS = 6, 28
MAX_SEED = 2**63 - 1
MAX_IMAGES = 256
# Past these no model FreeFuse runs makes a useful image, and the run would fail deep inside
# (attention memory grows with the square of the pixels: 8192² is 262 144 FLUX tokens).
MAX_SIDE = 8192
MAX_STEPS = 1000


#: The longest prompt accepted. Text encoders read at most 512 tokens (T5 on FLUX.1; CLIP reads
#: 77), about 2,000 characters of English; a longer prompt is cut, and one far longer is a mistake.
MAX_PROMPT_CHARS = 10_000
# Lone surrogates: what Python makes of bytes that are not UTF-8 (a command-line argument, a file read
# with surrogateescape) or of a JSON `\ud800` escape. No tokenizer or file format takes them.
_SURROGATE = re.compile("[\ud800-\udfff]")


def check_text(value: Any, what: str, limit: int | None = MAX_PROMPT_CHARS) -> Any:
    """A text a person wrote (a prompt, a word), if it is one: no undecodable bytes, at most `limit`
    characters (None: the caller's own limit). Else a `ValueError` that names `what`. Other values
    are left to the type checks."""
    if not isinstance(value, str):
        return value
    bad = _SURROGATE.search(value)
    if bad is not None:
        code = ord(bad.group())
        found = (
            f"the undecodable byte 0x{code - 0xDC00:02x}" if 0xDC80 <= code <= 0xDCFF else f"half of a surrogate pair ({code:#x})"
        )
        raise ValueError(
            f"`{what}` is not valid UTF-8 text: character {bad.start()} is {found}. Save the file as UTF-8 (or type "
            "the text again)."
        )
    if limit is not None and len(value) > limit:
        raise ValueError(
            f"`{what}` is {len(value):,} characters long; at most {limit:,} are accepted (the text encoder reads at "
            "most 512 tokens, about 2,000 characters)."
        )
    return value


def parse_size(size: str) -> tuple[int, int]:
    """ "WIDTHxHEIGHT" (or one number for a square) → (width, height)."""
    text = str(size).lower().replace("×", "x").strip()
    parts = text.split("x") if "x" in text else [text, text]
    try:
        width, height = (int(part) for part in parts)
    except ValueError:
        raise SettingsError(f"Size {size!r} is not WIDTHxHEIGHT, e.g. 1024x1024.") from None
    return width, height


def nearest_multiple(value: int, multiple: int) -> int:
    return max(multiple, int(round(value / multiple)) * multiple)


def _number(value: Any) -> Any:
    # pydantic's lax floats take True and "3"; a setting given as either is a mistake.
    if isinstance(value, bool | str):
        raise ValueError(f"must be a number, got {value!r}")
    return value


Number = Annotated[float, BeforeValidator(_number)]


def _alias(*names: str) -> AliasChoices:
    return AliasChoices(*names)


class GenerationSettings(BaseModel):
    """One run. `prompt` may be a list (a batch); each prompt gives `num_images_per_prompt` images.

    Seeds: an int gives image j of every prompt the seed `seed + j`, so an image's seed depends only
    on its own prompt and index, never on the rest of the batch; a list gives one seed per image.
    `mask_step`, `block` and `max_sequence_length` left as None mean the method's and the model's
    defaults; the manifest records the values a run used. Job files and manifests may also use the
    CLI's short names (`steps`, `guidance`, `true_cfg`, `images`) and `size: "WIDTHxHEIGHT"`.
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True, populate_by_name=True)

    prompt: str | list[str] = Field(description="The prompt, with each LoRA's activation words in it.")
    negative_prompt: str | None = Field(
        None, description="Negative prompt: the text of a second, guiding pass."
    )
    seed: StrictInt | list[StrictInt] = Field(0, description="Seed; image j of a prompt uses seed + j.")
    height: StrictInt = Field(1024, description="Image height in pixels.")
    width: StrictInt = Field(1024, description="Image width in pixels.")
    num_inference_steps: StrictInt = Field(
        28, validation_alias=_alias("num_inference_steps", "steps"), description="Denoising steps."
    )
    guidance_scale: Number | None = Field(
        None,
        validation_alias=_alias("guidance_scale", "guidance"),
        description="Guidance scale (default: the model's; FLUX.1-dev's distilled guidance is 3.5).",
    )
    true_cfg_scale: Number = Field(
        1.0,
        validation_alias=_alias("true_cfg_scale", "true_cfg"),
        description="True CFG scale; > 1 runs a negative-prompt pass.",
    )
    num_images_per_prompt: StrictInt = Field(
        1, validation_alias=_alias("num_images_per_prompt", "images"), description="Images per prompt."
    )
    method: str = Field("freefuse", description="How each subject LoRA's region is decided.")
    mask_step: StrictInt | None = Field(
        None,
        description="Step whose attention gives the masks (default: the model's share of the steps; FLUX.1: 6 of 28).",
    )
    block: StrictInt | list[StrictInt] | None = Field(
        None,
        description="Block(s) to tap; several are averaged (default: the model's, as in the paper).",
    )
    capture_steps: StrictInt = Field(
        1, description="Read attention at this many steps ending at the mask step, averaged."
    )
    text_scope: Literal["exclude-others", "all"] = Field(
        "exclude-others", description="A LoRA acts on the text except other subjects' words, or on all of it."
    )
    preview: Literal["vae", "latent"] = Field(
        "vae", description="x0 picture for superpixels: a VAE decode, or a cheap latent preview."
    )
    user_masks_from: Literal["first-step", "mask-step"] = Field(
        "first-step",
        description="When the masks you give (method 'masks') start to act: from the first step, or after the "
        "mask step as FreeFuse's own do.",
    )
    empty_mask: Literal["global", "off"] = Field(
        "global", description="A subject that wins no region: its LoRA acts everywhere, or not at all."
    )
    background_words: list[str] = Field(
        default_factory=list,
        description="Words for the background; where they win, no subject LoRA acts.",
    )
    max_sequence_length: StrictInt | None = Field(
        None, description="Text token limit (default: the model's)."
    )
    lora_op: Literal["fused", "peft"] = Field(
        "fused",
        description="How masked LoRAs run: one fused op per layer (fast), or PEFT's per-adapter path (reference).",
    )
    mask_config: MaskConfig = Field(default_factory=MaskConfig, description="Stage 1's constants.")
    attention_bias: Number | None = Field(
        None,
        description="Attention bias once the masks exist: added to the attention logits, it pushes a subject's "
        "region away from the other subjects' words (and its words away from outside its region); 0: off "
        "(default: the model's).",
    )
    attention_bias_positive: Number | None = Field(
        None, description="The attention bias's pull of a subject's region toward its own words (default: the model's)."
    )
    attention_bias_bidirectional: StrictBool | None = Field(
        None, description="The attention bias also acts on the words' attention to the image (default: the model's)."
    )
    attention_bias_blocks: Literal[BIAS_BLOCKS] | None = Field(  # type: ignore[valid-type]
        None, description="Blocks the attention bias goes into (default: the model's)."
    )

    def __init__(self, **values: Any) -> None:
        try:
            super().__init__(**values)
        except ValidationError as error:
            raise SettingsError(describe_errors(error)) from None

    # -- field checks ------------------------------------------------------------------------------
    @model_validator(mode="before")
    @classmethod
    def _split_size(cls, values: Any) -> Any:
        if isinstance(values, dict) and "size" in values:
            values = dict(values)
            if "width" in values or "height" in values:
                raise ValueError("give `size` or `width`/`height`, not both")
            values["width"], values["height"] = parse_size(values.pop("size"))
        return values

    @field_validator("prompt", "negative_prompt", "background_words", mode="before")
    @classmethod
    def _check_texts(cls, value: Any, info) -> Any:
        for text in value if isinstance(value, list) else [value]:
            check_text(text, info.field_name)
        return value

    @field_validator("prompt")
    @classmethod
    def _check_prompt(cls, prompt: str | list[str]) -> str | list[str]:
        prompts = [prompt] if isinstance(prompt, str) else prompt
        if not prompts:
            raise ValueError("`prompt` is an empty list; pass at least one prompt.")
        if any(not text.strip() for text in prompts):
            raise ValueError(
                "`prompt` is empty; describe the image and include each LoRA's activation words."
            )
        return prompt

    @field_validator("height", "width")
    @classmethod
    def _check_size(cls, value: int, info) -> int:
        if value <= 0:
            raise ValueError(f"`{info.field_name}` must be a positive whole number of pixels, got {value}.")
        if value > MAX_SIDE:
            raise ValueError(
                f"`{info.field_name}` {value} is more than {MAX_SIDE} pixels; no supported model makes images that "
                "large (and the attention alone would not fit in memory)."
            )
        return value

    @field_validator("num_inference_steps", "num_images_per_prompt", "capture_steps")
    @classmethod
    def _at_least_one(cls, value: int, info) -> int:
        if value < 1:
            raise ValueError(f"`{info.field_name}` must be >= 1, got {value}.")
        if info.field_name == "num_inference_steps" and value > MAX_STEPS:
            raise ValueError(
                f"`num_inference_steps` {value} is more than {MAX_STEPS}; flow-matching samplers gain nothing past "
                "a few dozen steps (FLUX.1-dev: 28)."
            )
        return value

    @field_validator("guidance_scale", "true_cfg_scale", "attention_bias", "attention_bias_positive")
    @classmethod
    def _check_scale(cls, value: float | None, info) -> float | None:
        if value is not None and (not math.isfinite(value) or value < 0):
            raise ValueError(f"`{info.field_name}` must be a finite number >= 0, got {value!r}.")
        return value

    @field_validator("seed")
    @classmethod
    def _check_seed(cls, seed: int | list[int]) -> int | list[int]:
        for value in [seed] if isinstance(seed, int) else seed:
            if not 0 <= value <= MAX_SEED - MAX_IMAGES:
                raise ValueError(
                    f"`seed` must be a whole number from 0 to {MAX_SEED - MAX_IMAGES}, got {value!r}."
                )
        return seed

    @field_validator("method")
    @classmethod
    def _check_method(cls, method: str) -> str:
        get_method(method)  # an unknown name lists the valid ones
        return method

    @field_validator("mask_step")
    @classmethod
    def _check_mask_step(cls, value: int | None) -> int | None:
        if value is not None and value < 1:
            raise ValueError(
                f"`mask_step` must be >= 1 (the step whose attention gives the masks), got {value}."
            )
        return value

    @field_validator("block")
    @classmethod
    def _check_block(cls, value: int | list[int] | None) -> int | list[int] | None:
        blocks = [] if value is None else [value] if isinstance(value, int) else value
        if isinstance(value, list) and not value:
            raise ValueError("`block` is an empty list; give at least one block index.")
        if any(block < 0 for block in blocks):
            raise ValueError(f"`block` must be block indices >= 0, got {value}.")
        if isinstance(value, list) and len(value) == 1:
            return value[0]
        return value

    @field_validator("max_sequence_length")
    @classmethod
    def _check_length(cls, value: int | None) -> int | None:
        if value is not None and value < 1:
            raise ValueError(f"`max_sequence_length` must be >= 1 token, got {value}.")
        return value

    @field_validator("background_words")
    @classmethod
    def _check_background(cls, words: list[str]) -> list[str]:
        cleaned = [word.strip() for word in words]
        if any(not word for word in cleaned):
            raise ValueError("`background_words` has an empty word; pass words like ['sky', 'grass'].")
        return cleaned

    @field_validator("mask_config", mode="before")
    @classmethod
    def _mask_config_from_dict(cls, value: Any) -> Any:
        return MaskConfig.from_dict(value) if isinstance(value, dict) else value

    @model_validator(mode="after")
    def _check_together(self) -> GenerationSettings:
        n_images = len(self.prompts) * self.num_images_per_prompt
        if n_images > MAX_IMAGES:
            raise ValueError(
                f"{n_images} images in one call; at most {MAX_IMAGES}. Use `freefuse batch` for more."
            )
        if not isinstance(self.seed, int) and len(self.seed) != n_images:
            raise ValueError(
                f"`seed` lists {len(self.seed)} seeds for {n_images} images; give one per image or one int."
            )
        if self.user_masks_from == "mask-step" and not get_method(self.method).takes_masks:
            raise ValueError(
                f"`user_masks_from` only applies to method 'masks' (method is {self.method!r}); leave it out."
            )
        late_masks = get_method(self.method).takes_masks and self.user_masks_from == "mask-step"
        if (get_method(self.method).reads_attention or late_masks) and self.resolved_mask_step > self.num_inference_steps:
            raise ValueError(
                f"`mask_step` {self.resolved_mask_step} is past the last of {self.num_inference_steps} steps; use a "
                f"value from 1 to {self.num_inference_steps} (the paper uses 6 of 28)."
            )
        if (
            get_method(self.method).reads_attention
            and self.mask_step is not None  # else the model's share decides, and preflight checks it
            and self.capture_steps > self.mask_step
        ):
            raise ValueError(
                f"`capture_steps` {self.capture_steps} reaches before the first step: the last of them is the mask "
                f"step {self.resolved_mask_step}; use at most {self.resolved_mask_step}."
            )
        return self

    # -- derived -----------------------------------------------------------------------------------
    @property
    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)

    @property
    def image_prompts(self) -> list[str]:
        return [p for p in self.prompts for _ in range(self.num_images_per_prompt)]

    @property
    def image_seeds(self) -> list[int]:
        if isinstance(self.seed, int):
            return [self.seed + j for _ in self.prompts for j in range(self.num_images_per_prompt)]
        return [int(s) for s in self.seed]

    @property
    def resolved_mask_step(self) -> int:
        """`mask_step`, or the paper's 6 of 28 scaled to the steps while no model is known (preflight
        sets the model's own share: `Architecture.default_mask_step`)."""
        if self.mask_step is not None:
            return self.mask_step
        return max(1, round(PAPER_MASK_STEP / PAPER_STEPS * self.num_inference_steps))

    # -- checks that need a number from the model --------------------------------------------------
    def check_size(self, size_multiple: int) -> None:
        """Height and width must be multiples of the model's pixels per token."""
        for name in ("height", "width"):
            value = getattr(self, name)
            if value % size_multiple:
                raise SettingsError(
                    f"`{name}` {value} is not a multiple of {size_multiple}; the nearest valid {name} is "
                    f"{nearest_multiple(value, size_multiple)}."
                )

    def notes(self) -> list[str]:
        """Odd but valid choices, said before the run."""
        notes = []
        if get_method(self.method).reads_attention and self.resolved_mask_step == self.num_inference_steps:
            notes.append(
                f"`mask_step` equals the number of steps ({self.num_inference_steps}): masks are read at the last "
                "step and never applied, so the image is the same as method='merge'."
            )
        if self.attention_bias and not get_method(self.method).masks_loras:
            notes.append(
                f"`attention_bias` acts between masked subjects' regions and words; method {self.method!r} masks none, "
                "so it does nothing."
            )
        if self.attention_bias == 0 and self.attention_bias_positive:
            notes.append("`attention_bias` is 0, so the attention bias is off: `attention_bias_positive` does nothing.")
        return notes

    # -- records -----------------------------------------------------------------------------------
    def with_seed(self, seed: int) -> GenerationSettings:
        """A copy with another seed (checked), without validating every other field again: a grid's
        jobs differ from one another by their seeds, 100,000 of them."""
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise SettingsError(f"`seed` must be a whole number, got {seed!r}.")
        try:
            type(self)._check_seed(seed)
        except ValueError as error:
            raise SettingsError(str(error)) from None
        return self.model_copy(update={"seed": seed})

    def to_dict(self) -> dict:
        """JSON-able, every field by its own name, `mask_step` resolved (what a manifest records)."""
        values = self.model_dump(mode="json")
        values["mask_step"] = self.resolved_mask_step
        return values

    @classmethod
    def from_dict(cls, values: dict) -> GenerationSettings:
        """From a job-file line or a manifest (field names or the CLI's short names)."""
        if not isinstance(values, dict):
            raise SettingsError(f"Settings must be a mapping, got {type(values).__name__}.")
        return cls(**values)


def describe_errors(error: ValidationError) -> str:
    """pydantic's errors as FreeFuse messages: each names the setting and what to pass."""
    valid = sorted(GenerationSettings.model_fields)
    lines = []
    for item in error.errors():
        where = ".".join(str(part) for part in item["loc"]) or "settings"
        kind = item["type"]
        if kind == "extra_forbidden":
            lines.append(f"Unknown setting `{where}`; valid ones are {valid}.")
        elif kind == "missing":
            lines.append(f"`{where}` is required.")
        elif kind in ("value_error", "assertion_error"):
            message = str(item["msg"]).removeprefix("Value error, ").removeprefix("Assertion failed, ")
            lines.append(message if "`" in message else f"`{where}` {message}.")
        else:
            shown = repr(item.get("input"))
            shown = shown if len(shown) <= 60 else shown[:57] + "..."
            lines.append(f"`{where}`: {item['msg']} (got {shown}).")
    return " ".join(dict.fromkeys(lines))


# The command line's name and type for each setting; help text is the field's description.
CLI_FLAGS: dict[str, tuple[tuple[str, ...], type]] = {
    "prompt": (("--prompt", "-p"), str),
    "negative_prompt": (("--negative-prompt",), str),
    "seed": (("--seed", "-s"), int),
    "num_inference_steps": (("--steps",), int),
    "guidance_scale": (("--guidance",), float),
    "true_cfg_scale": (("--true-cfg",), float),
    "num_images_per_prompt": (("--images",), int),
    "method": (("--method",), str),
    "mask_step": (("--mask-step",), int),
    "block": (("--block",), list[int]),
    "capture_steps": (("--capture-steps",), int),
    "text_scope": (("--text-scope",), str),
    "preview": (("--preview",), str),
    "empty_mask": (("--empty-mask",), str),
    "user_masks_from": (("--masks-from",), str),
    "background_words": (("--background-word",), list[str]),
    "max_sequence_length": (("--max-sequence-length",), int),
    "lora_op": (("--lora-op",), str),
    "attention_bias": (("--attn-bias",), float),
    "attention_bias_positive": (("--attn-bias-positive",), float),
    "attention_bias_bidirectional": (("--attn-bias-bidirectional/--attn-bias-one-way",), bool),
    "attention_bias_blocks": (("--attn-bias-blocks",), str),
}
