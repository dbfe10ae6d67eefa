"""The mask methods' arithmetic against small hand-computed tensors.

The planted-scene tests (`test_core_methods.py`) check how well scenes come out (IoU); a wrong unit
of the background level, a wrong mean in the combined method or sinks looked for in the wrong rows
can leave those scores high. Here each attention row is planted exactly: with one head, image keys
`e_i` and text keys `e_{N+t}` (one-hot, D = N + T), a query `sqrt(D) * log(p)` on the right slots
gives `softmax(q k^T / sqrt(D)) = p`, so every map, level and winner below is written out by hand.
"""

from __future__ import annotations

import math

import torch

from freefuse.core import MaskConfig, masks_from_attention

SUBJECT_A, SUBJECT_B = 1, 2  # text positions of the two subjects' words (T = 4)


def planted(text_to_image: torch.Tensor | None = None, image_to_text: torch.Tensor | None = None) -> dict:
    """One-head q/k whose attention rows are exactly the given distributions.

    Args:
        text_to_image: `[T, N]`, each text token's row over the image keys (positive, sums to 1).
        image_to_text: `[N, T]`, each image token's row over the text keys.
    """
    n_text, n_img = text_to_image.shape if text_to_image is not None else image_to_text.shape[::-1]
    dim = n_img + n_text
    scale = math.sqrt(dim)
    k_img = torch.zeros(1, n_img, dim)
    k_img[0, :, :n_img] = torch.eye(n_img)
    k_text = torch.zeros(1, n_text, dim)
    k_text[0, :, n_img:] = torch.eye(n_text)
    q_text = torch.zeros(1, n_text, dim)
    q_img = torch.zeros(1, n_img, dim)
    if text_to_image is not None:
        q_text[0, :, :n_img] = scale * text_to_image.log()
    if image_to_text is not None:
        q_img[0, :, n_img:] = scale * image_to_text.log()
    return {"q_text": q_text, "q_img": q_img, "k_img": k_img, "k_text": k_text}


def run(scene: dict, grid: tuple[int, int], **config):
    return masks_from_attention(
        scene["q_text"],
        scene["q_img"],
        scene["k_img"],
        [[SUBJECT_A], [SUBJECT_B]],
        grid,
        config=MaskConfig(**config),
        k_text=scene["k_text"],
    )


# Six image tokens (grid 2x3) over T = 4 text tokens: A's and B's shares are columns 1 and 2.
SHARES = torch.tensor(
    [
        [0.10, 0.60, 0.20, 0.10],
        [0.10, 0.20, 0.50, 0.20],
        [0.50, 0.20, 0.10, 0.20],
        [0.40, 0.30, 0.10, 0.20],
        [0.20, 0.10, 0.40, 0.30],
        [0.60, 0.10, 0.15, 0.15],
    ]
)


def test_image_to_text_threshold_background_is_in_units_of_the_text_uniform_share() -> None:
    """Unrefined image-to-text maps are attention shares (uniform 1/T), so the threshold level is
    `background_threshold / T`, not `/ N`: with N = 6 != T = 4 the two levels pick different tokens."""
    scene = planted(image_to_text=SHARES)
    result = run(scene, (2, 3), method="image-to-text", background=True)
    expected_maps = torch.tensor([[0.60, 0.20, 0.20, 0.30, 0.10, 0.10], [0.20, 0.50, 0.10, 0.10, 0.40, 0.15]])
    torch.testing.assert_close(result.maps.reshape(2, 6), expected_maps)
    # Level 1/4: token 2 (best 0.20) and token 5 (best 0.15) go to no subject.
    expected = torch.tensor([[1.0, 0, 0, 1, 0, 0], [0, 1, 0, 0, 1, 0]])
    assert torch.equal(result.token_masks.reshape(2, 6), expected)
    # Twice the uniform share (0.5): only 0.6 and the tie 0.5 (not below the level) stay.
    doubled = run(scene, (2, 3), method="image-to-text", background=True, background_threshold=2.0)
    assert torch.equal(
        doubled.token_masks.reshape(2, 6), torch.tensor([[1.0, 0, 0, 0, 0, 0], [0, 1, 0, 0, 0, 0]])
    )


