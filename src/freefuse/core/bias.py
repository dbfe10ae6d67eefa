"""Stage 2's attention bias between the subjects' regions and words: pure torch, no diffusers.

Once the masks exist, every biased attention gets an additive float mask on its logits (what SDPA
takes as `attn_mask`). With m_l(i) subject l's mask on image token i and w_l(t) = 1 when text
token t is one of subject l's words:

- image query i, text key t: Σ_l m_l(i) · (positive · w_l(t) − scale · Σ_{k≠l} w_k(t))
  (a subject's region is pulled toward its own words and pushed away from the other subjects');
- text query t, image key j (bidirectional): Σ_l w_l(t) · (positive · m_l(j) − scale · (1 − m_l(j)))
  (a subject's words are pushed away from the image outside its region);
- text-text and image-image pairs: no bias.

Both tables are sums of outer products over the L subjects, so they cost O(N · T · L); the full
(query × key) mask exists only when a block asks for it (`attention_bias`). A subject left out of
an image (`freefuse.attention_bias.pass_bias` decides) has zero columns there.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def bias_tables(
    regions: torch.Tensor, words: torch.Tensor, scale: float, positive: float, bidirectional: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The two non-zero parts of the bias.

    Args:
        regions: `[B, N, L]` each subject's mask on the N image tokens, in [0, 1].
        words: `[B, T, L]` 1 where text token t is one of subject l's words, else 0.
        scale, positive: the negative and positive bias (both >= 0).
        bidirectional: also make the text-query part.

    Returns:
        `(image_to_text [B, N, T], text_to_image [B, T, N] or None)`.
    """
    own = regions @ words.transpose(1, 2)  # [B, N, T]: Σ_l m_l(i) w_l(t)
    word_count = words.sum(dim=2)  # [B, T]: how many subjects own token t (0 or 1)
    region_sum = regions.sum(dim=2)  # [B, N]
    # Σ_l m_l(i) Σ_{k≠l} w_k(t) = region_sum(i) · word_count(t) − own(i, t)
    image_to_text = (positive + scale) * own - scale * region_sum[:, :, None] * word_count[:, None, :]
    if not bidirectional:
        return image_to_text, None
    # Σ_l w_l(t) (1 − m_l(j)) = word_count(t) − own(j, t)
    text_to_image = (positive + scale) * own.transpose(1, 2) - scale * word_count[:, :, None]
    return image_to_text, text_to_image


def attention_bias(
    image_to_text: torch.Tensor,
    text_to_image: torch.Tensor | None,
    query: Sequence[str],
    key: Sequence[str],
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """The additive mask of one attention, `[B, 1, Sq, Sk]` (one for every head).

    `query` and `key` say what the attention's query and key sequences hold, in order ("text",
    "image"): FLUX's joint attention is ("text", "image") for both, a UNet's cross-attention has
    ("image",) queries over ("text",) keys. `image_to_text` `[B, N, T]` and `text_to_image`
    `[B, T, N]` are `bias_tables`' (at this attention's N).
    """
    batch, n_image, n_text = image_to_text.shape
    size = {"text": n_text, "image": n_image}
    parts = {("image", "text"): image_to_text}
    if text_to_image is not None:
        parts[("text", "image")] = text_to_image
    bias = image_to_text.new_zeros(
        batch, 1, sum(size[s] for s in query), sum(size[s] for s in key), dtype=dtype or image_to_text.dtype
    )
    row = 0
    for q in query:
        column = 0
        for k in key:
            part = parts.get((q, k))
            if part is not None:
                bias[:, 0, row : row + size[q], column : column + size[k]] = part
            column += size[k]
        row += size[q]
    return bias


def grid_of(count: int, grid: tuple[int, int]) -> tuple[int, int]:
    """The `(h', w')` grid of `count` tokens with the aspect of `grid` (a UNet level's)."""
    h, w = grid
    scale = (count / (h * w)) ** 0.5
    size = (max(1, round(h * scale)), max(1, round(w * scale)))
    if size[0] * size[1] != count:
        raise ValueError(f"{count} image tokens are no {h}:{w} grid.")
    return size


def resize_tokens(values: torch.Tensor, grid: tuple[int, int], count: int) -> torch.Tensor:
    """`[B, N, C]` values on the `grid` → `[B, count, C]` on a grid of `count` tokens of the same
    aspect: area-averaged down (a coarse token gets the share of it a subject owns), repeated up."""
    if count == values.shape[1]:
        return values
    size = grid_of(count, grid)
    batch, _, channels = values.shape
    spatial = values.transpose(1, 2).reshape(batch, channels, *grid)
    mode = "area" if size[0] <= grid[0] and size[1] <= grid[1] else "nearest"
    resized = torch.nn.functional.interpolate(spatial.float(), size=size, mode=mode).to(values.dtype)
    return resized.reshape(batch, channels, count).transpose(1, 2)
