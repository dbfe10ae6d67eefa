"""Z-Image: the tiny `ZImagePipeline` against diffusers itself, the token layout of its layers read
from the model, the tap against the attention processor, LoRA files as people publish them,
refusals, the demo and single-file checkpoints.

The backend contract (`test_backend_contract.py`) also runs on Z-Image; these are Z-Image's own facts.
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
from freefuse.backends.zimage import ZImageArchitecture, ZImageBackend
from freefuse.lora import LoraFileError, check_lora_path, describe_lora
from freefuse.models import architecture_of, pixels_per_token, single_file_architecture
from freefuse.testing import (
    ai_toolkit_names,
    kohya_names,
    random_lora,
    share_qkv_down,
    tiny_flux2_pipeline,
    tiny_flux_pipeline,
    tiny_zimage_pipeline,
    typical_lora_state_dict,
    zimage_single_file_state_dict,
)

SIZE = 128
PROMPT = "Alice hugging Bob in the snow"
TOKENS = 64
NAMES = ("alice", "bob")


@pytest.fixture
def pipe():
    pipeline = tiny_zimage_pipeline(seed=0)
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


def diffusers_image(pipe, seed: int, prompt=PROMPT, **options) -> torch.Tensor:
    """diffusers' own `ZImagePipeline` call with the adapters active now: the reference."""
    return pipe(
        prompt=prompt,
        height=SIZE,
        width=SIZE,
        num_inference_steps=3,
        generator=torch.Generator().manual_seed(seed),
        output_type="pt",
        max_sequence_length=TOKENS,
        **options,
    ).images


def lora_files(pipe, tmp_path) -> dict[str, object]:
    return {
        name: random_lora(pipe, name, seed=index + 1, scale=0.5, path=tmp_path / f"{name}.safetensors")
        for index, name in enumerate(NAMES)
    }


@pytest.mark.parametrize("guidance", [0.0, 3.0])
def test_merge_is_diffusers_load_lora_weights_and_set_adapters(pipe, tmp_path, guidance: float) -> None:
    """The same LoRA files through `load_lora_weights` + `set_adapters` and diffusers' own call, with
    the same generator: Turbo's single pass (guidance 0) exactly, Z-Image base's guided pass (diffusers
    batches both passes in one forward; FreeFuse runs them one by one) to float rounding."""
    files = lora_files(pipe, tmp_path)
    freefuse = FreeFuse(pipe)
    weights = {"alice": 0.8, "bob": 0.6}
    for name, path in files.items():
        freefuse.add_lora(path, words=[name.capitalize()], weight=weights[name])
    ours = run(freefuse, method="merge", seed=5, guidance_scale=guidance).images[0]
    reference = tiny_zimage_pipeline(seed=0)
    reference.set_progress_bar_config(disable=True)
    for name, path in files.items():
        reference.load_lora_weights(str(path), adapter_name=name)
    reference.set_adapters(list(weights), adapter_weights=list(weights.values()))
    theirs = diffusers_image(reference, seed=5, guidance_scale=guidance)[0]
    tolerance = 0.0 if guidance == 0 else 2e-5
    torch.testing.assert_close(ours, theirs, atol=tolerance, rtol=0)
    assert (
        ours - run(freefuse, method="merge", seed=6, guidance_scale=guidance).images[0]
    ).abs().max() > 1e-3


def test_a_batch_of_prompts_of_different_lengths_is_diffusers_batch(pipe, tmp_path) -> None:
    """Two prompts whose text lengths differ (the transformer pads them to one sequence): each image
    is the one diffusers makes in the same batch."""
    files = lora_files(pipe, tmp_path)
    freefuse = FreeFuse(pipe)
    for name, path in files.items():
        freefuse.add_lora(path, words=[name.capitalize()])
    prompts = [PROMPT, "Bob and Alice " + "with a cat in the snow " * 6]
    generators = [torch.Generator().manual_seed(seed) for seed in (3, 4)]
    ours = run(freefuse, prompts, method="merge", generator=generators).images
    pipe.set_adapters(list(NAMES))
    theirs = pipe(
        prompt=prompts,
        height=SIZE,
        width=SIZE,
        num_inference_steps=3,
        generator=[torch.Generator().manual_seed(seed) for seed in (3, 4)],
        output_type="pt",
        max_sequence_length=TOKENS,
        guidance_scale=0.0,
    ).images
    torch.testing.assert_close(torch.stack(ours), theirs, atol=2e-6, rtol=0)
    lengths = backend_for(pipe).encode(prompts, TOKENS).text_lengths
    assert lengths[0] != lengths[1]


