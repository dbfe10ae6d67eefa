"""Stage 2 pinned layer by layer: which LoRA acts on which token, in every kind of FLUX layer.

The LoRAs here adapt every linear layer of the transformer (attention, MLPs, AdaLN modulation,
embedders), as kohya's and ai-toolkit's full FLUX LoRAs do. `LoraDeltaRecorder` reads back from
each layer's real input and output how much of each adapter's delta acted on each token, without
using FreeFuse's masking code; the expected masks are written here from FLUX's own code:
double-stream blocks keep image and text in separate layers, single-stream blocks see
`[text ‖ image]` in one sequence, and modulation layers see one vector per image.
"""

from __future__ import annotations

import re
import warnings

import pytest
import torch

from freefuse import FreeFuse, FreeFuseWarning, MaskSet
from freefuse import core as freefuse_core
from freefuse.core import MaskResult
from freefuse.testing import ALL_LINEAR, LoraDeltaRecorder, random_lora, tiny_flux_pipeline

SIZE, GRID = 128, (8, 8)  # 16 pixels per token on the tiny model
N_TEXT = 16
SPLIT = 3  # the left subject owns token columns 0..2 (3/8 of the image), the right one 3..7
PROMPT = "Alice hugging Bob in the snow"
NEGATIVE = "dark photo of Bob"  # Bob at another position than in PROMPT, Alice absent
RUN = {"height": SIZE, "width": SIZE, "num_inference_steps": 3, "max_sequence_length": N_TEXT}
NAMES = ("alice", "bob")

# FLUX.1's layers by what their input's token axis holds (FluxTransformer2DModel's forward).
IMAGE_LAYERS = re.compile(
    r"^(x_embedder|proj_out|transformer_blocks\.\d+\.(attn\.(to_q|to_k|to_v|to_out\.0)|ff\.net\.\S+))$"
)
TEXT_LAYERS = re.compile(
    r"^(context_embedder|transformer_blocks\.\d+\.(attn\.(add_q_proj|add_k_proj|add_v_proj|to_add_out)"
    r"|ff_context\.net\.\S+))$"
)
JOINT_LAYERS = re.compile(r"^single_transformer_blocks\.\d+\.(attn\.(to_q|to_k|to_v)|proj_mlp|proj_out)$")
MODULATION_LAYERS = re.compile(
    r"^(time_text_embed\.\S+|norm_out\.linear|transformer_blocks\.\d+\.(norm1|norm1_context)\.linear"
    r"|single_transformer_blocks\.\d+\.norm\.linear)$"
)


def layer_kind(name: str) -> str:
    for kind, pattern in (
        ("image", IMAGE_LAYERS),
        ("text", TEXT_LAYERS),
        ("joint", JOINT_LAYERS),
        ("modulation", MODULATION_LAYERS),
    ):
        if pattern.match(name):
            return kind
    raise AssertionError(f"layer {name!r} is of no known FLUX kind; add it to this test")


@pytest.fixture(scope="module")
def every_layer() -> FreeFuse:
    """Two subject LoRAs on every linear layer of the tiny FLUX."""
    pipe = tiny_flux_pipeline(seed=0)
    pipe.set_progress_bar_config(disable=True)
    for index, name in enumerate(NAMES):
        random_lora(pipe, name, seed=index + 1, targets=ALL_LINEAR, scale=0.5)
    freefuse = FreeFuse(pipe)
    for name in NAMES:
        freefuse.use_adapter(name, words=[name.capitalize()])
    return freefuse


def word_positions(freefuse: FreeFuse, prompt: str, word: str) -> list[int]:
    tokenizer = freefuse.pipeline.tokenizer_2
    ids = tokenizer(prompt)["input_ids"]
    wanted = tokenizer.convert_tokens_to_ids("▁" + word)
    found = [index for index, token in enumerate(ids) if token == wanted]
    assert found, f"{word!r} is not one token of {prompt!r} in the tiny tokenizer"
    return found


