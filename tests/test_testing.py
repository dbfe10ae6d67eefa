"""The tiny in-memory builders every other test stands on."""

from __future__ import annotations

import pytest
import torch
from diffusers import FluxPipeline
from safetensors.torch import load_file

from freefuse.testing import random_lora, tiny_clip_tokenizer, tiny_flux_pipeline, tiny_t5_tokenizer


def generate(pipeline, prompt: str = "Alice hugging Bob in the snow", seed: int = 0, **kwargs):
    return pipeline(
        prompt,
        height=kwargs.pop("height", 128),
        width=kwargs.pop("width", 128),
        num_inference_steps=kwargs.pop("num_inference_steps", 3),
        max_sequence_length=32,
        generator=torch.Generator().manual_seed(seed),
        output_type="pt",
        **kwargs,
    ).images


def test_tiny_pipeline_shapes_and_eval_mode(tiny_pipe) -> None:
    transformer = tiny_pipe.transformer
    assert transformer.config.num_layers == 2 and transformer.config.num_single_layers == 2
    assert transformer.config.in_channels == 16
    assert tiny_pipe.vae_scale_factor == 8
    for model in (transformer, tiny_pipe.vae, tiny_pipe.text_encoder, tiny_pipe.text_encoder_2):
        assert not model.training
    image = generate(tiny_pipe, height=128, width=192)
    assert image.shape == (1, 3, 128, 192)
    assert torch.isfinite(image).all()


def test_two_builds_with_one_seed_are_identical_and_other_seeds_differ() -> None:
    first, second, other = tiny_flux_pipeline(seed=3), tiny_flux_pipeline(seed=3), tiny_flux_pipeline(seed=4)
    for a, b in zip(
        first.transformer.state_dict().values(), second.transformer.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b)
    assert not torch.equal(first.transformer.x_embedder.weight, other.transformer.x_embedder.weight)
    for pipe in (first, second):
        pipe.set_progress_bar_config(disable=True)
    assert torch.equal(generate(first), generate(second))


def test_builder_leaves_the_global_random_state_alone() -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    tiny_flux_pipeline(seed=0)
    assert torch.equal(torch.rand(3), expected)


def test_tokenizers_split_known_words_whole_and_spell_unknown_ones() -> None:
    t5 = tiny_t5_tokenizer()
    pieces = t5.convert_ids_to_tokens(t5("Alice hugging Zorblax.")["input_ids"])
    assert pieces[:2] == ["▁Alice", "▁hugging"]
    assert pieces[-1] == "</s>"
    assert len(pieces) > 5  # Zorblax is spelled out in several pieces
    clip = tiny_clip_tokenizer()
    assert clip.convert_ids_to_tokens(clip("Alice hugging")["input_ids"])[1:3] == ["alice</w>", "hugging</w>"]


def test_pipeline_round_trips_through_save_pretrained(tmp_path, tiny_pipe) -> None:
    tiny_pipe.save_pretrained(tmp_path / "model")
    loaded = FluxPipeline.from_pretrained(tmp_path / "model")
    loaded.set_progress_bar_config(disable=True)
    for name in ("transformer", "vae", "text_encoder", "text_encoder_2"):
        saved, restored = getattr(tiny_pipe, name).state_dict(), getattr(loaded, name).state_dict()
        assert saved.keys() == restored.keys()
        assert all(torch.equal(saved[key], restored[key]) for key in saved)
    # Same weights; reloaded tensors may take other kernel paths, so allow float rounding.
    torch.testing.assert_close(generate(loaded), generate(tiny_pipe), atol=1e-5, rtol=0)


def test_random_lora_changes_images_and_file_form_leaves_pipeline_alone(tmp_path) -> None:
    pipe = tiny_flux_pipeline(seed=0)
    pipe.set_progress_bar_config(disable=True)
    before = generate(pipe)
    path = random_lora(pipe, "alice", seed=1, path=tmp_path / "alice.safetensors", metadata={"ss_x": "1"})
    assert torch.equal(generate(pipe), before)
    assert not getattr(pipe.transformer, "peft_config", None)
    state = load_file(path)
    assert all(key.startswith("transformer.") for key in state)
    assert any(".lora_A." in key for key in state) and any(".lora_B." in key for key in state)

    in_memory = random_lora(pipe, "alice", seed=1)
    assert set(in_memory) == set(state)
    assert all(torch.equal(in_memory[key], state[key]) for key in state)
    after = generate(pipe)
    assert (after - before).abs().max() > 0.02


def test_big_models_are_built_directly_in_their_dtype(monkeypatch) -> None:
    """A 12B transformer made in float32 and then cast needs twice the memory on the way."""
    from diffusers import FluxTransformer2DModel

    seen = []
    original = FluxTransformer2DModel.__init__

    def spy(self, *args, **kwargs):
        seen.append(torch.get_default_dtype())
        original(self, *args, **kwargs)

    monkeypatch.setattr(FluxTransformer2DModel, "__init__", spy)
    pipe = tiny_flux_pipeline(seed=0, dtype=torch.bfloat16)
    assert seen == [torch.bfloat16]
    assert torch.get_default_dtype() == torch.float32  # restored
    assert {p.dtype for p in pipe.transformer.parameters()} == {torch.bfloat16}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_random_loras_for_a_model_on_the_gpu(tmp_path) -> None:
    pipe = tiny_flux_pipeline(seed=0, device="cuda")
    path = random_lora(pipe, "alice", seed=1, path=tmp_path / "a.safetensors")
    assert path.is_file()
    random_lora(pipe, "bob", seed=2)
    assert "bob" in pipe.transformer.peft_config
