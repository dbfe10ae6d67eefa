"""Stage 2's attention bias on the tiny FLUX model: where it lands, when it is off, what it leaves behind.

The bias is read back where it takes effect: a recording processor on every attention module sees
the `attention_mask` each call hands to SDPA. What it should be is computed here from the
definition, token by token (`expected_bias`), never with `freefuse.core.bias`.
"""

from __future__ import annotations

import contextlib
import inspect
import warnings

import pytest
import torch

from freefuse import FreeFuse, FreeFuseWarning, MaskSet
from freefuse.backends.sdxl import transformer_block_levels
from freefuse.core import BiasConfig
from freefuse.core.bias import bias_tables
from freefuse.testing import random_lora, tiny_flux_pipeline, tiny_sdxl_pipeline
from freefuse.tokens import find_word

SMALL = {"height": 128, "width": 128, "num_inference_steps": 4, "max_sequence_length": 32}
GRID = (8, 8)  # 128 px / 16 px per token
NAMES = ("alice", "bob", "carol", "dave")
SCALE, POSITIVE = 3.0, 1.5


def make_freefuse(names=("alice", "bob"), global_lora: bool = False) -> FreeFuse:
    pipe = tiny_flux_pipeline(seed=0)
    pipe.set_progress_bar_config(disable=True)
    freefuse = FreeFuse(pipe)
    for index, name in enumerate(names):
        random_lora(pipe, name, seed=index + 1)
        freefuse.use_adapter(name, words=[name.capitalize()])
    if global_lora:
        random_lora(pipe, "style", seed=9)
        freefuse.use_adapter("style", scope="global")
    return freefuse


def run(freefuse: FreeFuse, prompt: str, **settings):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FreeFuseWarning)
        return freefuse(prompt, output_type="pt", progress=False, **{**SMALL, **settings})


def prompt_for(names) -> str:
    return " and ".join(name.capitalize() for name in names) + " in the snow"


def stripes(names, covered: float = 1.0) -> MaskSet:
    """Token-grid masks: subject l owns column band l; the last rows (1 - covered) belong to none."""
    h, w = GRID
    masks = torch.zeros(len(names), h, w)
    bands = torch.linspace(0, w, len(names) + 1).round().long()
    rows = round(h * covered)
    for index in range(len(names)):
        masks[index, :rows, bands[index] : bands[index + 1]] = 1.0
    return MaskSet(list(names), masks)


class Recorder:
    """Stands in for an attention module's processor: keeps every call's `attention_mask`."""

    def __init__(self, inner, log: list, name: str) -> None:
        self.inner, self.log, self.name = inner, log, name

    def __call__(self, attn, *args, **kwargs):
        # The arguments by the inner processor's own names (FLUX.2's parallel attention has no
        # `encoder_hidden_states` before `attention_mask`).
        names = list(inspect.signature(self.inner.__call__).parameters)[1:]
        mask = {**dict(zip(names, args, strict=False)), **kwargs}.get("attention_mask")
        self.log.append((self.name, None if mask is None else mask.detach().clone()))
        return self.inner(attn, *args, **kwargs)


def attention_modules(freefuse: FreeFuse) -> list[tuple[str, torch.nn.Module]]:
    transformer = freefuse.backend.denoiser
    return [(f"transformer_blocks.{i}", b.attn) for i, b in enumerate(transformer.transformer_blocks)] + [
        (f"single_transformer_blocks.{i}", b.attn) for i, b in enumerate(transformer.single_transformer_blocks)
    ]


def recorded_run(freefuse: FreeFuse, prompt: str, modules=None, **settings):
    """The run, and per forward pass the masks every attention got: [{module name: mask or None}]."""
    log: list = []
    modules = modules or attention_modules(freefuse)
    originals = [module.processor for _, module in modules]
    for (name, module), inner in zip(modules, originals, strict=True):
        module.processor = Recorder(inner, log, name)
    try:
        out = run(freefuse, prompt, **settings)
    finally:
        for (_, module), inner in zip(modules, originals, strict=True):
            module.processor = inner
    per_pass = [dict(log[i : i + len(modules)]) for i in range(0, len(log), len(modules))]
    return out, per_pass


def positions(freefuse: FreeFuse, text: str, names, max_length: int = 32) -> dict[str, list[int]]:
    found = {}
    for name in names:
        with contextlib.suppress(ValueError):  # a word the negative prompt lacks
            words = find_word(freefuse.backend.tokenizer, text, name.capitalize(), max_length)
            found[name] = list(words.positions)
    return found


