"""Stage 1 on synthetic scenes with planted answers (freefuse.core, no diffusers)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage

from freefuse.core import MaskConfig, head_mean_attention, masks_from_attention
from freefuse.testing import planted_scene, scene_masks


def iou(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.bool(), b.bool()
    return float((a & b).sum() / (a | b).sum().clamp_min(1))


def subject_ious(result, regions: torch.Tensor) -> list[float]:
    return [iou(result.token_masks[s] > 0.5, regions == s) for s in range(result.token_masks.shape[0])]


def run(scene: dict, image: bool = True, **config) -> object:
    return scene_masks(scene, MaskConfig(**config), image)


@pytest.mark.parametrize("n_subjects", [2, 3, 4])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_planted_regions_are_found(n_subjects: int, seed: int) -> None:
    scene = planted_scene(n_subjects, seed=seed)
    result = run(scene)
    assert min(subject_ious(result, scene["regions"])) >= 0.9
    assert result.token_masks.shape == (n_subjects, 32, 32)
    assert result.image_masks.shape == (n_subjects, 512, 512)
    assert result.maps.shape == (n_subjects, 32, 32)
    assert result.empty == []


@pytest.mark.parametrize("n_subjects", [2, 3, 4])
def test_without_sink_handling_the_same_scene_fails(n_subjects: int) -> None:
    scene = planted_scene(n_subjects, seed=0)
    with_filter = np.mean(subject_ious(run(scene), scene["regions"]))
    without_filter = np.mean(subject_ious(run(scene, p_sink=0.0), scene["regions"]))
    assert with_filter >= 0.9
    assert without_filter < 0.6


def test_sink_filter_removes_border_spikes_from_cross_maps() -> None:
    scene = planted_scene(2, seed=0)
    raw = run(scene, p_sink=0.0).cross_maps.reshape(2, -1)
    filtered = run(scene).cross_maps.reshape(2, -1)
    sinks = scene["sinks"]
    assert raw[:, sinks].sum(dim=1).min() > 0.5  # the sinks hold most of the raw attention
    assert filtered[:, sinks].sum(dim=1).max() < 1e-6
    torch.testing.assert_close(filtered.sum(dim=1), torch.ones(2))


def test_self_attention_refinement_fixes_leaking_cross_attention() -> None:
    refined, unrefined = [], []
    for seed in range(5):
        scene = planted_scene(3, seed=seed, leak=0.8)
        refined.append(np.mean(subject_ious(run(scene, image=False), scene["regions"])))
        unrefined.append(
            np.mean(subject_ious(run(scene, image=False, self_attention=False), scene["regions"]))
        )
    assert np.mean(refined) >= 0.9
    assert np.mean(unrefined) <= 0.8
    assert np.mean(refined) - np.mean(unrefined) >= 0.2
    assert all(r >= u for r, u in zip(refined, unrefined, strict=True))


def holes(mask: torch.Tensor) -> int:
    mask = mask.numpy().astype(bool)
    return int((ndimage.binary_fill_holes(mask) & ~mask).sum())


def test_superpixel_voting_has_no_holes_where_token_argmax_has_them() -> None:
    token_holes = 0
    for seed in range(3):
        scene = planted_scene(2, seed=seed, noise=1.0)
        superpixel = run(scene)
        per_token = run(scene, image=False)
        assert all(holes(mask) == 0 for mask in superpixel.image_masks)
        assert all(holes(mask > 0.5) == 0 for mask in superpixel.token_masks)
        token_holes += sum(holes(mask > 0.5) for mask in per_token.token_masks)
    assert token_holes > 0


def test_head_mean_attention_matches_full_softmax_and_chunking_does_not_change_it() -> None:
    generator = torch.Generator().manual_seed(0)
    queries = torch.randn(3, 7, 8, generator=generator)
    keys = torch.randn(3, 50, 8, generator=generator)
    full = torch.softmax(queries @ keys.transpose(1, 2) / 8**0.5, dim=-1).mean(dim=0)
    torch.testing.assert_close(head_mean_attention(queries, keys), full)
    torch.testing.assert_close(head_mean_attention(queries, keys, chunk_elements=60), full)


def test_one_subject_gets_everything() -> None:
    scene = planted_scene(1, seed=0)
    result = run(scene)
    assert bool(result.image_masks.all())


def test_background_channel_leaves_weak_regions_unassigned() -> None:
    scene = planted_scene(2, seed=0)
    # Only subject 0 is asked for: with a background channel the other region stays free.
    scene["token_sets"] = scene["token_sets"][:1]
    without = run(scene)
    with_background = run(scene, background=True, background_threshold=1.0)
    assert bool(without.image_masks.all())
    assert iou(with_background.token_masks[0] > 0.5, scene["regions"] == 0) >= 0.9


def test_background_words_compete_as_a_channel() -> None:
    scene = planted_scene(2, seed=0)
    background_tokens = scene["token_sets"][1]
    result = masks_from_attention(
        scene["q_text"],
        scene["q_img"],
        scene["k_img"],
        scene["token_sets"][:1],
        scene["grid"],
        scene["image"],
        MaskConfig(background=True),
        background_tokens=background_tokens,
    )
    assert iou(result.token_masks[0] > 0.5, scene["regions"] == 0) >= 0.9


def test_binarize_threshold_makes_token_masks_one_hot() -> None:
    scene = planted_scene(3, seed=0)
    soft = run(scene, slic_max_side=None)
    hard = run(scene, slic_max_side=None, binarize_threshold=0.5)
    assert ((soft.token_masks > 0) & (soft.token_masks < 1)).any()  # superpixel edges cut tokens
    assert set(hard.token_masks.unique().tolist()) <= {0.0, 1.0}
    assert hard.token_masks.sum(dim=0).max() <= 1


def test_image_size_upsamples_per_token_masks() -> None:
    scene = planted_scene(2, seed=0)
    result = masks_from_attention(
        scene["q_text"], scene["q_img"], scene["k_img"], scene["token_sets"], (32, 32), image_size=(64, 64)
    )
    assert result.image_masks.shape == (2, 64, 64)
    torch.testing.assert_close(result.image_masks[:, ::2, ::2].float(), result.token_masks)


def test_half_precision_inputs_give_the_same_masks() -> None:
    scene = planted_scene(2, seed=0)
    full = run(scene)
    half = masks_from_attention(
        scene["q_text"].bfloat16(),
        scene["q_img"].bfloat16(),
        scene["k_img"].bfloat16(),
        scene["token_sets"],
        scene["grid"],
        scene["image"],
    )
    assert iou(full.image_masks[0], half.image_masks[0]) > 0.95


def test_words_spanning_several_tokens_and_repeats_average_all_positions() -> None:
    scene = planted_scene(2, seed=0)
    base = run(scene, image=False)
    # Repeating a position or listing it twice must not change the subject's map (it is a set).
    scene["token_sets"] = [scene["token_sets"][0] * 2, scene["token_sets"][1]]
    repeated = run(scene, image=False)
    torch.testing.assert_close(base.cross_maps, repeated.cross_maps)


def test_slic_on_a_shrunk_copy_gives_nearly_the_same_masks() -> None:
    scene = planted_scene(3, seed=1, pixels_per_token=32)  # a 1024² picture
    full = run(scene, slic_max_side=None)
    shrunk = run(scene, slic_max_side=256)
    assert shrunk.labels.shape == full.labels.shape == (1024, 1024)
    for subject in range(3):
        assert iou(full.image_masks[subject], shrunk.image_masks[subject]) >= 0.95
    assert min(subject_ious(shrunk, scene["regions"])) >= 0.9


def test_noise_picture_falls_back_to_token_voting_and_says_so() -> None:
    scene = planted_scene(2, seed=0)
    scene["image"] = np.random.default_rng(0).random(scene["image"].shape)
    result = run(scene)
    assert result.labels is None
    assert result.notes and "voted per token" in result.notes[0]
    assert min(subject_ious(result, scene["regions"])) >= 0.9
    assert result.image_masks.shape == (2, 512, 512)
