"""Stage 1's mask methods: from one capture of attention tensors to one map per subject.

Every method returns, for L subjects on N image tokens, maps that voting compares across subjects
(`maps [L, N]`), the raw maps before refinement (`cross [L, N]`, for inspection) and a background
map (`[N]`) in the same units, or None when there is no background channel. A registry, so that
`MaskConfig(method=...)` names one and an unknown name lists the valid ones.

- `text-to-image` (the paper): each subject word's query over the image keys, sink-filtered,
  averaged; refined with self-attention. Units: probability density over the N image tokens.
- `image-to-text`: each image token's softmax over the text keys; a subject's map is the mean
  attention its words get from each image token. The only direction a UNet's cross-attention
  has, and a local decision per token, which keeps small subjects small. Units: attention share
  (uniform 1/T); with refinement, densities again.
- `combined`: the geometric mean of the two directions' maps, each normalised over the image, so
  a token must be found by both; then refinement.
- `routing`: seed tokens where a subject's image-to-text attention most exceeds the other
  subjects', then every token's cosine similarity to those seeds' attention outputs. Units: cosine.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .attention import cross_attention_maps, refine_with_self_attention
from .config import MAP_METHOD_BACKGROUND, MaskConfig


@dataclass
class Capture:
    """The attention tensors of one tapped block at one step, for one image.

    Attributes:
        q_text: `[heads, T, D]` text queries, or None.
        q_img: `[heads, N, D]` image queries.
        k_img: `[heads, N, D]` image keys (self-attention refinement), or None.
        k_text: `[heads, T, D]` text keys, or None.
        o_img: `[N, C]` attention outputs of the image tokens (before the output projection), or None.
    """

    q_text: torch.Tensor | None
    q_img: torch.Tensor
    k_img: torch.Tensor | None
    k_text: torch.Tensor | None = None
    o_img: torch.Tensor | None = None


@dataclass
class StageMaps:
    """One method's maps for L subjects. `maps`, `cross`: `[L, N]`; `background`: `[N]` or None."""

    maps: torch.Tensor
    cross: torch.Tensor
    background: torch.Tensor | None


@dataclass(frozen=True)
class MapMethod:
    """A stage-1 method: what it reads and how it maps."""

    name: str
    needs: tuple[str, ...]
    background: bool
    function: Callable[[Capture, list[list[int]], list[int] | None, tuple[int, int], MaskConfig], StageMaps]


MAP_METHODS: dict[str, MapMethod] = {}


def register_map_method(name: str, needs: tuple[str, ...]):
    """Register the implementation of a method declared in `core.config.MAP_METHOD_BACKGROUND`
    (which says whether it has a background channel unless told otherwise)."""
    if name not in MAP_METHOD_BACKGROUND:
        raise ValueError(f"Mask method {name!r} is not declared in core.config.MAP_METHOD_BACKGROUND.")
    background = MAP_METHOD_BACKGROUND[name]

    def decorate(function):
        MAP_METHODS[name] = MapMethod(name, needs, background, function)
        return function

    return decorate


def get_map_method(name: str) -> MapMethod:
    if name not in MAP_METHODS:
        raise ValueError(f"Unknown mask method {name!r}; valid methods are {sorted(MAP_METHODS)}.")
    return MAP_METHODS[name]


# -- building blocks -----------------------------------------------------------------------------------


def image_to_text_shares(
    q_img: torch.Tensor, k_text: torch.Tensor, token_sets: list[list[int]], chunk_elements: int
) -> torch.Tensor:
    """Mean attention each token set gets from each image token: softmax over the T text keys.

    Args:
        q_img: `[heads, N, D]`.
        k_text: `[heads, T, D]`.
        token_sets: S lists of text positions.

    Returns:
        `[S, N]` float32; 1/T where an image token attends to the text uniformly.
    """
    heads, n_img, dim = q_img.shape
    n_text = k_text.shape[1]
    scale = 1.0 / math.sqrt(dim)
    keys = k_text.float()
    columns = [sorted(set(tokens)) for tokens in token_sets]
    shares = torch.zeros(len(token_sets), n_img, device=q_img.device)
    rows = max(1, chunk_elements // max(1, heads * n_text))
    for start in range(0, n_img, rows):
        queries = q_img[:, start : start + rows].float()
        probs = torch.softmax(queries @ keys.transpose(1, 2) * scale, dim=-1).mean(dim=0)  # [rows, T]
        for index, tokens in enumerate(columns):
            shares[index, start : start + rows] = probs[:, tokens].mean(dim=1)
    return shares


def as_distribution(maps: torch.Tensor) -> torch.Tensor:
    """Each row scaled to sum 1 over the image (rows of zeros stay zero)."""
    return maps / maps.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(maps.dtype).tiny)


def refines(config: MaskConfig, default: bool = True) -> bool:
    """Whether a method refines its maps with self-attention (`default`: the method's own choice)."""
    return default if config.self_attention is None else config.self_attention


def _refine(maps: torch.Tensor, capture: Capture, config: MaskConfig, default: bool = True) -> torch.Tensor:
    if not refines(config, default):
        return maps
    if capture.k_img is None:
        raise ValueError(
            "Self-attention refinement needs `k_img` (the image keys); pass them, or set "
            "`self_attention=False` with a method that does not need it (image-to-text, routing)."
        )
    return refine_with_self_attention(
        as_distribution(maps), capture.q_img, capture.k_img, config.p_top, config.chunk_elements
    )


