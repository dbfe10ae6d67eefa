"""SDXL: the tiny `StableDiffusionXLPipeline` against diffusers itself, masks on every UNet level and
on convolutions, 2-4 subjects, kohya files with text-encoder parts, and what is refused.

The backend contract (`test_backend_contract.py`) also runs on SDXL; these are SDXL's own facts.
"""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from freefuse import FreeFuse, FreeFuseWarning, GenerationSettings, MaskSet
from freefuse.backends import backend_for
from freefuse.backends.sdxl import SdxlBackend
from freefuse.lora import LoraFileError, describe_lora
from freefuse.masking import AdapterMask
from freefuse.models import architecture_of, pixels_per_token
from freefuse.testing import (
    ALL_LAYERS,
    LoraDeltaRecorder,
    kohya_sdxl_lora_state_dict,
    random_lora,
    sdxl_single_file_state_dict,
    tiny_flux_pipeline,
    tiny_sdxl_pipeline,
    typical_lora_state_dict,
)

SIZE = 128
PROMPT = "Alice hugging Bob in the snow"
NAMES = ("alice", "bob", "carol", "dave")


@pytest.fixture
def pipe():
    pipeline = tiny_sdxl_pipeline(seed=0)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def run(freefuse: FreeFuse, prompt: str = PROMPT, **values):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FreeFuseWarning)
        return freefuse(
            prompt, output_type="pt", progress=False, height=SIZE, width=SIZE, num_inference_steps=3, **values
        )


def diffusers_image(pipe, seed: int, **options) -> torch.Tensor:
    """diffusers' own `StableDiffusionXLPipeline` call with the adapters active now: the reference."""
    generator = torch.Generator().manual_seed(seed)
    return pipe(
        PROMPT,
        height=SIZE,
        width=SIZE,
        num_inference_steps=3,
        generator=generator,
        output_type="pt",
        **options,
    ).images[0]


def with_loras(pipe, count: int = 2, targets=None, scale: float = 0.5) -> FreeFuse:
    freefuse = FreeFuse(pipe)
    for index, name in enumerate(NAMES[:count]):
        random_lora(pipe, name, seed=index + 1, targets=targets, scale=scale)
        freefuse.use_adapter(name, words=[name.capitalize()])
    return freefuse


def test_merge_is_diffusers_load_lora_weights_and_set_adapters(pipe) -> None:
    freefuse = with_loras(pipe)
    weights = {"alice": 0.8, "bob": 0.6}
    for name, weight in weights.items():
        freefuse.subjects[name].weight = weight
    ours = run(freefuse, method="merge", seed=5, guidance_scale=4.0).images[0]
    pipe.set_adapters(list(weights), adapter_weights=list(weights.values()))
    theirs = diffusers_image(pipe, seed=5, guidance_scale=4.0)
    # diffusers batches both CFG passes in one forward; FreeFuse runs them one by one.
    torch.testing.assert_close(ours, theirs, atol=2e-5, rtol=0)
    assert (ours - run(freefuse, method="merge", seed=6, guidance_scale=4.0).images[0]).abs().max() > 1e-3


def test_an_explicit_negative_prompt_is_encoded_and_an_unset_one_is_zeros(pipe) -> None:
    freefuse = with_loras(pipe)
    unset = run(freefuse, method="merge", seed=1).images[0]
    pipe.set_adapters(["alice", "bob"])
    theirs = diffusers_image(pipe, seed=1, negative_prompt="blurry")
    given = run(freefuse, method="merge", seed=1, negative_prompt="blurry").images[0]
    torch.testing.assert_close(given, theirs, atol=2e-5, rtol=0)
    assert (given - unset).abs().max() > 1e-3


