"""Trigger-word embeddings bundled in LoRA files (pivotal tuning: OneTrainer's `bundle_emb.*`).

Loaded without them, such a LoRA's trigger word keeps the base model's meaning; `add_lora` puts
each bundled embedding into its text encoder, and `remove` puts the encoders back exactly.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from safetensors.torch import save_file

from freefuse import FreeFuse
from freefuse.lora import LoraFileError, read_lora_file
from freefuse.testing import (
    kohya_sdxl_lora_state_dict,
    random_lora_state_dict,
    tiny_flux_pipeline,
    tiny_sdxl_pipeline,
)

RUN = {"height": 64, "width": 64, "num_inference_steps": 3, "max_sequence_length": 16, "seed": 2}


def encoder_width(pipe, attribute: str) -> int:
    return getattr(pipe, attribute).get_input_embeddings().weight.shape[1]


def write_lora(path, pipe, seed: int, bundles: dict[str, torch.Tensor], metadata: dict | None = None):
    state = random_lora_state_dict(pipe.transformer, rank=4, seed=seed, scale=0.5)
    save_file({**state, **bundles}, str(path), metadata={"format": "pt", **(metadata or {})})
    return path


def one_token_word(tokenizer, words=("snow", "Alice", "Bob", "photo", "red", "a")) -> str:
    for word in words:
        if len(tokenizer(word, add_special_tokens=False)["input_ids"]) == 1:
            return word
    raise AssertionError("no one-token word in the tiny vocabulary")


def encoded(freefuse: FreeFuse, prompt: str) -> torch.Tensor:
    with torch.no_grad():
        return freefuse.backend.encode([prompt], 16).prompt_embeds.clone()


def embedding_row(pipe, tokenizer: str, encoder: str, word: str) -> torch.Tensor:
    ids = getattr(pipe, tokenizer)(word, add_special_tokens=False)["input_ids"]
    assert len(ids) == 1, ids
    return getattr(pipe, encoder).get_input_embeddings().weight[ids[0]].detach().clone()


def test_a_new_placeholder_becomes_a_token_with_the_bundled_vector_and_goes_away_on_remove(tmp_path) -> None:
    pipe = tiny_flux_pipeline(seed=0)
    pipe.set_progress_bar_config(disable=True)
    freefuse = FreeFuse(pipe)
    t5 = torch.randn(1, encoder_width(pipe, "text_encoder_2"), generator=torch.Generator().manual_seed(1))
    clip = torch.randn(1, encoder_width(pipe, "text_encoder"), generator=torch.Generator().manual_seed(2))
    path = write_lora(
        tmp_path / "ohwx.safetensors", pipe, 1, {"bundle_emb.ohwx.t5": t5, "bundle_emb.ohwx.clip_l": clip}
    )
    assert set(read_lora_file(path).embeddings["ohwx"]) == {"t5", "clip_l"}
    sizes = (len(pipe.tokenizer), len(pipe.tokenizer_2))
    before = encoded(freefuse, "ohwx in the snow")

    subject = freefuse.add_lora(path)  # no trigger words in the metadata: the placeholder is the word
    assert subject.words == ["ohwx"] and sorted(subject.embeddings) == ["ohwx/clip_l", "ohwx/t5"]
    assert torch.equal(embedding_row(pipe, "tokenizer_2", "text_encoder_2", "ohwx"), t5[0])
    assert torch.equal(embedding_row(pipe, "tokenizer", "text_encoder", "ohwx"), clip[0])
    assert not torch.allclose(encoded(freefuse, "ohwx in the snow"), before)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = freefuse("ohwx in the snow", method="freefuse", output_type="pt", progress=False, **RUN)
    assert sorted(out.manifest["loras"][0]["bundled_embeddings"]) == ["ohwx/clip_l", "ohwx/t5"]

    freefuse.remove("ohwx")
    assert (len(pipe.tokenizer), len(pipe.tokenizer_2)) == sizes
    assert torch.equal(encoded(freefuse, "ohwx in the snow"), before)


def test_a_word_already_in_the_vocabulary_has_its_row_replaced_and_restored(tmp_path) -> None:
    pipe = tiny_flux_pipeline(seed=0)
    freefuse = FreeFuse(pipe)
    word = one_token_word(pipe.tokenizer_2)
    original = embedding_row(pipe, "tokenizer_2", "text_encoder_2", word)
    vector = torch.randn(1, original.shape[0])
    path = write_lora(tmp_path / "w.safetensors", pipe, 1, {f"bundle_emb.{word}.t5": vector})
    size = len(pipe.tokenizer_2)
    freefuse.add_lora(path, words=[word])
    assert len(pipe.tokenizer_2) == size  # no new token
    assert torch.equal(embedding_row(pipe, "tokenizer_2", "text_encoder_2", word), vector[0])
    freefuse.remove("w")
    assert torch.equal(embedding_row(pipe, "tokenizer_2", "text_encoder_2", word), original)


@pytest.mark.parametrize(
    ("key", "shape", "message"),
    [
        ("bundle_emb.ohwx.t5", (1, 7), "7-wide embedding"),
        ("bundle_emb.ohwx.clip_g", (1, 32), "text encoder 'clip_g'"),
        ("bundle_emb.ohwx.t5", (3, 32), "3 vectors"),
        ("bundle_emb.ohwx.t5_out", (1, 32), "output embedding"),
    ],
)
def test_embeddings_this_model_cannot_take_are_refused_before_the_lora_loads(
    tmp_path, key, shape, message
) -> None:
    pipe = tiny_flux_pipeline(seed=0)
    assert encoder_width(pipe, "text_encoder_2") == 32
    freefuse = FreeFuse(pipe)
    path = write_lora(tmp_path / "bad.safetensors", pipe, 1, {key: torch.randn(*shape)})
    size = len(pipe.tokenizer_2)
    with pytest.raises(LoraFileError, match=message):
        freefuse.add_lora(path, words=["ohwx"])
    assert not getattr(pipe.transformer, "peft_config", {}) and len(pipe.tokenizer_2) == size


def test_two_loras_cannot_define_one_word(tmp_path) -> None:
    pipe = tiny_flux_pipeline(seed=0)
    freefuse = FreeFuse(pipe)
    first = write_lora(tmp_path / "a.safetensors", pipe, 1, {"bundle_emb.ohwx.t5": torch.randn(1, 32)})
    second = write_lora(tmp_path / "b.safetensors", pipe, 2, {"bundle_emb.ohwx.t5": torch.randn(1, 32)})
    freefuse.add_lora(first)
    with pytest.raises(LoraFileError, match="another FreeFuse over this pipeline already set that word"):
        FreeFuse(pipe).add_lora(second)  # another FreeFuse over the same pipeline
    assert sorted(pipe.transformer.peft_config) == ["a"]
    freefuse.remove("a")
    FreeFuse(pipe).add_lora(second)  # free again


def test_a_kohya_sdxl_lora_with_bundled_clip_embeddings_loads(tmp_path) -> None:
    pipe = tiny_sdxl_pipeline(seed=0)
    freefuse = FreeFuse(pipe)
    state = random_lora_state_dict(pipe.unet, rank=4, seed=1, prefix="unet", within="")
    kohya = kohya_sdxl_lora_state_dict(state, pipe.unet)
    bundles = {
        "bundle_emb.ohwx.clip_l": torch.randn(1, encoder_width(pipe, "text_encoder")),
        "bundle_emb.ohwx.clip_g": torch.randn(1, encoder_width(pipe, "text_encoder_2")),
    }
    save_file({**kohya, **bundles}, str(tmp_path / "k.safetensors"))
    subject = freefuse.add_lora(tmp_path / "k.safetensors")
    assert subject.layout.startswith("kohya") and subject.words == ["ohwx"]
    assert torch.equal(
        embedding_row(pipe, "tokenizer_2", "text_encoder_2", "ohwx"), bundles["bundle_emb.ohwx.clip_g"][0]
    )


def test_inspect_shows_the_bundled_embeddings_and_takes_their_word(tmp_path) -> None:
    from freefuse.lora import describe_lora

    pipe = tiny_flux_pipeline(seed=0)
    path = write_lora(tmp_path / "o.safetensors", pipe, 1, {"bundle_emb.ohwx.t5": torch.randn(1, 32)})
    report = describe_lora(path)
    assert report["trigger_words"] == ["ohwx"] and report["trigger_words_from"] == "bundled embeddings"
    assert report["bundled_embeddings"].startswith("ohwx.t5 [1, 32]")
    assert report["layout"] == "diffusers"
    # a dotted placeholder in kohya's form: inspect names the word the loader will use
    dotted = write_lora(
        tmp_path / "d.safetensors", pipe, 2, {"bundle_emb.ms.x.string_to_param.*": torch.randn(1, 32)}
    )
    assert describe_lora(dotted)["trigger_words"] == ["ms.x"] == read_lora_file(dotted).trigger_words