def expected_bias(token_masks: dict[str, torch.Tensor], words: dict[str, list[int]], n_text: int,
                  scale: float, positive: float, bidirectional: bool) -> torch.Tensor:
    """`[T + N, T + N]` from the definition, one (query, key) pair at a time; subjects with no region
    of their own (none of the image, or all of it) are left out, and fewer than two means no bias."""
    chosen = [n for n, m in token_masks.items() if bool(m.any()) and not bool((m >= 1).all())]
    n_image = next(iter(token_masks.values())).numel()
    bias = torch.zeros(n_text + n_image, n_text + n_image)
    if len(chosen) < 2:
        return bias
    owner = {t: name for name in chosen for t in words.get(name, [])}
    for name in chosen:
        mask = token_masks[name].reshape(-1)
        for i in range(n_image):
            for t, who in owner.items():
                bias[n_text + i, t] += positive * mask[i] if who == name else -scale * mask[i]
        if bidirectional:
            for t in words.get(name, []):
                for j in range(n_image):
                    bias[t, n_text + j] += positive * mask[j] - scale * (1 - mask[j])
    return bias


# -- the pure tables ----------------------------------------------------------------------------------


def test_bias_tables_follow_the_definition_pair_by_pair() -> None:
    generator = torch.Generator().manual_seed(0)
    regions = torch.rand(2, 12, 3, generator=generator)  # soft, overlapping masks
    words = torch.zeros(2, 7, 3)
    words[0, [1, 2], 0] = words[0, 4, 1] = words[0, 6, 2] = 1
    words[1, 0, 2] = words[1, 3, 1] = 1
    image_to_text, text_to_image = bias_tables(regions, words, SCALE, POSITIVE, bidirectional=True)
    for b in range(2):
        masks = {str(slot): regions[b, :, slot] for slot in range(3)}
        found = {str(slot): words[b, :, slot].nonzero().flatten().tolist() for slot in range(3)}
        # every subject counts here (soft masks are neither empty nor full)
        full = expected_bias(masks, found, 7, SCALE, POSITIVE, True)
        torch.testing.assert_close(image_to_text[b], full[7:, :7])
        torch.testing.assert_close(text_to_image[b], full[:7, 7:])
    assert bias_tables(regions, words, SCALE, POSITIVE, bidirectional=False)[1] is None


# -- scale 0: today's images -------------------------------------------------------------------------


def test_scale_zero_gives_todays_images_bit_for_bit(monkeypatch) -> None:
    freefuse = make_freefuse()
    prompt = prompt_for(("alice", "bob"))
    hooks_seen = []

    def count_hooks(ff, step, timestep, tensors):
        hooks_seen.append(sum(len(m._forward_pre_hooks) for _, m in attention_modules(ff)))
        return {}

    off = run(freefuse, prompt, seed=1, attention_bias=0, attention_bias_positive=2.0, callback_on_step_end=count_hooks)
    default = run(freefuse, prompt, seed=1)

    # Today's code path: no bias machinery in the run at all.
    import freefuse.pipeline as pipeline_module

    class NoBias:
        def __init__(self, sites) -> None:
            assert not sites

        def installed(self):
            return contextlib.nullcontext(self)

        def set_pass(self, bias) -> None:
            assert bias is None

    monkeypatch.setattr(pipeline_module, "AttentionBiaser", NoBias)
    today = run(freefuse, prompt, seed=1, attention_bias=0)
    assert torch.equal(off.images[0], today.images[0])
    assert torch.equal(default.images[0], today.images[0])  # FLUX's default is off (docs/shapesworld.md)
    assert hooks_seen == [0] * SMALL["num_inference_steps"]
    assert off.manifest["settings"]["attention_bias"] == 0.0
    monkeypatch.undo()
    on = run(freefuse, prompt, seed=1, attention_bias=5)
    assert (on.images[0] - today.images[0]).abs().max() > 1e-4  # the bias does change the image


# -- where it lands ------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("n_subjects", [2, 3, 4])
def test_bias_lands_on_the_right_pairs_in_every_block_and_both_cfg_passes(n_subjects: int) -> None:
    names = NAMES[:n_subjects]
    freefuse = make_freefuse(names)
    prompt = prompt_for(names)
    negative = f"{names[-1].capitalize()} and {names[0].capitalize()}, blurry"  # its own word positions
    masks = stripes(names, covered=0.75)  # the last rows belong to no subject: a background
    out, passes = recorded_run(
        freefuse, prompt, method="masks", masks=masks, seed=0, negative_prompt=negative, true_cfg_scale=2.0,
        attention_bias=SCALE, attention_bias_positive=POSITIVE,
    )
    assert len(passes) == 2 * SMALL["num_inference_steps"]
    token_masks = {name: masks[name] for name in names}  # already on the token grid
    n_text = SMALL["max_sequence_length"]
    for index, per_block in enumerate(passes):
        text = prompt if index % 2 == 0 else negative
        want = expected_bias(token_masks, positions(freefuse, text, names), n_text, SCALE, POSITIVE, True)
        assert want.abs().max() > 0
        for block, mask in per_block.items():
            assert mask is not None, f"pass {index}, {block}: no bias"
            assert mask.shape == (1, 1, n_text + 64, n_text + 64)
            torch.testing.assert_close(mask[0, 0], want, msg=f"pass {index}, {block}")


