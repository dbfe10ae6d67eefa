"""The two-stage FLUX run on the tiny pipeline: invariants, masks per image, reproducibility."""

from __future__ import annotations

import warnings

import pytest
import torch

from freefuse import FreeFuse, FreeFuseWarning, GenerationSettings, MaskSet
from freefuse.backends.flux import FluxBackend
from freefuse.testing import random_lora, tiny_flux_pipeline

SMALL = {"height": 128, "width": 128, "num_inference_steps": 6, "max_sequence_length": 32}
PROMPT = "Alice hugging Bob in the snow"


def make_freefuse(names=("alice", "bob"), seed: int = 0) -> FreeFuse:
    pipe = tiny_flux_pipeline(seed=seed)
    pipe.set_progress_bar_config(disable=True)
    freefuse = FreeFuse(pipe)
    for index, name in enumerate(names):
        random_lora(pipe, name, seed=index + 1)
        freefuse.use_adapter(name, words=[name.capitalize()])
    return freefuse


def run(freefuse: FreeFuse, prompt=PROMPT, **settings):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FreeFuseWarning)
        return freefuse(prompt, output_type="pt", progress=False, **{**SMALL, **settings})


@pytest.fixture(scope="module")
def two() -> FreeFuse:
    return make_freefuse()


def full_masks(value: float, names=("alice", "bob"), size=(128, 128)) -> MaskSet:
    return MaskSet(list(names), torch.full((len(names), *size), value))


def test_merge_is_exactly_the_diffusers_pipeline(two: FreeFuse) -> None:
    ours = run(two, method="merge", seed=3).images[0]
    two.pipeline.set_adapters(["alice", "bob"])
    theirs = two.pipeline(
        PROMPT, generator=torch.Generator().manual_seed(3), output_type="pt", guidance_scale=3.5, **SMALL
    ).images[0]
    assert torch.equal(ours, theirs)


def test_all_ones_masks_equal_merge(two: FreeFuse) -> None:
    merge = run(two, method="merge").images[0]
    ones = run(two, method="masks", masks=full_masks(1.0), text_scope="all").images[0]
    assert (merge - ones).abs().max() <= 1e-5


def test_zero_mask_equals_running_without_that_lora(two: FreeFuse) -> None:
    masks = MaskSet(["alice", "bob"], torch.stack([torch.ones(128, 128), torch.zeros(128, 128)]))
    masked = run(two, method="masks", masks=masks, text_scope="all").images[0]
    without = make_freefuse(names=("alice",))
    alone = run(without, method="merge").images[0]
    assert (masked - alone).abs().max() <= 1e-5
    with_bob = run(two, method="merge").images[0]
    assert (with_bob - alone).abs().max() > 1e-2  # bob's LoRA does change the image


def test_freefuse_with_mask_step_equal_to_steps_is_merge(two: FreeFuse) -> None:
    merge = run(two, method="merge").images[0]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        late = two(
            PROMPT,
            method="freefuse",
            mask_step=SMALL["num_inference_steps"],
            output_type="pt",
            progress=False,
            **SMALL,
        )
    # The fused LoRA op sums in another order than PEFT: equal up to float rounding.
    assert (late.images[0] - merge).abs().max() <= 1e-5
    peft_op = run(two, method="freefuse", mask_step=SMALL["num_inference_steps"], lora_op="peft").images[0]
    assert torch.equal(peft_op, merge)
    assert late.masks[0] is not None  # masks were still read (at the last step)
    assert any("same as method='merge'" in str(w.message) for w in caught)


def test_freefuse_masks_partition_the_image_and_change_the_result(two: FreeFuse) -> None:
    out = run(two, seed=1)
    masks = out.masks[0]
    assert masks.names == ["alice", "bob"]
    assert masks.size == (128, 128)
    assert torch.equal(masks.masks.sum(dim=0), torch.ones(128, 128))
    assert all(0 < float(m.mean()) < 1 for m in masks.masks)
    merge = run(two, seed=1, method="merge").images[0]
    assert (out.images[0] - merge).abs().max() > 1e-3
    maps = out.attention[0]
    assert set(maps) == {"alice", "bob"} and maps["alice"]["cross"].shape == (8, 8)
    torch.testing.assert_close(maps["bob"]["refined"].sum(), torch.tensor(1.0))


