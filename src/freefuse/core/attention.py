"""Stage 1, steps 3-6: attention rows, sink filter, subject maps, self-attention refinement.

Pure tensors. Only the attention rows the method needs are formed, a chunk at a time, so memory
stays O(rows * N) for any image size: the full (text + image)^2 matrix never exists.
"""

from __future__ import annotations

import math

import torch

from .config import DEFAULT_CHUNK_ELEMENTS


def head_mean_attention(
    queries: torch.Tensor, keys: torch.Tensor, chunk_elements: int = DEFAULT_CHUNK_ELEMENTS
) -> torch.Tensor:
    """softmax(queries · keysᵀ / sqrt(D)) over the keys, averaged over heads.

    Args:
        queries: `[heads, R, D]` the attention rows wanted (text or image queries).
        keys: `[heads, N, D]` image keys.
        chunk_elements: upper bound on logits held at once; rows and heads are chunked to fit.

    Returns:
        `[R, N]` float32; every row sums to 1.
    """
    heads, rows, dim = queries.shape
    n_keys = keys.shape[1]
    out = torch.zeros(rows, n_keys, dtype=torch.float32, device=queries.device)
    rows_per_chunk = max(1, min(rows, chunk_elements // n_keys))
    heads_per_chunk = max(1, min(heads, chunk_elements // (rows_per_chunk * n_keys)))
    scale = 1.0 / math.sqrt(dim)
    for h0 in range(0, heads, heads_per_chunk):
        k = keys[h0 : h0 + heads_per_chunk].float()
        for r0 in range(0, rows, rows_per_chunk):
            q = queries[h0 : h0 + heads_per_chunk, r0 : r0 + rows_per_chunk].float()
            probs = torch.softmax(torch.matmul(q, k.transpose(1, 2)) * scale, dim=-1)
            out[r0 : r0 + rows_per_chunk] += probs.sum(dim=0)
    return out / heads


def border_tokens(grid: tuple[int, int], width: int, device: torch.device | None = None) -> torch.Tensor:
    """`[h * w]` bool: True for tokens within `width` tokens of the edge of the `(h, w)` grid."""
    h, w = grid
    rows = torch.arange(h, device=device)
    cols = torch.arange(w, device=device)
    on_rows = (rows < width) | (rows >= h - width)
    on_cols = (cols < width) | (cols >= w - width)
    return (on_rows[:, None] | on_cols[None, :]).reshape(-1)


def shared_sinks(
    q_text: torch.Tensor, k_img: torch.Tensor, p_sink: float, chunk_elements: int = DEFAULT_CHUNK_ELEMENTS
) -> torch.Tensor:
    """`[N]` bool: the top-k image tokens (k = floor(N * p_sink)) of the mean text→image row of ALL
    text tokens. A sink draws attention from every word, wherever it sits; a subject's own region
    draws it from that subject's few words only."""
    n_img = k_img.shape[1]
    k = math.floor(n_img * p_sink)
    candidates = torch.zeros(n_img, dtype=torch.bool, device=k_img.device)
    if k > 0:
        n_text = q_text.shape[1]
        total = torch.zeros(n_img, device=k_img.device)
        rows = max(1, chunk_elements // n_img)  # text rows at a time: memory O(rows * N)
        for start in range(0, n_text, rows):
            total += head_mean_attention(q_text[:, start : start + rows], k_img, chunk_elements).sum(dim=0)
        candidates[total.topk(k).indices] = True
    return candidates


def filter_sinks(rows: torch.Tensor, border: torch.Tensor, p_sink: float) -> torch.Tensor:
    """Attention-sink handling (paper eq. 6-7): drop entries in a row's top-k that lie on the border.

    Args:
        rows: `[R, N]` attention rows, each summing to 1.
        border: `[N]` bool, where sinks may be: the grid border (`border_tokens`, the paper), or
            `shared_sinks`.
        p_sink: fraction of N in the top-k, k = floor(N * p_sink); 0 turns the filter off.

    Returns:
        `[R, N]` rows renormalised to sum 1 (a row that would lose all its mass is kept as it was).
    """
    k = math.floor(rows.shape[-1] * p_sink)
    if k <= 0:
        return rows
    top = torch.zeros_like(rows, dtype=torch.bool).scatter_(-1, rows.topk(k, dim=-1).indices, True)
    kept = rows.masked_fill(top & border, 0.0)
    total = kept.sum(dim=-1, keepdim=True)
    return torch.where(total > 0, kept / total.clamp_min(torch.finfo(kept.dtype).tiny), rows)


def cross_attention_maps(
    q_text: torch.Tensor,
    k_img: torch.Tensor,
    token_sets: list[list[int]],
    grid: tuple[int, int],
    p_sink: float,
    sink_border: int,
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
    sink_rule: str = "border",
) -> torch.Tensor:
    """Subject maps M_l (paper eq. 5-8): mean of sink-filtered text→image rows of each subject's tokens.

    Args:
        q_text: `[heads, T, D]` text queries.
        k_img: `[heads, N, D]` image keys.
        token_sets: one list of text positions per subject (L lists).
        grid: `(h, w)` token grid, h * w = N.
        sink_rule: where sinks may be: "border" (the paper: the grid border, `sink_border` wide)
            or "shared" (`shared_sinks`: the image tokens every text token attends to most).

    Returns:
        `[L, N]` float32, every row sums to 1.
    """
    positions = sorted({i for tokens in token_sets for i in tokens})
    row_of = {pos: r for r, pos in enumerate(positions)}
    rows = head_mean_attention(q_text[:, positions], k_img, chunk_elements)
    if sink_rule == "shared":
        candidates = shared_sinks(q_text, k_img, p_sink, chunk_elements)
    else:
        candidates = border_tokens(grid, sink_border, rows.device)
    rows = filter_sinks(rows, candidates, p_sink)
    return torch.stack([rows[[row_of[i] for i in sorted(set(tokens))]].mean(dim=0) for tokens in token_sets])


def refine_with_self_attention(
    maps: torch.Tensor,
    q_img: torch.Tensor,
    k_img: torch.Tensor,
    p_top: float,
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
) -> torch.Tensor:
    """Self-attention refinement (paper eq. 9-10): mean image→image row of each map's top tokens.

    Args:
        maps: `[L, N]` cross-attention subject maps.
        q_img: `[heads, N, D]` image queries.
        k_img: `[heads, N, D]` image keys.
        p_top: fraction of N taken as each map's salient tokens (at least one).

    Returns:
        `[L, N]` float32 refined maps M_l^self, every row sums to 1.
    """
    n_subjects, n_tokens = maps.shape
    k = max(1, math.floor(n_tokens * p_top))
    salient = maps.topk(k, dim=-1).indices  # [L, k]
    rows = head_mean_attention(q_img[:, salient.reshape(-1)], k_img, chunk_elements)
    return rows.reshape(n_subjects, k, n_tokens).mean(dim=1)