def test_masks_reach_every_unet_level_and_every_convolution(pipe) -> None:
    """LoCon-style LoRAs (every linear layer and convolution): all-ones masks are merge, and a
    zero mask is the run without that LoRA, on layers at every resolution."""
    freefuse = with_loras(pipe, targets=ALL_LAYERS, scale=0.3)
    adapted = [name for name, module in pipe.unet.named_modules() if hasattr(module, "lora_A")]
    assert any(isinstance(pipe.unet.get_submodule(name).base_layer, torch.nn.Conv2d) for name in adapted)
    merge = run(freefuse, method="merge", seed=2).images[0]
    for op in ("fused", "peft"):
        ones = MaskSet(["alice", "bob"], torch.ones(2, SIZE, SIZE))
        same = run(freefuse, method="masks", masks=ones, text_scope="all", seed=2, lora_op=op).images[0]
        assert (same - merge).abs().max() <= 1e-5
    bob_off = MaskSet(["alice", "bob"], torch.stack([torch.ones(SIZE, SIZE), torch.zeros(SIZE, SIZE)]))
    masked = run(freefuse, method="masks", masks=bob_off, text_scope="all", seed=2).images[0]
    pipe.delete_adapters("bob")
    alone = FreeFuse(pipe)
    alone.use_adapter("alice", words=["Alice"])
    assert (masked - run(alone, method="merge", seed=2).images[0]).abs().max() <= 1e-5
    assert (masked - merge).abs().max() > 1e-3


@pytest.mark.parametrize("count", [2, 3, 4])
def test_freefuse_makes_one_mask_per_subject(pipe, count: int) -> None:
    freefuse = with_loras(pipe, count)
    prompt = " and ".join(name.capitalize() for name in NAMES[:count]) + " in the snow"
    for config in ({"method": "routing", "background": False}, {"method": "image-to-text"}):
        # empty_mask="off": a subject that wins no region gets an empty mask, not the whole image.
        out = run(freefuse, prompt, seed=0, mask_config=config, empty_mask="off")
        masks = out.masks[0]
        assert masks.names == list(NAMES[:count]) and masks.size == (SIZE, SIZE)
        assert torch.equal(masks.masks.sum(dim=0), torch.ones(SIZE, SIZE))
        assert out.manifest["backend"] == "sdxl"


def test_adapter_mask_follows_the_unet_levels() -> None:
    grid = torch.tensor(
        [[1.0, 0.0, 0.0, 0.0], [1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 1.0, 1.0]]
    )
    mask = AdapterMask(image=grid.reshape(1, 16), text=torch.ones(1, 3), grid=(4, 4))
    coarse = mask.image_tokens(4).reshape(2, 2)
    torch.testing.assert_close(coarse, torch.tensor([[0.75, 0.0], [0.0, 0.5]]))  # each coarse token's share
    fine = mask.image_tokens(64).reshape(8, 8)
    assert torch.equal(fine, grid.repeat_interleave(2, 0).repeat_interleave(2, 1))
    assert mask.for_layout(("spatial",), (1, 7, 8, 8)).shape == (1, 1, 8, 8)
    assert mask.for_layout(("image",), (1, 4, 7)).shape == (1, 4, 1)
    with pytest.raises(RuntimeError, match="no 4:4 grid"):
        mask.image_tokens(8)


