"""The fused LoRA op (one op per layer, masks on rank activations) against PEFT's own path.

`lora_op="peft"` runs PEFT's per-adapter forward with a hook scaling each masked adapter's
output: PEFT stays the source of truth for the weights. The fused op must give the same images
(float32, up to summation order) for any number of adapters, ranks, weights, global LoRAs, and
masks with zeros and fractions, and leave the model exactly as it was.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from freefuse import FreeFuse, FreeFuseWarning, MaskSet
from freefuse.testing import ALL_LINEAR, random_lora, tiny_flux_pipeline

SIZE = 128
RUN = {"height": SIZE, "width": SIZE, "num_inference_steps": 3, "max_sequence_length": 16}
NAMES = ("alice", "bob", "carol", "dave")
RANKS = (2, 4, 8, 3)
WEIGHTS = (1.0, 0.7, 1.3, 0.9)


def build(n_subjects: int, with_global: bool) -> FreeFuse:
    pipe = tiny_flux_pipeline(seed=0)
    pipe.set_progress_bar_config(disable=True)
    freefuse = FreeFuse(pipe)
    for index in range(n_subjects):
        name = NAMES[index]
        random_lora(pipe, name, rank=RANKS[index], seed=index + 1, targets=ALL_LINEAR, scale=0.5)
        freefuse.use_adapter(name, words=[name.capitalize()], weight=WEIGHTS[index])
    if with_global:
        random_lora(pipe, "style", rank=5, seed=9, scale=0.5)
        freefuse.use_adapter("style", scope="global", weight=0.6)
    return freefuse


def fractional_masks(names: tuple[str, ...]) -> MaskSet:
    """Vertical bands, one per subject, with soft edges (fractions) and an empty strip (zeros)."""
    masks = torch.zeros(len(names), SIZE, SIZE)
    band = SIZE // (len(names) + 1)
    for index in range(len(names)):
        masks[index, :, index * band : (index + 1) * band] = 1.0
        masks[index, :, (index + 1) * band : (index + 1) * band + 8] = 0.35  # half a token, shared edge
    return MaskSet(list(names), masks.clamp(0, 1))


def images(freefuse: FreeFuse, prompt: str, **settings) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FreeFuseWarning)
        return freefuse(prompt, output_type="pt", progress=False, seed=3, **{**RUN, **settings}).images[0]


@pytest.mark.parametrize("n_subjects", [1, 2, 3, 4])
@pytest.mark.parametrize("with_global", [False, True])
def test_fused_op_gives_the_peft_path_images(n_subjects: int, with_global: bool) -> None:
    freefuse = build(n_subjects, with_global)
    names = NAMES[:n_subjects]
    prompt = " and ".join(name.capitalize() for name in names) + " in the snow"
    masks = fractional_masks(names)
    for extra in ({}, {"text_scope": "all"}, {"negative_prompt": "dark photo of Bob", "true_cfg_scale": 2.0}):
        peft = images(freefuse, prompt, method="masks", masks=masks, lora_op="peft", **extra)
        fused = images(freefuse, prompt, method="masks", masks=masks, lora_op="fused", **extra)
        assert (fused - peft).abs().max() <= 2e-5, extra
    fused = images(freefuse, prompt, method="freefuse", lora_op="fused")
    peft = images(freefuse, prompt, method="freefuse", lora_op="peft")
    assert (fused - peft).abs().max() <= 2e-5


def model_state(pipe) -> tuple[dict, int, list[str]]:
    transformer = pipe.transformer
    state = {key: value.clone() for key, value in transformer.state_dict().items()}
    hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in transformer.modules())
    overridden = [name for name, m in transformer.named_modules() if "forward" in m.__dict__]
    return state, hooks, overridden


def assert_unchanged(before, pipe) -> None:
    state, hooks, overridden = model_state(pipe)
    assert overridden == [] and hooks == before[1]
    assert state.keys() == before[0].keys()
    assert all(torch.equal(state[key], before[0][key]) for key in state)


@pytest.mark.parametrize("lora_op", ["fused", "peft"])
def test_the_model_is_exactly_as_before_after_a_run_and_after_an_error(lora_op: str) -> None:
    freefuse = build(2, with_global=True)
    before = model_state(freefuse.pipeline)
    assert before[2] == []
    images(freefuse, "Alice and Bob", lora_op=lora_op)
    assert_unchanged(before, freefuse.pipeline)

    def fail_at_step_two(ff, step_index, timestep, tensors):
        if step_index == 1:
            raise RuntimeError("stopped mid-run")
        return {}

    with pytest.raises(RuntimeError, match="stopped mid-run"):
        images(freefuse, "Alice and Bob", lora_op=lora_op, callback_on_step_end=fail_at_step_two)
    assert_unchanged(before, freefuse.pipeline)


def test_weights_moved_during_a_run_as_model_offload_does_leave_a_usable_pipeline() -> None:
    """Model CPU offload moves the transformer onto the GPU inside the run; weights made there must
    stay ordinary tensors, so the adapters can be switched back (and trained) afterwards."""
    freefuse = build(2, with_global=False)

    def move_weights(module, args) -> None:  # `.to(device)` as accelerate's offload hook does it
        module._apply(lambda tensor: tensor.clone())

    freefuse.pipeline.transformer.register_forward_pre_hook(move_weights)
    first = images(freefuse, "Alice and Bob")
    second = images(freefuse, "Alice and Bob")
    assert torch.equal(first, second)
    assert not any(p.is_inference() for p in freefuse.pipeline.transformer.parameters())


def assert_fused_equals_peft(pipe) -> None:
    """alice and bob as subjects under fractional masks: the fused op gives PEFT's images."""
    freefuse = FreeFuse(pipe)
    freefuse.use_adapter("alice", words=["Alice"])
    freefuse.use_adapter("bob", words=["Bob"])
    masks = fractional_masks(("alice", "bob"))
    fused = images(freefuse, "Alice and Bob", method="masks", masks=masks, lora_op="fused")
    peft = images(freefuse, "Alice and Bob", method="masks", masks=masks, lora_op="peft")
    assert (fused - peft).abs().max() <= 2e-5