def peak_scaled(maps: torch.Tensor, p_top: float) -> torch.Tensor:
    """Each row divided by the mean of its top `p_top` share of tokens (at least one): a subject's
    own region comes out near 1 whatever its size, where densities favour small subjects inside
    them and spread large ones thin."""
    k = max(1, math.floor(maps.shape[-1] * p_top))
    return maps / maps.topk(k, dim=-1).values.mean(dim=-1, keepdim=True).clamp_min(
        torch.finfo(maps.dtype).tiny
    )


def _split(maps: torch.Tensor, cross: torch.Tensor, n_subjects: int, uniform: float, config) -> StageMaps:
    """Subjects' rows and the background row (words), or a threshold map, or none."""
    background = None
    level = config.background_threshold * uniform
    if config.map_scale == "peak":
        maps, level = peak_scaled(maps, config.p_top), config.peak_background
    if maps.shape[0] > n_subjects:
        background = maps[n_subjects]
    elif config.with_background:
        background = torch.full_like(maps[0], level)
    return StageMaps(maps[:n_subjects], cross[:n_subjects], background)


def _text_to_image_rows(
    capture: Capture, sets: list[list[int]], grid: tuple[int, int], config
) -> torch.Tensor:
    """`[S, N]` sink-filtered text→image maps of each token set (distributions over the image)."""
    return cross_attention_maps(
        capture.q_text,
        capture.k_img,
        sets,
        grid,
        config.p_sink,
        config.sink_border,
        config.chunk_elements,
        config.sink_rule,
    )


# -- the methods -----------------------------------------------------------------------------------------


@register_map_method("text-to-image", needs=("q_text", "k_img"))
def text_to_image(capture, token_sets, background_tokens, grid, config) -> StageMaps:
    """The paper's: sink-filtered text→image rows of each subject's words, then self-attention."""
    sets = token_sets + ([background_tokens] if background_tokens else [])
    cross = _text_to_image_rows(capture, sets, grid, config)
    n_img = capture.q_img.shape[1]
    return _split(_refine(cross, capture, config), cross, len(token_sets), 1.0 / n_img, config)


@register_map_method("image-to-text", needs=("k_text",))
def image_to_text(capture, token_sets, background_tokens, grid, config) -> StageMaps:
    """Each image token's attention share on each subject's words; refined with self-attention
    only when `config.self_attention` is True (the shares already decide per token)."""
    sets = token_sets + ([background_tokens] if background_tokens else [])
    shares = image_to_text_shares(capture.q_img, capture.k_text, sets, config.chunk_elements)
    if config.self_attention:
        refined = _refine(shares, capture, config, default=False)
        return _split(refined, shares, len(token_sets), 1.0 / capture.q_img.shape[1], config)
    return _split(shares, shares, len(token_sets), 1.0 / capture.k_text.shape[1], config)


@register_map_method("combined", needs=("q_text", "k_text", "k_img"))
def combined(capture, token_sets, background_tokens, grid, config) -> StageMaps:
    """Geometric mean of both directions' maps (each a distribution over the image), then refined."""
    sets = token_sets + ([background_tokens] if background_tokens else [])
    forward = _text_to_image_rows(capture, sets, grid, config)
    backward = as_distribution(
        image_to_text_shares(capture.q_img, capture.k_text, sets, config.chunk_elements)
    )
    cross = as_distribution((forward * backward).sqrt())
    return _split(
        _refine(cross, capture, config), cross, len(token_sets), 1.0 / capture.q_img.shape[1], config
    )


def contrastive_scores(scores: torch.Tensor) -> torch.Tensor:
    """`a_l - mean_{c != l} a_c` for every subject l (the scores themselves for one subject).

    Args:
        scores: `[L, N]` each subject's score of each image token.

    Returns:
        `[L, N]`, the same dtype. Permuting the subjects permutes the rows bit for bit.
    """
    n_subjects = scores.shape[0]
    if n_subjects == 1:
        return scores
    # Summed in sorted order so the total, and so every seed, does not depend on the order the
    # subjects come in: float rounding of a plain sum did, and decided near-tied seeds.
    total = scores.sort(dim=0).values.sum(dim=0, keepdim=True)
    return scores - (total - scores) / (n_subjects - 1)


@register_map_method("routing", needs=("k_text", "o_img"))
def routing(capture, token_sets, background_tokens, grid, config) -> StageMaps:
    """Seeds where a subject's image→text attention most exceeds the others', then every token's
    cosine similarity to the seeds' attention outputs.

    Seeds: the top `routing_seed_fraction` of N tokens (at least one) by the contrastive score
    `a_l - mean_{c != l} a_c`, a_l the subject's image→text share as a distribution over the image.
    Background (on unless `config.background` is False): the background words' own top tokens
    when given; otherwise the tokens that every subject's contrastive score ranks lowest.
    """
    sets = token_sets + ([background_tokens] if background_tokens else [])
    n_subjects = len(token_sets)
    scores = as_distribution(image_to_text_shares(capture.q_img, capture.k_text, sets, config.chunk_elements))
    subject_scores = scores[:n_subjects]
    contrast = contrastive_scores(subject_scores)
    n_img = capture.q_img.shape[1]
    k = max(1, math.floor(n_img * config.routing_seed_fraction))
    seeds = [contrast[index].topk(k).indices for index in range(n_subjects)]
    if background_tokens:
        seeds.append(scores[n_subjects].topk(k).indices)
    elif config.with_background:
        seeds.append((-contrast.max(dim=0).values).topk(k).indices)
    outputs = torch.nn.functional.normalize(capture.o_img.float(), dim=-1)
    centres = torch.nn.functional.normalize(torch.stack([outputs[s].mean(dim=0) for s in seeds]), dim=-1)
    similarity = centres @ outputs.T  # [S', N]
    background = similarity[n_subjects] if similarity.shape[0] > n_subjects else None
    return StageMaps(similarity[:n_subjects], subject_scores, background)
