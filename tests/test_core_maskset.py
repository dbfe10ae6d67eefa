"""Mask sets: save/load round trips, resizing, overlay pictures, untrusted index files."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from freefuse.core import MaskSet, subject_colour


def example_masks() -> MaskSet:
    masks = torch.zeros(3, 32, 48)
    masks[0, :, :16] = 1
    masks[1, :, 16:32] = 1
    masks[2, :, 32:] = 0.5
    return MaskSet(["alice", "bob the builder", "carol"], masks)


@pytest.mark.parametrize("name", ["masks.json", "masks.safetensors"])
def test_save_load_round_trip(tmp_path, name: str) -> None:
    masks = example_masks()
    masks.save(tmp_path / name)
    loaded = MaskSet.load(tmp_path / name)
    assert loaded.names == masks.names
    torch.testing.assert_close(loaded.masks, masks.masks, atol=1 / 255, rtol=0)


def test_json_layout_is_one_png_per_subject(tmp_path) -> None:
    example_masks().save(tmp_path / "run.json")
    index = json.loads((tmp_path / "run.json").read_text())
    assert index["names"] == ["alice", "bob the builder", "carol"]
    assert len(index["files"]) == 3
    for file in index["files"]:
        with Image.open(tmp_path / file) as image:
            assert image.mode == "L" and image.size == (48, 32)
    assert not list(tmp_path.glob("*.part"))


def test_index_pointing_outside_its_folder_is_refused(tmp_path) -> None:
    (tmp_path / "sub").mkdir()
    Image.new("L", (4, 4)).save(tmp_path / "secret.png")
    (tmp_path / "sub" / "m.json").write_text(json.dumps({"names": ["a"], "files": ["../secret.png"]}))
    with pytest.raises(ValueError, match="outside its folder"):
        MaskSet.load(tmp_path / "sub" / "m.json")


def test_bad_mask_sets_are_refused() -> None:
    with pytest.raises(ValueError, match="one name per mask"):
        MaskSet(["a"], torch.zeros(2, 4, 4))
    with pytest.raises(ValueError, match="unique"):
        MaskSet(["a", "a"], torch.zeros(2, 4, 4))
    with pytest.raises(ValueError, match="within"):
        MaskSet(["a"], torch.full((1, 4, 4), 2.0))
    with pytest.raises(ValueError, match=r"\[subjects, H, W\]"):
        MaskSet(["a"], torch.zeros(4, 4))


def test_resize_area_gives_shares_and_nearest_keeps_binary() -> None:
    masks = example_masks()
    grid = masks.to_token_grid((2, 3))
    torch.testing.assert_close(grid[0], torch.tensor([[1.0, 0, 0], [1.0, 0, 0]]))
    big = masks.resize((64, 96), mode="nearest")
    assert set(big.masks[0].unique().tolist()) == {0.0, 1.0}
    with pytest.raises(ValueError, match="resize mode"):
        masks.resize((4, 4), mode="bicubic")


def test_overlay_colours_each_subject_and_draws_a_legend() -> None:
    masks = example_masks()
    base = Image.new("RGB", (48, 32), (0, 0, 0))
    picture = np.asarray(masks.overlay(base, legend=False)).astype(int)
    # Each subject's area takes on its own colour.
    for index, column in ((0, 8), (1, 24)):
        pixel = picture[20, column]
        expected = np.array(subject_colour(index)) * 0.55
        assert np.abs(pixel - expected).max() <= 2
    with_legend = np.asarray(masks.overlay(base, legend=True)).astype(int)
    # The legend is a strip below the picture: it covers none of it, even at 48x32 px.
    assert with_legend.shape[0] > picture.shape[0] and with_legend.shape[1] == picture.shape[1]
    np.testing.assert_array_equal(with_legend[: picture.shape[0]], picture)
    assert (with_legend[picture.shape[0] :] != with_legend[-1, -1]).any()  # something is drawn there
    # A colour per subject name (the demo gives each subject its own): that area takes it.
    purple = (155, 60, 215)
    recoloured = np.asarray(masks.overlay(base, legend=False, colours={"bob the builder": purple})).astype(int)
    assert np.abs(recoloured[20, 24] - np.array(purple) * 0.55).max() <= 2
    np.testing.assert_array_equal(recoloured[20, 8], picture[20, 8])  # the others keep the palette's
