"""The attention-sink rule (paper eq. 6-7) pinned on scenes where the plausible wrong rules differ.

The rule: in each text→image row, zero the entries that are BOTH in the row's top-k
(k = floor(N · p_sink)) AND on the border of the token grid, then renormalise. Two wrong rules
look alike on scenes whose sinks are exactly the border top-k: "top-k anywhere" (also drops a
subject's own interior peak) and "the whole border" (also drops a subject's ordinary border
tokens). The scenes here have both an interior peak and plain border mass, so all three differ.
"""

from __future__ import annotations

import math

import pytest
import torch

from freefuse.core import MaskConfig, border_tokens, filter_sinks, masks_from_attention
from freefuse.testing import planted_scene


def test_border_tokens_are_the_outer_ring_of_the_grid() -> None:
    border = border_tokens((4, 5), 1).reshape(4, 5)
    expected = torch.ones(4, 5, dtype=torch.bool)
    expected[1:3, 1:4] = False
    assert torch.equal(border, expected)
    assert border_tokens((4, 5), 0).sum() == 0


def test_only_top_k_entries_on_the_border_are_dropped() -> None:
    grid = (10, 10)
    row = torch.full((100,), 0.001)
    interior_peak, border_sink, second_sink, weak_border = 55, 0, 5, 99  # (5,5), (0,0), (0,5), (9,9)
    row[interior_peak], row[border_sink], row[second_sink], row[weak_border] = 0.30, 0.25, 0.20, 0.004
    row = row / row.sum()
    filtered = filter_sinks(row[None], border_tokens(grid, 1), p_sink=0.03)[0]  # k = 3
    assert filtered[border_sink] == 0 and filtered[second_sink] == 0  # top-3 and on the border
    assert filtered[interior_peak] > 0  # top-3 but inside: a subject's own peak stays
    assert filtered[weak_border] > 0  # on the border but not in the top-3: stays
    kept = row.clone()
    kept[[border_sink, second_sink]] = 0
    torch.testing.assert_close(filtered, kept / kept.sum())


def test_a_row_that_would_lose_everything_is_kept_as_it_was() -> None:
    row = torch.zeros(16)
    row[0] = 1.0  # all mass on one border token, which is also the top-1
    filtered = filter_sinks(row[None], border_tokens((4, 4), 1), p_sink=1 / 16)[0]
    torch.testing.assert_close(filtered, row)


def reference_cross_maps(scene: dict, p_sink: float, rule: str) -> torch.Tensor:
    """Subject maps M_l from the full attention matrix, written out naively for one rule."""
    q_text, k_img = scene["q_text"].double(), scene["k_img"].double()
    n_tokens = k_img.shape[1]
    probs = torch.softmax(q_text @ k_img.transpose(1, 2) / math.sqrt(q_text.shape[-1]), dim=-1).mean(0)
    h, w = scene["grid"]
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    border = ((ys == 0) | (ys == h - 1) | (xs == 0) | (xs == w - 1)).reshape(-1)
    k = math.floor(n_tokens * p_sink)
    maps = []
    for tokens in scene["token_sets"]:
        rows = []
        for position in tokens:
            row = probs[position].clone()
            top = torch.zeros(n_tokens, dtype=torch.bool)
            top[row.topk(k).indices] = True
            drop = {"paper": top & border, "top-k anywhere": top, "whole border": border}[rule]
            row[drop] = 0
            rows.append(row / row.sum())
        maps.append(torch.stack(rows).mean(0))
    return torch.stack(maps).float()


@pytest.fixture
def scene_with_interior_peaks() -> dict:
    """Planted border sinks, plus each subject's word attending strongly to one interior token."""
    scene = planted_scene(2, grid=(16, 16), seed=3, n_sinks=2)
    n_tokens = 16 * 16
    generator = torch.Generator().manual_seed(11)
    for subject, tokens in enumerate(scene["token_sets"]):
        peak = (5 * 16 + 5, 10 * 16 + 10)[subject]
        extra = torch.randn(scene["k_img"].shape[-1], generator=generator)
        extra = 4.0 * extra / extra.norm()
        scene["k_img"][:, peak] += extra
        for position in tokens:
            scene["q_text"][:, position] += extra
    assert n_tokens * 0.02 >= 4  # k covers the sinks and the peaks
    return scene


@pytest.mark.parametrize("seed_offset", [0, 1])
def test_cross_maps_follow_the_paper_rule_where_the_wrong_rules_differ(
    scene_with_interior_peaks, seed_offset
) -> None:
    scene = scene_with_interior_peaks
    if seed_offset:
        scene["q_text"] = scene["q_text"] * 1.2  # sharper rows, same structure
    config = MaskConfig(p_sink=0.02)
    result = masks_from_attention(
        scene["q_text"], scene["q_img"], scene["k_img"], scene["token_sets"], scene["grid"], config=config
    )
    ours = result.cross_maps.reshape(2, -1)
    paper = reference_cross_maps(scene, 0.02, "paper")
    torch.testing.assert_close(ours, paper, atol=1e-5, rtol=1e-4)
    for wrong in ("top-k anywhere", "whole border"):
        other = reference_cross_maps(scene, 0.02, wrong)
        assert (other - paper).abs().max() > 1e-3, f"the scene does not tell {wrong!r} from the paper's rule"


def test_planted_sinks_are_removed_and_interior_peaks_survive(scene_with_interior_peaks) -> None:
    scene = scene_with_interior_peaks
    result = masks_from_attention(
        scene["q_text"],
        scene["q_img"],
        scene["k_img"],
        scene["token_sets"],
        scene["grid"],
        config=MaskConfig(p_sink=0.02),
    )
    maps = result.cross_maps.reshape(2, -1)
    assert maps[:, scene["sinks"]].max() < 1e-6
    assert maps[0, 5 * 16 + 5] == maps[0].max() and maps[1, 10 * 16 + 10] == maps[1].max()
    border = border_tokens(scene["grid"], 1)
    k = int(16 * 16 * 0.02)
    assert ((maps[:, border] > 0).sum(dim=1) >= int(border.sum()) - k).all()  # the rest of the border stays