def test_token_layout_of_zimage_layers_follows_the_model(pipe) -> None:
    """The declared layouts, and the order of the joint sequence read from the model itself: noise
    changes only the first (image) part of the first joint layer's input, the prompt only the rest;
    the output depends on the last layer's image part only."""
    backend = ZImageBackend(pipe)
    layouts = {name: backend.token_layout(name) for name, _ in pipe.transformer.named_modules()}
    assert layouts["layers.0.attention.to_q"] == ("image", "text")
    assert layouts["layers.1.feed_forward.w2"] == ("image", "text")
    assert layouts["layers.0.adaLN_modulation.0"] == ()
    assert layouts["noise_refiner.0.attention.to_k"] == ("image",)
    assert layouts["noise_refiner.0.adaLN_modulation.0"] == ()
    assert layouts["context_refiner.0.feed_forward.w1"] == ("text",)
    assert layouts["all_x_embedder.2-1"] == ("image",) and layouts["cap_embedder.1"] == ("text",)
    assert layouts["all_final_layer.2-1.linear"] == ("image", "text")
    assert layouts["all_final_layer.2-1.adaLN_modulation.1"] == ()
    assert layouts["t_embedder.mlp.0"] == () and layouts["t_embedder.mlp.2"] == ()

    seen = {}
    handle = pipe.transformer.layers[0].attention.to_q.register_forward_hook(
        lambda module, inputs, output: seen.setdefault("x", []).append(inputs[0].detach())
    )
    with torch.no_grad():
        timesteps, _ = backend.timesteps(3, SIZE, SIZE)
        settings = GenerationSettings(prompt=PROMPT)
        for prompt, seed in ((PROMPT, 0), (PROMPT, 1), ("a cat in the snow", 0)):
            state = backend.prepare_latents(
                [torch.Generator().manual_seed(seed)], 1, SIZE, SIZE, torch.float32
            )
            backend.predict(state, timesteps[0], backend.encode([prompt], TOKENS), settings)
    handle.remove()
    first, other_noise, other_prompt = seen["x"]
    n_image = backend.grid(SIZE, SIZE)[0] * backend.grid(SIZE, SIZE)[1]
    changed_by_noise = (first != other_noise).any(dim=-1)[0]
    changed_by_prompt = (first != other_prompt).any(dim=-1)[0]
    assert bool(changed_by_noise[:n_image].all()) and not bool(changed_by_noise[n_image:].any())
    assert not bool(changed_by_prompt[:n_image].any()) and bool(changed_by_prompt[n_image:].any())