def column_grid(owner_of_left: str) -> dict[str, torch.Tensor]:
    """Token-grid masks `[h, w]`: `owner_of_left` owns columns < SPLIT, the other subject the rest."""
    left = torch.zeros(GRID)
    left[:, :SPLIT] = 1.0
    other = next(name for name in NAMES if name != owner_of_left)
    return {owner_of_left: left, other: 1.0 - left}


def as_mask_set(grid_masks: dict[str, torch.Tensor]) -> MaskSet:
    pixels = SIZE // GRID[0]
    return MaskSet(
        list(NAMES),
        torch.stack(
            [grid_masks[name].repeat_interleave(pixels, 0).repeat_interleave(pixels, 1) for name in NAMES]
        ),
    )


def text_masks(freefuse: FreeFuse, prompt: str, scope: str) -> dict[str, torch.Tensor]:
    """`exclude-others`: a LoRA is off on the other subjects' words in this pass's text."""
    masks = {name: torch.ones(N_TEXT) for name in NAMES}
    if scope == "exclude-others":
        for name in NAMES:
            for other in NAMES:
                word = other.capitalize()
                if other != name and word in prompt.split():
                    masks[name][word_positions(freefuse, prompt, word)] = 0.0
    return masks


def expected_for(kind: str, image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """What one adapter's coefficients must be in a layer of `kind`, for one image."""
    if kind == "image":
        return image
    if kind == "text":
        return text
    if kind == "joint":
        return torch.cat([text, image])
    return image.mean()


def check_calls(
    calls, expected: dict[str, dict[str, torch.Tensor]], labels: set[str] | None = None
) -> set[str]:
    """Every recorded call of every layer against `expected[label][adapter]` = {"image", "text"}."""
    kinds = set()
    checked = 0
    for call in calls:
        if labels is not None and call.label not in labels:
            continue
        kind = layer_kind(call.layer)
        kinds.add(kind)
        want_tokens = {"image": GRID[0] * GRID[1], "text": N_TEXT, "joint": N_TEXT + GRID[0] * GRID[1]}
        assert call.tokens == want_tokens.get(kind), (call.layer, call.tokens)
        assert call.fit_error < 1e-4, (call.layer, call.fit_error)
        for adapter, got in call.masks.items():
            masks = expected[call.label][adapter]
            want = expected_for(kind, masks["image"], masks["text"])
            got = got[0]  # one image
            assert got.shape == want.shape, (call.layer, adapter, got.shape)
            assert torch.allclose(got, want, atol=1e-4), (
                f"{call.layer} ({kind}, pass {call.label!r}): adapter {adapter!r} acted with "
                f"{got.tolist()} where {want.tolist()} was expected"
            )
        checked += 1
    assert checked > 0
    return kinds


def run_quietly(freefuse: FreeFuse, prompt: str = PROMPT, **settings):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FreeFuseWarning)
        return freefuse(prompt, output_type="pt", progress=False, **{**RUN, **settings})


@pytest.mark.parametrize("owner_of_left", NAMES)
@pytest.mark.parametrize("text_scope", ["exclude-others", "all"])
@pytest.mark.parametrize("lora_op", ["fused", "peft"])
def test_each_lora_acts_only_inside_its_own_mask_in_every_layer(
    every_layer: FreeFuse, owner_of_left: str, text_scope: str, lora_op: str
) -> None:
    """Left columns give exactly LoRA A's delta, the right ones LoRA B's; swapping masks swaps them."""
    grid_masks = column_grid(owner_of_left)
    text = text_masks(every_layer, PROMPT, text_scope)
    expected = {"": {name: {"image": grid_masks[name].reshape(-1), "text": text[name]} for name in NAMES}}
    recorder = LoraDeltaRecorder(every_layer.pipeline.transformer, list(NAMES))
    with recorder.recording():
        run_quietly(
            every_layer, method="masks", masks=as_mask_set(grid_masks), text_scope=text_scope, lora_op=lora_op
        )
    kinds = check_calls(recorder.calls, expected)
    assert kinds == {"image", "text", "joint", "modulation"}


