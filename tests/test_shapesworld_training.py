"""ShapesWorld training pieces: pivotal-tuned LoRAs, the grounding loss, the v3 chain in miniature (seconds)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from freefuse import FreeFuse
from freefuse.shapesworld import train
from freefuse.shapesworld.model import (
    MAX_TEXT_TOKENS,
    MODEL_DIR,
    add_subject_words,
    load_shapesworld,
    tokenizers,
)
from freefuse.shapesworld.scenes import V1, V3
from freefuse.shapesworld.train import (
    GRID,
    TrainConfig,
    grounded_batch,
    grounding_loss,
    train_base,
    train_lora,
    train_vae,
    word_token,
)


def test_a_pivotal_lora_carries_its_trained_word_embedding_and_add_lora_puts_it_in(tmp_path) -> None:
    config = TrainConfig(out=tmp_path, steps=3, batch_size=2, lr=1e-2, warmup=1, checkpoint_every=100)
    path = train_lora(config, MODEL_DIR, "zorblax", rank=2, progress=False)
    state = load_file(str(path))
    vector = state["bundle_emb.zorblax.t5"]
    pipe = load_shapesworld()
    token = word_token(pipe.tokenizer_2, "zorblax")
    table = pipe.text_encoder_2.get_input_embeddings().weight
    original = table[token].detach().clone()
    assert vector.shape == (1, table.shape[1])
    assert not torch.allclose(vector[0], original.float(), atol=1e-3)  # trained, not a copy

    freefuse = FreeFuse(pipe)
    subject = freefuse.add_lora(path)
    assert subject.words == ["zorblax"] and subject.embeddings == ["zorblax/t5"]
    assert torch.allclose(table[token].float(), vector[0], atol=1e-3)
    freefuse.remove("zorblax")
    assert torch.equal(table[token], original)


@pytest.mark.parametrize(("world", "grid"), [(V1, GRID), (V3, 16)], ids=["v1", "v3"])
def test_grounded_batches_mark_each_objects_own_words_and_tokens(world, grid) -> None:
    _, t5 = tokenizers()
    _, captions, words, regions = grounded_batch(0, 3, 6, t5, world=world, grid=grid)
    assert words.shape == (6, 4, MAX_TEXT_TOKENS) and regions.shape == (6, 4, grid * grid)
    for b, caption in enumerate(captions):
        ids = t5(caption)["input_ids"]
        phrases = caption.replace(" and ", ", ").split(", ")
        for k, phrase in enumerate(phrases):
            marked = [t5.convert_ids_to_tokens(ids[t]).lstrip("▁") for t in range(len(ids)) if words[b, k, t]]
            assert marked == phrase.split()[1:], (caption, k, marked)  # its words, without "a"
        assert not words[b, len(phrases) :].any()
    # every region belongs to a captioned object; most objects own image tokens (a small one mostly
    # hidden behind others may own none)
    assert not ((regions.sum(-1) > 0) & (words.sum(-1) == 0)).any()
    assert (regions.sum(-1) > 0).sum() >= 0.8 * (words.sum(-1) > 0).sum()


class FakeTaps:
    """One double block whose queries and keys are given directly (`[B, H, S, D]`)."""

    indices = (0,)

    def __init__(self, q_img, k_img, q_text, k_text) -> None:
        self.tensors = {"q_img": q_img, "k_img": k_img, "q_text": q_text, "k_text": k_text}

    def qk(self, index: int) -> dict[str, torch.Tensor]:
        return self.tensors


def test_the_grounding_loss_is_low_only_when_attention_lands_on_the_right_object() -> None:
    # Two objects: image tokens 0-3 are object 0, 4-7 object 1; text tokens 1 and 2 are their words.
    n_image, n_text, dim = 8, 4, 2
    words = torch.zeros(1, 4, n_text)
    words[0, 0, 1] = words[0, 1, 2] = 1.0
    regions = torch.zeros(1, 4, n_image)
    regions[0, 0, :4] = regions[0, 1, 4:] = 1.0
    code = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # object 0 → e0, object 1 → e1
    image = torch.cat([code[0].expand(4, dim), code[1].expand(4, dim)]) * 8
    text = torch.zeros(n_text, dim)
    text[1], text[2] = code[0] * 8, code[1] * 8

    def loss(k_text, k_img) -> float:
        taps = FakeTaps(image[None, None], k_img[None, None], text[None, None], k_text[None, None])
        return float(grounding_loss(taps, words, regions))

    right = loss(text, image)
    swapped = loss(text[[0, 2, 1, 3]], image[[4, 5, 6, 7, 0, 1, 2, 3]])
    flat = loss(torch.zeros_like(text), torch.zeros_like(image))
    assert right < 0.05 < flat < swapped


def test_the_grounding_fine_tune_runs_and_saves_a_model_that_loads(tmp_path) -> None:
    from freefuse.shapesworld.train import train_grounding

    config = TrainConfig(out=tmp_path, steps=2, batch_size=2, lr=1e-3, warmup=1, checkpoint_every=100)
    trained = train_grounding(config, MODEL_DIR, progress=False)
    assert not any(hook for m in trained.transformer.modules() for hook in m._forward_hooks.values())
    pipe = load_shapesworld(tmp_path / "model")
    before = load_shapesworld()
    changed = [
        name
        for (name, p), q in zip(
            pipe.transformer.named_parameters(), before.transformer.parameters(), strict=True
        )
        if not torch.equal(p, q)
    ]
    assert changed and not any(module.training for module in (pipe.transformer, pipe.text_encoder_2))


def test_a_pivotal_embedding_can_start_from_an_initializer_word(tmp_path) -> None:
    config = TrainConfig(out=tmp_path, steps=1, batch_size=2, lr=1e-4, warmup=1, checkpoint_every=100)
    path = train_lora(config, MODEL_DIR, "snerk", rank=2, init_word="red", progress=False)
    vector = load_file(str(path))["bundle_emb.snerk.t5"][0]
    pipe = load_shapesworld()
    table = pipe.text_encoder_2.get_input_embeddings().weight.float()
    red, own = table[word_token(pipe.tokenizer_2, "red")], table[word_token(pipe.tokenizer_2, "snerk")]
    assert (vector - red).norm() < 0.1 * (vector - own).norm()  # one small step away from "red"


@pytest.fixture(scope="module")
def v3_vae(tmp_path_factory):
    """A v3 VAE after two steps (its folder): enough to run the later stages."""
    out = tmp_path_factory.mktemp("v3") / "vae"
    train_vae(TrainConfig(out=out, steps=2, batch_size=2, warmup=1, world="v3"), progress=False)
    return out / "vae"


def tiny_v3(out, steps: int = 2, every: int = 100) -> TrainConfig:
    return TrainConfig(out=out, steps=steps, batch_size=2, warmup=1, checkpoint_every=every, world="v3")


def test_the_v3_chain_in_miniature_gives_a_16x16_token_model_and_a_class_noun_lora(tmp_path, v3_vae) -> None:
    pipe = train_base(tiny_v3(tmp_path / "base"), v3_vae, ground_weight=0.1, progress=False)
    assert pipe.vae_scale_factor == 2 and len(pipe.transformer.transformer_blocks) == 3
    assert json.loads((tmp_path / "base" / "config.json").read_text())["extra"]["ground_blocks"] == [1, 2]
    add_subject_words(pipe, world="v3")
    pipe.save_pretrained(tmp_path / "words")
    path = train_lora(
        tiny_v3(tmp_path / "lora"), tmp_path / "words", "snerk", rank=2, init_word="red", progress=False
    )
    model = load_shapesworld(tmp_path / "words")
    subject = FreeFuse(model).add_lora(path)
    assert subject.words == ["snerk star"] and subject.embeddings == ["snerk/t5"]
    with torch.no_grad():
        latents = model(
            "a snerk star and a red circle",
            height=64,
            width=64,
            num_inference_steps=1,
            max_sequence_length=MAX_TEXT_TOKENS,
            output_type="latent",
        ).images
    assert latents.shape[1] == 16 * 16  # image tokens


def test_a_killed_v3_base_run_resumes_to_the_same_weights(tmp_path, v3_vae, monkeypatch) -> None:
    whole = train_base(
        tiny_v3(tmp_path / "whole", steps=4, every=2), v3_vae, ground_weight=0.1, progress=False
    )
    original, calls = train.grounding_loss, []

    def killed_at_step_2(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:  # after the checkpoint at step 2
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(train, "grounding_loss", killed_at_step_2)
    with pytest.raises(KeyboardInterrupt):
        train_base(tiny_v3(tmp_path / "resumed", steps=4, every=2), v3_vae, ground_weight=0.1, progress=False)
    assert json.loads((tmp_path / "resumed" / "checkpoint" / "step.json").read_text()) == {"step": 2}
    monkeypatch.setattr(train, "grounding_loss", original)
    resumed = train_base(
        tiny_v3(tmp_path / "resumed", steps=4, every=2), v3_vae, ground_weight=0.1, progress=False
    )
    for a, b in zip(whole.transformer.parameters(), resumed.transformer.parameters(), strict=True):
        assert torch.equal(a, b)
