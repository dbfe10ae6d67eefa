"""Stage 1, steps 7-8: give every superpixel (or token) to one subject, then bring masks to the token grid."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F


def superpixels(
    image: np.ndarray, n_segments: int, compactness: float, sigma: float = 0.0, max_side: int | None = None
) -> np.ndarray:
    """SLIC superpixels of an `H×W×3` float image in [0, 1]: `[H, W]` int64 labels 0..S-1.

    With `max_side`, SLIC runs on a copy shrunk to at most that many pixels per side (area
    averaging) and the labels are scaled back up to H×W by nearest neighbour.
    """
    from skimage.segmentation import slic

    height, width = image.shape[:2]
    small = image
    if max_side is not None and max(height, width) > max_side:
        factor = math.ceil(max(height, width) / max_side)
        size = (max(1, height // factor), max(1, width // factor))
        small = (
            F.interpolate(
                torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32)).permute(2, 0, 1)[None],
                size=size,
                mode="area",
            )[0]
            .permute(1, 2, 0)
            .numpy()
        )
    labels = slic(
        np.ascontiguousarray(small, dtype=np.float64),
        n_segments=n_segments,
        compactness=compactness,
        sigma=sigma,
        start_label=0,
        channel_axis=-1,
    )
    # slic may skip label values; make them dense so that scores index 0..S-1.
    _, dense = np.unique(labels, return_inverse=True)
    dense = dense.reshape(labels.shape).astype(np.int64)
    if dense.shape != (height, width):
        rows = np.arange(height) * dense.shape[0] // height
        cols = np.arange(width) * dense.shape[1] // width
        dense = dense[rows[:, None], cols[None, :]]
    return dense


def assign(scores: torch.Tensor, background: torch.Tensor | None) -> torch.Tensor:
    """Winner of every region: argmax over subjects, or -1 where `background` beats the best subject.

    Args:
        scores: `[L, S]` per-subject score of each of S regions.
        background: `[S]` background score, or None for no background channel.

    Returns:
        `[S]` int64 subject index, -1 for background.
    """
    best, winner = scores.max(dim=0)
    if background is not None:
        winner = torch.where(best < background, torch.full_like(winner, -1), winner)
    return winner


def region_sums(maps: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Each map, bilinearly upsampled to the labels' size, summed over each superpixel.

    Args:
        maps: `[L, h, w]` maps on the token grid.
        labels: `[H, W]` int64 superpixel labels 0..S-1.

    Returns:
        `[L, S]` float32 sums (the votes of eq. 12, before the argmax).
    """
    height, width = labels.shape
    up = F.interpolate(maps[None].float(), size=(height, width), mode="bilinear", align_corners=False)[0]
    return torch.zeros(maps.shape[0], int(labels.max()) + 1, device=up.device).index_add_(
        1, labels.reshape(-1), up.reshape(maps.shape[0], -1)
    )


def vote_superpixels(
    maps: torch.Tensor, labels: torch.Tensor, background: torch.Tensor | float | None = None
) -> torch.Tensor:
    """Superpixel voting (paper eq. 12-13).

    Args:
        maps: `[L, h, w]` subject maps on the token grid (M_l^self).
        labels: `[H, W]` int64 superpixel labels 0..S-1; H, W multiples of h, w.
        background: None (no background), a float density threshold in units of the uniform
            density 1/(h*w): a superpixel whose best subject's mean density is below it goes to no
            subject; or an `[h, w]` background map competing as one more channel.

    Returns:
        `[L, H, W]` bool masks, disjoint.
    """
    n_subjects = maps.shape[0]
    height, width = labels.shape
    flat_labels = labels.reshape(-1)
    area = torch.bincount(flat_labels, minlength=int(labels.max()) + 1).to(torch.float32)
    scores = region_sums(maps, labels)
    background_scores = None
    if isinstance(background, torch.Tensor):
        background_scores = region_sums(background[None], labels)[0]
    elif background is not None:
        uniform = 1.0 / (maps.shape[1] * maps.shape[2])
        background_scores = area * float(background) * uniform
    winner = assign(scores, background_scores)[flat_labels].reshape(height, width)
    return winner[None] == torch.arange(n_subjects, device=winner.device)[:, None, None]


def vote_tokens(maps: torch.Tensor, background: torch.Tensor | float | None = None) -> torch.Tensor:
    """Per-token voting (no image): `[L, h, w]` maps → `[L, h, w]` bool disjoint masks.

    `background` as in `vote_superpixels`, with each token its own region.
    """
    n_subjects, h, w = maps.shape
    flat = maps.reshape(n_subjects, -1).float()
    if isinstance(background, torch.Tensor):
        background_scores = background.reshape(-1).float()
    elif background is not None:
        background_scores = torch.full((h * w,), float(background) / (h * w), device=maps.device)
    else:
        background_scores = None
    winner = assign(flat, background_scores).reshape(h, w)
    return winner[None] == torch.arange(n_subjects, device=maps.device)[:, None, None]


def to_token_grid(masks: torch.Tensor, grid: tuple[int, int], threshold: float | None = None) -> torch.Tensor:
    """Area-average `[L, H, W]` masks onto the `(h, w)` token grid (H, W multiples of h, w).

    Returns `[L, h, w]` float: the share of each token each subject owns. With `threshold`, the
    masks are made binary: a token goes to its largest-share subject when that share is at least
    `threshold`, and to no subject otherwise.
    """
    n_subjects, height, width = masks.shape
    h, w = grid
    shares = masks.float().reshape(n_subjects, h, height // h, w, width // w).mean(dim=(2, 4))
    if threshold is None or n_subjects == 0:
        return shares
    best, winner = shares.max(dim=0)
    one_hot = winner[None] == torch.arange(n_subjects, device=shares.device)[:, None, None]
    return (one_hot & (best >= threshold)[None]).float()
