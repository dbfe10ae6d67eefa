"""Masked LoRAs over quantized bases: GGUF, bitsandbytes NF4 and int8, torchao int8, fp8 storage.

Each base is the tiny FLUX model with its linear layers as loading that kind of model leaves them
(`freefuse.testing.quantize_denoiser`), two LoRAs on every linear layer loaded on top. On each:
the fused op takes the quantized layers and gives PEFT's own path's images; all-ones masks give
the same quantized model's `merge`; a zero mask removes that LoRA; each LoRA acts only inside its
mask, read back from a layer's real input and output; the model is as before after a run and
after an error. Kinds whose package is missing are skipped (`pip install 'freefuse[quant]'`).
"""

from __future__ import annotations

import importlib.util
import warnings

import pytest
import torch

from freefuse import FreeFuse, FreeFuseWarning, MaskSet
from freefuse.masking import _fusable
from freefuse.testing import (
    ALL_LINEAR,
    QUANTIZED_BASE_PACKAGES,
    QUANTIZED_BASES,
    quantize_denoiser,
    tiny_flux_pipeline,
    typical_lora_state_dict,
)

SIZE = 128  # an 8 x 8 token grid (16 pixels a token)
RUN = {"height": SIZE, "width": SIZE, "num_inference_steps": 3, "max_sequence_length": 16}
NAMES = ("alice", "bob")
RANKS = (4, 3)
TOLERANCE = 2e-5  # the fused op and PEFT's path differ in summation order only


def package_of(kind: str) -> str | None:
    return QUANTIZED_BASE_PACKAGES.get(kind.split("-")[0] if kind.startswith("gguf") else kind)


def with_package(kinds):
    """Each kind as a parameter, skipped with the reason when its package is not installed."""
    for kind in kinds:
        package = package_of(kind)
        missing = package is not None and importlib.util.find_spec(package) is None
        yield pytest.param(
            kind, marks=pytest.mark.skipif(missing, reason=f"{kind} needs `{package}` (pip install 'freefuse[quant]')")
        )


def build(kind: str | None) -> FreeFuse:
    """The tiny model quantized as `kind` (None: not), with two LoRAs on every linear layer made
    before quantizing."""
    pipe = tiny_flux_pipeline(seed=0)
    pipe.set_progress_bar_config(disable=True)
    states = [
        typical_lora_state_dict(pipe, rank=rank, seed=index + 1, scale=0.5, targets=ALL_LINEAR)
        for index, rank in enumerate(RANKS)
    ]
    if kind is not None:
        quantize_denoiser(pipe, kind)
    freefuse = FreeFuse(pipe)
    for name, state in zip(NAMES, states, strict=True):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pipe.load_lora_weights({key: value.clone() for key, value in state.items()}, adapter_name=name)
        freefuse.use_adapter(name, words=[name.capitalize()])
    return freefuse


@pytest.fixture(scope="module", params=list(with_package(QUANTIZED_BASES)))
def base(request) -> tuple[str, FreeFuse]:
    return request.param, build(request.param)


def images(freefuse: FreeFuse, prompt: str = "Alice and Bob", **settings) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FreeFuseWarning)
        return freefuse(prompt, output_type="pt", progress=False, seed=3, **{**RUN, **settings}).images[0]


