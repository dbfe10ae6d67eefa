"""Conditions besides the prompt (img2img, inpainting, ControlNets) on the tiny FLUX.1 and SDXL
pipelines: `merge` against the matching diffusers pipeline with the same LoRAs and generator,
all-ones masks against merge under each condition, what inpainting keeps, and what is refused.

The oracles are diffusers' own pipelines built from the same components (`FluxImg2ImgPipeline`,
`FluxInpaintPipeline`, `FluxControlNetPipeline`, the SDXL ones), with tiny random ControlNets.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from freefuse import FreeFuse, FreeFuseWarning, GenerationSettings, MaskSet
from freefuse.conditions import Conditions, Control
from freefuse.errors import SettingsError
from freefuse.testing import (
    random_lora,
    tiny_flux_controlnet,
    tiny_flux_pipeline,
    tiny_sdxl_controlnet,
    tiny_sdxl_pipeline,
)

PROMPT = "Alice hugging Bob in the snow"
SIZE = 128
FLUX = {"height": SIZE, "width": SIZE, "num_inference_steps": 6, "max_sequence_length": 32, "guidance_scale": 3.5}
SDXL = {"height": SIZE, "width": SIZE, "num_inference_steps": 5, "guidance_scale": 4.0}


def picture(seed: int, size: int = SIZE, mode: str = "RGB") -> Image.Image:
    """A random picture (smooth enough for a VAE to keep)."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 255, (size // 16, size // 16, 3), dtype=np.uint8)
    return Image.fromarray(coarse).resize((size, size), Image.BILINEAR).convert(mode)


def region(size: int = SIZE, box=(32, 40, 96, 100)) -> Image.Image:
    """White inside `box` (top, left, bottom, right): where inpainting repaints."""
    mask = np.zeros((size, size), dtype=np.uint8)
    top, left, bottom, right = box
    mask[top:bottom, left:right] = 255
    return Image.fromarray(mask, "L")


def with_loras(pipe, scale: float = 1.0) -> FreeFuse:
    pipe.set_progress_bar_config(disable=True)
    freefuse = FreeFuse(pipe)
    for index, name in enumerate(("alice", "bob")):
        random_lora(pipe, name, seed=index + 1, scale=scale)
        freefuse.use_adapter(name, words=[name.capitalize()])
    return freefuse


def run(freefuse: FreeFuse, settings: dict, **values):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FreeFuseWarning)
        return freefuse(PROMPT, progress=False, **{"output_type": "pt", **settings, **values})


def oracle(pipe, cls, settings: dict, seed: int, **inputs) -> torch.Tensor:
    """diffusers' pipeline `cls` over `pipe`'s components, both LoRAs active: the reference."""
    reference = cls(**pipe.components, **inputs.pop("components", {}))
    reference.set_progress_bar_config(disable=True)
    pipe.set_adapters(["alice", "bob"])
    generator = torch.Generator().manual_seed(seed)
    return reference(PROMPT, generator=generator, output_type="pt", **settings, **inputs).images[0]


@pytest.fixture(scope="module")
def flux() -> FreeFuse:
    return with_loras(tiny_flux_pipeline(seed=0))


@pytest.fixture(scope="module")
def sdxl() -> FreeFuse:
    return with_loras(tiny_sdxl_pipeline(seed=0), scale=0.5)


def ones(names=("alice", "bob")) -> MaskSet:
    return MaskSet(list(names), torch.ones(len(names), SIZE, SIZE))


# -- FLUX.1 against diffusers -----------------------------------------------------------------------------


def test_flux_img2img_merge_is_flux_img2img_pipeline(flux: FreeFuse) -> None:
    from diffusers import FluxImg2ImgPipeline

    init = picture(1)
    ours = run(flux, FLUX, method="merge", seed=3, conditions=Conditions.of(init_image=init, strength=0.7))
    theirs = oracle(flux.pipeline, FluxImg2ImgPipeline, FLUX, 3, image=init, strength=0.7)
    assert torch.equal(ours.images[0], theirs)
    plain = run(flux, FLUX, method="merge", seed=3).images[0]
    assert (plain - theirs).abs().max() > 1e-2  # the init image does change the picture
    assert ours.manifest["conditions"]["strength"] == 0.7
    assert ours.manifest["conditions"]["init_image"]["sha256"] == Conditions.of(init_image=init).init_image.sha256