def test_alpha_set_per_layer_is_kept_by_the_fused_op() -> None:
    """kohya files may give each layer its own alpha: same adapter and rank, another scaling."""
    from peft import LoraConfig

    pipe = tiny_flux_pipeline(seed=0)
    pipe.set_progress_bar_config(disable=True)
    for index, name in enumerate(("alice", "bob")):
        config = LoraConfig(
            r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v"], alpha_pattern={"to_k": 12, "to_v": 2}
        )
        config.init_lora_weights = False
        torch.manual_seed(index)
        pipe.transformer.add_adapter(config, adapter_name=name)
    assert_fused_equals_peft(pipe)


def test_layers_the_fused_op_cannot_take_fall_back_to_peft() -> None:
    """A LoRA with a bias on B is not `B(m ⊙ Ax)`-maskable; those layers take PEFT's path."""
    from peft import LoraConfig

    pipe = tiny_flux_pipeline(seed=0)
    pipe.set_progress_bar_config(disable=True)
    random_lora(pipe, "alice", seed=1)
    pipe.transformer.add_adapter(
        LoraConfig(
            r=4, lora_alpha=4, target_modules=["to_q", "to_k"], lora_bias=True, init_lora_weights=False
        ),
        adapter_name="bob",
    )
    assert_fused_equals_peft(pipe)


def test_a_global_dora_lora_runs_beside_masked_subjects() -> None:
    """Global LoRAs are never masked, so one the fused op cannot take (DoRA) runs through PEFT."""
    from peft import LoraConfig

    freefuse = build(2, with_global=False)
    config = LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_v"], use_dora=True)
    config.init_lora_weights = False
    freefuse.pipeline.transformer.add_adapter(config, adapter_name="style")
    freefuse.use_adapter("style", scope="global", weight=0.6)
    masks = fractional_masks(("alice", "bob"))
    fused = images(freefuse, "Alice and Bob", method="masks", masks=masks, lora_op="fused")
    peft = images(freefuse, "Alice and Bob", method="masks", masks=masks, lora_op="peft")
    assert (fused - peft).abs().max() <= 2e-5