def test_tap_matches_the_processor_queries_and_keys(pipe) -> None:
    """The hook-based tap sees exactly the post-norm, post-RoPE q/k Z-Image's processor attends with,
    and the image tokens' attention output (written out here, every query over every key)."""
    from diffusers.models.transformers.transformer_z_image import ZSingleStreamAttnProcessor

    recorded = {}

    class Recording(ZSingleStreamAttnProcessor):
        def __call__(
            self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, freqs_cis=None
        ):
            query = attn.norm_q(attn.to_q(hidden_states).unflatten(-1, (attn.heads, -1)))
            key = attn.norm_k(attn.to_k(hidden_states).unflatten(-1, (attn.heads, -1)))
            value = attn.to_v(hidden_states).unflatten(-1, (attn.heads, -1))

            def rope(x):  # Z-Image's own formula, written out
                pairs = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
                return torch.view_as_real(pairs * freqs_cis.unsqueeze(2)).flatten(3).type_as(x)

            query, key = rope(query), rope(key)
            weights = torch.softmax(
                torch.einsum("bqhd,bkhd->bhqk", query, key) / query.shape[-1] ** 0.5, dim=-1
            )
            output = torch.einsum("bhqk,bkhd->bqhd", weights, value).flatten(2)
            recorded.update(query=query, key=key, output=output)
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, freqs_cis)

    backend = ZImageBackend(pipe)
    pipe.transformer.layers[1].attention.set_processor(Recording())
    conditioning = backend.encode([PROMPT], TOKENS)
    state = backend.prepare_latents([torch.Generator().manual_seed(0)], 1, SIZE, SIZE, torch.float32)
    timesteps, _ = backend.timesteps(4, SIZE, SIZE)
    with torch.no_grad(), backend.capture(1) as tap:
        backend.predict(state, timesteps[0], conditioning, GenerationSettings(prompt=PROMPT))
    captured = tap.result()
    n_image = 64  # 8x8 tokens: a multiple of 32, so no image padding
    text = slice(n_image, n_image + conditioning.num_text_tokens)
    torch.testing.assert_close(captured.q_img[0, 0], recorded["query"][0, :n_image].transpose(0, 1))
    torch.testing.assert_close(captured.k_img[0, 0], recorded["key"][0, :n_image].transpose(0, 1))
    torch.testing.assert_close(captured.q_text[0, 0], recorded["query"][0, text].transpose(0, 1))
    torch.testing.assert_close(captured.k_text[0, 0], recorded["key"][0, text].transpose(0, 1))
    torch.testing.assert_close(captured.o_img[0, 0], recorded["output"][0, :n_image], atol=1e-5, rtol=1e-4)
    assert captured.text_lengths == [conditioning.num_text_tokens]


def test_the_padding_is_diffusers_own() -> None:
    from diffusers.models.transformers.transformer_z_image import SEQ_MULTI_OF

    assert ZImageBackend.sequence_multiple == SEQ_MULTI_OF


def test_word_positions_are_those_of_the_templated_prompt(pipe) -> None:
    """The activation words sit where Qwen3 reads them: after the chat template's opening."""
    from freefuse.tokens import find_word

    backend = ZImageBackend(pipe)
    ids = pipe.tokenizer(backend.tokenizer.template(PROMPT))["input_ids"]
    bob = find_word(backend.tokenizer, PROMPT, "Bob", TOKENS).positions
    assert [pipe.tokenizer.convert_ids_to_tokens(ids[i]) for i in bob] == ["ĠBob"]
    assert bob[0] > 3  # past "<|im_start|>", "user", "\n" and "Alice"


def test_every_mask_method_can_read_zimage(pipe) -> None:
    """Z-Image's joint attention has text queries: all four methods read it, and each runs."""
    from freefuse.core.methods import MAP_METHODS

    for index, name in enumerate(NAMES):
        random_lora(pipe, name, seed=index + 1, scale=0.5)
    freefuse = FreeFuse(pipe)
    for name in NAMES:
        freefuse.use_adapter(name, words=[name.capitalize()])
    for method in sorted(MAP_METHODS):
        ZImageArchitecture.check_mask_config(
            GenerationSettings(prompt=PROMPT, mask_config={"method": method})
        )
        out = run(freefuse, mask_config={"method": method, "background": False})
        assert out.manifest["settings"]["mask_config"]["method"] == method
        assert torch.equal(out.masks[0].masks.sum(dim=0), torch.ones(SIZE, SIZE))


def test_default_tap_block_and_step_follow_the_authors_share() -> None:
    """`layers.18` of 30 and step 3 of 12: the same depth and share on other models and schedules."""
    assert ZImageArchitecture.default_block(30) == 18
    assert ZImageArchitecture.default_block(2) == 1
    assert ZImageArchitecture.default_mask_step(12) == 3
    assert ZImageArchitecture.default_mask_step(8) == 2
    assert ZImageArchitecture.default_mask_step(28) == 7  # a quarter, not the paper's 6 of 28
    assert ZImageArchitecture.default_mask_step(1) == 1