def test_flux_inpaint_merge_is_flux_inpaint_pipeline(flux: FreeFuse) -> None:
    from diffusers import FluxInpaintPipeline

    init, mask = picture(2), region()
    conditions = Conditions.of(init_image=init, inpaint_mask=mask, strength=0.8)
    ours = run(flux, FLUX, method="merge", seed=4, conditions=conditions).images[0]
    theirs = oracle(flux.pipeline, FluxInpaintPipeline, FLUX, 4, image=init, mask_image=mask, strength=0.8)
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("kind", ["instantx", "union", "xlabs"])
def test_flux_controlnet_merge_is_flux_controlnet_pipeline(flux: FreeFuse, kind: str) -> None:
    from diffusers import FluxControlNetPipeline

    net = tiny_flux_controlnet(flux.pipeline, seed=5, union=kind == "union", hint=kind == "xlabs")
    control = Control(picture(3), scale=0.8, type="depth" if kind == "union" else None)
    ours = run(flux, FLUX, method="merge", seed=3, conditions=Conditions.of(controls=[control]), controlnet=net)
    mode = {"control_mode": 2} if kind == "union" else {}  # "depth" is the union's mode 2
    theirs = oracle(
        flux.pipeline,
        FluxControlNetPipeline,
        FLUX,
        3,
        components={"controlnet": net},
        control_image=control.image,
        controlnet_conditioning_scale=0.8,
        **mode,
    )
    assert torch.equal(ours.images[0], theirs)
    plain = run(flux, FLUX, method="merge", seed=3).images[0]
    assert (plain - theirs).abs().max() > 1e-2  # the ControlNet does act
    assert ours.manifest["conditions"]["controlnets"][0]["class"] == "FluxControlNetModel"


@pytest.mark.parametrize("union", [False, True])
def test_flux_multi_controlnet_merge_is_the_pipeline_with_a_multi_controlnet(flux: FreeFuse, union: bool) -> None:
    from diffusers import FluxControlNetPipeline, FluxMultiControlNetModel

    if union:  # one union ControlNet reads both pictures, each in its own mode
        nets = [tiny_flux_controlnet(flux.pipeline, seed=7, union=True)]
        controls = [Control(picture(3), 0.8, "canny"), Control(picture(4), 0.5, "pose")]
        extra = {"control_mode": [0, 4]}
    else:
        nets = [tiny_flux_controlnet(flux.pipeline, seed=5), tiny_flux_controlnet(flux.pipeline, seed=6)]
        controls = [Control(picture(3), 0.8), Control(picture(4), 0.5, controlnet=1)]
        extra = {}
    ours = run(flux, FLUX, method="merge", seed=3, conditions=Conditions.of(controls=controls), controlnet=nets)
    theirs = oracle(
        flux.pipeline,
        FluxControlNetPipeline,
        FLUX,
        3,
        components={"controlnet": FluxMultiControlNetModel(nets)},
        control_image=[c.image for c in controls],
        controlnet_conditioning_scale=[0.8, 0.5],
        # diffusers sizes `control_guidance_start` by its number of ControlNets: with one union
        # ControlNet and two pictures it would keep the first picture only; given per picture, both act.
        control_guidance_start=[0.0, 0.0],
        control_guidance_end=[1.0, 1.0],
        **extra,
    )
    assert torch.equal(ours.images[0], theirs)


# -- SDXL against diffusers -------------------------------------------------------------------------------
# diffusers batches the two guidance passes in one forward; FreeFuse runs them one by one, so the
# images agree to float rounding (as `test_sdxl.py`'s merge test).


def test_sdxl_img2img_merge_is_sdxl_img2img_pipeline(sdxl: FreeFuse) -> None:
    from diffusers import StableDiffusionXLImg2ImgPipeline

    init = picture(1)
    ours = run(sdxl, SDXL, method="merge", seed=3, conditions=Conditions.of(init_image=init, strength=0.7)).images[0]
    theirs = oracle(sdxl.pipeline, StableDiffusionXLImg2ImgPipeline, SDXL, 3, image=init, strength=0.7)
    torch.testing.assert_close(ours, theirs, atol=2e-5, rtol=0)
    assert (ours - run(sdxl, SDXL, method="merge", seed=3).images[0]).abs().max() > 1e-3


@pytest.mark.parametrize("strength", [0.8, 1.0])
def test_sdxl_inpaint_merge_is_sdxl_inpaint_pipeline(sdxl: FreeFuse, strength: float) -> None:
    from diffusers import StableDiffusionXLInpaintPipeline

    init, mask = picture(2), region()
    conditions = Conditions.of(init_image=init, inpaint_mask=mask, strength=strength)
    ours = run(sdxl, SDXL, method="merge", seed=4, conditions=conditions).images[0]
    theirs = oracle(
        sdxl.pipeline, StableDiffusionXLInpaintPipeline, SDXL, 4, image=init, mask_image=mask, strength=strength
    )
    torch.testing.assert_close(ours, theirs, atol=2e-5, rtol=0)


