"""FLUX.2 [klein]: the tiny `Flux2KleinPipeline` against diffusers itself, the token layout of its
layers read from the model, the tap against the attention processor, LoRA files as people publish
them, FLUX.1 and FLUX.2 files told apart, refusals, the demo and single-file checkpoints.

The backend contract (`test_backend_contract.py`) also runs on FLUX.2; these are FLUX.2's own facts.
"""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from freefuse import FreeFuse, FreeFuseWarning, GenerationSettings
from freefuse.backends import backend_for
from freefuse.backends.flux import FluxArchitecture
from freefuse.backends.flux2 import Flux2Architecture, Flux2Backend
from freefuse.lora import LoraFileError, check_lora_path, describe_lora, lora_family
from freefuse.models import architecture_of, pixels_per_token, single_file_architecture
from freefuse.testing import (
    FLUX2_QKV,
    flux2_bfl_lora_state_dict,
    flux2_single_file_state_dict,
    flux_single_file_state_dict,
    kohya_names,
    random_lora,
    share_qkv_down,
    tiny_flux2_pipeline,
    tiny_flux_pipeline,
    typical_lora_state_dict,
)

SIZE = 128
PROMPT = "Alice hugging Bob in the snow"
TOKENS = 64
NAMES = ("alice", "bob")


@pytest.fixture
def pipe():
    pipeline = tiny_flux2_pipeline(seed=0)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def run(freefuse: FreeFuse, prompt=PROMPT, **values):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FreeFuseWarning)
        return freefuse(
            prompt,
            output_type="pt",
            progress=False,
            height=SIZE,
            width=SIZE,
            num_inference_steps=3,
            max_sequence_length=TOKENS,
            **values,
        )


@pytest.mark.parametrize("distilled", [True, False])
def test_merge_is_diffusers_load_lora_weights_and_set_adapters(tmp_path, distilled: bool) -> None:
    """The same LoRA files through `load_lora_weights` + `set_adapters` and diffusers' own call with the
    same generator: a distilled [klein] model (one pass; its guidance scale ignored) and a base model
    (guidance 4 with diffusers' empty negative prompt), both exactly."""
    pipe = tiny_flux2_pipeline(seed=0, is_distilled=distilled)
    pipe.set_progress_bar_config(disable=True)
    files = {
        name: random_lora(pipe, name, seed=index + 1, scale=0.5, path=tmp_path / f"{name}.safetensors")
        for index, name in enumerate(NAMES)
    }
    weights = {"alice": 0.8, "bob": 0.6}
    freefuse = FreeFuse(pipe)
    for name, path in files.items():
        freefuse.add_lora(path, words=[name.capitalize()], weight=weights[name])
    guidance = 1.0 if distilled else 4.0
    ours = run(freefuse, method="merge", seed=5, guidance_scale=guidance).images[0]
    reference = tiny_flux2_pipeline(seed=0, is_distilled=distilled)
    reference.set_progress_bar_config(disable=True)
    for name, path in files.items():
        reference.load_lora_weights(str(path), adapter_name=name)
    reference.set_adapters(list(weights), adapter_weights=list(weights.values()))
    theirs = reference(
        prompt=PROMPT,
        height=SIZE,
        width=SIZE,
        num_inference_steps=3,
        guidance_scale=4.0,  # what diffusers uses only on a base model
        generator=torch.Generator().manual_seed(5),
        output_type="pt",
        max_sequence_length=TOKENS,
    ).images[0]
    torch.testing.assert_close(ours, theirs, atol=0, rtol=0)
    assert (
        ours - run(freefuse, method="merge", seed=6, guidance_scale=guidance).images[0]
    ).abs().max() > 1e-3