@pytest.mark.parametrize("n_subjects", [2, 3, 4])
def test_masks_come_out_for_several_subjects(n_subjects: int) -> None:
    names = ("alice", "bob", "carol", "dave")[:n_subjects]
    freefuse = make_freefuse(names=names)
    prompt = " and ".join(name.capitalize() for name in names) + " at the beach"
    out = run(freefuse, prompt=prompt, seed=2, height=256, width=256)
    masks = out.masks[0]
    assert masks.names == list(names)
    assert torch.equal(masks.masks.sum(dim=0), torch.ones(256, 256))
    record = out.manifest["images"][0]["subjects"]
    assert set(record) == set(names)


def test_batch_of_prompts_with_different_subjects_gets_its_own_masks() -> None:
    freefuse = make_freefuse(names=("alice", "bob", "carol"))
    out = run(freefuse, prompt=["Alice hugging Bob", "Carol and Bob dancing"], seed=[4, 4])
    first, second = out.masks
    assert float(first["carol"].sum()) == 0 and float(first["alice"].sum()) > 0
    assert float(second["alice"].sum()) == 0 and float(second["carol"].sum()) > 0
    assert not torch.equal(first["bob"], second["bob"])
    notes = out.manifest["notes"]
    assert any("'carol' is off" in note for note in notes) and any("'alice' is off" in note for note in notes)


def test_same_seed_same_image_and_batch_does_not_change_an_image(two: FreeFuse) -> None:
    first = run(two, seed=9)
    again = run(two, seed=9)
    assert torch.equal(first.images[0], again.images[0])
    assert torch.equal(first.masks[0].masks, again.masks[0].masks)
    batched = run(two, prompt=["Bob and Alice dancing", PROMPT], seed=[5, 9])
    # Same noise and masks; batched matmuls may round differently in the last float bits.
    assert torch.equal(batched.masks[1].masks, first.masks[0].masks)
    assert (batched.images[1] - first.images[0]).abs().max() <= 1e-4
    other = run(two, seed=10)
    assert (other.images[0] - first.images[0]).abs().max() > 1e-2


def test_seed_int_gives_each_image_of_a_prompt_its_own_seed(two: FreeFuse) -> None:
    out = run(two, seed=7, num_images_per_prompt=2)
    assert [image["seed"] for image in out.manifest["images"]] == [7, 8]
    single = run(two, seed=8)
    assert torch.equal(out.masks[1].masks, single.masks[0].masks)


def test_global_lora_is_never_masked() -> None:
    pipe = tiny_flux_pipeline(seed=0)
    pipe.set_progress_bar_config(disable=True)
    freefuse = FreeFuse(pipe)
    for index, name in enumerate(("alice", "bob", "style")):
        random_lora(pipe, name, seed=index + 1)
    freefuse.use_adapter("alice", words=["Alice"])
    freefuse.use_adapter("bob", words=["Bob"])
    freefuse.use_adapter("style", scope="global")
    out = run(freefuse)
    assert out.masks[0].names == ["alice", "bob"]
    # With zero subject masks only the global LoRA acts: same as a merge with the style LoRA alone.
    zero = run(freefuse, method="masks", masks=full_masks(0.0), text_scope="all").images[0]
    style_only = FreeFuse(pipe)
    style_only.use_adapter("style", scope="global")
    assert (zero - run(style_only, method="merge").images[0]).abs().max() <= 1e-5


def test_true_cfg_with_negative_prompt_runs_and_differs(two: FreeFuse) -> None:
    plain = run(two, seed=1)
    cfg = run(two, seed=1, negative_prompt="blurry", true_cfg_scale=2.0)
    assert cfg.masks[0] is not None
    assert (plain.images[0] - cfg.images[0]).abs().max() > 1e-3


def test_latent_preview_gives_masks_too(two: FreeFuse) -> None:
    out = run(two, seed=1, preview="latent")
    assert out.previews[0].shape == (16, 16, 3)  # latent resolution: no VAE decode
    assert out.masks[0].masks.sum(dim=0).min() >= 1  # every pixel has a LoRA (or a stated fallback)
    vae = run(two, seed=1)
    assert vae.previews[0].shape == (128, 128, 3)


def test_masks_only_stops_after_stage_one(two: FreeFuse) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = two.masks(PROMPT, progress=False, **SMALL, seed=1)
    full = run(two, seed=1)
    assert torch.equal(out.masks[0].masks, full.masks[0].masks)
    assert len(out.manifest["timings"]["step_s"]) == 1  # 6 steps scaled: mask step 1


def test_hooks_are_removed_even_when_a_run_fails(two: FreeFuse) -> None:
    transformer = two.pipeline.transformer

    def count_hooks() -> int:
        return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in transformer.modules())

    before = count_hooks()

    def explode(freefuse, step_index, timestep, tensors):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        two(PROMPT, callback_on_step_end=explode, progress=False, **SMALL)
    assert count_hooks() == before