def test_peak_scaled_maps_compete_with_the_peak_background_level() -> None:
    """`map_scale="peak"`: each map divided by its top token (k = 1 here), and the background is
    `peak_background` in those units."""
    scene = planted(image_to_text=SHARES)
    result = run(
        scene, (2, 3), method="image-to-text", background=True, map_scale="peak", peak_background=0.45
    )
    expected_maps = torch.tensor(
        [[1.0, 1 / 3, 1 / 3, 0.5, 1 / 6, 1 / 6], [0.4, 1.0, 0.2, 0.2, 0.8, 0.3]]  # A / 0.6, B / 0.5
    )
    torch.testing.assert_close(result.maps.reshape(2, 6), expected_maps)
    # Below 0.45: token 2 (best 1/3) and token 5 (best 0.3).
    expected = torch.tensor([[1.0, 0, 0, 1, 0, 0], [0, 1, 0, 0, 1, 0]])
    assert torch.equal(result.token_masks.reshape(2, 6), expected)


def test_combined_is_the_geometric_mean_of_both_directions() -> None:
    """Four image tokens. A's text->image row is [.4, .1, .1, .4] and its image->text shares
    [.4, .4, .1, .1]: sqrt of the products is [.4, .2, .1, .2], which sums to .9."""
    text_to_image = torch.tensor(
        [
            [0.25, 0.25, 0.25, 0.25],
            [0.40, 0.10, 0.10, 0.40],  # A
            [0.10, 0.40, 0.40, 0.10],  # B
            [0.25, 0.25, 0.25, 0.25],
        ]
    )
    image_to_text = torch.tensor(
        [
            [0.25, 0.40, 0.10, 0.25],
            [0.25, 0.40, 0.10, 0.25],
            [0.25, 0.10, 0.40, 0.25],
            [0.25, 0.10, 0.40, 0.25],
        ]
    )
    scene = planted(text_to_image, image_to_text)
    result = run(scene, (2, 2), method="combined", self_attention=False, p_sink=0.0)
    expected = torch.tensor([[4.0, 2.0, 1.0, 2.0], [1.0, 2.0, 4.0, 2.0]]) / 9
    torch.testing.assert_close(result.cross_maps.reshape(2, 4), expected)
    torch.testing.assert_close(result.maps.reshape(2, 4), expected)


def test_shared_sinks_are_the_tokens_all_words_attend_to_not_the_subjects_peaks() -> None:
    """16 image tokens, k = floor(16 * 0.125) = 2. The two non-subject words put 0.4 each on tokens
    5 and 6 (sinks); A's word peaks on its own token 10 (0.30) and also hits sink 5 (0.25), B's on
    12 (0.28) and 5. Summed over all words the top 2 are {5, 6}; summed over the subjects' words
    only they would be {5, 10}, A's own peak. So each subject row loses token 5 and nothing else."""
    rows = torch.zeros(4, 16)
    for word in (0, 3):
        rows[word] = 0.2 / 14
        rows[word, [5, 6]] = 0.4
    rows[SUBJECT_A] = 0.45 / 14
    rows[SUBJECT_A, 10], rows[SUBJECT_A, 5] = 0.30, 0.25
    rows[SUBJECT_B] = 0.47 / 14
    rows[SUBJECT_B, 12], rows[SUBJECT_B, 5] = 0.28, 0.25
    torch.testing.assert_close(rows.sum(dim=1), torch.ones(4))
    scene = planted(text_to_image=rows)
    result = run(
        scene, (4, 4), method="text-to-image", sink_rule="shared", p_sink=0.125, self_attention=False
    )
    expected = rows[[SUBJECT_A, SUBJECT_B]].clone()
    expected[:, 5] = 0.0
    expected = expected / expected.sum(dim=1, keepdim=True)  # 0.75 each
    torch.testing.assert_close(result.cross_maps.reshape(2, 16), expected)
    assert result.cross_maps.reshape(2, 16)[0].argmax() == 10  # A's own peak stays its peak
