"""FLUX Redux reference images on the tiny FLUX.1 pipeline: `merge` against diffusers'
`FluxPriorReduxPipeline` (with the pipeline's text encoders) feeding `FluxPipeline`, all-ones masks
against merge, the subjects' words kept at their positions, what is refused, and the command line
with a Redux folder, recorded and replayed byte for byte."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from freefuse import FreeFuse, FreeFuseWarning, MaskSet
from freefuse.cli import app
from freefuse.conditions import Conditions, redux_source
from freefuse.errors import SettingsError
from freefuse.testing import random_lora, tiny_flux_pipeline, tiny_flux_redux

PROMPT = "Alice hugging Bob in the snow"
SIZE = 128
# The prior encodes its prompt to 512 T5 tokens: the run does too, so that both see the same text.
FLUX = {"height": SIZE, "width": SIZE, "num_inference_steps": 4, "max_sequence_length": 512, "guidance_scale": 3.5}


def picture(seed: int, size: int = 40) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def flux() -> FreeFuse:
    pipe = tiny_flux_pipeline(seed=0)
    pipe.set_progress_bar_config(disable=True)
    freefuse = FreeFuse(pipe)
    for index, name in enumerate(("alice", "bob")):
        random_lora(pipe, name, seed=index + 1)
        freefuse.use_adapter(name, words=[name.capitalize()])
    return freefuse


def run(freefuse: FreeFuse, **values):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FreeFuseWarning)
        return freefuse(PROMPT, progress=False, **{"output_type": "pt", **FLUX, **values})


@pytest.mark.parametrize("scale", [1.0, 0.6])
def test_merge_with_a_redux_image_is_the_prior_feeding_flux_pipeline(flux: FreeFuse, scale: float) -> None:
    from diffusers import FluxPipeline

    reference = picture(1)
    redux = tiny_flux_redux(flux.pipeline, seed=2)
    conditions = Conditions.of(redux=reference, redux_scale=scale)
    ours = run(flux, method="merge", seed=3, conditions=conditions, redux=redux)
    oracle_prior = tiny_flux_redux(flux.pipeline, seed=2, text_encoders=True)
    prior = oracle_prior(reference, prompt=PROMPT, prompt_embeds_scale=scale)
    oracle = FluxPipeline(**flux.pipeline.components)
    oracle.set_progress_bar_config(disable=True)
    flux.pipeline.set_adapters(["alice", "bob"])
    settings = {k: v for k, v in FLUX.items() if k != "max_sequence_length"}
    theirs = oracle(
        prompt_embeds=prior.prompt_embeds,
        pooled_prompt_embeds=prior.pooled_prompt_embeds,
        generator=torch.Generator().manual_seed(3),
        output_type="pt",
        **settings,
    ).images[0]
    assert torch.equal(ours.images[0], theirs)
    plain = run(flux, method="merge", seed=3).images[0]
    assert (plain - theirs).abs().max() > 1e-2  # the reference does change the picture
    assert ours.manifest["conditions"]["redux"]["scale"] == scale
    assert ours.manifest["conditions"]["redux"]["image"]["sha256"] == conditions.redux.sha256


def test_all_ones_masks_equal_merge_with_a_redux_image(flux: FreeFuse) -> None:
    redux = tiny_flux_redux(flux.pipeline, seed=2)
    conditions = Conditions.of(redux=picture(4), redux_scale=0.8)
    merged = run(flux, method="merge", seed=5, conditions=conditions, redux=redux)
    masked = run(flux, method="masks", masks=ones(), text_scope="all", seed=5, conditions=conditions, redux=redux)
    assert (merged.images[0] - masked.images[0]).abs().max() <= 1e-5
    half = MaskSet(["alice", "bob"], torch.stack([torch.ones(SIZE, SIZE), torch.zeros(SIZE, SIZE)]))
    other = run(flux, method="masks", masks=half, seed=5, conditions=conditions, redux=redux)
    assert (merged.images[0] - other.images[0]).abs().max() > 1e-3  # the masks do act beside the reference
    found = run(flux, seed=5, conditions=conditions, redux=redux)  # stage 1 reads words before the image tokens
    assert found.masks[0].names == ["alice", "bob"]


def ones(names=("alice", "bob")) -> MaskSet:
    return MaskSet(list(names), torch.ones(len(names), SIZE, SIZE))


def test_a_redux_image_needs_its_model_and_a_model_its_image(flux: FreeFuse) -> None:
    redux = tiny_flux_redux(flux.pipeline, seed=2)
    with pytest.raises(SettingsError, match="needs a Redux model"):
        run(flux, method="merge", seed=1, conditions=Conditions.of(redux=picture(1)))
    with pytest.raises(SettingsError, match="without its reference image"):
        run(flux, method="merge", seed=1, redux=redux)
    with pytest.raises(SettingsError, match="Redux scale is a number from 0 to 10"):
        run(flux, method="merge", seed=1, conditions=Conditions.of(redux=picture(1), redux_scale=11), redux=redux)


def test_a_redux_folder_is_checked_before_loading(tmp_path, flux: FreeFuse) -> None:
    folder = tmp_path / "redux"
    tiny_flux_redux(flux.pipeline).save_pretrained(folder)
    assert redux_source(str(folder)) == str(folder)
    assert redux_source("black-forest-labs/FLUX.1-Redux-dev") == "black-forest-labs/FLUX.1-Redux-dev"
    for weights in (folder / "image_embedder").glob("*.safetensors"):
        weights.rename(weights.with_suffix(".bin"))
    with pytest.raises(SettingsError, match="image_embedder has no .safetensors weights"):
        redux_source(str(folder))
    with pytest.raises(SettingsError, match="not a FluxPriorReduxPipeline folder"):
        redux_source(str(tmp_path))
    with pytest.raises(SettingsError, match="neither a folder nor a Hugging Face id"):
        redux_source("./missing")


# -- the command line ------------------------------------------------------------------------------------

RUNNER = CliRunner()
FAST = ["--steps", "4", "--size", "128x128", "--max-sequence-length", "32", "--seed", "3"]


def invoke(*args):
    return RUNNER.invoke(app, [str(arg) for arg in args], catch_exceptions=False)


def generate(assets, out, *extra):
    return invoke(
        "generate", "--model", assets / "model", "--lora", f"{assets / 'alice.safetensors'}=Alice",
        "--lora", f"{assets / 'bob.safetensors'}=Bob", "--prompt", PROMPT, "--out", out, *FAST, *extra,
    )  # fmt: skip


def test_cli_runs_redux_records_it_and_replays_it_byte_for_byte(assets, monkeypatch) -> None:
    monkeypatch.chdir(assets)
    tiny_flux_redux(tiny_flux_pipeline(seed=0), seed=6).save_pretrained(assets / "redux")
    picture(7).save(assets / "ref.png")
    first = generate(assets, "runs/a", "--redux", "ref.png@0.8", "--redux-model", "redux")
    assert first.exit_code == 0, first.output
    recorded = json.loads((assets / "runs" / "a" / "freefuse.json").read_text())["conditions"]["redux"]
    assert recorded["scale"] == 0.8 and recorded["model"] == "redux" and recorded["model_from_manifest"] == "../../redux"
    replay = invoke("generate", "--manifest", "runs/a/freefuse.json", "--out", "runs/b")
    assert replay.exit_code == 0, replay.output
    assert (assets / "runs" / "b" / "freefuse.png").read_bytes() == (assets / "runs" / "a" / "freefuse.png").read_bytes()
    plain = generate(assets, "runs/plain")
    assert plain.exit_code == 0, plain.output
    assert (assets / "runs" / "plain" / "freefuse.png").read_bytes() != (assets / "runs" / "a" / "freefuse.png").read_bytes()
    refused = generate(assets, "runs/refused", "--redux", "ref.png")
    assert refused.exit_code == 2 and "needs a Redux model" in " ".join(refused.output.split())
    refused = generate(assets, "runs/refused", "--redux-model", "redux")
    assert refused.exit_code == 2 and "without its reference image" in " ".join(refused.output.split())
    assert not (assets / "runs" / "refused").exists()