@pytest.mark.parametrize(
    ("blocks", "biased"),
    [
        ("double-stream", {"transformer_blocks.0", "transformer_blocks.1"}),
        ("single-stream", {"single_transformer_blocks.0", "single_transformer_blocks.1"}),
        ("last-half", {"single_transformer_blocks.0", "single_transformer_blocks.1"}),
    ],
)
def test_only_the_chosen_blocks_are_biased(blocks: str, biased: set[str]) -> None:
    freefuse = make_freefuse()
    _, passes = recorded_run(
        freefuse, prompt_for(("alice", "bob")), method="masks", masks=stripes(("alice", "bob")),
        attention_bias=SCALE, attention_bias_blocks=blocks, attention_bias_bidirectional=False,
        num_inference_steps=2,
    )
    for per_block in passes:
        assert {name for name, mask in per_block.items() if mask is not None} == biased
        for name in biased:  # one way: the text rows carry nothing
            assert not per_block[name][0, 0, :32].any() and per_block[name][0, 0, 32:, :32].any()


@pytest.mark.slow
@pytest.mark.parametrize("mask_method", ["text-to-image", "image-to-text", "combined", "routing"])
def test_every_mask_method_gets_its_own_masks_bias_from_the_step_after_the_mask_step(mask_method: str) -> None:
    names = ("alice", "bob", "carol")
    freefuse = make_freefuse(names, global_lora=True)  # the global LoRA gets no bias
    prompt = prompt_for(names)
    out, passes = recorded_run(
        freefuse, prompt, seed=3, mask_step=2, mask_config={"method": mask_method},
        attention_bias=SCALE, attention_bias_positive=POSITIVE,
    )
    assert len(passes) == SMALL["num_inference_steps"]
    assert all(mask is None for step in passes[:2] for mask in step.values())  # no masks yet
    token_masks = {name: out.masks[0][name][None] for name in names}
    token_masks = {name: MaskSet([name], mask).to_token_grid(GRID)[0] for name, mask in token_masks.items()}
    want = expected_bias(token_masks, positions(freefuse, prompt, names), 32, SCALE, POSITIVE, True)
    assert want.any()  # seed 3: at least two subjects have a region of their own with every method
    background = (sum(token_masks.values()) == 0).reshape(-1)
    assert mask_method != "routing" or background.any()  # routing's background channel took some tokens
    for per_block in passes[2:]:
        for block, mask in per_block.items():
            torch.testing.assert_close(mask[0, 0], want, atol=1e-5, rtol=1e-5, msg=block)
            assert not mask[0, 0, 32:][background].any()  # background tokens are pulled by no subject's words


@pytest.mark.parametrize("case", ["one subject", "the other subject's mask is the whole image"])
def test_one_subject_gets_no_bias(case: str) -> None:
    names = ("alice",) if case == "one subject" else ("alice", "bob")
    freefuse = make_freefuse(names, global_lora=True)
    prompt = prompt_for(names)
    half = torch.cat([torch.ones(8, 4), torch.zeros(8, 4)], dim=1)
    half = MaskSet(list(names), torch.stack([half, torch.ones(8, 8)][: len(names)]))
    out, passes = recorded_run(freefuse, prompt, method="masks", masks=half, seed=2, attention_bias=5)
    assert all(mask is None for step in passes for mask in step.values())
    without = run(freefuse, prompt, method="masks", masks=half, seed=2, attention_bias=0)
    assert torch.equal(out.images[0], without.images[0])