def test_settings_zimage_cannot_run_are_refused_before_loading() -> None:
    with pytest.raises(ValueError, match="guidance_scale"):
        ZImageArchitecture.check_settings(GenerationSettings(prompt=PROMPT, true_cfg_scale=2.0))
    with pytest.raises(ValueError, match="negative_prompt"):
        ZImageArchitecture.check_settings(GenerationSettings(prompt=PROMPT, negative_prompt="blurry"))
    with pytest.raises(ValueError, match="512"):
        ZImageArchitecture.check_settings(GenerationSettings(prompt=PROMPT, max_sequence_length=600))
    guided = GenerationSettings(prompt=PROMPT, negative_prompt="blurry", guidance_scale=4.0)
    assert (
        ZImageArchitecture.check_settings(guided) == []
        and ZImageArchitecture.negative_prompt(guided) == "blurry"
    )
    assert ZImageArchitecture.negative_prompt(GenerationSettings(prompt=PROMPT)) is None


@pytest.mark.parametrize("layout", ["ai-toolkit", "kohya", "kohya fused qkv", "peft"])
def test_lora_files_as_published_load_with_the_same_deltas(pipe, tmp_path, layout: str) -> None:
    """ai-toolkit (`diffusion_model.`), kohya / musubi-tuner (`lora_unet_…` with alpha; fused `qkv` in
    the dotted form) and bare PEFT files of one LoRA make the image its diffusers file makes, through
    diffusers' own converter; `inspect` names Z-Image."""
    state = share_qkv_down(typical_lora_state_dict(pipe, seed=1, scale=0.5), [("to_q", "to_k", "to_v")])
    if layout == "ai-toolkit":
        other = ai_toolkit_names(state)
    elif layout == "kohya":
        other = kohya_names(state)
    elif layout == "peft":
        other = {
            "base_model.model." + key.removeprefix("transformer."): value for key, value in state.items()
        }
    else:
        other = {}
        for key, value in kohya_names(state).items():
            name, leaf = key.split(".", 1)
            if "_attention_to_k" in name or "_attention_to_v" in name:
                continue
            if "_attention_to_q" in name:
                name = name.replace("_attention_to_q", "_attention_qkv")
                if leaf == "lora_up.weight":
                    ups = [kohya_names(state)[key.replace("_to_q.", f"_to_{p}.")] for p in "qkv"]
                    value = torch.cat(ups)
            leaf = leaf.replace("lora_down", "lora.down").replace("lora_up", "lora.up")
            other[f"{name}.{leaf}"] = value
    save_file(state, str(tmp_path / "diffusers.safetensors"))
    save_file(other, str(tmp_path / "other.safetensors"))
    images = {}
    for stem in ("diffusers", "other"):
        freefuse = FreeFuse(pipe)
        freefuse.add_lora(tmp_path / f"{stem}.safetensors", name="alice", words=["Alice"])
        images[stem] = run(freefuse, seed=0, method="merge").images[0]
        freefuse.remove("alice")
    torch.testing.assert_close(images["other"], images["diffusers"], atol=1e-5, rtol=0)
    assert describe_lora(tmp_path / "other.safetensors")["for"] == "Z-Image transformer"


def test_loras_of_other_architectures_are_refused_before_loading_with_both_names(pipe, tmp_path) -> None:
    flux = random_lora(tiny_flux_pipeline(seed=0), "x", path=tmp_path / "flux1.safetensors")
    flux2 = random_lora(tiny_flux2_pipeline(seed=0), "x", path=tmp_path / "flux2.safetensors")
    for path, family in ((flux, "FLUX.1 transformer"), (flux2, "FLUX.2 transformer")):
        with pytest.raises(LoraFileError, match=f"{family}.*not for a Z-Image transformer"):
            check_lora_path(path, ZImageArchitecture)
        with pytest.raises(LoraFileError, match="not for a Z-Image transformer"):
            FreeFuse(pipe).add_lora(path, name="x", words=["Alice"])
    assert not getattr(pipe.transformer, "peft_config", None)
    zimage = random_lora(pipe, "z", path=tmp_path / "zimage.safetensors")
    with pytest.raises(LoraFileError, match="Z-Image transformer.*not for a FLUX.1 transformer"):
        FreeFuse(tiny_flux_pipeline(seed=0)).add_lora(zimage, name="z", words=["Alice"])