@pytest.mark.parametrize("count", [1, 2])
def test_sdxl_controlnet_merge_is_sdxl_controlnet_pipeline(sdxl: FreeFuse, count: int) -> None:
    from diffusers import StableDiffusionXLControlNetPipeline
    from diffusers.models.controlnets.multicontrolnet import MultiControlNetModel

    nets = [tiny_sdxl_controlnet(sdxl.pipeline, seed=5 + k) for k in range(count)]
    controls = [Control(picture(3 + k), scale=0.8 - 0.3 * k, controlnet=k) for k in range(count)]
    ours = run(sdxl, SDXL, method="merge", seed=3, conditions=Conditions.of(controls=controls), controlnet=nets)
    theirs = oracle(
        sdxl.pipeline,
        StableDiffusionXLControlNetPipeline,
        SDXL,
        3,
        components={"controlnet": nets[0] if count == 1 else MultiControlNetModel(nets)},
        image=controls[0].image if count == 1 else [c.image for c in controls],
        controlnet_conditioning_scale=controls[0].scale if count == 1 else [c.scale for c in controls],
    )
    torch.testing.assert_close(ours.images[0], theirs, atol=2e-5, rtol=0)
    assert (theirs - run(sdxl, SDXL, method="merge", seed=3).images[0]).abs().max() > 1e-3


# -- FreeFuse under each condition --------------------------------------------------------------------------


def _conditions(kind: str, pipe):
    if kind == "img2img":
        return Conditions.of(init_image=picture(1), strength=0.8), None
    if kind == "inpaint":
        return Conditions.of(init_image=picture(2), inpaint_mask=region(), strength=0.9), None
    make = tiny_flux_controlnet if hasattr(pipe, "transformer") else tiny_sdxl_controlnet
    return Conditions.of(controls=[Control(picture(3), 0.7)]), make(pipe, seed=5)


@pytest.mark.parametrize("kind", ["img2img", "inpaint", "controlnet"])
@pytest.mark.parametrize("arch", ["flux", "sdxl"])
def test_all_ones_masks_equal_merge_under_each_condition(flux, sdxl, arch: str, kind: str) -> None:
    freefuse, settings = (flux, FLUX) if arch == "flux" else (sdxl, SDXL)
    conditions, net = _conditions(kind, freefuse.pipeline)
    merge = run(freefuse, settings, method="merge", seed=2, conditions=conditions, controlnet=net).images[0]
    masked = run(
        freefuse, settings, method="masks", masks=ones(), text_scope="all", seed=2, conditions=conditions, controlnet=net
    ).images[0]
    assert (merge - masked).abs().max() <= 1e-5
    half = MaskSet(["alice", "bob"], torch.stack([torch.ones(SIZE, SIZE), torch.zeros(SIZE, SIZE)]))
    other = run(freefuse, settings, method="masks", masks=half, seed=2, conditions=conditions, controlnet=net)
    assert (merge - other.images[0]).abs().max() > 1e-3  # the masks do act under the condition


