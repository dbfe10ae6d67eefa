"""The backend contract (`freefuse.backends.base.Backend`), checked on every registered backend.

Each backend must come with a tiny pipeline builder in `freefuse.testing.TINY_PIPELINES`. The
checks compare what a backend says about its model (token layouts, grid, shapes, x0) with what
the model really does, so a new architecture that passes them runs in the two-stage pipeline.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from freefuse import FreeFuse, FreeFuseWarning, GenerationSettings, MaskSet
from freefuse.attention_bias import AttentionBiaser, PassBias
from freefuse.backends import BACKENDS, SPATIAL, Backend, backend_for
from freefuse.core import BiasConfig
from freefuse.core.methods import MAP_METHODS
from freefuse.masking import AdapterMask
from freefuse.testing import ALL_LINEAR, TINY_PIPELINES, random_lora

PROMPT = "Alice hugging Bob in the snow"
SIZE = 128
TOKENS = 16
LAYOUT_TOKENS = 24


@pytest.fixture(params=sorted(BACKENDS))
def backend(request) -> Backend:
    name = request.param
    assert name in TINY_PIPELINES, f"backend {name!r} has no tiny pipeline in freefuse.tiny.TINY_PIPELINES"
    pipe = TINY_PIPELINES[name](seed=0)
    pipe.set_progress_bar_config(disable=True)
    return backend_for(pipe)


def hooks(module: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in module.modules())


def settings(**values) -> GenerationSettings:
    return GenerationSettings(prompt=PROMPT, height=SIZE, width=SIZE, **values)


def noise(backend: Backend, seeds: list[int], dtype=torch.float32):
    generators = [torch.Generator().manual_seed(seed) for seed in seeds]
    return backend.prepare_latents(generators, len(seeds), SIZE, SIZE, dtype)


def test_every_backend_is_found_for_its_own_pipeline_only(backend: Backend) -> None:
    assert type(backend_for(backend.pipeline)) is type(backend)
    assert backend.matches(backend.pipeline)
    assert not backend.matches(object())
    assert type(backend.pipeline).__name__ in backend.architecture.pipeline_classes
    assert backend.denoiser is getattr(backend.pipeline, backend.denoiser_name)


def test_model_facts_are_consistent(backend: Backend, tmp_path) -> None:
    assert 0 <= backend.default_block() < backend.num_blocks
    assert backend.architecture.max_sequence_length > 0
    assert backend.grid(SIZE, SIZE) == (SIZE // backend.size_multiple,) * 2
    backend.pipeline.save_pretrained(tmp_path)  # read from configs alone, as before loading
    assert backend.architecture.pixels_per_token(tmp_path) == backend.size_multiple
    assert backend.tokenizer(PROMPT, return_offsets_mapping=True)["offset_mapping"]  # a fast tokenizer


def test_encode_gives_one_row_of_tokens_per_prompt(backend: Backend) -> None:
    with torch.no_grad():
        conditioning = backend.encode([PROMPT, "a cat"], TOKENS)
    assert conditioning.prompt_embeds.shape[:2] == (2, conditioning.num_text_tokens)
    # At most the limit, or padded up to the denoiser's multiple (Z-Image: 32), or every prompt padded
    # to the text encoder's length.
    multiple = backend.sequence_multiple
    assert conditioning.num_text_tokens <= -(-TOKENS // multiple) * multiple or conditioning.num_text_tokens == (
        backend.architecture.max_sequence_length
    )
    if conditioning.text_lengths is not None:  # each prompt's own share of the text axis
        assert len(conditioning.text_lengths) == 2 and max(conditioning.text_lengths) == conditioning.num_text_tokens


def test_noise_of_an_image_depends_only_on_its_own_generator(backend: Backend) -> None:
    alone = noise(backend, [7]).latents
    pair = noise(backend, [3, 7]).latents
    assert torch.equal(pair[1], alone[0])
    assert not torch.equal(pair[0], pair[1])


def test_schedule_ends_at_zero_noise(backend: Backend) -> None:
    timesteps, sigmas = backend.timesteps(6, SIZE, SIZE)
    assert len(timesteps) == 6 and len(sigmas) == 7
    assert float(sigmas[-1]) == 0.0
    assert bool((sigmas[1:] <= sigmas[:-1]).all())


def test_x0_is_where_the_schedulers_last_step_lands(backend: Backend) -> None:
    """From the last noise level the scheduler steps to σ = 0, which is x0 of that prediction."""
    state = noise(backend, [0])
    timesteps, sigmas = backend.timesteps(4, SIZE, SIZE)
    prediction = torch.randn(state.latents.shape, generator=torch.Generator().manual_seed(1))
    latents = state.latents
    for t in timesteps[:-1]:
        latents = backend.step(prediction, t, latents)
    last = backend.step(prediction, timesteps[-1], latents)
    torch.testing.assert_close(backend.predict_x0(latents, prediction, float(sigmas[-2])), last)


def test_capture_gives_queries_keys_and_outputs_of_the_grid_and_leaves_no_hook(backend: Backend) -> None:
    before = hooks(backend.denoiser)
    blocks = sorted({0, backend.default_block()})
    with torch.no_grad():
        conditioning = backend.encode([PROMPT], TOKENS)
        state = noise(backend, [0], conditioning.prompt_embeds.dtype)
        timesteps, _ = backend.timesteps(4, SIZE, SIZE)
        with backend.capture(blocks) as tap:
            backend.predict(state, timesteps[0], conditioning, settings())
    captured = tap.result()
    h, w = backend.grid(SIZE, SIZE)
    batch, captures, heads, n_img, dim = captured.q_img.shape
    assert (batch, captures, n_img) == (1, len(blocks), h * w)
    n_text = conditioning.num_text_tokens
    assert captured.k_text.shape == (1, len(blocks), heads, n_text, dim)
    assert captured.o_img.shape[:3] == (1, len(blocks), n_img)
    # What the backend says it captures is there, and nothing else (methods are refused by it).
    assert {"q_img", "k_text", "o_img"} <= set(backend.architecture.captured)
    for name, shape in (("k_img", captured.q_img.shape), ("q_text", captured.k_text.shape)):
        tensor = getattr(captured, name)
        assert tensor is None if name not in backend.architecture.captured else tensor.shape == shape
    assert hooks(backend.denoiser) == before


def test_the_default_mask_method_reads_only_what_the_backend_captures(backend: Backend) -> None:
    backend.architecture.check_mask_config(settings())
    unreadable = [
        name for name, method in MAP_METHODS.items() if not set(method.needs) <= set(backend.architecture.captured)
    ]
    for name in unreadable:
        with pytest.raises(ValueError, match="does not give|do not give"):
            backend.architecture.check_mask_config(settings(mask_config={"method": name}))


def test_attention_bias_goes_into_attentions_that_take_it_and_leaves_no_hook(backend: Backend) -> None:
    """A backend offers the bias's block choices its model has, each a list of attentions that take
    the `[B, 1, Sq, Sk]` (or `[B, Sq, Sk]`) mask and change their output; or none, and then it is
    refused before loading."""
    architecture = backend.architecture
    architecture.check_attention_bias(settings())  # the default is always allowed
    if not architecture.attention_bias_blocks:
        with pytest.raises(NotImplementedError):
            backend.bias_sites("all")
        with pytest.raises(ValueError, match="attention_bias"):
            architecture.check_attention_bias(settings(attention_bias=1.0))
        return
    modules = set(backend.denoiser.modules())
    for choice in architecture.attention_bias_blocks:
        sites = backend.bias_sites(choice)
        assert all(site.module in modules for site in sites)
        assert bool(sites) == (choice != "none")
    h, w = backend.grid(SIZE, SIZE)
    regions = torch.zeros(1, h * w, 2)
    regions[0, : h * w // 2, 0] = regions[0, h * w // 2 :, 1] = 1
    config = BiasConfig(scale=5.0, positive=1.0, bidirectional=architecture.attention_bias_text_queries)
    biaser = AttentionBiaser(backend.bias_sites("all"))
    before = hooks(backend.denoiser)
    with torch.no_grad():
        conditioning = backend.encode([PROMPT], TOKENS)
        words = torch.zeros(1, conditioning.num_text_tokens, 2)
        words[0, 1, 0] = words[0, 3, 1] = 1
        state = noise(backend, [0], conditioning.prompt_embeds.dtype)
        timestep = backend.timesteps(4, SIZE, SIZE)[0][0]
        plain = backend.predict(state, timestep, conditioning, settings())
        with biaser.installed():
            biaser.set_pass(PassBias(regions, words, (h, w), config))
            biased = backend.predict(state, timestep, conditioning, settings())
    assert hooks(backend.denoiser) == before
    assert biased.shape == plain.shape and (biased - plain).abs().max() > 1e-4


def test_token_layout_of_every_adapted_layer_matches_what_it_sees(backend: Backend) -> None:
    """Every linear layer a full LoRA adapts: its input's token axis has the length its layout says."""
    random_lora(backend.pipeline, "probe", seed=1, targets=ALL_LINEAR)
    seen: dict[str, tuple] = {}
    handles = []
    for name, module in backend.denoiser.named_modules():
        if hasattr(module, "lora_A") and "probe" in module.lora_A:

            def record(module, inputs, output, name=name) -> None:
                seen.setdefault(name, tuple(inputs[0].shape))

            handles.append(module.register_forward_hook(record))
    try:
        with torch.no_grad():
            # A text length that no image grid of the run has, so text and image cannot be mistaken.
            conditioning = backend.encode([PROMPT], LAYOUT_TOKENS)
            state = noise(backend, [0], conditioning.prompt_embeds.dtype)
            timesteps, _ = backend.timesteps(4, SIZE, SIZE)
            backend.predict(state, timesteps[0], conditioning, settings())
    finally:
        for handle in handles:
            handle.remove()
    h, w = backend.grid(SIZE, SIZE)
    # A UNet sees the image at several resolutions: the grid, or halved / doubled some times.
    image_sizes = {(h * 2**k // 2**j, w * 2**k // 2**j) for k in range(4) for j in range(4)}
    n_text = conditioning.num_text_tokens
    assert all(n_text != a * b for a, b in image_sizes)
    assert seen, "the probe LoRA adapted no layer that ran"
    multiple = backend.sequence_multiple
    for name, shape in seen.items():
        layout = backend.token_layout(name)
        if not layout:
            assert len(shape) == 2 and shape[0] == 1, f"{name}: no-token layout but input {shape}"
        elif layout == SPATIAL:
            assert len(shape) == 4 and tuple(shape[2:]) in image_sizes, (name, layout, shape)
        else:
            # A 2-d input with tokens: the batch's tokens one image after the other (here one image).
            tokens = shape[0] if len(shape) == 2 else shape[1]
            n_image = tokens - n_text * layout.count("text")
            assert len(shape) in (2, 3) and layout.count("image") <= 1, (name, layout, shape)
            expected = {a * b for a, b in image_sizes} if "image" in layout else {0}
            if backend.name != "sdxl":
                # A transformer sees the image at one resolution, padded to the backend's multiple.
                expected = {-(-h * w // multiple) * multiple} if "image" in layout else {0}
            assert n_image in expected, (name, layout, shape)
    # A mask on the grid can be put on every adapted layer's output.
    mask = AdapterMask(image=torch.rand(1, h * w), text=torch.rand(1, n_text), grid=(h, w), image_multiple=multiple)
    for name, shape in seen.items():
        layout = backend.token_layout(name)
        out_shape = (*shape[:-1], 5) if layout != SPATIAL else (shape[0], 5, *shape[2:])
        assert mask.for_layout(layout, out_shape).shape[:-1] == (
            tuple(out_shape[:-1]) if layout and layout != SPATIAL else (1,)
        ), (name, layout, out_shape)


def test_decode_and_preview_give_pictures(backend: Backend) -> None:
    state = noise(backend, [0, 1])
    with torch.no_grad():
        images = backend.decode(state.latents, SIZE, SIZE)
        full = backend.preview(state.latents, SIZE, SIZE, "vae")
        cheap = backend.preview(state.latents, SIZE, SIZE, "latent")
    assert images.shape == (2, 3, SIZE, SIZE) and 0 <= float(images.min()) <= float(images.max()) <= 1
    assert full.shape == (2, SIZE, SIZE, 3)
    assert cheap.shape[0] == 2 and cheap.shape[-1] == 3 and np.isfinite(cheap).all()


def test_lora_keys_of_its_own_family_are_accepted(backend: Backend, tmp_path) -> None:
    path = random_lora(backend.pipeline, "probe", seed=1, path=tmp_path / "probe.safetensors")
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        backend.architecture.check_lora_keys(list(handle.keys()), path.name)


@pytest.fixture
def with_two_loras(backend: Backend) -> FreeFuse:
    for index, name in enumerate(("alice", "bob")):
        random_lora(backend.pipeline, name, seed=index + 1, targets=ALL_LINEAR, scale=0.5)
    freefuse = FreeFuse(backend.pipeline)
    for name in ("alice", "bob"):
        freefuse.use_adapter(name, words=[name.capitalize()])
    return freefuse


def run(freefuse: FreeFuse, **values):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FreeFuseWarning)
        return freefuse(
            PROMPT,
            output_type="pt",
            progress=False,
            height=SIZE,
            width=SIZE,
            num_inference_steps=3,
            max_sequence_length=TOKENS,
            **values,
        ).images[0]


def test_all_ones_masks_are_merge_and_a_zero_mask_removes_that_lora(with_two_loras: FreeFuse) -> None:
    merge = run(with_two_loras, method="merge")
    ones = MaskSet(["alice", "bob"], torch.ones(2, SIZE, SIZE))
    assert (run(with_two_loras, method="masks", masks=ones, text_scope="all") - merge).abs().max() <= 1e-5
    bob_off = MaskSet(["alice", "bob"], torch.stack([torch.ones(SIZE, SIZE), torch.zeros(SIZE, SIZE)]))
    masked = run(with_two_loras, method="masks", masks=bob_off, text_scope="all")
    with_two_loras.pipeline.delete_adapters("bob")
    alone = FreeFuse(with_two_loras.pipeline)
    alone.use_adapter("alice", words=["Alice"])
    assert (masked - run(alone, method="merge")).abs().max() <= 1e-5
    assert (masked - merge).abs().max() > 1e-3


def test_freefuse_runs_and_partitions_the_image(with_two_loras: FreeFuse) -> None:
    """With the backend's default mask method: no pixel goes to two subjects; without a background
    channel every pixel goes to one."""
    default = with_two_loras.backend.architecture.default_mask_config
    for background in (None, False):
        config = {**default.to_dict(), "background": background}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FreeFuseWarning)
            out = with_two_loras(
                PROMPT,
                progress=False,
                height=SIZE,
                width=SIZE,
                num_inference_steps=3,
                max_sequence_length=TOKENS,
                mask_config=config,
            )
        masks = out.masks[0]
        assert masks.names == ["alice", "bob"] and masks.size == (SIZE, SIZE)
        coverage = masks.masks.sum(dim=0)
        assert out.manifest["settings"]["mask_config"]["method"] == default.method
        if background is False or not default.with_background:
            assert torch.equal(coverage, torch.ones(SIZE, SIZE))
        else:
            assert bool((coverage <= 1).all()) and bool(coverage.any())


# A 6x8 grid on 16-pixel tokens: 48 image tokens, which a backend that pads to 32 (Z-Image) pads to 64.
READBACK_SIZE = (96, 128)
# Two prompts of different token lengths (Z-Image: different text lengths in one batch).
READBACK_PROMPTS = [PROMPT, "Bob and Alice " + "with a cat in the snow " * 6]
READBACK_TOKENS = 64
SPLIT = 3  # Alice owns token columns 0..2 of 8, Bob the rest


def expected_coefficients(backend, layout, got, image, text, text_lengths):
    """What an adapter's recovered coefficients must be in a layer of `layout`, written from the
    layout alone: `image` `[B, N]` its grid mask, `text` `[B, T]` its text mask, `text_lengths`
    each image's own text tokens. Returns (expected, compared): padding between images of different
    prompt lengths is not compared (no token reads it)."""
    batch, n_image = image.shape
    share = image.mean(dim=1)
    padding = -n_image % backend.sequence_multiple
    image_part = torch.cat([image, share[:, None].expand(-1, padding)], dim=1)
    if not layout:
        return share, torch.ones(batch, dtype=torch.bool)
    if got.ndim == 1:  # no batch axis: each image's tokens, image after image
        pieces = [
            image_part[b] if segment == "image" else text[b, : text_lengths[b]]
            for b in range(batch)
            for segment in layout
        ]
        expected = torch.cat(pieces)
        return expected, torch.ones_like(expected, dtype=torch.bool)
    n_text = got.shape[1] - image_part.shape[1] * layout.count("image")
    rows, compared = [], []
    for b in range(batch):
        parts = [image_part[b] if segment == "image" else text[b, :n_text] for segment in layout]
        rows.append(torch.cat(parts))
        own = [
            torch.ones(image_part.shape[1], dtype=torch.bool)
            if segment == "image"
            else torch.arange(n_text) < text_lengths[b]
            for segment in layout
        ]
        compared.append(torch.cat(own))
    return torch.stack(rows), torch.stack(compared)


@pytest.mark.slow
@pytest.mark.parametrize("text_scope", ["exclude-others", "all"])
def test_each_lora_acts_only_inside_its_own_mask_in_every_layer(backend: Backend, text_scope: str) -> None:
    """Read back from every adapted layer's real input and output (`LoraDeltaRecorder`, none of the
    masking code) how much of each LoRA acted on each token, in a batch of two prompts of different
    lengths at a size whose grid a padding backend pads: LoRA A inside its columns only, B in the
    others, padding image tokens at the subject's share, text as `text_scope` says."""
    from freefuse.testing import LoraDeltaRecorder
    from freefuse.tokens import find_word

    if backend.name == "sdxl":
        pytest.skip("a UNet sees the image at several resolutions: test_sdxl.py reads each level back")
    names = ("alice", "bob")
    for index, name in enumerate(names):
        random_lora(backend.pipeline, name, seed=index + 1, targets=ALL_LINEAR, scale=0.5)
    freefuse = FreeFuse(backend.pipeline)
    for name in names:
        freefuse.use_adapter(name, words=[name.capitalize()])
    height, width = READBACK_SIZE
    h, w = backend.grid(height, width)
    left = torch.zeros(h, w)
    left[:, :SPLIT] = 1.0
    grids = {"alice": left.reshape(1, -1), "bob": 1 - left.reshape(1, -1)}
    pixels = backend.size_multiple
    masks = MaskSet(
        list(names),
        torch.stack([g.reshape(h, w).repeat_interleave(pixels, 0).repeat_interleave(pixels, 1) for g in grids.values()]),
    )
    recorder = LoraDeltaRecorder(backend.denoiser, list(names))
    with recorder.recording(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FreeFuseWarning)
        freefuse(
            READBACK_PROMPTS,
            method="masks",
            masks=masks,
            text_scope=text_scope,
            height=height,
            width=width,
            num_inference_steps=2,
            max_sequence_length=READBACK_TOKENS,
            output_type="pt",
            progress=False,
        )
    with torch.no_grad():
        conditioning = backend.encode(READBACK_PROMPTS, READBACK_TOKENS)
    n_text = conditioning.num_text_tokens
    lengths = conditioning.text_lengths or [n_text] * len(READBACK_PROMPTS)
    text = {name: torch.ones(len(READBACK_PROMPTS), n_text) for name in names}
    if text_scope == "exclude-others":
        for b, prompt in enumerate(READBACK_PROMPTS):
            for name, other in (names, names[::-1]):
                found = find_word(backend.tokenizer, prompt, other.capitalize(), READBACK_TOKENS).positions
                text[name][b, list(found)] = 0.0
    kinds = set()
    for call in recorder.calls:
        assert call.fit_error < 1e-4, (call.layer, call.fit_error)
        layout = backend.token_layout(call.layer)
        for name, got in call.masks.items():
            image = grids[name].expand(len(READBACK_PROMPTS), -1)
            expected, compared = expected_coefficients(backend, layout, got, image, text[name], lengths)
            assert got.shape == expected.shape, (call.layer, layout, tuple(got.shape), tuple(expected.shape))
            compared = compared & ~got.isnan()
            assert bool(compared.any()), call.layer
            torch.testing.assert_close(got[compared], expected[compared].float(), atol=1e-4, rtol=0, msg=call.layer)
        kinds.add((layout, call.masks[names[0]].ndim))
    assert any(len(layout) == 2 for layout, _ in kinds)  # a joint [text ‖ image] layer was read back
