"""Properties of stage 1 on random inputs (hypothesis) and its input checks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from freefuse.core import MaskConfig, masks_from_attention
from freefuse.core.methods import MAP_METHODS
from freefuse.core.voting import region_sums

METHODS = st.sampled_from(sorted(MAP_METHODS))


@st.composite
def random_inputs(draw, with_image: bool = False):
    n_subjects = draw(st.integers(1, 4))
    h = draw(st.integers(2, 8))
    w = draw(st.integers(2, 8))
    heads = draw(st.integers(1, 3))
    dim = draw(st.sampled_from([4, 8]))
    n_text = draw(st.integers(n_subjects, 10))
    seed = draw(st.integers(0, 2**31 - 1))
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(n_text, generator=generator).tolist()
    cuts = (
        sorted(
            draw(
                st.lists(
                    st.integers(1, n_text - 1), min_size=n_subjects - 1, max_size=n_subjects - 1, unique=True
                )
            )
        )
        if n_subjects > 1
        else []
    )
    bounds = [0, *cuts, n_text]
    token_sets = [order[bounds[i] : bounds[i + 1]] for i in range(n_subjects)]
    scale = draw(st.sampled_from([0.5, 2.0, 5.0]))
    inputs = {
        "q_text": scale * torch.randn(heads, n_text, dim, generator=generator),
        "q_img": scale * torch.randn(heads, h * w, dim, generator=generator),
        "k_img": scale * torch.randn(heads, h * w, dim, generator=generator),
        "k_text": scale * torch.randn(heads, n_text, dim, generator=generator),
        "o_img": torch.randn(h * w, heads * dim, generator=generator),
        "token_sets": token_sets,
        "grid": (h, w),
        "image": torch.rand(h * 4, w * 4, 3, generator=generator).numpy() if with_image else None,
    }
    return inputs


@settings(max_examples=60, deadline=None)
@given(inputs=random_inputs(), background=st.booleans(), method=METHODS)
def test_masks_partition_the_grid(inputs: dict, background: bool, method: str) -> None:
    result = masks_from_attention(**inputs, config=MaskConfig(method=method, background=background))
    coverage = result.token_masks.sum(dim=0)
    assert set(result.token_masks.unique().tolist()) <= {0.0, 1.0}
    if background:
        assert coverage.max() <= 1.0
    else:
        assert bool((coverage == 1.0).all())
    assert bool((result.image_masks.sum(dim=0) <= 1).all())


@settings(max_examples=30, deadline=None)
@given(inputs=random_inputs(with_image=True), method=METHODS)
def test_superpixel_masks_partition_the_image_and_shares_sum_to_one(inputs: dict, method: str) -> None:
    result = masks_from_attention(**inputs, config=MaskConfig(method=method, background=False))
    assert bool((result.image_masks.sum(dim=0) == 1).all())
    torch.testing.assert_close(result.token_masks.sum(dim=0), torch.ones(inputs["grid"]))


@settings(max_examples=30, deadline=None)
@given(inputs=random_inputs(with_image=True), method=METHODS)
def test_deterministic(inputs: dict, method: str) -> None:
    first = masks_from_attention(**inputs, config=MaskConfig(method=method))
    second = masks_from_attention(**inputs, config=MaskConfig(method=method))
    assert torch.equal(first.image_masks, second.image_masks)
    assert torch.equal(first.token_masks, second.token_masks)
    assert torch.equal(first.maps, second.maps)


@settings(max_examples=40, deadline=None)
@given(inputs=st.one_of(random_inputs(), random_inputs(with_image=True)), data=st.data(), method=METHODS)
def test_permuting_subjects_permutes_masks(inputs: dict, data, method: str) -> None:
    n_subjects = len(inputs["token_sets"])
    permutation = data.draw(st.permutations(range(n_subjects)))
    config = MaskConfig(method=method)
    result = masks_from_attention(**inputs, config=config)
    # On tiny grids two subjects can seed their refinement with the same top token and get equal
    # maps; an exact tie has no symmetric winner, so such draws are not a test of symmetry.
    top2 = result.maps.reshape(n_subjects, -1).topk(min(2, n_subjects), dim=0).values
    assume(n_subjects == 1 or bool((top2[0] > top2[1]).all()))
    # Each map sums to 1, so one superpixel covering the whole image is an exact tie as well.
    assume(result.labels is None or int(result.labels.max()) > 0)
    if result.labels is not None and n_subjects > 1:
        # Likewise two maps whose upsampled sums over a superpixel are equal (a few pixels placed
        # symmetrically between two tokens whose values the maps swap): the vote goes to the first.
        votes = region_sums(result.maps, result.labels).topk(2, dim=0).values
        assume(bool((votes[0] > votes[1]).all()))
    permuted = masks_from_attention(
        **{**inputs, "token_sets": [inputs["token_sets"][i] for i in permutation]}, config=config
    )
    assert torch.equal(permuted.image_masks, result.image_masks[list(permutation)])
    assert torch.equal(permuted.token_masks, result.token_masks[list(permutation)])
    torch.testing.assert_close(permuted.maps, result.maps[list(permutation)])


# -- input checks ------------------------------------------------------------------------------


def good_inputs() -> dict:
    generator = torch.Generator().manual_seed(0)
    return {
        "q_text": torch.randn(2, 6, 8, generator=generator),
        "q_img": torch.randn(2, 16, 8, generator=generator),
        "k_img": torch.randn(2, 16, 8, generator=generator),
        "token_sets": [[0, 1], [3]],
        "grid": (4, 4),
        "image": np.zeros((16, 16, 3)),
    }


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"token_sets": []}, "token_sets` is empty"),
        ({"token_sets": [[0], []]}, r"token_sets\[1\]` is empty"),
        ({"token_sets": [[0], [6]]}, "outside the 6 text tokens"),
        ({"token_sets": [[-1], [2]]}, "outside the 6 text tokens"),
        ({"grid": (4, 5)}, "does not match the 16 image tokens"),
        ({"q_img": torch.randn(3, 16, 8)}, "same shape"),
        ({"q_img": torch.randn(3, 16, 8), "k_img": torch.randn(3, 16, 8)}, "heads"),
        ({"q_text": torch.randn(2, 6, 4)}, "dim"),
        ({"q_text": torch.randn(6, 8)}, r"\[heads, tokens, dim\]"),
        ({"q_img": torch.full((2, 16, 8), float("nan"))}, "`q_img` contains NaN"),
        ({"k_img": torch.full((2, 16, 8), float("inf"))}, "`k_img` contains NaN or inf"),
        ({"image": np.zeros((15, 16, 3))}, "not a multiple of the token grid"),
        ({"image": np.zeros((16, 16))}, r"H×W×3"),
        ({"image": np.full((16, 16, 3), np.nan)}, "`image` contains NaN"),
    ],
)
def test_bad_input_is_a_clear_value_error(change: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        masks_from_attention(**{**good_inputs(), **change})


@pytest.mark.parametrize(
    ("method", "missing"), [("image-to-text", "k_text"), ("combined", "k_text"), ("routing", "o_img")]
)
def test_a_method_without_its_tensors_says_which(method: str, missing: str) -> None:
    inputs = {**good_inputs(), "k_text": torch.randn(2, 6, 8)} if missing == "o_img" else good_inputs()
    with pytest.raises(ValueError, match=f"needs `{missing}`"):
        masks_from_attention(**inputs, config=MaskConfig(method=method))


@pytest.mark.parametrize(
    "settings_",
    [
        {"p_sink": 1.5},
        {"p_top": -0.1},
        {"sink_border": -1},
        {"n_segments": 0},
        {"compactness": 0},
        {"binarize_threshold": 2.0},
        {"background_threshold": -1},
        {"chunk_elements": 0},
        {"method": "magic"},
        {"sink_rule": "edges"},
        {"map_scale": "log"},
        {"routing_seed_fraction": 2.0},
    ],
)
def test_bad_config_is_a_clear_value_error(settings_: dict) -> None:
    name = next(iter(settings_))
    with pytest.raises(ValueError, match=name):
        MaskConfig(**settings_)


def test_routing_has_a_background_channel_unless_told_otherwise() -> None:
    assert MaskConfig(method="routing").with_background
    assert not MaskConfig(method="routing", background=False).with_background
    assert not MaskConfig().with_background and MaskConfig(background=True).with_background


def test_config_round_trips_through_a_dict_and_rejects_unknown_keys() -> None:
    config = MaskConfig(p_sink=0.02, background=True)
    assert MaskConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="Unknown mask settings"):
        MaskConfig.from_dict({"p_snk": 0.1})