def test_kohya_file_loads_like_the_diffusers_file_and_its_text_encoder_part_is_global(pipe, tmp_path) -> None:
    state = typical_lora_state_dict(pipe, seed=1, scale=0.5)
    save_file(state, str(tmp_path / "diffusers.safetensors"))
    save_file(kohya_sdxl_lora_state_dict(state, pipe.unet), str(tmp_path / "kohya.safetensors"))
    encoders = {"te1": pipe.text_encoder, "te2": pipe.text_encoder_2}
    save_file(kohya_sdxl_lora_state_dict(state, pipe.unet, encoders), str(tmp_path / "kohya_te.safetensors"))
    images = {}
    for stem in ("diffusers", "kohya", "kohya_te"):
        freefuse = FreeFuse(pipe)
        subject = freefuse.add_lora(tmp_path / f"{stem}.safetensors", name="alice", words=["Alice"])
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", FreeFuseWarning)
            out = freefuse(
                PROMPT,
                output_type="pt",
                progress=False,
                height=SIZE,
                width=SIZE,
                num_inference_steps=3,
                seed=0,
            )
        images[stem] = out.images[0]
        said = " ".join(str(w.message) for w in caught)
        entry = out.manifest["loras"][0]
        if stem == "kohya_te":
            assert subject.text_encoders == ["text_encoder", "text_encoder_2"]
            assert "alice" in (pipe.text_encoder.peft_config or {})
            assert "acts everywhere" in said and entry["text_encoders_unmasked"] == subject.text_encoders
        else:
            assert subject.text_encoders == [] and "text_encoders_unmasked" not in entry
        freefuse.remove("alice")
    assert torch.equal(images["diffusers"], images["kohya"])
    assert (images["kohya_te"] - images["kohya"]).abs().max() > 1e-3
    report = describe_lora(tmp_path / "kohya_te.safetensors")
    assert report["for"] != "FLUX" and "not masked" in report["text_encoder"]


def test_loras_of_the_other_architecture_are_refused_before_loading(pipe, tmp_path) -> None:
    flux_file = random_lora(tiny_flux_pipeline(seed=0), "x", path=tmp_path / "flux.safetensors")
    freefuse = FreeFuse(pipe)
    with pytest.raises(LoraFileError, match="FLUX.1 transformer"):
        freefuse.add_lora(flux_file, name="x", words=["Alice"])
    assert not getattr(pipe.unet, "peft_config", None)
    sdxl_file = tmp_path / "sdxl.safetensors"
    save_file(kohya_sdxl_lora_state_dict(typical_lora_state_dict(pipe, seed=1), pipe.unet), str(sdxl_file))
    with pytest.raises(LoraFileError, match="UNet"):
        FreeFuse(tiny_flux_pipeline(seed=0)).add_lora(sdxl_file, name="y", words=["Alice"])


def test_methods_sdxl_cannot_read_are_refused_with_the_ones_it_can() -> None:
    for config in (
        {"method": "text-to-image"},
        {"method": "combined"},
        {"method": "image-to-text", "self_attention": True},
    ):
        settings = GenerationSettings(prompt=PROMPT, mask_config=config)
        with pytest.raises(ValueError, match=r"routing") as error:
            SdxlBackend.architecture.check_mask_config(settings)
        assert "image-to-text" in str(error.value)
    assert SdxlBackend.architecture.mask_config(GenerationSettings(prompt=PROMPT)).method == "routing"
    with pytest.raises(ValueError, match="guidance_scale"):
        SdxlBackend.architecture.check_settings(GenerationSettings(prompt=PROMPT, true_cfg_scale=2.0))
    with pytest.raises(ValueError, match="77"):
        SdxlBackend.architecture.check_settings(GenerationSettings(prompt=PROMPT, max_sequence_length=100))


def test_a_model_folder_is_told_sdxl_from_its_files(pipe, tmp_path) -> None:
    pipe.save_pretrained(tmp_path)
    assert architecture_of(str(tmp_path)) is SdxlBackend.architecture
    assert pixels_per_token(str(tmp_path)) == backend_for(pipe).size_multiple == 16
    assert (
        json.loads((tmp_path / "model_index.json").read_text())["_class_name"] == "StableDiffusionXLPipeline"
    )
    assert architecture_of("tiny-sdxl") is SdxlBackend.architecture