@pytest.mark.parametrize("arch", ["flux", "sdxl"])
def test_inpainting_keeps_the_init_image_outside_the_mask_and_cuts_the_subjects_to_it(flux, sdxl, arch) -> None:
    from diffusers.pipelines.flux.pipeline_flux_inpaint import retrieve_latents

    freefuse, settings = (flux, FLUX) if arch == "flux" else (sdxl, SDXL)
    init, mask = picture(2), region()
    conditions = Conditions.of(init_image=init, inpaint_mask=mask, strength=0.9)
    values = {"method": "freefuse", "mask_step": 2, "seed": 6, "conditions": conditions}
    out = run(freefuse, settings, **values)
    # The init image's latents as the run drew them (the seed's first draw).
    pipe = freefuse.pipeline
    vae = pipe.vae
    pixels = torch.from_numpy(np.asarray(init, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)[None]
    latents = retrieve_latents(vae.encode(pixels), generator=torch.Generator().manual_seed(6))
    repainted = torch.from_numpy(np.asarray(mask) > 127)
    kept = ~torch.nn.functional.interpolate(repainted[None, None].float(), size=latents.shape[2:])[0, 0].bool()
    if arch == "flux":
        latents = (latents - vae.config.shift_factor) * vae.config.scaling_factor
    else:
        latents = latents * vae.config.scaling_factor
    final = run(freefuse, settings, output_type="latent", **values).images[0]
    if arch == "flux":  # packed [N, C]: back to [C, h, w]
        final = pipe._unpack_latents(final[None], SIZE, SIZE, pipe.vae_scale_factor)[0]
    # Outside the mask: the init image's latents (to the float rounding of two VAE encodes).
    torch.testing.assert_close(final[:, kept], latents[0][:, kept], atol=1e-5, rtol=0)
    assert (final[:, ~kept] - latents[0][:, ~kept]).abs().mean() > 1e-2  # inside: redrawn
    masks = out.masks[0].masks  # stage 1's subjects, cut to the repainted region
    assert masks[:, ~repainted].abs().max() == 0
    assert masks[:, repainted].sum(0).min() > 0  # every repainted pixel has a subject (no background)


def test_inpainted_pixels_away_from_the_mask_are_the_vae_round_trip_of_the_init_image() -> None:
    """Pixels: with a decoder whose reach is bounded (the tiny VAE's group norms, which mix the
    whole image, taken out: ±70 pixels), every pixel beyond that reach from the mask is the VAE's
    round trip of the init image, as the kept latents say."""
    size = 256
    pipe = tiny_flux_pipeline(seed=0)
    for module in list(pipe.vae.decoder.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, torch.nn.GroupNorm):
                setattr(module, name, torch.nn.Identity())
    freefuse = with_loras(pipe)
    init, mask = picture(2, size=size), region(size=size, box=(16, 16, 80, 96))
    conditions = Conditions.of(init_image=init, inpaint_mask=mask, strength=0.9)
    settings = {**FLUX, "height": size, "width": size}
    out = run(freefuse, settings, method="freefuse", mask_step=2, seed=6, conditions=conditions)
    processed = freefuse.backend._helper("FluxInpaintPipeline").image_processor.preprocess(init)
    round_trip = pipe.vae.decode(pipe.vae.encode(processed).latent_dist.sample(torch.Generator().manual_seed(6)))
    round_trip = (round_trip.sample[0] / 2 + 0.5).clamp(0, 1)
    repainted = torch.from_numpy(np.asarray(mask) > 127)
    reach = 80
    near = torch.nn.functional.max_pool2d(repainted[None, None].float(), 2 * reach + 1, stride=1, padding=reach)
    far = ~near[0, 0].bool()
    assert far.sum() > 10_000
    assert (out.images[0] - round_trip)[:, far].abs().max() <= 1e-4
    assert (out.images[0] - round_trip)[:, repainted].abs().mean() > 1e-2


def test_an_img2img_image_does_not_depend_on_the_rest_of_the_batch(flux: FreeFuse) -> None:
    conditions = Conditions.of(init_image=picture(1), strength=0.6)
    alone = run(flux, FLUX, method="merge", seed=11, conditions=conditions).images[0]
    batch = run(flux, FLUX, method="merge", seed=10, num_images_per_prompt=2, conditions=conditions).images
    assert (batch[1] - alone).abs().max() <= 2e-5
    assert (batch[0] - alone).abs().max() > 1e-3


@pytest.mark.parametrize("arch", ["flux", "sdxl"])
def test_the_steps_preflight_counts_are_the_ones_diffusers_runs(flux, sdxl, arch: str) -> None:
    """`Architecture.denoised_steps` (known before loading) against the img2img pipeline's own
    `get_timesteps` (the backend's `schedule`), for many step counts and strengths."""
    backend = (flux if arch == "flux" else sdxl).backend
    for steps in (1, 2, 3, 7, 10, 28, 30):
        for strength in (0.05, 0.3, 0.5, 0.6, 0.77, 0.9999, 1.0):
            timesteps, sigmas = backend.schedule(steps, SIZE, SIZE, strength)
            assert len(timesteps) == backend.architecture.denoised_steps(steps, strength)
            assert len(sigmas) == len(timesteps) + 1 and float(sigmas[-1]) == 0.0


def test_mask_step_counts_the_steps_an_init_image_leaves(flux: FreeFuse) -> None:
    conditions = Conditions.of(init_image=picture(1), strength=0.5)  # 3 of the 6 steps
    settings, _, _ = flux.check_inputs(GenerationSettings(prompt=PROMPT, **FLUX), conditions=conditions)
    assert settings.mask_step == 1  # the paper's 6 of 28, of the 3 steps denoised
    with pytest.raises(SettingsError, match="past the last of the 3 steps"):
        run(flux, FLUX, method="freefuse", mask_step=4, conditions=conditions)
    out = run(flux, FLUX, method="freefuse", mask_step=3, conditions=conditions, seed=1)
    assert out.manifest["settings"]["mask_step"] == 3 and out.masks[0] is not None


# -- refused before any denoising ------------------------------------------------------------------------------


def test_conditions_that_cannot_run_are_refused(flux: FreeFuse) -> None:
    cases = [
        (Conditions.of(init_image=picture(1), strength=1.5), "at most 1"),
        (Conditions.of(init_image=picture(1), strength=0.0), "above 0"),
        (Conditions.of(strength=0.5), "applies to an init image"),
        (Conditions.of(inpaint_mask=region()), "needs the image it repaints"),
        (Conditions.of(init_image=picture(1, size=64)), "64x64 pixels but the run makes 128x128"),
        (Conditions.of(init_image=picture(1), inpaint_mask=region(box=(0, 0, 0, 0))), "repaints nothing"),
        (Conditions.of(init_image=picture(1), inpaint_mask=region(box=(0, 0, SIZE, SIZE))), "whole image"),
        (Conditions.of(controls=[Control(picture(3))]), "need a ControlNet"),
        (Conditions.of(ip_adapter=picture(3)), "needs a model with an IP-Adapter"),
    ]
    for conditions, message in cases:
        with pytest.raises(SettingsError, match=message):
            run(flux, FLUX, method="merge", conditions=conditions)


def test_a_controlnet_of_another_kind_or_without_its_mode_is_refused(flux: FreeFuse, sdxl: FreeFuse) -> None:
    controls = Conditions.of(controls=[Control(picture(3))])
    with pytest.raises(ValueError, match="is a ControlNetModel; flux runs"):
        run(flux, FLUX, conditions=controls, controlnet=tiny_sdxl_controlnet(sdxl.pipeline))
    union = tiny_flux_controlnet(flux.pipeline, union=True)
    with pytest.raises(SettingsError, match="union ControlNet.*needs its type"):
        run(flux, FLUX, conditions=controls, controlnet=union)


def test_images_of_the_wrong_mode_size_or_kind_are_refused_when_read(tmp_path) -> None:
    from freefuse.conditions import ConditionsSpec, read_image

    picture(1, mode="RGBA").save(tmp_path / "rgba.png")
    picture(1).save(tmp_path / "rgb.png")
    (tmp_path / "text.png").write_bytes(b"not an image at all")
    with pytest.raises(SettingsError, match="'RGBA' image"):
        read_image(tmp_path / "rgba.png", "--init-image")
    with pytest.raises(SettingsError, match="'RGB' image; it must be 'L' or '1'"):
        ConditionsSpec(init_image=str(tmp_path / "rgb.png"), inpaint_mask=str(tmp_path / "rgb.png")).load()
    with pytest.raises(ValueError, match="is not a PNG, JPEG, WEBP image"):
        read_image(tmp_path / "text.png", "--init-image")
    assert read_image(tmp_path / "rgb.png", "--init-image").size == (SIZE, SIZE)


def test_a_decompression_bomb_is_refused_from_its_header(tmp_path) -> None:
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    # A PNG whose header says 60000 x 60000 pixels (3.6 gigapixels); its pixels are never decoded.
    header = struct.pack(">IIBBBBB", 60000, 60000, 8, 0, 0, 0, 0)
    bomb = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")
    (tmp_path / "bomb.png").write_bytes(bomb)
    from freefuse.conditions import read_image

    with pytest.raises(SettingsError, match="60000x60000 pixels|refused"):
        read_image(tmp_path / "bomb.png", "--init-image")


def test_architectures_without_these_conditions_refuse_them() -> None:
    from freefuse.backends.zimage import ZImageArchitecture
    from freefuse.conditions import ConditionFacts
    from freefuse.preflight import ModelFacts, SubjectFacts, preflight

    settings = GenerationSettings(prompt="Alice", height=SIZE, width=SIZE)
    from freefuse.backends.flux2 import Flux2Architecture

    facts = ConditionFacts(Conditions.of(init_image=picture(1)))
    with pytest.raises(SettingsError, match="flux2 runs take no img2img"):
        preflight(ModelFacts(Flux2Architecture), settings, [SubjectFacts("alice", ("Alice",))], None, facts)
    reference = ConditionFacts(Conditions.of(ip_adapter=picture(3)))
    with pytest.raises(SettingsError, match="zimage runs take no ip-adapter"):
        preflight(ModelFacts(ZImageArchitecture), settings, [SubjectFacts("alice", ("Alice",))], None, reference)