def test_token_layout_of_flux2_layers_follows_the_model(pipe) -> None:
    """The declared layouts, and the single-stream order read from the model: the output depends on
    the last block's tokens after the text (the image), not on the first `T` (the text)."""
    backend = Flux2Backend(pipe)
    layouts = {name: backend.token_layout(name) for name, _ in pipe.transformer.named_modules()}
    assert layouts["single_transformer_blocks.0.attn.to_qkv_mlp_proj"] == ("text", "image")
    assert layouts["single_transformer_blocks.2.attn.to_out"] == ("text", "image")
    assert layouts["transformer_blocks.0.attn.to_q"] == ("image",)
    assert layouts["transformer_blocks.0.attn.add_k_proj"] == ("text",)
    assert layouts["transformer_blocks.1.ff.linear_in"] == ("image",)
    assert layouts["transformer_blocks.1.ff_context.linear_out"] == ("text",)
    assert layouts["x_embedder"] == ("image",) and layouts["context_embedder"] == ("text",)
    assert layouts["proj_out"] == ("image",) and layouts["norm_out.linear"] == ()
    for name in ("double_stream_modulation_img.linear", "single_stream_modulation.linear"):
        assert layouts[name] == ()
    assert layouts["time_guidance_embed.timestep_embedder.linear_1"] == ()

    conditioning = backend.encode([PROMPT], TOKENS)
    state = backend.prepare_latents(
        [torch.Generator().manual_seed(0)], 1, SIZE, SIZE, conditioning.prompt_embeds.dtype
    )
    timesteps, _ = backend.timesteps(3, SIZE, SIZE)
    settings = GenerationSettings(prompt=PROMPT)
    n_text = conditioning.num_text_tokens

    def output_with(part: slice | None) -> torch.Tensor:
        def nudge(module, inputs, output):
            if part is None:
                return output
            output = output.clone()
            output[:, part] += 1.0
            return output

        handle = pipe.transformer.single_transformer_blocks[-1].register_forward_hook(nudge)
        try:
            with torch.no_grad():
                return backend.predict(state, timesteps[0], conditioning, settings)
        finally:
            handle.remove()

    plain = output_with(None)
    assert torch.equal(output_with(slice(0, n_text)), plain)
    assert not torch.equal(output_with(slice(n_text, None)), plain)