def test_demo_arch_sdxl_runs_the_tiny_sdxl_model_and_replays(tmp_path, monkeypatch) -> None:
    from typer.testing import CliRunner

    from freefuse.cli import app

    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-cache"))  # no cached SDXL model
    runner = CliRunner()
    out = tmp_path / "demo"
    result = runner.invoke(
        app, ["demo", "--arch", "sdxl", "--out", str(out), "--steps", "3", "--size", "128"]
    )
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "demo.json").read_text())
    assert manifest["model"]["id_or_path"] == "tiny-sdxl" and manifest["backend"] == "sdxl"
    assert manifest["settings"]["mask_config"]["method"] == "routing"
    monkeypatch.chdir(tmp_path)
    replay = runner.invoke(app, ["generate", "--manifest", str(out / "demo.json"), "--out", "replay"])
    assert replay.exit_code == 0, replay.output
    assert (tmp_path / "replay" / "demo.png").read_bytes() == (out / "demo.png").read_bytes()  # named after it
    wrong = runner.invoke(app, ["demo", "--arch", "sdxl", "--model", "tiny", "--out", str(tmp_path / "x")])
    assert wrong.exit_code == 2 and "flux model" in wrong.output


def test_a_single_file_checkpoint_runs_like_its_folder_and_replays(pipe, tmp_path, monkeypatch) -> None:
    """A civitai-style single file (original SGM layout) loads through `from_single_file`, its
    configs from --base-model, and makes the same image as the diffusers folder it came from."""
    from typer.testing import CliRunner

    from freefuse.cli import app
    from freefuse.models import load_pipeline

    folder, checkpoint = tmp_path / "folder", tmp_path / "model.safetensors"
    pipe.save_pretrained(folder)
    save_file(sdxl_single_file_state_dict(pipe), str(checkpoint))
    assert architecture_of(str(checkpoint)) is SdxlBackend.architecture
    loaded = load_pipeline(str(checkpoint), base=str(folder))
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        theirs = getattr(loaded, name).state_dict()
        for key, value in getattr(pipe, name).state_dict().items():
            assert torch.equal(theirs[key], value), (name, key)
    random_lora(pipe, "alice", seed=1, path=tmp_path / "alice.safetensors")
    runner = CliRunner()
    common = [
        "--lora",
        f"{tmp_path / 'alice.safetensors'}=Alice",
        "--prompt",
        PROMPT,
        "--steps",
        "3",
        "--size",
        "128",
    ]
    from_folder = runner.invoke(
        app, ["generate", "--model", str(folder), *common, "--out", str(tmp_path / "a")]
    )
    assert from_folder.exit_code == 0, from_folder.output
    from_file = runner.invoke(
        app,
        [
            "generate",
            "--model",
            str(checkpoint),
            "--base-model",
            str(folder),
            *common,
            "--out",
            str(tmp_path / "b"),
        ],
    )
    assert from_file.exit_code == 0, from_file.output
    image = (tmp_path / "b" / "freefuse.png").read_bytes()
    # The same picture: equal weights, but from_single_file's UNet differs in the last float bits
    # (7e-7 on one forward), so a pixel may round the other way.
    pixels = [np.asarray(Image.open(tmp_path / run / "freefuse.png")).astype(int) for run in ("a", "b")]
    assert np.abs(pixels[0] - pixels[1]).max() <= 1
    manifest = json.loads((tmp_path / "b" / "freefuse.json").read_text())
    assert (
        manifest["model"]["base_model"] == str(folder.resolve())
        and "checkpoint" in manifest["model"]["files"]
    )
    monkeypatch.chdir(tmp_path)
    replay = runner.invoke(
        app, ["generate", "--manifest", str(tmp_path / "b" / "freefuse.json"), "--out", "c"]
    )
    assert replay.exit_code == 0, replay.output
    assert (tmp_path / "c" / "freefuse.png").read_bytes() == image


