"""Stage 1 of FreeFuse as one function: attention tensors in, one mask per subject out."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from .config import MaskConfig
from .methods import Capture, get_map_method
from .voting import superpixels, to_token_grid, vote_superpixels, vote_tokens


@dataclass
class MaskResult:
    """What stage 1 found. L subjects, `(h, w)` token grid, `H×W` image.

    Attributes:
        token_masks: `[L, h, w]` float, each token's share per subject; shares sum to at most 1.
        image_masks: `[L, H, W]` bool, disjoint.
        maps: `[L, h, w]` float, the maps that were voted on (M_l^self, or M_l without refinement).
        cross_maps: `[L, h, w]` float, the sink-filtered cross-attention maps M_l.
        labels: `[H, W]` int64 superpixel labels, or None when voting per token.
        empty: indices of subjects that won no region.
        notes: what stage 1 had to fall back on, in words (empty when nothing unusual happened).
    """

    token_masks: torch.Tensor
    image_masks: torch.Tensor
    maps: torch.Tensor
    cross_maps: torch.Tensor
    labels: torch.Tensor | None = None
    empty: list[int] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


class NonFiniteError(ValueError):
    """An input of `masks_from_attention` holds NaN or inf; `argument` names which one."""

    def __init__(self, argument: str, message: str) -> None:
        super().__init__(message)
        self.argument = argument


def _check_finite(name: str, tensor: torch.Tensor) -> None:
    if not torch.isfinite(tensor).all():
        raise NonFiniteError(name, f"`{name}` contains NaN or inf values (check the model's dtype).")


def _captures(name: str, tensor: torch.Tensor | None, ndim: int) -> torch.Tensor | None:
    """A tensor with or without the leading capture axis → with it (`[C, ...]`)."""
    if tensor is None:
        return None
    if not isinstance(tensor, torch.Tensor) or tensor.ndim not in (ndim, ndim + 1):
        shape = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
        what = "[heads, tokens, dim]" if ndim == 3 else "[tokens, channels]"
        raise ValueError(
            f"`{name}` must be a tensor of shape {what} (or [captures, ...] of those), got {shape}."
        )
    return tensor if tensor.ndim == ndim + 1 else tensor[None]


def check_inputs(
    q_text: torch.Tensor | None,
    q_img: torch.Tensor,
    k_img: torch.Tensor | None,
    token_sets: Sequence[Sequence[int]],
    grid: tuple[int, int],
    image: np.ndarray | torch.Tensor | None,
    background_tokens: Sequence[int] | None = None,
    k_text: torch.Tensor | None = None,
    o_img: torch.Tensor | None = None,
    method: str = "text-to-image",
    self_attention: bool = False,
) -> None:
    """Raise a ValueError naming the argument when the inputs of `masks_from_attention` do not fit."""
    tensors = {
        "q_text": _captures("q_text", q_text, 3),
        "q_img": _captures("q_img", q_img, 3),
        "k_img": _captures("k_img", k_img, 3),
        "k_text": _captures("k_text", k_text, 3),
        "o_img": _captures("o_img", o_img, 2),
    }
    needed = get_map_method(method).needs
    if self_attention:
        needed = (*needed, "k_img")
    missing = [name for name in needed if tensors[name] is None]
    if missing:
        raise ValueError(
            f"Mask method {method!r} needs `{missing[0]}`; pass it (the tapped block's {missing[0]})."
        )
    captures, heads, n_img, dim = tensors["q_img"].shape
    if tensors["k_img"] is not None and tensors["k_img"].shape != tensors["q_img"].shape:
        raise ValueError(
            f"`q_img` {tuple(q_img.shape)} and `k_img` {tuple(k_img.shape)} must have the same shape."
        )
    n_text = None
    for name in ("q_text", "k_text"):
        tensor = tensors[name]
        if tensor is None:
            continue
        if tensor.shape[0] != captures or tensor.shape[1] != heads or tensor.shape[3] != dim:
            raise ValueError(
                f"`{name}` has {tensor.shape[1]} heads of dim {tensor.shape[3]} but `q_img` has {heads} heads of "
                f"dim {dim}; pass queries and keys of the same attention block (and as many captures)."
            )
        if n_text is not None and tensor.shape[2] != n_text:
            raise ValueError("`q_text` and `k_text` must hold the same text tokens.")
        n_text = tensor.shape[2]
    if tensors["o_img"] is not None and tuple(tensors["o_img"].shape[:2]) != (captures, n_img):
        raise ValueError(f"`o_img` {tuple(o_img.shape)} must have one row per image token ({n_img}).")
    if len(grid) != 2 or grid[0] < 1 or grid[1] < 1 or grid[0] * grid[1] != n_img:
        raise ValueError(
            f"`grid` {tuple(grid)} does not match the {n_img} image tokens; pass (h, w) with h * w = N."
        )
    if len(token_sets) == 0:
        raise ValueError("`token_sets` is empty: pass one list of text positions per subject.")
    sets = list(token_sets)
    if background_tokens is not None:
        sets.append(background_tokens)
    for index, tokens in enumerate(sets):
        label = "`background_tokens`" if index == len(token_sets) else f"`token_sets[{index}]`"
        if len(tokens) == 0:
            raise ValueError(f"{label} is empty: every subject needs at least one text position.")
        bad = [i for i in tokens if n_text is not None and not 0 <= int(i) < n_text]
        if bad:
            raise ValueError(
                f"{label} has positions {bad} outside the {n_text} text tokens (0..{n_text - 1})."
            )
    if image is not None:
        shape = tuple(image.shape)
        if len(shape) != 3 or shape[2] != 3:
            raise ValueError(f"`image` must be an H×W×3 array in [0, 1], got shape {shape}.")
        if shape[0] % grid[0] or shape[1] % grid[1]:
            raise ValueError(
                f"`image` size {shape[0]}×{shape[1]} is not a multiple of the token grid {grid[0]}×{grid[1]}."
            )
        if not np.isfinite(np.asarray(image, dtype=np.float64)).all():
            raise NonFiniteError("image", "`image` contains NaN or inf values (the x0 preview is broken).")
    for name, tensor in tensors.items():
        if tensor is not None:
            _check_finite(name, tensor)


def masks_from_attention(
    q_text: torch.Tensor | None,
    q_img: torch.Tensor,
    k_img: torch.Tensor | None,
    token_sets: Sequence[Sequence[int]],
    grid: tuple[int, int],
    image: np.ndarray | torch.Tensor | None = None,
    config: MaskConfig = MaskConfig(),
    background_tokens: Sequence[int] | None = None,
    image_size: tuple[int, int] | None = None,
    k_text: torch.Tensor | None = None,
    o_img: torch.Tensor | None = None,
) -> MaskResult:
    """Stage 1 of FreeFuse: one mask per subject from the tapped attention's queries and keys.

    Args:
        q_text: `[heads, T, D]` text queries of the tapped block (post-norm, post-RoPE); None for
            a method that does not read them (`image-to-text`, `routing`).
        q_img: `[heads, N, D]` image queries.
        k_img: `[heads, N, D]` image keys; None for a method that does not refine with
            self-attention (`image-to-text` and `routing` without `self_attention=True`).
        token_sets: L lists of text positions, one per subject (its activation words' tokens).
        grid: `(h, w)` token grid with h * w = N.
        image: `H×W×3` float array in [0, 1] (the predicted x0) for SLIC voting; None votes per token.
        config: the stage-1 constants, `config.method` the mask method (`MAP_METHODS`).
        background_tokens: text positions of background words; with `config.background` their
            map competes with the subjects as a background channel (instead of the threshold).
        image_size: `(H, W)` for `image_masks` when `image` is None (nearest upsampling);
            default: the token grid.
        k_text: `[heads, T, D]` text keys (image-to-text, combined, routing).
        o_img: `[N, C]` attention outputs of the image tokens before the output projection (routing).

    Every tensor may carry a leading capture axis (`[C, heads, N, D]`, `[C, N, C_out]`): C
    captures of several blocks or steps of the same image, whose maps are averaged before voting.

    Returns:
        A `MaskResult`; `token_masks` `[L, h, w]`, `image_masks` `[L, H, W]`, `maps` `[L, h, w]`.
    """
    check_inputs(
        q_text,
        q_img,
        k_img,
        token_sets,
        grid,
        image,
        background_tokens,
        k_text,
        o_img,
        config.method,
        bool(config.self_attention),
    )
    h, w = grid
    sets = [[int(i) for i in tokens] for tokens in token_sets]
    words = (
        [int(i) for i in background_tokens]
        if config.with_background and background_tokens is not None
        else None
    )
    maps, cross, background = _averaged_maps(
        {"q_text": q_text, "q_img": q_img, "k_img": k_img, "k_text": k_text, "o_img": o_img}, sets, words, grid, config
    )
    notes: list[str] = []
    labels = None if image is None else _superpixels(image, config, notes)
    if labels is None:
        token_hard = vote_tokens(maps, background)
        token_masks = token_hard.float()
        if image is not None:  # SLIC collapsed: per token, at the picture's size
            image_size = (int(image.shape[0]), int(image.shape[1]))
        height, width = image_size or grid
        if height % h or width % w:
            raise ValueError(f"`image_size` {height}×{width} is not a multiple of the token grid {h}×{w}.")
        image_masks = token_hard.repeat_interleave(height // h, dim=1).repeat_interleave(width // w, dim=2)
    else:
        image_masks = vote_superpixels(maps, labels.to(maps.device), background)
        token_masks = to_token_grid(image_masks, grid, config.binarize_threshold)

    # Stage 2 uses the token masks: a subject whose region shrinks to no token (binarised) is empty too.
    empty = [index for index in range(len(sets)) if not bool(token_masks[index].any())]
    return MaskResult(
        token_masks=token_masks,
        image_masks=image_masks,
        maps=maps,
        cross_maps=cross,
        labels=labels,
        empty=empty,
        notes=notes,
    )


def _averaged_maps(
    tensors: dict[str, torch.Tensor | None],
    sets: list[list[int]],
    words: list[int] | None,
    grid: tuple[int, int],
    config: MaskConfig,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The method's maps of each capture, averaged: `maps`, `cross` `[L, h, w]`, `background` `[h, w]` or None."""
    h, w = grid
    method = get_map_method(config.method)
    stacked = {name: _captures(name, tensor, 2 if name == "o_img" else 3) for name, tensor in tensors.items()}
    per_capture = []
    for index in range(stacked["q_img"].shape[0]):
        capture = Capture(**{name: None if t is None else t[index] for name, t in stacked.items()})
        per_capture.append(method.function(capture, sets, words, grid, config))
    maps = torch.stack([found.maps for found in per_capture]).mean(dim=0).reshape(len(sets), h, w)
    cross = torch.stack([found.cross for found in per_capture]).mean(dim=0).reshape(len(sets), h, w)
    background = None
    if per_capture[0].background is not None:
        background = torch.stack([found.background for found in per_capture]).mean(dim=0).reshape(h, w)
    return maps, cross, background


def _superpixels(image: np.ndarray | torch.Tensor, config: MaskConfig, notes: list[str]) -> torch.Tensor | None:
    """SLIC labels `[H, W]` of the x0 picture, or None (with a note) when SLIC collapses."""
    image_np = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    height, width = image_np.shape[:2]
    n_segments = config.n_segments or round(math.sqrt(height * width))
    labels = torch.from_numpy(
        superpixels(np.clip(image_np, 0.0, 1.0), n_segments, config.compactness, config.slic_sigma, config.slic_max_side)
    )
    found = int(labels.max()) + 1
    if found < max(2, n_segments // 10):
        # SLIC collapses on noise-like pictures (e.g. a very early x0); its few regions would hand
        # the whole image to one subject, so vote per token instead.
        notes.append(
            f"SLIC found only {found} superpixels (asked for {n_segments}); the x0 preview has no usable "
            "structure, so stage 1 voted per token instead."
        )
        return None
    return labels