def test_tap_matches_the_processor_queries_and_keys(pipe) -> None:
    """The hook-based tap sees exactly the post-norm, post-RoPE q/k FLUX.2's single-stream processor
    attends with, and the image tokens' attention output (written out here)."""
    from diffusers.models.embeddings import apply_rotary_emb
    from diffusers.models.transformers.transformer_flux2 import Flux2ParallelSelfAttnProcessor

    recorded = {}

    class Recording(Flux2ParallelSelfAttnProcessor):
        def __call__(self, attn, hidden_states, attention_mask=None, image_rotary_emb=None):
            projected = attn.to_qkv_mlp_proj(hidden_states)[..., : 3 * attn.inner_dim]
            query, key, value = (x.unflatten(-1, (-1, attn.head_dim)) for x in projected.chunk(3, dim=-1))
            query = apply_rotary_emb(attn.norm_q(query), image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(attn.norm_k(key), image_rotary_emb, sequence_dim=1)
            weights = torch.softmax(
                torch.einsum("bqhd,bkhd->bhqk", query, key) / query.shape[-1] ** 0.5, dim=-1
            )
            output = torch.einsum("bhqk,bkhd->bqhd", weights, value).flatten(2)
            recorded.update(query=query, key=key, output=output)
            return super().__call__(attn, hidden_states, attention_mask, image_rotary_emb)

    backend = Flux2Backend(pipe)
    pipe.transformer.single_transformer_blocks[1].attn.set_processor(Recording())
    conditioning = backend.encode([PROMPT], TOKENS)
    state = backend.prepare_latents(
        [torch.Generator().manual_seed(0)], 1, SIZE, SIZE, conditioning.prompt_embeds.dtype
    )
    timesteps, _ = backend.timesteps(4, SIZE, SIZE)
    with torch.no_grad(), backend.capture(1) as tap:
        backend.predict(state, timesteps[0], conditioning, GenerationSettings(prompt=PROMPT))
    captured = tap.result()
    n_text = conditioning.num_text_tokens
    torch.testing.assert_close(captured.q_text[0, 0], recorded["query"][0, :n_text].transpose(0, 1))
    torch.testing.assert_close(captured.q_img[0, 0], recorded["query"][0, n_text:].transpose(0, 1))
    torch.testing.assert_close(captured.k_text[0, 0], recorded["key"][0, :n_text].transpose(0, 1))
    torch.testing.assert_close(captured.k_img[0, 0], recorded["key"][0, n_text:].transpose(0, 1))
    torch.testing.assert_close(captured.o_img[0, 0], recorded["output"][0, n_text:], atol=1e-5, rtol=1e-4)


def test_every_mask_method_can_read_flux2(pipe) -> None:
    """FLUX.2's single-stream attention has text queries: all four methods read it, and each runs."""
    from freefuse.core.methods import MAP_METHODS

    for index, name in enumerate(NAMES):
        random_lora(pipe, name, seed=index + 1, scale=0.5)
    freefuse = FreeFuse(pipe)
    for name in NAMES:
        freefuse.use_adapter(name, words=[name.capitalize()])
    for method in sorted(MAP_METHODS):
        Flux2Architecture.check_mask_config(GenerationSettings(prompt=PROMPT, mask_config={"method": method}))
        out = run(freefuse, mask_config={"method": method, "background": False})
        assert out.manifest["settings"]["mask_config"]["method"] == method
        assert torch.equal(out.masks[0].masks.sum(dim=0), torch.ones(SIZE, SIZE))


def test_default_tap_block_and_step_are_the_authors() -> None:
    """Single-stream block 6 of the 4B's 20 and 3 of the 9B's 24; other sizes the 4B's depth; step 2
    of 4, the same share of other schedules."""
    assert Flux2Architecture.default_block(20) == 6
    assert Flux2Architecture.default_block(24) == 3
    assert Flux2Architecture.default_block(3) == 1
    assert Flux2Architecture.default_mask_step(4) == 2
    assert Flux2Architecture.default_mask_step(8) == 4
    assert Flux2Architecture.default_mask_step(1) == 1


def test_settings_flux2_cannot_run_are_refused(pipe) -> None:
    """Before loading: FLUX.1's true CFG, a negative prompt without guidance, too many tokens. With the
    distilled model loaded: guidance, which diffusers would silently ignore."""
    with pytest.raises(ValueError, match="guidance_scale"):
        Flux2Architecture.check_settings(GenerationSettings(prompt=PROMPT, true_cfg_scale=2.0))
    with pytest.raises(ValueError, match="negative_prompt"):
        Flux2Architecture.check_settings(GenerationSettings(prompt=PROMPT, negative_prompt="blurry"))
    with pytest.raises(ValueError, match="512"):
        Flux2Architecture.check_settings(GenerationSettings(prompt=PROMPT, max_sequence_length=600))
    assert Flux2Architecture.negative_prompt(GenerationSettings(prompt=PROMPT)) is None
    assert Flux2Architecture.negative_prompt(GenerationSettings(prompt=PROMPT, guidance_scale=4.0)) == ""
    random_lora(pipe, "alice", seed=1)
    freefuse = FreeFuse(pipe)
    freefuse.use_adapter("alice", words=["Alice"])
    with pytest.raises(ValueError, match="step-distilled"):
        run(freefuse, method="merge", guidance_scale=4.0)


def flux2_lora(pipe) -> dict[str, torch.Tensor]:
    """A typical FLUX.2 LoRA whose q/k/v share their down matrices (what a fused-qkv file holds)."""
    groups = [tuple(name.removeprefix("attn.") for name in names) for names in FLUX2_QKV.values()]
    return share_qkv_down(typical_lora_state_dict(pipe, seed=1, scale=0.5), groups)


@pytest.mark.parametrize("layout", ["ai-toolkit", "kohya", "peft"])
def test_lora_files_as_published_load_with_the_same_deltas(pipe, tmp_path, layout: str) -> None:
    """ai-toolkit (BFL names, `diffusion_model.`), kohya / musubi-tuner (`lora_unet_double_blocks_…`
    with alpha) and PEFT files of one LoRA make the image its diffusers file makes, through diffusers'
    own converters; `inspect` names FLUX.2 (by names or by the feed-forward widths)."""
    state = flux2_lora(pipe)
    other = {
        "ai-toolkit": lambda: flux2_bfl_lora_state_dict(state),
        "kohya": lambda: flux2_bfl_lora_state_dict(state, kohya=True),
        "peft": lambda: {"base_model.model." + k.removeprefix("transformer."): v for k, v in state.items()},
    }[layout]()
    save_file(state, str(tmp_path / "diffusers.safetensors"))
    save_file(other, str(tmp_path / "other.safetensors"))
    images = {}
    for stem in ("diffusers", "other"):
        freefuse = FreeFuse(pipe)
        freefuse.add_lora(tmp_path / f"{stem}.safetensors", name="alice", words=["Alice"])
        images[stem] = run(freefuse, seed=0, method="merge").images[0]
        freefuse.remove("alice")
    torch.testing.assert_close(images["other"], images["diffusers"], atol=1e-5, rtol=0)
    assert (images["diffusers"] - run_without_loras(pipe)).abs().max() > 1e-3
    assert describe_lora(tmp_path / "other.safetensors")["for"] == "FLUX.2 transformer"


def run_without_loras(pipe) -> torch.Tensor:
    return pipe(
        prompt=PROMPT,
        height=SIZE,
        width=SIZE,
        num_inference_steps=3,
        generator=torch.Generator().manual_seed(0),
        output_type="pt",
        max_sequence_length=TOKENS,
    ).images[0]


def test_flux1_and_flux2_files_are_refused_on_each_other_before_loading(pipe, tmp_path) -> None:
    """In diffusers' names (told apart by layer names) and in BFL/kohya names (told apart by the
    feed-forward widths in the header): refused before any weight loads, both names said."""
    flux1_pipe = tiny_flux_pipeline(seed=0)
    flux1 = random_lora(flux1_pipe, "x", path=tmp_path / "flux1.safetensors")
    flux1_kohya = tmp_path / "flux1_kohya.safetensors"
    save_file(kohya_names(flux1_bfl_names(typical_lora_state_dict(flux1_pipe, seed=1))), str(flux1_kohya))
    flux2 = random_lora(pipe, "y", path=tmp_path / "flux2.safetensors")
    flux2_kohya = tmp_path / "flux2_kohya.safetensors"
    save_file(flux2_bfl_lora_state_dict(flux2_lora(pipe), kohya=True), str(flux2_kohya))
    assert describe_lora(flux1_kohya)["for"] == "FLUX.1 transformer"
    for path in (flux1, flux1_kohya):
        with pytest.raises(
            LoraFileError, match="FLUX.1 transformer.*not for a FLUX.2 \\[klein\\] transformer"
        ):
            check_lora_path(path, Flux2Architecture)
        with pytest.raises(LoraFileError, match="not for a FLUX.2"):
            FreeFuse(pipe).add_lora(path, name="x", words=["Alice"])
    assert not getattr(pipe.transformer, "peft_config", None)
    for path in (flux2, flux2_kohya):
        with pytest.raises(LoraFileError, match="FLUX.2 transformer.*not for a FLUX.1 transformer"):
            check_lora_path(path, FluxArchitecture)
        with pytest.raises(LoraFileError, match="not for a FLUX.1"):
            FreeFuse(flux1_pipe).add_lora(path, name="y", words=["Alice"])


def flux1_bfl_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The feed-forward layers of a FLUX.1 diffusers-layout LoRA under BFL's names (as kohya files
    store them), where only their widths tell FLUX.1 from FLUX.2."""
    names = {"ff.net.0.proj": "img_mlp.0", "ff.net.2": "img_mlp.2"}
    result = {}
    for key, value in state.items():
        module, half = key.removeprefix("transformer.").rsplit(".lora_", 1)
        parts = module.split(".")
        inner = ".".join(parts[2:])
        if parts[0] == "transformer_blocks" and inner in names:
            result[f"t.double_blocks.{parts[1]}.{names[inner]}.lora_{half}"] = value
    return {key.removeprefix("t."): value for key, value in result.items()}


def test_flux_generations_are_told_apart_at_real_widths() -> None:
    """Header shapes at the real models' widths (rank 16, one block): FLUX.1-dev (3072), FLUX.2 [klein]
    4B (3072) and 9B (4096), in BFL/kohya names only the widths distinguish."""

    def header(width: int, mlp_out: int, linear1_out: int) -> dict[str, list[int]]:
        rank = 16
        return {
            "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": [rank, width],
            "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": [3 * width, rank],
            "lora_unet_double_blocks_0_img_mlp_0.lora_down.weight": [rank, width],
            "lora_unet_double_blocks_0_img_mlp_0.lora_up.weight": [mlp_out, rank],
            "lora_unet_single_blocks_0_linear1.lora_down.weight": [rank, width],
            "lora_unet_single_blocks_0_linear1.lora_up.weight": [linear1_out, rank],
        }

    assert lora_family(header(3072, 4 * 3072, 7 * 3072)) == "FLUX.1 transformer"
    assert lora_family(header(3072, 6 * 3072, 9 * 3072)) == "FLUX.2 transformer"
    assert lora_family(header(4096, 6 * 4096, 9 * 4096)) == "FLUX.2 transformer"
    attention_only = {k: v for k, v in header(3072, 1, 1).items() if "qkv" in k}
    assert lora_family(attention_only) == "FLUX transformer"  # nothing tells: either may take it
    assert lora_family(list(header(3072, 4 * 3072, 7 * 3072))) == "FLUX transformer"  # names alone


def test_a_model_folder_is_told_flux2_from_its_files(pipe, tmp_path) -> None:
    pipe.save_pretrained(tmp_path)
    assert architecture_of(str(tmp_path)) is Flux2Architecture
    assert pixels_per_token(str(tmp_path)) == backend_for(pipe).size_multiple == 16
    assert json.loads((tmp_path / "model_index.json").read_text())["_class_name"] == "Flux2KleinPipeline"
    assert architecture_of("tiny-flux2") is Flux2Architecture
    tokenizer = Flux2Architecture.load_tokenizer(tmp_path)
    assert "<think>" in tokenizer.template(PROMPT)  # FLUX.2 [klein] encodes with thinking off


def test_single_files_of_flux1_and_flux2_are_told_apart() -> None:
    flux1 = list(flux_single_file_state_dict(tiny_flux_pipeline(seed=0).transformer))
    flux2 = list(flux2_single_file_state_dict(tiny_flux2_pipeline(seed=0).transformer))
    assert FluxArchitecture.single_file_matches(flux1) and not FluxArchitecture.single_file_matches(flux2)
    assert Flux2Architecture.single_file_matches(flux2) and not Flux2Architecture.single_file_matches(flux1)
    nine_b = [f"double_blocks.{i}.img_attn.qkv.weight" for i in range(8)] + [
        "single_stream_modulation.lin.weight"
    ]
    assert Flux2Architecture.default_single_file_base(nine_b).endswith("9B")
    assert Flux2Architecture.default_single_file_base(flux2).endswith("4B")
    # FLUX.2 [dev] (48 single-stream blocks, Flux2Pipeline with another text encoder) is no [klein].
    dev = nine_b + [f"model.diffusion_model.single_blocks.{i}.linear1.weight" for i in range(48)]
    assert not Flux2Architecture.single_file_matches(dev) and not FluxArchitecture.single_file_matches(dev)


@pytest.mark.slow
def test_demo_arch_flux2_runs_the_tiny_model_and_replays(tmp_path, monkeypatch) -> None:
    from typer.testing import CliRunner

    from freefuse.cli import app

    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-cache"))  # no cached FLUX.2
    runner = CliRunner()
    out = tmp_path / "demo"
    result = runner.invoke(
        app, ["demo", "--arch", "flux2", "--out", str(out), "--steps", "4", "--size", "128"]
    )
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "demo.json").read_text())
    assert manifest["model"]["id_or_path"] == "tiny-flux2" and manifest["backend"] == "flux2"
    assert manifest["settings"]["mask_step"] == 2 and manifest["settings"]["block"] == 1
    monkeypatch.chdir(tmp_path)
    replay = runner.invoke(app, ["generate", "--manifest", str(out / "demo.json"), "--out", "replay"])
    assert replay.exit_code == 0, replay.output
    assert (tmp_path / "replay" / "demo.png").read_bytes() == (out / "demo.png").read_bytes()  # named after it


@pytest.mark.slow
def test_a_comfyui_transformer_file_runs_like_its_folder_and_replays(pipe, tmp_path, monkeypatch) -> None:
    """A transformer-only file in BFL's layout (as ComfyUI ships FLUX.2 [klein]) loads with the rest
    from --base-model and makes the folder's image; its manifest replays byte for byte."""
    from typer.testing import CliRunner

    from freefuse.cli import app
    from freefuse.models import load_pipeline

    folder, checkpoint = tmp_path / "folder", tmp_path / "flux-2-klein.safetensors"
    pipe.save_pretrained(folder)
    save_file(flux2_single_file_state_dict(pipe.transformer), str(checkpoint))
    assert single_file_architecture(checkpoint) is Flux2Architecture
    loaded = load_pipeline(str(checkpoint), base=str(folder))
    for key, value in pipe.transformer.state_dict().items():
        assert torch.equal(loaded.transformer.state_dict()[key], value), key
    lora = random_lora(pipe, "alice", seed=1, path=tmp_path / "alice.safetensors")
    runner = CliRunner()
    common = [
        "--lora",
        f"{lora}=Alice",
        "--prompt",
        PROMPT,
        "--steps",
        "3",
        "--size",
        "128",
        "--method",
        "merge",
    ]
    from_file = runner.invoke(
        app,
        [
            "generate",
            "--model",
            str(checkpoint),
            "--base-model",
            str(folder),
            "--out",
            str(tmp_path / "a"),
            *common,
        ],
    )
    assert from_file.exit_code == 0, from_file.output
    from_folder = runner.invoke(
        app, ["generate", "--model", str(folder), "--out", str(tmp_path / "b"), *common]
    )
    assert from_folder.exit_code == 0, from_folder.output
    # The same picture: equal weights, but the file's fused q/k/v come apart into other tensors and
    # the forward differs in the last float bits (2e-6), so a pixel may round the other way.
    pixels = [np.asarray(Image.open(tmp_path / run / "freefuse.png")).astype(int) for run in ("a", "b")]
    assert np.abs(pixels[0] - pixels[1]).max() <= 1
    monkeypatch.chdir(tmp_path)
    replay = runner.invoke(
        app, ["generate", "--manifest", str(tmp_path / "a" / "freefuse.json"), "--out", "c"]
    )
    assert replay.exit_code == 0, replay.output
    assert (tmp_path / "c" / "freefuse.png").read_bytes() == (tmp_path / "a" / "freefuse.png").read_bytes()
