"""FLUX.1 Fill on a tiny random `FluxFillPipeline`: `merge` against diffusers' own pipeline with the
same LoRAs and generator, all-ones masks against merge, the subjects cut to the repainted region,
its defaults and refusals, and a model folder run from the command line and replayed."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from freefuse import FreeFuse, FreeFuseWarning, MaskSet
from freefuse.backends import FluxFillBackend, backend_for
from freefuse.cli import app
from freefuse.conditions import Conditions, Control
from freefuse.errors import SettingsError
from freefuse.models import architecture_of
from freefuse.testing import random_lora, tiny_flux_fill_pipeline

PROMPT = "Alice hugging Bob in the snow"
SIZE = 128
FILL = {"height": SIZE, "width": SIZE, "num_inference_steps": 5, "max_sequence_length": 32}
BOX = (32, 40, 96, 100)  # top, left, bottom, right of the repainted region


def picture(seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 255, (SIZE // 16, SIZE // 16, 3), dtype=np.uint8)
    return Image.fromarray(coarse).resize((SIZE, SIZE), Image.BILINEAR)


def region() -> Image.Image:
    mask = np.zeros((SIZE, SIZE), dtype=np.uint8)
    top, left, bottom, right = BOX
    mask[top:bottom, left:right] = 255
    return Image.fromarray(mask, "L")


@pytest.fixture(scope="module")
def fill() -> FreeFuse:
    pipe = tiny_flux_fill_pipeline(seed=0)
    pipe.set_progress_bar_config(disable=True)
    freefuse = FreeFuse(pipe)
    for index, name in enumerate(("alice", "bob")):
        random_lora(pipe, name, seed=index + 1)
        freefuse.use_adapter(name, words=[name.capitalize()])
    return freefuse


def run(freefuse: FreeFuse, **values):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FreeFuseWarning)
        return freefuse(PROMPT, progress=False, **{"output_type": "pt", **FILL, **values})


def test_a_fill_pipeline_gets_the_fill_backend_and_its_defaults(fill: FreeFuse) -> None:
    assert type(backend_for(fill.pipeline)) is FluxFillBackend
    architecture = fill.backend.architecture
    assert architecture.default_guidance == 30.0 and architecture.default_strength == {"inpaint": 1.0}


@pytest.mark.parametrize("strength", [1.0, 0.7])
def test_merge_is_flux_fill_pipeline(fill: FreeFuse, strength: float) -> None:
    from diffusers import FluxFillPipeline

    init, mask = picture(1), region()
    conditions = Conditions.of(init_image=init, inpaint_mask=mask, strength=strength)
    ours = run(fill, method="merge", seed=3, conditions=conditions)
    reference = FluxFillPipeline(**fill.pipeline.components)
    reference.set_progress_bar_config(disable=True)
    fill.pipeline.set_adapters(["alice", "bob"])
    theirs = reference(
        PROMPT, image=init, mask_image=mask, strength=strength, generator=torch.Generator().manual_seed(3),
        output_type="pt", **FILL,
    ).images[0]  # fmt: skip
    assert torch.equal(ours.images[0], theirs)
    assert ours.manifest["settings"]["guidance_scale"] == 30.0
    other = run(fill, method="merge", seed=3, conditions=Conditions.of(init_image=picture(2), inpaint_mask=mask))
    assert (other.images[0] - theirs).abs().max() > 1e-2  # the picture is read


def test_all_ones_masks_are_merge_and_subjects_stay_in_the_repainted_region(fill: FreeFuse) -> None:
    conditions = Conditions.of(init_image=picture(3), inpaint_mask=region())
    merged = run(fill, method="merge", seed=4, conditions=conditions).images[0]
    ones = MaskSet(["alice", "bob"], torch.ones(2, SIZE, SIZE))
    masked = run(fill, method="masks", masks=ones, text_scope="all", seed=4, conditions=conditions).images[0]
    assert (merged - masked).abs().max() <= 1e-5
    found = run(fill, seed=4, conditions=conditions)
    top, left, bottom, right = BOX
    inside = torch.zeros(SIZE, SIZE, dtype=torch.bool)
    inside[top:bottom, left:right] = True
    for mask in found.masks[0].masks:
        assert float(mask[~inside].abs().max()) == 0.0


def test_what_fill_cannot_run_is_refused(fill: FreeFuse) -> None:
    with pytest.raises(SettingsError, match="flux-fill runs take no img2img"):
        run(fill, method="merge", seed=1, conditions=Conditions.of(init_image=picture(1)))
    with pytest.raises(SettingsError, match="flux-fill runs take no controlnet"):
        run(fill, method="merge", seed=1, conditions=Conditions.of(controls=[Control(picture(2))]))


def test_a_fill_model_folder_runs_from_the_command_line_and_replays(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    pipe = tiny_flux_fill_pipeline(seed=0)
    pipe.save_pretrained(tmp_path / "fill")
    assert architecture_of(str(tmp_path / "fill")).name == "flux-fill"
    random_lora(pipe, "alice", seed=1, path=tmp_path / "alice.safetensors")
    random_lora(pipe, "bob", seed=2, path=tmp_path / "bob.safetensors")
    picture(5).save(tmp_path / "init.png")
    region().save(tmp_path / "mask.png")
    args = ["generate", "--model", "fill", "--lora", "alice.safetensors=Alice", "--lora", "bob.safetensors=Bob",
            "--prompt", PROMPT, "--size", "128x128", "--steps", "4", "--max-sequence-length", "32", "--seed", "2"]  # fmt: skip
    runner = CliRunner()
    first = runner.invoke(app, [*args, "--init-image", "init.png", "--inpaint-mask", "mask.png", "--out", "a"])
    assert first.exit_code == 0, first.output
    manifest = json.loads((tmp_path / "a" / "freefuse.json").read_text())
    assert manifest["backend"] == "flux-fill" and manifest["conditions"]["strength"] == 1.0
    again = runner.invoke(app, ["generate", "--manifest", "a/freefuse.json", "--out", "b"])
    assert again.exit_code == 0, again.output
    assert (tmp_path / "a" / "freefuse.png").read_bytes() == (tmp_path / "b" / "freefuse.png").read_bytes()


def test_a_fill_image_does_not_depend_on_the_rest_of_the_batch(fill: FreeFuse) -> None:
    """Seed 10 with two images makes image 1 from seed 11: the same picture as seed 11 alone (its
    noise and its masked-picture latents from its own generator)."""
    conditions = Conditions.of(init_image=picture(4), inpaint_mask=region())
    alone = run(fill, method="merge", seed=11, conditions=conditions).images[0]
    batch = run(fill, method="merge", seed=10, num_images_per_prompt=2, conditions=conditions).images
    assert (batch[1] - alone).abs().max() <= 2e-5
    assert (batch[0] - alone).abs().max() > 1e-3
    blank = run(fill, method="merge", seed=11).images[0]  # no picture: a black one repainted everywhere
    assert (blank - alone).abs().max() > 1e-3