def test_a_model_folder_is_told_zimage_from_its_files(pipe, tmp_path) -> None:
    pipe.save_pretrained(tmp_path)
    assert architecture_of(str(tmp_path)) is ZImageArchitecture
    assert pixels_per_token(str(tmp_path)) == backend_for(pipe).size_multiple == 16
    assert json.loads((tmp_path / "model_index.json").read_text())["_class_name"] == "ZImagePipeline"
    assert architecture_of("tiny-zimage") is ZImageArchitecture
    tokenizer = ZImageArchitecture.load_tokenizer(tmp_path)  # before loading: words are checked then
    assert tokenizer.template(PROMPT) == backend_for(pipe).tokenizer.template(PROMPT)


@pytest.mark.slow
def test_demo_arch_zimage_runs_the_tiny_model_and_replays(tmp_path, monkeypatch) -> None:
    from typer.testing import CliRunner

    from freefuse.cli import app

    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-cache"))  # no cached Z-Image
    runner = CliRunner()
    out = tmp_path / "demo"
    result = runner.invoke(
        app, ["demo", "--arch", "zimage", "--out", str(out), "--steps", "3", "--size", "128"]
    )
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "demo.json").read_text())
    assert manifest["model"]["id_or_path"] == "tiny-zimage" and manifest["backend"] == "zimage"
    assert manifest["settings"]["mask_step"] == 1  # 3 of 12, scaled to 3 steps
    monkeypatch.chdir(tmp_path)
    replay = runner.invoke(app, ["generate", "--manifest", str(out / "demo.json"), "--out", "replay"])
    assert replay.exit_code == 0, replay.output
    assert (tmp_path / "replay" / "demo.png").read_bytes() == (out / "demo.png").read_bytes()  # named after it


@pytest.mark.slow
def test_a_comfyui_transformer_file_runs_like_its_folder_and_replays(pipe, tmp_path, monkeypatch) -> None:
    """A transformer-only file in the original layout (fused qkv, as ComfyUI ships Z-Image) loads with
    the rest from --base-model and makes the folder's image; its manifest replays byte for byte."""
    from typer.testing import CliRunner

    from freefuse.cli import app
    from freefuse.models import load_pipeline

    folder, checkpoint = tmp_path / "folder", tmp_path / "z_image_turbo.safetensors"
    pipe.save_pretrained(folder)
    save_file(zimage_single_file_state_dict(pipe.transformer), str(checkpoint))
    assert single_file_architecture(checkpoint) is ZImageArchitecture
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
    pixels = [np.asarray(Image.open(tmp_path / run / "freefuse.png")) for run in ("a", "b")]
    assert np.array_equal(pixels[0], pixels[1])  # the files differ in the model they name
    monkeypatch.chdir(tmp_path)
    replay = runner.invoke(
        app, ["generate", "--manifest", str(tmp_path / "a" / "freefuse.json"), "--out", "c"]
    )
    assert replay.exit_code == 0, replay.output
    assert (tmp_path / "c" / "freefuse.png").read_bytes() == (tmp_path / "a" / "freefuse.png").read_bytes()


def test_in_a_batch_a_short_prompt_reads_only_its_own_text(pipe) -> None:
    """Stage 1 of a short prompt batched with a long one (padding between them in the sequence)
    reads the same attention as the short prompt alone: image-to-text shares over its own text
    keys, not over the long prompt's padding."""
    for index, name in enumerate(NAMES):
        random_lora(pipe, name, seed=index + 1, scale=0.5)
    freefuse = FreeFuse(pipe)
    for name in NAMES:
        freefuse.use_adapter(name, words=[name.capitalize()])
    config = {"method": "image-to-text", "background": False}
    long_prompt = "Bob and Alice " + "with a cat in the snow " * 6
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FreeFuseWarning)
        options = {"height": SIZE, "width": SIZE, "num_inference_steps": 3, "max_sequence_length": TOKENS}
        alone = freefuse.masks(PROMPT, progress=False, seed=[0], mask_config=config, **options)
        batch = freefuse.masks([PROMPT, long_prompt], progress=False, seed=[0, 1], mask_config=config, **options)
    for name in NAMES:
        torch.testing.assert_close(
            batch.attention[0][name]["cross"], alone.attention[0][name]["cross"], atol=1e-5, rtol=1e-3
        )


