"""Every setting of a generation run, checked before any weights load.

The same object is built by the library call, the CLI flags, a job file line and a manifest
replay, and it is what the manifest records.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields

from .baselines import get_method
from .core import MaskConfig

TEXT_SCOPES = ("exclude-others", "all")
PREVIEWS = ("vae", "latent")
EMPTY_MASK_POLICIES = ("global", "off")
PAPER_MASK_STEP, PAPER_STEPS = 6, 28
MAX_SEED = 2**63 - 1
MAX_IMAGES = 256


def parse_size(size: str) -> tuple[int, int]:
    """ "WIDTHxHEIGHT" (or one number for a square) → (width, height)."""
    text = size.lower().replace("×", "x").strip()
    parts = text.split("x") if "x" in text else [text, text]
    try:
        width, height = (int(part) for part in parts)
    except ValueError:
        raise ValueError(f"Size {size!r} is not WIDTHxHEIGHT, e.g. 1024x1024.") from None
    return width, height


def nearest_multiple(value: int, multiple: int) -> int:
    return max(multiple, int(round(value / multiple)) * multiple)


@dataclass
class GenerationSettings:
    """One run. `prompt` may be a list (a batch); each prompt gives `num_images_per_prompt` images.

    Seeds: an int gives image j of every prompt the seed `seed + j`, so an image's seed depends only
    on its own prompt and index, never on the rest of the batch; a list gives one seed per image.
    `mask_step=None` means the paper's 6 of 28 steps scaled to `num_inference_steps`.
    """

    prompt: str | list[str]
    negative_prompt: str | None = None
    seed: int | list[int] = 0
    height: int = 1024
    width: int = 1024
    num_inference_steps: int = 28
    guidance_scale: float = 3.5
    true_cfg_scale: float = 1.0
    num_images_per_prompt: int = 1
    method: str = "freefuse"
    mask_step: int | None = None
    block: int | None = None
    text_scope: str = "exclude-others"
    preview: str = "vae"
    empty_mask: str = "global"
    max_sequence_length: int = 512
    mask_config: MaskConfig = field(default_factory=MaskConfig)

    # -- derived ---------------------------------------------------------------------------------
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
        if self.mask_step is not None:
            return self.mask_step
        return max(1, round(PAPER_MASK_STEP / PAPER_STEPS * self.num_inference_steps))

    # -- checks ----------------------------------------------------------------------------------
    def validate(self, size_multiple: int = 16) -> list[str]:
        """Raise ValueError naming the setting and the fix; return warnings for odd but valid runs."""
        notes: list[str] = []
        method = get_method(self.method)
        prompts = self.prompt if isinstance(self.prompt, list) else [self.prompt]
        if not prompts:
            raise ValueError("`prompt` is an empty list; pass at least one prompt.")
        for prompt in prompts:
            if not isinstance(prompt, str):
                raise ValueError(f"`prompt` must be text, got {type(prompt).__name__}.")
            if not prompt.strip():
                raise ValueError(
                    "`prompt` is empty; describe the image and include each LoRA's activation words."
                )
        for name in ("height", "width"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"`{name}` must be a positive whole number of pixels, got {value!r}.")
            if value % size_multiple:
                raise ValueError(
                    f"`{name}` {value} is not a multiple of {size_multiple}; the nearest valid {name} is "
                    f"{nearest_multiple(value, size_multiple)}."
                )
        if not isinstance(self.num_inference_steps, int) or self.num_inference_steps < 1:
            raise ValueError(f"`num_inference_steps` must be >= 1, got {self.num_inference_steps!r}.")
        for name in ("guidance_scale", "true_cfg_scale"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
                raise ValueError(f"`{name}` must be a finite number >= 0, got {value!r}.")
        if self.true_cfg_scale > 1 and not self.negative_prompt:
            notes.append("`true_cfg_scale` > 1 has no effect without a `negative_prompt`.")
        if not isinstance(self.num_images_per_prompt, int) or self.num_images_per_prompt < 1:
            raise ValueError(f"`num_images_per_prompt` must be >= 1, got {self.num_images_per_prompt!r}.")
        n_images = len(prompts) * self.num_images_per_prompt
        if n_images > MAX_IMAGES:
            raise ValueError(
                f"{n_images} images in one call; at most {MAX_IMAGES}. Use `freefuse batch` for more."
            )
        seeds = [self.seed] if isinstance(self.seed, int) else list(self.seed)
        if not isinstance(self.seed, int) and len(seeds) != n_images:
            raise ValueError(
                f"`seed` lists {len(seeds)} seeds for {n_images} images; give one per image or one int."
            )
        for seed in seeds:
            if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED - MAX_IMAGES:
                raise ValueError(
                    f"`seed` must be a whole number from 0 to {MAX_SEED - MAX_IMAGES}, got {seed!r}."
                )
        mask_step = self.resolved_mask_step
        if method.reads_attention:
            if not isinstance(mask_step, int) or mask_step < 1:
                raise ValueError(
                    f"`mask_step` must be >= 1 (the step whose attention gives the masks), got {mask_step!r}."
                )
            if mask_step > self.num_inference_steps:
                raise ValueError(
                    f"`mask_step` {mask_step} is past the last of {self.num_inference_steps} steps; use a value from 1 "
                    f"to {self.num_inference_steps} (the paper uses 6 of 28)."
                )
            if mask_step == self.num_inference_steps:
                notes.append(
                    f"`mask_step` equals the number of steps ({mask_step}): masks are read at the last step and never "
                    "applied, so the image is the same as method='merge'."
                )
        if self.block is not None and (not isinstance(self.block, int) or self.block < 0):
            raise ValueError(f"`block` must be a double-stream block index >= 0, got {self.block!r}.")
        for name, value, valid in (
            ("text_scope", self.text_scope, TEXT_SCOPES),
            ("preview", self.preview, PREVIEWS),
            ("empty_mask", self.empty_mask, EMPTY_MASK_POLICIES),
        ):
            if value not in valid:
                raise ValueError(f"Unknown `{name}` {value!r}; valid values are {list(valid)}.")
        if not isinstance(self.max_sequence_length, int) or not 1 <= self.max_sequence_length <= 512:
            raise ValueError(
                f"`max_sequence_length` must be 1..512 tokens, got {self.max_sequence_length!r}."
            )
        if not isinstance(self.mask_config, MaskConfig):
            raise ValueError("`mask_config` must be a freefuse.core.MaskConfig.")
        return notes

    # -- records ---------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        values["mask_config"] = self.mask_config.to_dict()
        values["mask_step"] = self.resolved_mask_step
        return values

    @classmethod
    def from_dict(cls, values: dict) -> GenerationSettings:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"Unknown settings {unknown}; valid ones are {sorted(known)}.")
        values = dict(values)
        if isinstance(values.get("mask_config"), dict):
            values["mask_config"] = MaskConfig.from_dict(values["mask_config"])
        return cls(**values)