def test_the_negative_pass_masks_the_negative_prompts_own_words(every_layer: FreeFuse) -> None:
    pipe = every_layer.pipeline
    negative_embeds = pipe.encode_prompt(prompt=NEGATIVE, prompt_2=None, max_sequence_length=N_TEXT)[0]
    grid_masks = column_grid("alice")
    cond_text = text_masks(every_layer, PROMPT, "exclude-others")
    uncond_text = text_masks(every_layer, NEGATIVE, "exclude-others")
    assert not torch.equal(cond_text["alice"], uncond_text["alice"])  # the scene tells them apart
    expected = {
        label: {name: {"image": grid_masks[name].reshape(-1), "text": text[name]} for name in NAMES}
        for label, text in (("cond", cond_text), ("uncond", uncond_text))
    }
    recorder = LoraDeltaRecorder(pipe.transformer, list(NAMES))

    def label_pass(module, args, kwargs):
        is_negative = torch.equal(kwargs["encoder_hidden_states"], negative_embeds)
        recorder.label = "uncond" if is_negative else "cond"

    handle = pipe.transformer.register_forward_pre_hook(label_pass, with_kwargs=True)
    try:
        with recorder.recording():
            run_quietly(
                every_layer,
                method="masks",
                masks=as_mask_set(grid_masks),
                negative_prompt=NEGATIVE,
                true_cfg_scale=2.0,
            )
    finally:
        handle.remove()
    assert {call.label for call in recorder.calls} == {"cond", "uncond"}
    check_calls(recorder.calls, expected)


def fake_stage1(monkeypatch, freefuse: FreeFuse, plan: dict[str, torch.Tensor]) -> list[dict]:
    """Make stage 1's core return `plan` (subject → `[h, w]` token mask, zeros = wins nothing).

    The fake decides which subject a token set belongs to from the prompt's own word positions,
    so a run that hands a subject's mask to another adapter shows up in the layers.
    """
    positions = {name: set(word_positions(freefuse, PROMPT, name.capitalize())) for name in NAMES}
    calls: list[dict] = []

    def masks_from_attention(q_text, q_img, k_img, token_sets, grid, image=None, config=None, **kwargs):
        owners = [next(name for name in NAMES if positions[name] <= set(tokens)) for tokens in token_sets]
        calls.append({"owners": owners, "grid": grid})
        token_masks = torch.stack([plan[name] for name in owners])
        size = kwargs.get("image_size") or grid
        pixels = size[0] // grid[0]
        image_masks = token_masks.repeat_interleave(pixels, 1).repeat_interleave(pixels, 2) > 0.5
        empty = [slot for slot, name in enumerate(owners) if not plan[name].any()]
        return MaskResult(token_masks, image_masks, token_masks, token_masks, None, empty, [])

    monkeypatch.setattr(freefuse_core, "masks_from_attention", masks_from_attention)
    return calls


def step_labels(recorder: LoraDeltaRecorder):
    """A `callback_on_step_end` that labels the recorder's calls with their step (0-based)."""

    def callback(freefuse, step_index, timestep, tensors):
        recorder.label = f"step{step_index + 1}"
        return {}

    recorder.label = "step0"
    return callback


