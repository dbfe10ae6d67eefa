"""SDXL at a non-square size (128x64 and 64x128 on the tiny SDXL).

At 128x128 a mask grid read as w x h, a UNet level sized w x h, or a size conditioning given as
(width, height) are all invisible; `test_sdxl.py` runs square images only.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from freefuse import FreeFuse, FreeFuseWarning, MaskSet
from freefuse.backends import backend_for
from freefuse.testing import LoraDeltaRecorder, random_lora, tiny_sdxl_pipeline

PROMPT = "Alice hugging Bob in the snow"
NAMES = ("alice", "bob")
# (height, width) in pixels: taller than wide, and wider than tall.
SIZES = [(128, 64), (64, 128)]


def with_loras(pipe) -> FreeFuse:
    freefuse = FreeFuse(pipe)
    for index, name in enumerate(NAMES):
        random_lora(pipe, name, seed=index + 1, scale=0.5)
        freefuse.use_adapter(name, words=[name.capitalize()])
    return freefuse


def run(freefuse: FreeFuse, height: int, width: int, **values):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FreeFuseWarning)
        return freefuse(
            PROMPT,
            output_type="pt",
            progress=False,
            height=height,
            width=width,
            num_inference_steps=3,
            **values,
        )


@pytest.mark.parametrize(("height", "width"), SIZES)
def test_size_conditioning_is_height_then_width_as_in_diffusers(height: int, width: int) -> None:
    pipe = tiny_sdxl_pipeline(seed=0)
    pipe.set_progress_bar_config(disable=True)
    freefuse = with_loras(pipe)
    backend = backend_for(pipe)
    backend.timesteps(3, height, width)
    state = backend.prepare_latents([torch.Generator().manual_seed(0)], 1, height, width, torch.float32)
    assert state.latents.shape[-2:] == (height // 8, width // 8)
    # SDXL's add_time_ids: original size (h, w), crop corner (0, 0), target size (h, w).
    assert state.positions.tolist() == [[height, width, 0, 0, height, width]]

    ours = run(freefuse, height, width, method="merge", seed=3).images[0]
    assert ours.shape == (3, height, width)
    pipe.set_adapters(list(NAMES))
    theirs = pipe(
        PROMPT,
        height=height,
        width=width,
        num_inference_steps=3,
        generator=torch.Generator().manual_seed(3),
        output_type="pt",
    ).images[0]
    torch.testing.assert_close(ours, theirs, atol=2e-5, rtol=0)


def token_pattern(h: int, w: int) -> torch.Tensor:
    """An `[h, w]` 0/1 pattern that no transpose, flip or w x h reading of the grid keeps."""
    pattern = torch.zeros(h, w)
    pattern[: (5 * h) // 8, : w // 4 + 1] = 1.0
    pattern[h - 1, w - 1] = 1.0
    pattern[0, w - 1] = 1.0
    return pattern


@pytest.mark.parametrize(("height", "width"), SIZES)
def test_each_lora_acts_inside_its_mask_at_every_unet_level_of_a_non_square_image(
    height: int, width: int
) -> None:
    """Read back from every adapted layer (`LoraDeltaRecorder`, none of FreeFuse's masking code)
    how much of each LoRA acted per token, on a UNet with attention at the mask grid's level and
    at twice its resolution."""
    pipe = tiny_sdxl_pipeline(
        seed=0,
        unet_config={
            "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        },
    )
    pipe.set_progress_bar_config(disable=True)
    freefuse = with_loras(pipe)
    backend = backend_for(pipe)
    h, w = backend.grid(height, width)
    assert (h, w) == (height // 16, width // 16) and h != w
    grid = token_pattern(h, w)
    pixels = height // h
    alice = grid.repeat_interleave(pixels, 0).repeat_interleave(pixels, 1)
    masks = MaskSet(list(NAMES), torch.stack([alice, 1 - alice]))
    recorder = LoraDeltaRecorder(pipe.unet, list(NAMES))
    with recorder.recording():
        # A negative prompt of its own: an unset one is zeros, where any coefficient fits the
        # cross-attention's output layer (its input is zero).
        out = run(
            freefuse,
            height,
            width,
            method="masks",
            masks=masks,
            text_scope="all",
            seed=0,
            negative_prompt="blurry",
        )
    assert out.images[0].shape == (3, height, width)
    sides = set()
    for call in recorder.calls:
        assert call.fit_error < 1e-4, (call.layer, call.fit_error)
        if backend.token_layout(call.layer) == ("text",):
            continue
        side = int(round((call.masks["alice"].shape[-1] / (h * w)) ** 0.5))
        expected = grid.repeat_interleave(side, 0).repeat_interleave(side, 1).reshape(1, -1)
        for name, want in (("alice", expected), ("bob", 1 - expected)):
            found = call.masks[name]
            torch.testing.assert_close(found, want.expand_as(found), atol=1e-4, rtol=0, msg=call.layer)
        sides.add(side)
    assert sides == {1, 2}  # layers at the grid and at twice its resolution were both seen


def test_freefuse_masks_of_a_non_square_sdxl_image_have_its_size() -> None:
    pipe = tiny_sdxl_pipeline(seed=0)
    pipe.set_progress_bar_config(disable=True)
    freefuse = with_loras(pipe)
    out = run(freefuse, 128, 64, seed=0, mask_config={"method": "image-to-text"}, empty_mask="off")
    masks = out.masks[0]
    assert masks.size == (128, 64)
    assert torch.equal(masks.masks.sum(dim=0), torch.ones(128, 64))