def _picture(seed: int, mode: str = "RGB"):
    from PIL import Image

    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 255, (SIZE // 16, SIZE // 16, 3), dtype=np.uint8)
    return Image.fromarray(coarse).resize((SIZE, SIZE), Image.BILINEAR).convert(mode)


def _region():
    from PIL import Image

    mask = np.zeros((SIZE, SIZE), dtype=np.uint8)
    mask[32:96, 40:100] = 255
    return Image.fromarray(mask, "L")


@pytest.mark.parametrize("kind", ["img2img", "inpaint"])
@pytest.mark.parametrize("guidance", [0.0, 3.0])
def test_img2img_and_inpainting_merge_are_the_zimage_pipelines(pipe, tmp_path, kind: str, guidance: float) -> None:
    """`ZImageImg2ImgPipeline` and `ZImageInpaintPipeline` over the same components and LoRAs, with
    the same generator: Turbo's single pass exactly, the guided pass to float rounding (diffusers
    batches both passes)."""
    import diffusers

    from freefuse.conditions import Conditions

    files = lora_files(pipe, tmp_path)
    freefuse = FreeFuse(pipe)
    for name, path in files.items():
        freefuse.add_lora(path, words=[name.capitalize()])
    init = _picture(1)
    # 0.4 of 3 steps: the first step is skipped (get_timesteps' t_start = int(3 - 1.2) = 1).
    inputs = {"image": init, "strength": 0.4}
    conditions = Conditions.of(init_image=init, strength=0.4)
    if kind == "inpaint":
        inputs["mask_image"] = _region()
        conditions = Conditions.of(init_image=init, inpaint_mask=_region(), strength=0.4)
    ours = run(freefuse, method="merge", seed=4, guidance_scale=guidance, conditions=conditions).images[0]
    cls = getattr(diffusers, "ZImageInpaintPipeline" if kind == "inpaint" else "ZImageImg2ImgPipeline")
    reference = cls(**pipe.components)
    reference.set_progress_bar_config(disable=True)
    pipe.set_adapters(list(files))
    theirs = diffusers_image(reference, seed=4, guidance_scale=guidance, **inputs)[0]
    torch.testing.assert_close(ours, theirs, atol=0.0 if guidance == 0 else 2e-5, rtol=0)
    plain = run(freefuse, method="merge", seed=4, guidance_scale=guidance).images[0]
    assert (plain - theirs).abs().max() > 1e-2  # the init image does change the picture


def test_zimage_inpainting_keeps_the_init_image_outside_and_all_ones_masks_are_merge(pipe, tmp_path) -> None:
    from freefuse import MaskSet
    from freefuse.conditions import Conditions

    files = lora_files(pipe, tmp_path)
    freefuse = FreeFuse(pipe)
    for name, path in files.items():
        freefuse.add_lora(path, words=[name.capitalize()])
    conditions = Conditions.of(init_image=_picture(2), inpaint_mask=_region(), strength=0.9)
    merged = run(freefuse, method="merge", seed=3, conditions=conditions).images[0]
    ones = MaskSet(list(NAMES), torch.ones(len(NAMES), SIZE, SIZE))
    masked = run(freefuse, method="masks", masks=ones, text_scope="all", seed=3, conditions=conditions).images[0]
    assert (merged - masked).abs().max() <= 1e-5
    found = run(freefuse, seed=3, conditions=conditions)
    inside = torch.zeros(SIZE, SIZE, dtype=torch.bool)
    inside[32:96, 40:100] = True
    for mask in found.masks[0].masks:  # each subject's mask is cut to the repainted region
        assert float(mask[~inside].abs().max()) == 0.0


@pytest.mark.parametrize("guidance", [0.0, 3.0])
def test_controlnet_merge_is_the_zimage_controlnet_pipeline(pipe, tmp_path, guidance: float) -> None:
    """`ZImageControlNetPipeline` with a tiny random ControlNet over the same components and LoRAs:
    exactly without guidance, to float rounding with it (diffusers batches the two passes)."""
    from diffusers import ZImageControlNetPipeline

    from freefuse import MaskSet
    from freefuse.conditions import Conditions, Control
    from freefuse.errors import SettingsError
    from freefuse.testing import tiny_zimage_controlnet

    files = lora_files(pipe, tmp_path)
    freefuse = FreeFuse(pipe)
    for name, path in files.items():
        freefuse.add_lora(path, words=[name.capitalize()])
    net = tiny_zimage_controlnet(pipe, seed=5)
    control = _picture(6)
    conditions = Conditions.of(controls=[Control(control, scale=0.8, type="depth")])
    ours = run(freefuse, method="merge", seed=4, guidance_scale=guidance, conditions=conditions, controlnet=net)
    reference = ZImageControlNetPipeline(**pipe.components, controlnet=net)
    reference.set_progress_bar_config(disable=True)
    pipe.set_adapters(list(files))
    theirs = diffusers_image(
        reference, seed=4, guidance_scale=guidance, control_image=control, controlnet_conditioning_scale=0.8
    )[0]
    torch.testing.assert_close(ours.images[0], theirs, atol=0.0 if guidance == 0 else 2e-5, rtol=0)
    plain = run(freefuse, method="merge", seed=4, guidance_scale=guidance).images[0]
    assert (plain - theirs).abs().max() > 1e-2  # the ControlNet does act
    ones = MaskSet(list(NAMES), torch.ones(len(NAMES), SIZE, SIZE))
    masked = run(freefuse, method="masks", masks=ones, text_scope="all", seed=4, guidance_scale=guidance,
                 conditions=conditions, controlnet=net).images[0]  # fmt: skip
    assert (ours.images[0] - masked).abs().max() <= 1e-5
    two = Conditions.of(controls=[Control(control), Control(_picture(7))])
    with pytest.raises(SettingsError, match="zimage runs take at most 1 ControlNet"):
        run(freefuse, method="merge", seed=4, conditions=two, controlnet=net)


def test_cli_runs_a_zimage_controlnet_folder_and_replays(pipe, tmp_path, monkeypatch) -> None:
    import json

    from typer.testing import CliRunner

    from freefuse.cli import app
    from freefuse.testing import tiny_zimage_controlnet

    monkeypatch.chdir(tmp_path)
    files = lora_files(pipe, tmp_path)
    tiny_zimage_controlnet(pipe, seed=5).save_pretrained(tmp_path / "controlnet")
    _picture(6).save(tmp_path / "depth.png")
    args = ["generate", "--model", "tiny-zimage", "--prompt", PROMPT, "--size", "128x128", "--steps", "3",
            "--max-sequence-length", str(TOKENS), "--seed", "2"]  # fmt: skip
    for name, path in files.items():
        args += ["--lora", f"{path}={name.capitalize()}"]
    runner = CliRunner()
    first = runner.invoke(app, [*args, "--controlnet", "controlnet", "--control", "depth=depth.png@0.8", "--out", "a"])
    assert first.exit_code == 0, first.output
    recorded = json.loads((tmp_path / "a" / "freefuse.json").read_text())["conditions"]
    assert recorded["controlnets"][0]["class"] == "ZImageControlNetModel" and recorded["controls"][0]["scale"] == 0.8
    again = runner.invoke(app, ["generate", "--manifest", "a/freefuse.json", "--out", "b"])
    assert again.exit_code == 0, again.output
    assert (tmp_path / "a" / "freefuse.png").read_bytes() == (tmp_path / "b" / "freefuse.png").read_bytes()
    plain = runner.invoke(app, [*args, "--out", "c"])
    assert plain.exit_code == 0, plain.output
    assert (tmp_path / "c" / "freefuse.png").read_bytes() != (tmp_path / "a" / "freefuse.png").read_bytes()