def test_masks_found_by_stage1_go_to_the_lora_whose_words_they_came_from(every_layer, monkeypatch) -> None:
    plan = column_grid("bob")  # bob's words get the left columns
    calls = fake_stage1(monkeypatch, every_layer, plan)
    text = text_masks(every_layer, PROMPT, "exclude-others")
    recorder = LoraDeltaRecorder(every_layer.pipeline.transformer, list(NAMES))
    with recorder.recording(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FreeFuseWarning)
        out = every_layer(
            PROMPT,
            method="freefuse",
            mask_step=1,
            output_type="pt",
            progress=False,
            callback_on_step_end=step_labels(recorder),
            **RUN,
        )
    assert len(calls) == 1
    everywhere = {
        name: {"image": torch.ones(GRID[0] * GRID[1]), "text": torch.ones(N_TEXT)} for name in NAMES
    }
    masked = {name: {"image": plan[name].reshape(-1), "text": text[name]} for name in NAMES}
    check_calls(recorder.calls, {"step0": everywhere}, labels={"step0"})
    check_calls(recorder.calls, {"step1": masked, "step2": masked}, labels={"step1", "step2"})
    # The reported masks are the ones applied.
    for name in NAMES:
        reported = torch.nn.functional.avg_pool2d(out.masks[0][name][None, None], SIZE // GRID[0])[0, 0]
        assert torch.equal(reported, plan[name])


@pytest.mark.parametrize("policy", ["global", "off"])
def test_empty_mask_policy_decides_where_a_lora_that_won_nothing_acts(
    every_layer, monkeypatch, policy
) -> None:
    plan = {"alice": torch.ones(GRID), "bob": torch.zeros(GRID)}  # bob wins no region
    fake_stage1(monkeypatch, every_layer, plan)
    recorder = LoraDeltaRecorder(every_layer.pipeline.transformer, list(NAMES))
    with recorder.recording():
        out = run_quietly(
            every_layer,
            method="freefuse",
            mask_step=1,
            empty_mask=policy,
            text_scope="all",
            callback_on_step_end=step_labels(recorder),
        )
    bob = 1.0 if policy == "global" else 0.0
    after = {
        "alice": {"image": torch.ones(GRID[0] * GRID[1]), "text": torch.ones(N_TEXT)},
        "bob": {"image": torch.full((GRID[0] * GRID[1],), bob), "text": torch.full((N_TEXT,), bob)},
    }
    check_calls(recorder.calls, {"step1": after, "step2": after}, labels={"step1", "step2"})
    merge = run_quietly(every_layer, method="merge").images[0]
    if policy == "global":  # both LoRAs everywhere: the merge image
        assert (out.images[0] - merge).abs().max() <= 1e-5
        assert float(out.masks[0]["bob"].min()) == 1.0
    else:
        assert (out.images[0] - merge).abs().max() > 1e-3
        assert float(out.masks[0]["bob"].max()) == 0.0
    assert any("won no region" in note for note in out.manifest["images"][0]["fallbacks"])


def test_x0_of_the_mask_step_is_the_schedulers_own_step_carried_to_the_end(every_layer) -> None:
    """x0 = x_t - σ_t v; checked against FlowMatchEulerDiscreteScheduler's update, not the formula."""
    latents = []
    run_quietly(
        every_layer,
        method="merge",
        callback_on_step_end=lambda freefuse, step, timestep, tensors: (
            latents.append(tensors["latents"]) or {}
        ),
    )
    sigmas = every_layer.pipeline.scheduler.sigmas  # the run's own schedule, ending at 0
    mask_step = 2  # its capture happens during step index 1: from latents[0] to latents[1]
    x_t, x_next = latents[0], latents[1]
    sigma, sigma_next = float(sigmas[1]), float(sigmas[2])
    # Euler: x_next = x_t + (σ_next - σ) v, so carrying the same v on to σ = 0 gives x0.
    from_scheduler = x_t + (x_next - x_t) * sigma / (sigma - sigma_next)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FreeFuseWarning)
        stage1 = every_layer.generate(
            every_layer_settings(mask_step=mask_step),
            progress=False,
            stop_after_masks=True,
            output_type="latent",
        )
    torch.testing.assert_close(stage1.images[0], from_scheduler[0], atol=1e-4, rtol=1e-4)


def every_layer_settings(**overrides):
    from freefuse.settings import GenerationSettings

    return GenerationSettings(prompt=PROMPT, method="freefuse", **{**RUN, **overrides})