def test_offload_without_a_gpu_is_refused_before_loading(tmp_path) -> None:
    """Model CPU offload needs an accelerator; asked for on the CPU it is a clear mistake (exit 2)."""
    from typer.testing import CliRunner

    from freefuse.cli import app

    result = CliRunner().invoke(
        app, ["demo", "--model", "tiny", "--offload", "model", "--device", "cpu", "--out", str(tmp_path)]
    )
    assert result.exit_code == 2 and "there is nothing to offload" in result.output, result.output
    assert not list(tmp_path.iterdir())


# -- on a GPU (skipped elsewhere; run on an H200 through the device tool, see docs/benchmarks.md) -------
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def two_subjects(dtype: torch.dtype = torch.float32) -> FreeFuse:
    """alice and bob (rank 4 and 8) plus a global style LoRA on a CPU pipeline, not yet placed."""
    pipe = tiny_flux_pipeline(seed=0, dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    freefuse = FreeFuse(pipe)
    for index, name in enumerate(("alice", "bob")):
        random_lora(pipe, name, rank=4 * (index + 1), seed=index + 1, targets=ALL_LINEAR, scale=0.5)
        freefuse.use_adapter(name, words=[name.capitalize()])
    random_lora(pipe, "style", rank=5, seed=9, scale=0.5)
    freefuse.use_adapter("style", scope="global", weight=0.6)
    return freefuse


@needs_cuda
def test_fused_op_gives_the_peft_path_images_in_bf16_on_the_gpu() -> None:
    freefuse = two_subjects(torch.bfloat16)
    freefuse.pipeline.to("cuda")
    # Given masks: with method="freefuse", rounding can tip stage 1's argmax to other tokens.
    masks = fractional_masks(("alice", "bob"))
    fused = images(freefuse, "Alice and Bob", method="masks", masks=masks, lora_op="fused").float()
    peft = images(freefuse, "Alice and Bob", method="masks", masks=masks, lora_op="peft").float()
    merge = images(freefuse, "Alice and Bob", method="merge").float()
    gap = (fused - peft).abs()
    print(
        f"bf16 fused vs PEFT: mean {gap.mean():.5f}, max {gap.max():.5f}; masks vs merge: "
        f"mean {(peft - merge).abs().mean():.5f}"
    )
    # bf16 rounding (one ulp at 1.0 is 2^-8), and far below what masking itself changes.
    assert gap.mean() <= 2**-8 and gap.max() <= 2**-3, (gap.mean(), gap.max())
    assert gap.mean() <= 0.1 * (peft - merge).abs().mean()


@needs_cuda
@pytest.mark.parametrize("offload", ["model", "sequential"])
def test_offloaded_pipelines_give_the_images_of_one_on_the_gpu(offload: str) -> None:
    on_gpu = two_subjects()
    on_gpu.pipeline.to("cuda")
    expected = images(on_gpu, "Alice and Bob")
    offloaded = two_subjects()
    if offload == "model":
        offloaded.pipeline.enable_model_cpu_offload(device="cuda")
    else:
        offloaded.pipeline.enable_sequential_cpu_offload(device="cuda")
    got = images(offloaded, "Alice and Bob")
    assert (got.cpu() - expected.cpu()).abs().max() <= 1e-3


def test_weights_offloaded_to_meta_take_the_peft_path_and_are_not_hashed(tiny_pipe) -> None:
    """Sequential CPU offload leaves weights on "meta" between forwards (run end to end only on a
    GPU, above; accelerate's sequential offload does not run on a CPU-only torch here)."""
    from freefuse.manifest import model_record
    from freefuse.masking import _fusable

    random_lora(tiny_pipe, "alice", rank=4, seed=1)
    layer = next(m for m in tiny_pipe.transformer.modules() if hasattr(m, "lora_A") and "alice" in m.lora_A)
    assert _fusable(layer, ["alice"])
    tiny_pipe.transformer.to("meta")
    assert not _fusable(layer, ["alice"])
    record = model_record(tiny_pipe, tiny_pipe.transformer)
    assert record["base_weights_sha256"] is None and "offloaded" in record["base_weights_note"]