def test_hooks_are_gone_and_processors_the_same_after_an_error_mid_run() -> None:
    freefuse = make_freefuse()
    prompt = prompt_for(("alice", "bob"))
    modules = attention_modules(freefuse)
    processors = [module.processor for _, module in modules]
    seen = []

    def fail_at_step_2(ff, step, timestep, tensors):
        seen.append(sum(len(m._forward_pre_hooks) for _, m in modules))
        if step == 2:
            raise RuntimeError("stop here")
        return {}

    settings = {"method": "masks", "masks": stripes(("alice", "bob")), "seed": 4, "attention_bias": 5}
    with pytest.raises(RuntimeError, match="stop here"):
        run(freefuse, prompt, callback_on_step_end=fail_at_step_2, **settings)
    assert seen[0] == len(modules)  # the bias was in every attention during the run
    assert all(len(module._forward_pre_hooks) == 0 for _, module in modules)
    assert [module.processor for _, module in modules] == processors
    after = run(freefuse, prompt, **{**settings, "attention_bias": 0})
    fresh = run(make_freefuse(), prompt, **{**settings, "attention_bias": 0})
    assert torch.equal(after.images[0], fresh.images[0])


def test_bias_config_refuses_what_it_cannot_be() -> None:
    with pytest.raises(ValueError, match="scale"):
        BiasConfig(scale=-1.0)
    with pytest.raises(ValueError, match="blocks"):
        BiasConfig(scale=1.0, blocks="middle")
    assert not BiasConfig(scale=0.0, positive=3.0).active
    assert not BiasConfig(scale=2.0, blocks="none").active


