"""Generation methods: how a run decides where each subject LoRA acts. A registry of small objects.

- `merge`: plain joint LoRAs, every delta everywhere (what diffusers does with several adapters).
- `masks`: each subject LoRA inside a mask the caller gives (files, tensors, images), from step 1.
- `freefuse`: masks read from attention at `mask_step` (stage 1), applied for the remaining steps.

A method answers four questions for the denoising loop in `freefuse.pipeline`: can it run with
these inputs (`check`), which masks hold from the first step (`initial_masks`), during which
steps to tap the attention (`capture_steps`), and which masks the tapped tensors give
(`masks_from_capture`). Masks are keyed by adapter name end to end, never by list position.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar, Union

from . import core
from .errors import SettingsError

if TYPE_CHECKING:
    import numpy as np
    import torch

    from .backends.base import Backend, CapturedAttention
    from .core import MaskSet
    from .settings import GenerationSettings

#: What a caller may give as masks: a MaskSet or its file, a dict name → mask, a list (see
#: `user_mask_sets`), or None.
MaskInput = Union["MaskSet", dict, Sequence, str, Path, None]


@dataclass
class RunContext:
    """What a method sees of one run, resolved for this model. B images, L subject LoRAs.

    Attributes:
        settings: the run's settings (block and token limit resolved).
        backend: the architecture.
        names: adapter names of the L masked subject LoRAs, in the order they were added.
        positions: per image, {adapter name: token positions of its activation words}; a subject
            none of whose words are in an image's prompt is absent from that image's dict.
        background: per image, token positions of the background words (empty when none).
        grid: `(h, w)` image tokens.
        fallbacks: per image, what fell back to a stated behaviour (methods append).
        negative_prompt: the text of the unconditional pass, or None.
        negative_positions: per image, {adapter name: positions of its words} in the negative
            prompt (its own words, not the prompt's), or None.
    """

    settings: GenerationSettings
    backend: Backend
    names: list[str]
    positions: list[dict[str, list[int]]]
    background: list[list[int]]
    grid: tuple[int, int]
    fallbacks: list[list[str]]
    negative_prompt: str | None = None
    negative_positions: list[dict[str, list[int]]] | None = None

    @property
    def batch(self) -> int:
        return len(self.positions)

    @property
    def size(self) -> tuple[int, int]:
        """`(H, W)` pixels."""
        return self.settings.height, self.settings.width


@dataclass
class SubjectMasks:
    """Where each subject LoRA acts in each of B images, keyed by adapter name.

    Attributes:
        tokens: name → `[B, N]` image-token masks in [0, 1] (what stage 2 applies).
        everywhere: (name, image) pairs whose LoRA acts on the whole image and the whole text, as
            in `merge` (a stated fallback), whatever `tokens` and `text_scope` say.
        sets: per image, the masks at image size for people (`MaskSet`), or None.
        previews: per image, the x0 picture stage 1 voted on, or None.
        attention: per image, {name: {"cross": [h, w], "refined": [h, w]}}, or None.
        from_step: the 0-based step from which the masks act (every LoRA acts everywhere before).
    """

    tokens: dict[str, torch.Tensor]
    everywhere: set[tuple[str, int]] = field(default_factory=set)
    sets: list[MaskSet | None] = field(default_factory=list)
    previews: list[np.ndarray | None] = field(default_factory=list)
    attention: list[dict | None] = field(default_factory=list)
    from_step: int = 0


class Method(abc.ABC):
    """How a run decides each subject LoRA's mask."""

    name: ClassVar[str]
    description: ClassVar[str]
    #: Every subject LoRA's activation words must be found in the prompt.
    needs_words: ClassVar[bool] = False
    #: Masks come from the attention of one step (so `mask_step` and `block` matter).
    reads_attention: ClassVar[bool] = False
    #: The caller's `masks=` are used.
    takes_masks: ClassVar[bool] = False
    #: Subject LoRAs are masked at all (False: every LoRA acts everywhere).
    masks_loras: ClassVar[bool] = True

    def check(  # noqa: B027 (optional hook)
        self, subjects: list[str], grid: tuple[int, int] | None, size: tuple[int, int]
    ) -> None:
        """Raise ValueError for a run this method cannot do (`freefuse.preflight` calls it before any
        weights load). `subjects`: the masked subject LoRAs; `grid`: `(h, w)` image tokens, None
        when not yet known; `size`: `(H, W)` pixels."""

    def initial_masks(self, context: RunContext, masks: MaskInput) -> SubjectMasks | None:
        """Masks that hold from the first step, or None (every LoRA acts everywhere until told)."""
        return None

    def capture_steps(self, settings: GenerationSettings) -> list[int]:
        """0-based indices of the steps whose attention is tapped (the last makes the masks)."""
        return []

    def masks_from_capture(
        self, context: RunContext, captured: CapturedAttention, x0: torch.Tensor
    ) -> SubjectMasks:
        """Masks from the tapped queries/keys and the predicted clean latents `x0` of that step."""
        raise NotImplementedError(f"method {self.name!r} does not read attention")


METHODS: dict[str, type[Method]] = {}


def register_method(cls: type[Method]) -> type[Method]:
    METHODS[cls.name] = cls
    return cls


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise ValueError(f"Unknown method {name!r}; valid methods are {sorted(METHODS)}.")
    return METHODS[name]()


@register_method
class Merge(Method):
    name = "merge"
    description = "plain joint LoRAs: every LoRA acts everywhere (the baseline)"
    masks_loras = False


@register_method
class UserMasks(Method):
    name = "masks"
    description = "each subject LoRA acts only inside a mask you give (--masks)"
    takes_masks = True

    def check(self, subjects: list[str], grid: tuple[int, int] | None, size: tuple[int, int]) -> None:
        if not subjects:
            raise SettingsError(
                "method='masks' needs at least one LoRA with scope='subject' to apply the masks to."
            )

    def initial_masks(self, context: RunContext, masks: MaskInput) -> SubjectMasks:
        import torch  # here, not at the top: the registry is read by `--help`, which needs no torch

        sets = user_mask_sets(masks, context.names, context.batch, context.size, context.grid)
        n_tokens = context.grid[0] * context.grid[1]
        grids = [
            mask_set.to_token_grid(context.grid).reshape(len(context.names), n_tokens) for mask_set in sets
        ]
        tokens = {
            name: torch.stack([grid[index] for grid in grids]) for index, name in enumerate(context.names)
        }
        for name, mask in tokens.items():
            for b in range(context.batch):
                if not bool(mask[b].any()):
                    context.fallbacks[b].append(
                        f"image {b}: the mask given for LoRA {name!r} covers no image token; it is off in this image."
                    )
        # "mask-step": as FreeFuse's masks do, from the step after the mask step (ground-truth masks
        # compared with FreeFuse on equal terms).
        late = context.settings.user_masks_from == "mask-step"
        return SubjectMasks(tokens=tokens, sets=list(sets), from_step=context.settings.resolved_mask_step if late else 0)


@register_method
class AttentionMasks(Method):
    """The paper's FreeFuse: masks from one block's attention at `mask_step`, then masked LoRAs."""

    name = "freefuse"
    description = "masks read from the model's attention at mask_step, then each LoRA only inside its mask"
    needs_words = True
    reads_attention = True

    def check(self, subjects: list[str], grid: tuple[int, int] | None, size: tuple[int, int]) -> None:
        if not subjects:
            raise SettingsError("method='freefuse' needs at least one LoRA with scope='subject'.")
        n_tokens = None if grid is None else grid[0] * grid[1]
        if n_tokens is not None and len(subjects) > n_tokens:
            height, width = size
            raise SettingsError(
                f"{len(subjects)} subjects but only {n_tokens} image tokens at {width}x{height}; use fewer "
                "subjects or a larger image."
            )

    def capture_steps(self, settings: GenerationSettings) -> list[int]:
        last = settings.resolved_mask_step - 1
        return list(range(last - settings.capture_steps + 1, last + 1))

    def masks_from_capture(
        self, context: RunContext, captured: CapturedAttention, x0: torch.Tensor
    ) -> SubjectMasks:
        """Stage 1 for every image: `freefuse.core` on the tapped tensors and the x0 preview."""
        import torch

        settings, names, grid = context.settings, context.names, context.grid
        height, width = context.size
        previews = list(context.backend.preview(x0, height, width, settings.preview))
        masks = SubjectMasks(
            tokens={name: torch.zeros(context.batch, grid[0] * grid[1]) for name in names},
            previews=previews,
            attention=[None] * context.batch,
        )
        for b in range(context.batch):
            masks.sets.append(self._one_image(context, captured, previews[b], b, masks))
        return masks

    def _one_image(self, context, captured, preview, b: int, masks: SubjectMasks) -> MaskSet | None:
        import torch

        settings, names, grid = context.settings, context.names, context.grid
        height, width = context.size
        full = {name: torch.zeros(height, width) for name in names}
        active = [name for name in names if name in context.positions[b]]
        if not active:
            return core.MaskSet(names, torch.stack([full[name] for name in names]))
        config = settings.mask_config
        background = context.background[b] or None
        if background is not None:
            config = replace(config, background=True)
        tensors = captured.image(b)  # its own text rows only, in a batch of prompts of different lengths
        try:
            result = core.masks_from_attention(
                tensors["q_text"],
                tensors["q_img"],
                tensors["k_img"],
                [context.positions[b][name] for name in active],
                grid,
                image=preview,
                config=config,
                background_tokens=background,
                image_size=(height, width),
                k_text=tensors["k_text"],
                o_img=tensors["o_img"],
            )
        except core.NonFiniteError as error:
            what = "x0 preview" if error.argument == "image" else "attention capture"
            context.fallbacks[b].append(
                f"image {b}: the {what} has NaN/inf values ({error}); every LoRA acts on the whole image for the "
                "remaining steps (same as method='merge')."
            )
            for name in names:
                masks.tokens[name][b] = 1.0
                masks.everywhere.add((name, b))
            return None
        context.fallbacks[b].extend(f"image {b}: {note}" for note in result.notes)
        masks.attention[b] = {
            name: {"cross": result.cross_maps[slot], "refined": result.maps[slot]}
            for slot, name in enumerate(active)
        }
        hard = torch.nn.functional.interpolate(
            result.image_masks.float()[None], size=(height, width), mode="nearest-exact"
        )[0]
        for slot, name in enumerate(active):
            masks.tokens[name][b] = result.token_masks[slot].reshape(-1)
            full[name] = hard[slot]
        for slot in result.empty:
            name = active[slot]
            if settings.empty_mask == "global":
                masks.tokens[name][b] = 1.0
                masks.everywhere.add((name, b))
                full[name] = torch.ones(height, width)
                what = "acts on the whole image (empty_mask='global')"
            else:
                what = "is off in this image (empty_mask='off')"
            context.fallbacks[b].append(f"image {b}: LoRA {name!r} won no region of the image; it {what}.")
        return core.MaskSet(names, torch.stack([full[name] for name in names]).clamp(0, 1))


# -- the caller's masks ------------------------------------------------------------------------------


def user_mask_sets(
    masks: MaskInput, names: list[str], batch: int, size: tuple[int, int], grid: tuple[int, int]
) -> list[MaskSet]:
    """The caller's masks → one MaskSet per image, in `names` order, at image size `(H, W)`.

    Accepted: a MaskSet or a saved one's path, a dict name → mask, a list with one mask per
    subject, or a list of MaskSets (one per image). A mask is a tensor, array, PIL image or image
    file, at image size or token-grid size.
    """
    sets = (
        list(masks)
        if isinstance(masks, list | tuple) and masks and isinstance(masks[0], core.MaskSet)
        else [masks]
    )
    if len(sets) not in (1, batch):
        raise ValueError(f"{len(sets)} mask sets for {batch} images; give one set, or one per image.")
    result = [_one_mask_set(mask_set, names, size, grid) for mask_set in sets]
    return result * batch if len(result) == 1 else result


def _one_mask_set(
    masks: MaskInput, names: list[str], size: tuple[int, int], grid: tuple[int, int]
) -> MaskSet:
    import torch

    if isinstance(masks, str | Path):
        masks = core.MaskSet.load(masks)
    if isinstance(masks, core.MaskSet):
        missing = [name for name in names if name not in masks.names]
        if missing:
            raise ValueError(f"The mask set has no mask for {missing}; it has {masks.names}.")
        given = {name: masks[name] for name in names}
    elif isinstance(masks, dict):
        missing = [name for name in names if name not in masks]
        if missing:
            raise ValueError(f"`masks` has no mask for {missing}; give one per subject LoRA: {names}.")
        given = {name: masks[name] for name in names}
    elif isinstance(masks, list | tuple):
        if len(masks) != len(names):
            raise ValueError(f"{len(masks)} masks for {len(names)} subject LoRAs {names}; give one each.")
        given = dict(zip(names, masks, strict=True))
    else:
        raise ValueError(
            "`masks` must be a MaskSet, a dict name → mask, or a list with one mask per subject."
        )
    loaded = [_mask_tensor(name, given[name], size, grid) for name in names]
    return core.MaskSet(names, torch.stack(loaded))


def _mask_tensor(name: str, mask, size: tuple[int, int], grid: tuple[int, int]) -> torch.Tensor:
    import numpy as np
    import torch
    from PIL import Image

    if isinstance(mask, str | Path):
        mask = core.load_mask_image(mask)
    elif isinstance(mask, Image.Image):
        mask = torch.from_numpy(np.asarray(mask.convert("L"), dtype=np.float32) / 255.0)
    mask = torch.as_tensor(mask, dtype=torch.float32)
    if mask.ndim == 3 and mask.shape[0] == 1:
        mask = mask[0]
    if mask.ndim != 2 or tuple(mask.shape) not in (tuple(size), tuple(grid)):
        raise ValueError(
            f"Mask for {name!r} has shape {tuple(mask.shape)}; it must be the image size {size[0]}x{size[1]} "
            f"(H x W) or the token grid {grid[0]}x{grid[1]}."
        )
    if not torch.isfinite(mask).all():
        raise ValueError(f"Mask for {name!r} has NaN or inf values.")
    if tuple(mask.shape) != tuple(size):
        mask = torch.nn.functional.interpolate(mask[None, None], size=tuple(size), mode="nearest-exact")[0, 0]
    return mask.clamp(0, 1)
