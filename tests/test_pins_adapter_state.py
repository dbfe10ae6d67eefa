"""The caller's adapter state after a FreeFuse run, on every component, text encoders included.

A run activates its LoRAs with their weights (`set_adapters`, which diffusers applies to the text
encoders too); afterwards every adapted layer of every component must have the caller's active
adapters, scalings, trainability and enabled/disabled state back, and a LoRA the caller left out
or disabled must stay off: a plain diffusers call gives the picture it gave before the run.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from safetensors.torch import save_file

from freefuse import FreeFuse, FreeFuseWarning
from freefuse.testing import kohya_sdxl_lora_state_dict, tiny_sdxl_pipeline, typical_lora_state_dict

PROMPT = "Alice hugging Bob in the snow"
SIZE = 64


def adapter_state(pipe) -> dict:
    """(component, layer) -> what the caller set on it, for every PEFT layer of every component."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    state = {}
    for component_name, component in pipe.components.items():
        if not isinstance(component, torch.nn.Module):
            continue
        for name, module in component.named_modules():
            if isinstance(module, BaseTunerLayer):
                state[(component_name, name)] = (
                    sorted(module.active_adapters),
                    dict(module.scaling),
                    bool(module.disable_adapters),
                    {key: p.requires_grad for key, p in module.named_parameters()},
                )
    return state


@pytest.fixture
def pipe_with_text_encoder_loras(tmp_path):
    """Tiny SDXL with two kohya LoRAs that also adapt both text encoders, added by FreeFuse."""
    pipe = tiny_sdxl_pipeline(seed=0)
    pipe.set_progress_bar_config(disable=True)
    encoders = {"te1": pipe.text_encoder, "te2": pipe.text_encoder_2}
    # Both files first: once a LoRA is loaded, the encoders' linear layers are PEFT layers.
    for index, name in enumerate(("alice", "bob")):
        state = typical_lora_state_dict(pipe, seed=index + 1, scale=0.5)
        save_file(
            kohya_sdxl_lora_state_dict(state, pipe.unet, encoders), str(tmp_path / f"{name}.safetensors")
        )
    freefuse = FreeFuse(pipe)
    for name in ("alice", "bob"):
        freefuse.add_lora(tmp_path / f"{name}.safetensors", name=name, words=[name.capitalize()])
    for component in ("unet", "text_encoder", "text_encoder_2"):
        assert {"alice", "bob"} <= set(getattr(pipe, component).peft_config), component
    return pipe, freefuse


def run(freefuse: FreeFuse, **values):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FreeFuseWarning)
        return freefuse(
            PROMPT, output_type="pt", progress=False, height=SIZE, width=SIZE, num_inference_steps=2, **values
        )


def plain(pipe) -> torch.Tensor:
    """diffusers' own call with whatever adapter state the pipeline has."""
    return pipe(
        PROMPT,
        height=SIZE,
        width=SIZE,
        num_inference_steps=2,
        generator=torch.Generator().manual_seed(1),
        output_type="pt",
    ).images[0]


def test_every_components_adapter_state_is_back_and_a_left_out_lora_stays_off(
    pipe_with_text_encoder_loras,
) -> None:
    pipe, freefuse = pipe_with_text_encoder_loras
    pipe.set_adapters(["alice"], adapter_weights=[0.3])  # bob left out, alice weaker
    before, image_before = adapter_state(pipe), plain(pipe)
    assert any(component.startswith("text_encoder") for component, _ in before)
    assert all(active == ["alice"] for active, *_ in before.values())

    out = run(freefuse, seed=0, mask_config={"method": "image-to-text"})
    assert sorted(entry["name"] for entry in out.manifest["loras"]) == ["alice", "bob"]
    after = adapter_state(pipe)
    changed = [key for key in before if after[key] != before[key]]
    assert not changed, (
        f"{len(changed)} layers changed, e.g. {changed[0]}: {before[changed[0]]} -> {after[changed[0]]}"
    )
    assert torch.equal(plain(pipe), image_before)

    def boom(ff, step_index, timestep, tensors):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        run(freefuse, seed=0, method="merge", callback_on_step_end=boom)
    assert adapter_state(pipe) == before


def test_loras_the_caller_disabled_stay_disabled_after_a_run(pipe_with_text_encoder_loras) -> None:
    pipe, freefuse = pipe_with_text_encoder_loras
    pipe.set_adapters(["alice", "bob"])
    with_loras = plain(pipe)
    pipe.disable_lora()
    before, image_before = adapter_state(pipe), plain(pipe)
    assert all(disabled for _, _, disabled, _ in before.values())
    assert (with_loras - image_before).abs().max() > 1e-3  # disabling shows in the picture

    run(freefuse, seed=0, method="merge")
    assert adapter_state(pipe) == before
    assert torch.equal(plain(pipe), image_before)


def test_a_run_after_disable_lora_applies_its_loras_and_says_so(pipe_with_text_encoder_loras) -> None:
    """Found while pinning: a run after `disable_lora()` applied no LoRA at all, silently."""
    pipe, freefuse = pipe_with_text_encoder_loras
    enabled = run(freefuse, seed=0, method="merge")
    pipe.disable_lora()
    with pytest.warns(FreeFuseWarning, match="disable_lora"):
        disabled = freefuse(
            PROMPT, seed=0, method="merge", output_type="pt", progress=False, height=SIZE, width=SIZE, num_inference_steps=2
        )
    assert torch.equal(enabled.images[0], disabled.images[0])  # the run's LoRAs acted all the same
    assert all(off for _, _, off, _ in adapter_state(pipe).values())  # and are disabled again after