@pytest.mark.slow
def test_sdxl_gets_the_image_to_text_half_in_every_cross_attention_at_every_unet_level() -> None:
    """A UNet with cross-attention at the mask grid (8x8 at 128²) and at twice it (16x16): each
    `attn2` call gets `[B, N, 77]` at its own level, the regions repeated up; both CFG passes."""
    pipe = tiny_sdxl_pipeline(
        seed=0,
        unet_config={
            "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        },
    )
    pipe.set_progress_bar_config(disable=True)
    freefuse = FreeFuse(pipe)
    names = ("alice", "bob")
    for index, name in enumerate(names):
        random_lora(pipe, name, seed=index + 1)
        freefuse.use_adapter(name, words=[name.capitalize()])
    grid = freefuse.backend.grid(128, 128)
    masks = stripes(names)
    assert masks.size == grid == GRID
    modules = [(f"{name}.attn2", pipe.unet.get_submodule(name).attn2) for name, _ in transformer_block_levels(pipe.unet)]
    prompt, negative = prompt_for(names), "Bob, blurry"
    out, passes = recorded_run(
        freefuse, prompt, modules=modules, method="masks", masks=masks, seed=0, negative_prompt=negative,
        attention_bias=SCALE, attention_bias_positive=POSITIVE, attention_bias_bidirectional=False,
        num_inference_steps=2,
    )
    assert len(passes) == 4
    sides = set()
    for index, per_block in enumerate(passes):
        text = prompt if index % 2 == 0 else negative
        found = positions(freefuse, text, names, max_length=77)
        for block, mask in per_block.items():
            side = int(round((mask.shape[1] / 64) ** 0.5))
            sides.add(side)
            level = {n: masks[n].repeat_interleave(side, 0).repeat_interleave(side, 1) for n in names}
            want = expected_bias(level, found, 77, SCALE, POSITIVE, False)
            assert mask.shape == (1, 64 * side * side, 77)
            torch.testing.assert_close(mask[0], want[77:, :77], msg=f"pass {index}, {block}")
    assert sides == {1, 2}


def test_refused_before_loading_where_attention_cannot_take_it() -> None:
    from freefuse.backends import FluxArchitecture, SdxlArchitecture
    from freefuse.errors import FreeFuseError
    from freefuse.preflight import ModelFacts, SubjectFacts, preflight
    from freefuse.settings import GenerationSettings

    subjects = [SubjectFacts("alice", ("Alice",)), SubjectFacts("bob", ("Bob",))]

    def check(architecture, **values):
        settings = GenerationSettings(prompt="Alice and Bob", **values)
        return preflight(ModelFacts(architecture=architecture), settings, subjects)

    with pytest.raises(ValueError, match="text never attends to the image"):
        check(SdxlArchitecture, attention_bias=2.0, attention_bias_bidirectional=True)
    with pytest.raises(ValueError, match=r"sdxl models have \['all', 'last-half', 'none'\]"):
        check(SdxlArchitecture, attention_bias=2.0, attention_bias_blocks="double-stream")
    resolved = check(SdxlArchitecture, attention_bias=2.0).settings
    assert (resolved.attention_bias, resolved.attention_bias_bidirectional) == (2.0, False)

    class NoBias(FluxArchitecture):  # an architecture that offers no bias (the contract's default)
        name = "nobias"
        attention_bias_blocks = ()

    with pytest.raises(ValueError, match="on nobias: FreeFuse does not add an attention bias"):
        check(NoBias, attention_bias=1.0)
    assert check(NoBias, attention_bias=0.0).settings.attention_bias == 0.0
    resolved = check(FluxArchitecture).settings  # the model's defaults, recorded in the manifest
    assert (resolved.attention_bias, resolved.attention_bias_positive) == (0.0, 1.0)
    assert (resolved.attention_bias_bidirectional, resolved.attention_bias_blocks) == (True, "all")
    with pytest.raises(FreeFuseError, match="attention_bias"):
        GenerationSettings(prompt="Alice", attention_bias=-1.0)
    with pytest.raises(FreeFuseError, match="attention_bias_blocks"):
        GenerationSettings(prompt="Alice", attention_bias_blocks="middle")


def test_shapesworld_bias_variants_name_a_method_and_a_scale() -> None:
    from freefuse.shapesworld.evaluate import split_bias

    assert split_bias("freefuse+bias5") == ("freefuse", {"attention_bias": 5.0})
    assert split_bias("freefuse/routing+bias2.5") == ("freefuse/routing", {"attention_bias": 2.5})
    assert split_bias("masks+bias0") == ("masks", {"attention_bias": 0.0})
    assert split_bias("freefuse") == ("freefuse", {})
    for wrong in ("merge+bias2", "freefuse+biasx", "freefuse+bias-1"):
        with pytest.raises(ValueError, match="bias"):
            split_bias(wrong)


@pytest.mark.slow
def test_flux2_klein_gets_the_bias_on_the_right_pairs_in_every_block() -> None:
    """FLUX.2 [klein]: the same joint attention over [text ‖ image] in both kinds of block."""
    from freefuse.testing import TINY_PIPELINES

    pipe = TINY_PIPELINES["flux2"](seed=0)
    pipe.set_progress_bar_config(disable=True)
    freefuse = FreeFuse(pipe)
    names = ("alice", "bob")
    for index, name in enumerate(names):
        random_lora(pipe, name, seed=index + 1)
        freefuse.use_adapter(name, words=[name.capitalize()])
    grid = freefuse.backend.grid(128, 128)
    h, w = grid
    masks = torch.zeros(2, h, w)
    masks[0, :, : 3 * w // 8] = 1
    masks[1, : h // 2, 3 * w // 8 :] = 1  # the rest is no subject's
    masks = MaskSet(list(names), masks)
    prompt = prompt_for(names)
    out, passes = recorded_run(
        freefuse, prompt, method="masks", masks=masks, seed=0, attention_bias=SCALE,
        attention_bias_positive=POSITIVE, num_inference_steps=2,
    )
    n_text = SMALL["max_sequence_length"]
    found = positions(freefuse, prompt, names)
    assert set(found) == set(names)
    want = expected_bias({n: masks[n] for n in names}, found, n_text, SCALE, POSITIVE, True)
    assert len(passes) == 2 and want.any()
    for per_block in passes:
        assert len(per_block) == len(attention_modules(freefuse))
        for block, mask in per_block.items():
            torch.testing.assert_close(mask[0, 0], want, msg=block)


def test_a_caller_mask_is_kept_and_a_positional_one_is_refused() -> None:
    from freefuse.attention_bias import AttentionBiaser, PassBias

    freefuse = make_freefuse()
    site = freefuse.backend.bias_sites("double-stream")[0]
    attn = site.module
    image, text = torch.randn(1, 4, 32), torch.randn(1, 3, 32)
    regions = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 0.0]]])
    words = torch.zeros(1, 3, 2)
    words[0, 0, 0] = words[0, 2, 1] = 1
    biaser = AttentionBiaser([site])
    seen = []
    own = torch.ones(1, 1, 7, 7, dtype=torch.bool)
    own[..., 1] = False  # the caller hides text token 1 from everyone
    with torch.no_grad(), biaser.installed():
        # after the bias's hook: sees what the processor gets
        spy = attn.register_forward_pre_hook(lambda m, a, k: seen.append(k.get("attention_mask")), with_kwargs=True)
        biaser.set_pass(PassBias(regions, words, (2, 2), BiasConfig(scale=SCALE, positive=POSITIVE)))
        attn(hidden_states=image, encoder_hidden_states=text, attention_mask=own)
        with pytest.raises(RuntimeError, match="positional"):
            attn(image, text, own)
        spy.remove()
    got = seen[0][0, 0]
    assert torch.isinf(got[:, 1]).all() and got[:, 1].lt(0).all()
    assert got[3, 0] == POSITIVE and got[3, 2] == -SCALE  # image token 0 (row 3): subject 0's region