def test_single_files_that_cannot_be_run_are_refused_before_loading(pipe, tmp_path) -> None:
    from typer.testing import CliRunner

    from freefuse.cli import app

    random_lora(pipe, "alice", seed=1, path=tmp_path / "alice.safetensors")
    runner = CliRunner()
    common = [
        "--lora",
        f"{tmp_path / 'alice.safetensors'}=Alice",
        "--prompt",
        PROMPT,
        "--out",
        str(tmp_path / "o"),
    ]
    pickled = tmp_path / "model.ckpt"
    pickled.write_bytes(b"not read")
    unknown = tmp_path / "other.safetensors"
    save_file({"some.weight": torch.zeros(2)}, str(unknown))
    cases = [
        (["--model", str(pickled)], "never unpickles"),
        (["--model", str(unknown)], "no architecture FreeFuse runs"),
        (["--model", "tiny-sdxl", "--base-model", str(tmp_path)], "only applies to a single-file checkpoint"),
    ]
    for extra, message in cases:
        result = runner.invoke(app, ["generate", *extra, *common])
        assert result.exit_code == 2 and message in result.output, result.output
        assert not (tmp_path / "o").exists()


def test_a_kohya_locon_file_with_convolutions_loads_and_is_masked(pipe, tmp_path) -> None:
    """LoCon: kohya names for the resnets' convolutions too (`…_in_layers_2`). Loaded from the file it
    equals the same LoRA in diffusers layout, and a zero mask gives the picture without it."""
    every_layer = typical_lora_state_dict(pipe, seed=1, scale=0.3, targets=ALL_LAYERS)
    state = {k: v for k, v in every_layer.items() if ".attentions." in k or ".resnets." in k}
    assert any(value.ndim == 4 for value in state.values())
    save_file(state, str(tmp_path / "diffusers.safetensors"))
    kohya = kohya_sdxl_lora_state_dict(state, pipe.unet)
    assert any("_in_layers_2.lora_down" in key for key in kohya)
    save_file(kohya, str(tmp_path / "locon.safetensors"))
    images = {}
    for stem in ("diffusers", "locon"):
        freefuse = FreeFuse(pipe)
        freefuse.add_lora(tmp_path / f"{stem}.safetensors", name="alice", words=["Alice"])
        adapted = [n for n, m in pipe.unet.named_modules() if hasattr(m, "lora_A") and "alice" in m.lora_A]
        assert any(isinstance(pipe.unet.get_submodule(n).base_layer, torch.nn.Conv2d) for n in adapted)
        images[stem] = run(freefuse, method="merge", seed=0).images[0]
        off = MaskSet(["alice"], torch.zeros(1, SIZE, SIZE))
        images[stem + " off"] = run(freefuse, method="masks", masks=off, seed=0).images[0]
        freefuse.remove("alice")
    # Equal weights and scalings (checked by hand); the kohya path's PEFT config rounds differently (2e-6).
    torch.testing.assert_close(images["diffusers"], images["locon"], atol=1e-5, rtol=0)
    assert (images["locon"] - images["locon off"]).abs().max() > 1e-3
    torch.testing.assert_close(images["locon off"], images["diffusers off"], atol=1e-5, rtol=0)
    assert not getattr(pipe.unet, "peft_config", None)  # both removed: diffusers runs the bare model
    bare = diffusers_image(pipe, seed=0)
    torch.testing.assert_close(images["locon off"], bare, atol=2e-5, rtol=0)