def test_tap_matches_the_processor_queries_and_keys() -> None:
    """The hook-based tap sees exactly the post-norm, post-RoPE q/k the attention processor uses,
    and the image tokens' joint attention output."""
    from diffusers.models.embeddings import apply_rotary_emb
    from diffusers.models.transformers.transformer_flux import FluxAttnProcessor, _get_qkv_projections

    pipe = tiny_flux_pipeline(seed=0)
    recorded = {}

    class Recording(FluxAttnProcessor):
        def __call__(
            self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None
        ):
            q, k, v, eq, ek, ev = _get_qkv_projections(attn, hidden_states, encoder_hidden_states)
            q = attn.norm_q(q.unflatten(-1, (attn.heads, -1)))
            k = attn.norm_k(k.unflatten(-1, (attn.heads, -1)))
            eq = attn.norm_added_q(eq.unflatten(-1, (attn.heads, -1)))
            ek = attn.norm_added_k(ek.unflatten(-1, (attn.heads, -1)))
            query = apply_rotary_emb(torch.cat([eq, q], 1), image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(torch.cat([ek, k], 1), image_rotary_emb, sequence_dim=1)
            value = torch.cat([ev, v], 1).unflatten(-1, (attn.heads, -1))
            n_text = eq.shape[1]
            # Joint attention written out: every query over every key, heads side by side.
            weights = torch.softmax(
                torch.einsum("bqhd,bkhd->bhqk", query, key) / query.shape[-1] ** 0.5, dim=-1
            )
            output = torch.einsum("bhqk,bkhd->bqhd", weights, value).flatten(2)
            recorded.update(query=query, key=key, output=output[:, n_text:], n_text=n_text)
            return super().__call__(
                attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb
            )

    backend = FluxBackend(pipe)
    block = pipe.transformer.transformer_blocks[1]
    block.attn.set_processor(Recording())
    conditioning = backend.encode([PROMPT], 32)
    state = backend.prepare_latents(
        [torch.Generator().manual_seed(0)], 1, 128, 128, conditioning.prompt_embeds.dtype
    )
    timesteps, _ = backend.timesteps(4, 128, 128)
    with torch.no_grad(), backend.capture(1) as tap:
        backend.predict(state, timesteps[0], conditioning, GenerationSettings(prompt=PROMPT))
    captured = tap.result()
    n_text = recorded["n_text"]
    torch.testing.assert_close(captured.q_text[0, 0], recorded["query"][0, :n_text].transpose(0, 1))
    torch.testing.assert_close(captured.q_img[0, 0], recorded["query"][0, n_text:].transpose(0, 1))
    torch.testing.assert_close(captured.k_img[0, 0], recorded["key"][0, n_text:].transpose(0, 1))
    torch.testing.assert_close(captured.k_text[0, 0], recorded["key"][0, :n_text].transpose(0, 1))
    torch.testing.assert_close(captured.o_img[0, 0], recorded["output"][0])


def test_token_layout_of_every_adapted_flux_layer() -> None:
    pipe = tiny_flux_pipeline(seed=0)
    backend = FluxBackend(pipe)
    layouts = {name: backend.token_layout(name) for name, _ in pipe.transformer.named_modules()}
    assert layouts["transformer_blocks.0.attn.to_q"] == ("image",)
    assert layouts["transformer_blocks.0.attn.add_k_proj"] == ("text",)
    assert layouts["transformer_blocks.0.ff_context.net.2"] == ("text",)
    assert layouts["transformer_blocks.0.ff.net.0.proj"] == ("image",)
    assert layouts["transformer_blocks.0.norm1.linear"] == ()
    assert layouts["single_transformer_blocks.1.proj_out"] == ("text", "image")
    assert layouts["single_transformer_blocks.1.norm.linear"] == ()
    assert layouts["x_embedder"] == ("image",) and layouts["context_embedder"] == ("text",)
    assert layouts["proj_out"] == ("image",) and layouts["norm_out.linear"] == ()
    assert backend.default_block() == 1
    pipe.transformer.transformer_blocks.extend([pipe.transformer.transformer_blocks[0]] * 17)  # 19 blocks
    assert backend.default_block() == 16


def test_remove_forgets_a_borrowed_adapter_but_deletes_an_owned_one(tmp_path) -> None:
    pipe = tiny_flux_pipeline(seed=0)
    random_lora(pipe, "borrowed", seed=1)
    owned_file = random_lora(pipe, "x", seed=2, path=tmp_path / "owned.safetensors")
    freefuse = FreeFuse(pipe)
    freefuse.use_adapter("borrowed", words=["Alice"])
    freefuse.add_lora(owned_file, words=["Bob"], name="owned")
    freefuse.remove("borrowed")
    freefuse.remove("owned")
    assert "borrowed" in pipe.transformer.peft_config  # the caller's adapter stays
    assert "owned" not in pipe.transformer.peft_config
    assert freefuse.subjects == {}


def test_masks_given_to_a_method_that_does_not_use_them_are_refused(two: FreeFuse) -> None:
    with pytest.raises(ValueError, match="only used by method='masks'"):
        run(two, method="merge", masks=full_masks(1.0))


def test_generator_latents_and_step_callback_follow_diffusers(two: FreeFuse) -> None:
    seeded = run(two, seed=4)
    from_generator = run(two, generator=torch.Generator().manual_seed(4))
    assert torch.equal(seeded.images[0], from_generator.images[0])
    assert from_generator.manifest["images"][0]["seed"] is None  # not replayable from the manifest
    assert any("caller's `generator`" in note for note in from_generator.manifest["notes"])
    noise = two.backend.prepare_latents(
        [torch.Generator().manual_seed(4)], 1, 128, 128, torch.float32
    ).latents
    assert torch.equal(run(two, latents=noise).images[0], seeded.images[0])

    seen = []

    def halve_at_step_two(freefuse, step_index, timestep, tensors):
        seen.append((step_index, sorted(tensors)))
        return {"latents": tensors["latents"] * 0.5} if step_index == 2 else {}

    changed = run(
        two, seed=4, callback_on_step_end=halve_at_step_two, callback_on_step_end_tensor_inputs=["latents"]
    )
    assert [step for step, _ in seen] == list(range(SMALL["num_inference_steps"]))
    assert seen[0][1] == ["latents"]
    assert (changed.images[0] - seeded.images[0]).abs().max() > 1e-2
    with pytest.raises(ValueError, match="not available"):
        run(two, callback_on_step_end=halve_at_step_two, callback_on_step_end_tensor_inputs=["noise"])


def test_background_words_reach_stage_one_and_leave_their_region_to_no_lora(
    two: FreeFuse, monkeypatch
) -> None:
    from freefuse import core

    seen = {}
    original = core.masks_from_attention

    def spy(*args, **kwargs):
        seen["background"] = kwargs.get("background_tokens")
        seen["config"] = kwargs.get("config")
        result = original(*args, **kwargs)
        result.token_masks[:, :, :2] = 0.0  # the two left columns: background
        result.image_masks[:, :, :32] = False
        return result

    monkeypatch.setattr(core, "masks_from_attention", spy)
    out = run(two, seed=1, background_words=["snow"])
    tokenizer = two.pipeline.tokenizer_2
    snow = tokenizer.convert_tokens_to_ids("▁snow")
    assert seen["background"] == [tokenizer(PROMPT)["input_ids"].index(snow)]
    assert seen["config"].background is True
    assert float(out.masks[0].masks[:, :, :32].sum()) == 0  # no subject owns the background
    with pytest.raises(ValueError, match="background words"):
        run(two, background_words=["castle"])


def test_one_generator_for_a_batch_draws_the_noise_as_diffusers_does(two: FreeFuse) -> None:
    prompts = [PROMPT, "Bob and Alice dancing"]
    ours = run(two, prompt=prompts, method="merge", generator=torch.Generator().manual_seed(3)).images
    two.pipeline.set_adapters(["alice", "bob"])
    theirs = two.pipeline(
        prompts, generator=torch.Generator().manual_seed(3), output_type="pt", guidance_scale=3.5, **SMALL
    ).images
    assert all(torch.equal(a, b) for a, b in zip(ours, theirs, strict=True))


def test_with_true_cfg_stage_one_reads_the_prompts_pass_not_the_negative_one(
    two: FreeFuse, monkeypatch
) -> None:
    from freefuse import core

    seen = []
    original = core.masks_from_attention

    def spy(q_text, *args, **kwargs):
        seen.append(q_text.clone())
        return original(q_text, *args, **kwargs)

    monkeypatch.setattr(core, "masks_from_attention", spy)
    run(two, seed=2, mask_step=1)
    run(two, seed=2, mask_step=1, negative_prompt="dark photo", true_cfg_scale=2.0)
    assert torch.equal(seen[0], seen[1])  # step 1 is the same run up to the guidance


@pytest.mark.parametrize("mask_method", ["text-to-image", "image-to-text", "combined", "routing"])
def test_every_mask_method_runs_end_to_end_and_is_recorded(two: FreeFuse, mask_method: str) -> None:
    out = run(two, seed=1, mask_config={"method": mask_method, "background": mask_method == "routing"})
    masks = out.masks[0]
    assert masks.names == ["alice", "bob"]
    assert float(masks.masks.sum(dim=0).max()) <= 1.0
    assert out.manifest["settings"]["mask_config"]["method"] == mask_method


def test_several_blocks_and_steps_are_read_and_averaged(two: FreeFuse, monkeypatch) -> None:
    from freefuse import core

    seen = []
    original = core.masks_from_attention

    def spy(q_text, q_img, *args, **kwargs):
        seen.append(q_img.shape[0])
        return original(q_text, q_img, *args, **kwargs)

    monkeypatch.setattr(core, "masks_from_attention", spy)
    out = run(two, seed=1, mask_step=3, capture_steps=2, block=[0, 1])
    assert seen == [4]  # 2 steps x 2 blocks, one call
    assert out.manifest["settings"]["block"] == [0, 1] and out.manifest["settings"]["capture_steps"] == 2
    with pytest.raises(ValueError, match="capture_steps"):
        run(two, mask_step=1, capture_steps=2)


def test_the_callers_adapter_state_is_back_after_a_run_and_weights_can_change() -> None:
    pipe = tiny_flux_pipeline(seed=0)
    pipe.set_progress_bar_config(disable=True)
    for index, name in enumerate(("alice", "bob", "other")):
        random_lora(pipe, name, seed=index + 1)
    pipe.set_adapters(["alice", "other"], adapter_weights=[0.5, 0.25])

    def state():
        layer = pipe.transformer.transformer_blocks[0].attn.to_q
        grads = {name: p.requires_grad for name, p in layer.named_parameters()}
        return list(layer.active_adapters), dict(layer.scaling), grads

    def plain():
        return pipe(
            PROMPT, generator=torch.Generator().manual_seed(1), output_type="pt", guidance_scale=3.5, **SMALL
        ).images[0]

    before, image_before = state(), plain()
    freefuse = FreeFuse(pipe)
    freefuse.use_adapter("alice", words=["Alice"])
    freefuse.use_adapter("bob", words=["Bob"])
    first = run(freefuse, seed=1)
    assert state() == before
    assert torch.equal(plain(), image_before)

    def boom(ff, step_index, timestep, tensors):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        run(freefuse, seed=1, callback_on_step_end=boom)
    assert state() == before

    freefuse.set_weight("bob", 0.3)
    assert freefuse.subjects["bob"].weight == 0.3
    assert (run(freefuse, seed=1).images[0] - first.images[0]).abs().max() > 1e-3
    assert state() == before
    with pytest.raises(ValueError, match="No LoRA named"):
        freefuse.set_weight("carol", 1.0)


def test_an_empty_user_mask_is_said(two: FreeFuse) -> None:
    masks = MaskSet(["alice", "bob"], torch.stack([torch.ones(128, 128), torch.zeros(128, 128)]))
    out = run(two, method="masks", masks=masks)
    assert any("'bob' covers no image token" in note for note in out.manifest["images"][0]["fallbacks"])


def test_user_masks_from_the_mask_step_act_only_after_it(two: FreeFuse) -> None:
    """`user_masks_from="mask-step"`: the caller's masks act as FreeFuse's do, after the mask step;
    every LoRA acts everywhere before (ground-truth masks compared with FreeFuse on equal terms)."""
    halves = torch.zeros(2, 128, 128)
    halves[0, :, :64], halves[1, :, 64:] = 1.0, 1.0
    masks = MaskSet(["alice", "bob"], halves)
    merge = run(two, method="merge")
    never = run(two, method="masks", masks=masks, user_masks_from="mask-step", mask_step=SMALL["num_inference_steps"])
    assert torch.allclose(never.images[0], merge.images[0], atol=1e-5)  # masks from after the last step: merge
    late = run(two, method="masks", masks=masks, user_masks_from="mask-step", mask_step=3)
    early = run(two, method="masks", masks=masks)
    assert (late.images[0] - early.images[0]).abs().max() > 1e-3 and (late.images[0] - merge.images[0]).abs().max() > 1e-3
    assert late.manifest["settings"]["user_masks_from"] == "mask-step"
    with pytest.raises(ValueError, match="only applies to method 'masks'"):
        run(two, method="freefuse", user_masks_from="mask-step")