def band_masks(left: str, right: str | None) -> MaskSet:
    """`left` owns the left half of the image, `right` (if any) the right half; aligned to tokens."""
    masks = torch.zeros(len(NAMES), SIZE, SIZE)
    masks[NAMES.index(left), :, : SIZE // 2] = 1.0
    if right is not None:
        masks[NAMES.index(right), :, SIZE // 2 :] = 1.0
    return MaskSet(list(NAMES), masks)


def adapted_layers(freefuse: FreeFuse) -> list[tuple[str, torch.nn.Module]]:
    return [
        (name, module)
        for name, module in freefuse.backend.denoiser.named_modules()
        if isinstance(getattr(module, "lora_A", None), torch.nn.ModuleDict) and "alice" in module.lora_A
    ]


def is_quantized(layer: torch.nn.Module) -> bool:
    base_layer = layer.get_base_layer()
    weight = base_layer.weight
    return type(base_layer) is not torch.nn.Linear or type(weight) not in (torch.Tensor, torch.nn.Parameter) or (
        weight.dtype == torch.float8_e4m3fn
    )


def test_the_fused_op_takes_every_quantized_layer(base) -> None:
    kind, freefuse = base
    quantized = [(name, layer) for name, layer in adapted_layers(freefuse) if is_quantized(layer)]
    assert len(quantized) >= 20, f"{kind}: only {len(quantized)} quantized LoRA layers"
    refused = [name for name, layer in quantized if not _fusable(layer, list(NAMES))]
    assert not refused, f"{kind}: the fused op refuses {refused[:3]}"


def test_the_fused_op_gives_peft_images_on_a_quantized_base(base) -> None:
    kind, freefuse = base
    masks = band_masks("alice", "bob")
    fused = images(freefuse, method="masks", masks=masks)
    peft = images(freefuse, method="masks", masks=masks, lora_op="peft")
    assert (fused - peft).abs().max() <= TOLERANCE, kind
    assert (fused - images(freefuse, method="merge")).abs().max() > 1e-3, kind  # the masks did something


def test_all_ones_masks_give_the_quantized_models_merge(base) -> None:
    kind, freefuse = base
    ones = MaskSet(list(NAMES), torch.ones(len(NAMES), SIZE, SIZE))
    masked = images(freefuse, method="masks", masks=ones, text_scope="all")
    assert (masked - images(freefuse, method="merge")).abs().max() <= TOLERANCE, kind


def test_a_zero_mask_removes_that_lora_on_a_quantized_base(base) -> None:
    kind, freefuse = base
    ones_and_zeros = torch.stack([torch.ones(SIZE, SIZE), torch.zeros(SIZE, SIZE)])
    masked = images(freefuse, method="masks", masks=MaskSet(list(NAMES), ones_and_zeros), text_scope="all")
    alice_alone = FreeFuse(freefuse.pipeline)
    alice_alone.use_adapter("alice", words=["Alice"])
    assert (masked - images(alice_alone, "Alice and Bob", method="merge")).abs().max() <= TOLERANCE, kind
    assert (masked - images(freefuse, method="merge")).abs().max() > 1e-3, kind  # Bob's LoRA did act in merge


def test_each_lora_acts_only_inside_its_mask_on_a_quantized_base(base) -> None:
    """Read back from a layer's own input and output: on the left half's image tokens the delta
    over the quantized base layer is Alice's alone, on the right half Bob's alone."""
    kind, freefuse = base
    layer = freefuse.backend.denoiser.transformer_blocks[0].attn.to_q  # sees the 8 x 8 image tokens
    seen = []

    def record(module, inputs, output):
        x = inputs[0]
        deltas = {
            name: module.lora_B[name](module.lora_A[name](x.to(module.lora_A[name].weight.dtype))).float()
            * module.scaling[name]
            for name in NAMES
        }
        seen.append((output.float() - module.base_layer(x).float(), deltas))

    handle = layer.register_forward_hook(record)
    try:
        images(freefuse, method="masks", masks=band_masks("alice", "bob"))
    finally:
        handle.remove()
    left = (torch.arange(64) % 8) < 4
    for delta, own in seen:
        assert own["alice"][:, left].abs().amax() > 1e-3 and own["bob"][:, ~left].abs().amax() > 1e-3
        assert (delta[:, left] - own["alice"][:, left]).abs().amax() <= 1e-4, kind
        assert (delta[:, ~left] - own["bob"][:, ~left]).abs().amax() <= 1e-4, kind


def model_state(freefuse: FreeFuse) -> dict:
    """Everything a run could leave changed: weights (quantized data as stored), instance
    `forward`s, hooks, active adapters and scalings."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    state = {}
    for name, module in freefuse.backend.denoiser.named_modules():
        state[f"{name}:forward"] = module.__dict__.get("forward")
        state[f"{name}:hooks"] = (len(module._forward_hooks), len(module._forward_pre_hooks))
        if isinstance(module, BaseTunerLayer):
            state[f"{name}:adapters"] = (list(module.active_adapters), dict(module.scaling))
    for key, tensor in freefuse.backend.denoiser.state_dict().items():
        tensor = tensor.detach()
        if type(tensor) not in (torch.Tensor, torch.nn.Parameter) and hasattr(tensor, "dequantize"):
            tensor = tensor.dequantize()
        state[key] = tensor.clone()
    return state


def assert_same_state(before: dict, after: dict) -> None:
    assert before.keys() == after.keys()
    for key, value in before.items():
        if isinstance(value, torch.Tensor):
            assert value.dtype == after[key].dtype and torch.equal(value, after[key]), key
        else:
            assert value == after[key], key


def test_a_quantized_model_is_unchanged_after_a_run_and_after_an_error(base) -> None:
    kind, freefuse = base
    before = model_state(freefuse)
    images(freefuse, method="freefuse", mask_step=1)
    assert_same_state(before, model_state(freefuse))

    def fail(freefuse, step, timestep, tensors):
        if step == 1:
            raise RuntimeError("stopped inside stage 2")
        return {}

    with pytest.raises(RuntimeError, match="stopped inside stage 2"):
        images(freefuse, method="freefuse", mask_step=1, callback_on_step_end=fail)
    assert_same_state(before, model_state(freefuse))


# -- fp8 storage: LoRA copies in the compute dtype ------------------------------------------------------


def test_loras_added_to_an_fp8_base_are_made_in_the_compute_dtype() -> None:
    """PEFT makes a LoRA layer in its base layer's dtype, float8 here, unless the base says its
    compute dtype; `store_in_fp8` says it, so a LoRA loaded later is never rounded to float8."""
    freefuse = build("fp8")
    layers = adapted_layers(freefuse)
    assert any(layer.get_base_layer().weight.dtype == torch.float8_e4m3fn for _, layer in layers)
    dtypes = {layer.lora_A[name].weight.dtype for _, layer in layers for name in NAMES}
    assert dtypes == {torch.float32}


def test_lora_layers_stored_in_fp8_run_the_fused_op_in_the_compute_dtype() -> None:
    """LoRA layers cast to fp8 too (layerwise casting applied after loading them, LoRA layers not
    skipped): the concatenated copies are made in the compute dtype, never used in fp8."""
    from diffusers.hooks import apply_layerwise_casting

    from freefuse.masking import LoraMasker

    freefuse = build(None)
    apply_layerwise_casting(
        freefuse.backend.denoiser,
        storage_dtype=torch.float8_e4m3fn,
        compute_dtype=torch.float32,
        skip_modules_pattern=("norm", "pos_embed", "x_embedder", "context_embedder", "time_text_embed", "proj_out"),
    )
    name, layer = next((n, m) for n, m in adapted_layers(freefuse) if n.endswith("attn.to_q"))
    assert layer.lora_A["alice"].weight.dtype == torch.float8_e4m3fn
    masker = LoraMasker(freefuse.backend.denoiser, list(NAMES), freefuse.backend.token_layout)
    plan = masker._plan(name, layer, list(NAMES))
    assert plan.down.dtype == plan.up.dtype == torch.float32
    masks = band_masks("alice", "bob")
    fused = images(freefuse, method="masks", masks=masks)
    assert (fused - images(freefuse, method="masks", masks=masks, lora_op="peft")).abs().max() <= TOLERANCE


def test_the_fused_op_takes_plain_layers_without_bitsandbytes(monkeypatch) -> None:
    """Without bitsandbytes, PEFT's bitsandbytes module fails to import; asking it about a plain
    layer must not (it once broke every fused-op run on a machine without bitsandbytes)."""
    import sys

    import peft.tuners.lora

    freefuse = build(None)
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    monkeypatch.setitem(sys.modules, "peft.tuners.lora.bnb", None)  # importing it raises ImportError
    monkeypatch.delattr(peft.tuners.lora, "bnb", raising=False)
    layers = adapted_layers(freefuse)
    assert layers and all(_fusable(layer, list(NAMES)) for _, layer in layers)