def test_each_lora_acts_inside_its_mask_in_every_layer_at_every_unet_level() -> None:
    """Read back from each adapted layer's real input and output (`LoraDeltaRecorder`, none of
    FreeFuse's masking code) how much of each LoRA acted per token, on a UNet with attention at two
    levels: the mask grid (8x8 at 128²) and twice that (16x16), where the mask is repeated up."""
    pipe = tiny_sdxl_pipeline(
        seed=0,
        unet_config={
            "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        },
    )
    pipe.set_progress_bar_config(disable=True)
    freefuse = with_loras(pipe)
    h, w = backend_for(pipe).grid(SIZE, SIZE)
    # Unequal columns (3/8 and 5/8 of the width), on token boundaries, so a swap or a flip shows.
    alice = torch.zeros(SIZE, SIZE)
    alice[:, : 3 * SIZE // 8] = 1
    masks = MaskSet(["alice", "bob"], torch.stack([alice, 1 - alice]))
    recorder = LoraDeltaRecorder(pipe.unet, ["alice", "bob"])
    with recorder.recording():
        # A negative prompt of its own: an unset one is zeros, where any coefficient fits the text side.
        run(freefuse, method="masks", masks=masks, text_scope="all", seed=0, negative_prompt="blurry")
    sizes = set()
    for call in recorder.calls:
        assert call.fit_error < 1e-4, (call.layer, call.fit_error)
        layout = backend_for(pipe).token_layout(call.layer)
        for name, share in (("alice", 3 / 8), ("bob", 5 / 8)):
            found = call.masks[name]
            if layout == ("text",):
                torch.testing.assert_close(found, torch.ones_like(found), atol=1e-4, rtol=0)
                continue
            side = int(round((found.shape[1] / (h * w)) ** 0.5))
            columns = torch.arange(w * side) < round(3 / 8 * w * side)
            expected = (columns if name == "alice" else ~columns).float().expand(h * side, -1).reshape(1, -1)
            assert abs(float(expected.mean()) - share) < 1e-6
            torch.testing.assert_close(found, expected.expand_as(found), atol=1e-4, rtol=0)
            sizes.add(side)
    assert sizes == {1, 2}  # layers at the grid and at twice its resolution were both seen


def test_the_default_block_on_sdxls_own_unet_layout_is_the_authors() -> None:
    """SDXL's UNet layout (3 levels, 1/2/10 transformer layers, 2 resnets per level) at a tiny
    width: the tap grid is the deepest level, 32 pixels a token, and the default block is
    up_blocks.0.attentions.0.transformer_blocks.3, as in the authors' SDXL code."""
    layout = {
        "block_out_channels": (32, 32, 32),
        "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        "transformer_layers_per_block": (1, 2, 10),
        "layers_per_block": 2,
        "attention_head_dim": (2, 2, 2),
    }
    backend = backend_for(tiny_sdxl_pipeline(seed=0, unet_config=layout))
    assert backend.num_blocks == 60
    assert backend.tap_blocks[backend.default_block()] == "up_blocks.0.attentions.0.transformer_blocks.3"
    assert backend.size_multiple == 32 and backend.grid(1216, 832) == (38, 26)


def test_euler_ancestral_draws_its_step_noise_from_the_images_generators(pipe) -> None:
    """A stochastic sampler: the same seed gives the same picture, and diffusers' picture."""
    from diffusers import EulerAncestralDiscreteScheduler

    pipe.scheduler = EulerAncestralDiscreteScheduler.from_config(pipe.scheduler.config)
    freefuse = with_loras(pipe)
    first = run(freefuse, method="merge", seed=4).images[0]
    torch.manual_seed(123)  # the global generator must not matter
    assert torch.equal(first, run(freefuse, method="merge", seed=4).images[0])
    pipe.set_adapters(["alice", "bob"])
    theirs = diffusers_image(pipe, seed=4)
    torch.testing.assert_close(first, theirs, atol=2e-5, rtol=0)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_x0_is_the_schedulers_own_for_variance_preserving_samplers(pipe, prediction_type: str) -> None:
    """DPM++ keeps latents variance-preserving (x / √(σ² + 1)); x0 is what the scheduler itself
    predicts from the model output (`convert_model_output`), at every step."""
    from diffusers import DPMSolverMultistepScheduler

    pipe.scheduler = DPMSolverMultistepScheduler.from_config(
        pipe.scheduler.config, prediction_type=prediction_type
    )
    backend = backend_for(pipe)
    timesteps, sigmas = backend.timesteps(5, SIZE, SIZE)
    state = backend.prepare_latents([torch.Generator().manual_seed(0)], 1, SIZE, SIZE, torch.float32)
    prediction = torch.randn(state.latents.shape, generator=torch.Generator().manual_seed(1))
    latents = state.latents
    for index, timestep in enumerate(timesteps):
        pipe.scheduler._step_index = index
        expected = pipe.scheduler.convert_model_output(prediction, sample=latents)
        torch.testing.assert_close(backend.predict_x0(latents, prediction, float(sigmas[index])), expected)
        latents = backend.step(prediction, timestep, latents)


def test_schedulers_whose_steps_are_not_one_model_call_are_refused(pipe) -> None:
    from diffusers import EDMEulerScheduler, HeunDiscreteScheduler

    freefuse = with_loras(pipe)
    pipe.scheduler = HeunDiscreteScheduler.from_config(pipe.scheduler.config)
    with pytest.raises(ValueError, match="model calls for 3 steps"):
        run(freefuse, seed=0)
    pipe.scheduler = EDMEulerScheduler()
    with pytest.raises(ValueError, match="preconditions"):
        run(freefuse, seed=0)


def test_single_file_markers_and_defaults(pipe, tmp_path) -> None:
    """A v-prediction file (`v_pred`, `ztsnr` markers) gets a v-prediction, zero-SNR scheduler; a
    `.sft` file is told to be renamed; without --base-model, diffusers reads SDXL's model type."""
    from freefuse.models import ModelLoadError, base_model_for, check_model_source, load_pipeline

    folder = tmp_path / "folder"
    pipe.save_pretrained(folder)
    state = sdxl_single_file_state_dict(pipe)
    marked = tmp_path / "noob-vpred.safetensors"
    save_file({**state, "v_pred": torch.tensor([]), "ztsnr": torch.tensor([])}, str(marked))
    short = tmp_path / "model.sft"
    short.write_bytes(b"")
    with pytest.raises(ModelLoadError, match=r"rename it to model\.safetensors"):
        check_model_source(str(short))
    assert architecture_of(str(marked)) is SdxlBackend.architecture
    assert base_model_for(str(marked), None) is None
    scheduler = load_pipeline(str(marked), base=str(folder)).scheduler
    assert scheduler.config.prediction_type == "v_prediction"
    assert scheduler.config.rescale_betas_zero_snr and scheduler.config.timestep_spacing == "trailing"
    assert float(scheduler.alphas_cumprod[-1]) < 1e-6  # the betas were recomputed, not just relabelled


def test_a_batch_job_runs_a_single_file_checkpoint_with_its_base_model(pipe, tmp_path) -> None:
    """Job files take `base_model` beside `model` (relative paths from the job file)."""
    from freefuse.batch import load_jobs, run_batch

    (tmp_path / "models").mkdir()
    pipe.save_pretrained(tmp_path / "models" / "base")
    save_file(sdxl_single_file_state_dict(pipe), str(tmp_path / "models" / "model.safetensors"))
    random_lora(pipe, "alice", seed=1, path=tmp_path / "alice.safetensors")
    job = {
        "model": "models/model.safetensors",
        "base_model": "models/base",
        "prompt": "{A} in the snow",
        "loras": [{"path": "alice.safetensors", "words": ["Alice"]}],
        "steps": 2,
        "size": "128",
    }
    (tmp_path / "jobs.jsonl").write_text(json.dumps(job) + "\n")
    jobs = load_jobs(tmp_path / "jobs.jsonl")
    assert jobs[0].base_model == str(tmp_path / "models" / "base")
    report = run_batch(jobs, tmp_path / "out")
    manifests = list((tmp_path / "out").rglob("*.json"))
    records = [json.loads(path.read_text()) for path in manifests]
    assert report.model_loads == 1
    assert any(
        record.get("model", {}).get("base_model") == str((tmp_path / "models" / "base").resolve())
        for record in records
    )
