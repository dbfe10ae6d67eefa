"""Error paths that undo work: a failure half-way leaves things exactly as before.

- Bundled embeddings: an install that fails after some rows were replaced and some tokens added
  puts every row and token back; through `add_lora`, the adapter goes too.
- `files.write_all`: a rename that fails after some files are in place removes the new files this
  call placed (and only those), and leaves no temporary file.
"""

from __future__ import annotations

import errno
import os

import pytest
import torch
from safetensors.torch import save_file

import freefuse.files as files_module
from freefuse import FreeFuse
from freefuse.embeddings import install
from freefuse.testing import random_lora_state_dict, tiny_flux_pipeline

SLOTS = {"clip_l": ("tokenizer", "text_encoder"), "t5": ("tokenizer_2", "text_encoder_2")}


def one_token_word(tokenizer) -> str:
    for word in ("snow", "photo", "red", "Alice", "Bob", "a"):
        if len(tokenizer(word, add_special_tokens=False)["input_ids"]) == 1:
            return word
    raise AssertionError("no one-token word in the tiny vocabulary")


def text_state(pipe) -> dict:
    """Everything an install may change: tokenizer sizes and both embedding tables, copied."""
    return {
        "sizes": (len(pipe.tokenizer), len(pipe.tokenizer_2)),
        "clip": pipe.text_encoder.get_input_embeddings().weight.detach().clone(),
        "t5": pipe.text_encoder_2.get_input_embeddings().weight.detach().clone(),
    }


def assert_same_text_state(pipe, before: dict) -> None:
    after = text_state(pipe)
    assert after["sizes"] == before["sizes"]
    for key in ("clip", "t5"):
        assert after[key].shape == before[key].shape, key
        assert torch.equal(after[key], before[key]), key


def embeddings_for(pipe) -> dict[str, dict[str, torch.Tensor]]:
    """A word of the vocabulary (its T5 row replaced), then a new placeholder for both encoders:
    install replaces a row, adds a CLIP token, then adds a T5 token (the call made to fail)."""
    generator = torch.Generator().manual_seed(5)
    clip_width = pipe.text_encoder.get_input_embeddings().weight.shape[1]
    t5_width = pipe.text_encoder_2.get_input_embeddings().weight.shape[1]
    return {
        one_token_word(pipe.tokenizer_2): {"t5": torch.randn(1, t5_width, generator=generator)},
        "ohwx": {
            "clip_l": torch.randn(1, clip_width, generator=generator),
            "t5": torch.randn(1, t5_width, generator=generator),
        },
    }


def fail_on_second_token(pipe, monkeypatch) -> list[str]:
    """`load_textual_inversion` adds the first token, then fails; returns the tokens it was asked for."""
    original = pipe.load_textual_inversion
    asked: list[str] = []

    def flaky(*args, **kwargs):
        asked.append(kwargs["token"])
        if len(asked) == 2:
            raise RuntimeError("embedding load failed")
        return original(*args, **kwargs)

    monkeypatch.setattr(pipe, "load_textual_inversion", flaky)
    return asked


def test_an_install_failing_half_way_puts_every_row_and_token_back(monkeypatch) -> None:
    pipe = tiny_flux_pipeline(seed=0)
    embeddings = embeddings_for(pipe)
    before = text_state(pipe)
    asked = fail_on_second_token(pipe, monkeypatch)
    with pytest.raises(RuntimeError, match="embedding load failed"):
        install(embeddings, SLOTS, pipe)
    assert asked == ["ohwx", "ohwx"]  # one row replaced and one token added before the failure
    assert_same_text_state(pipe, before)
    assert pipe.tokenizer.convert_tokens_to_ids("ohwx") == pipe.tokenizer.unk_token_id


def test_add_lora_whose_embeddings_fail_to_install_leaves_no_adapter_row_or_token(
    tmp_path, monkeypatch
) -> None:
    pipe = tiny_flux_pipeline(seed=0)
    embeddings = embeddings_for(pipe)
    bundles = {
        f"bundle_emb.{word}.{encoder}": vector
        for word, per_encoder in embeddings.items()
        for encoder, vector in per_encoder.items()
    }
    path = tmp_path / "ohwx.safetensors"
    state = random_lora_state_dict(pipe.transformer, rank=4, seed=1, scale=0.5)
    save_file({**state, **bundles}, str(path), metadata={"format": "pt"})
    before = text_state(pipe)
    freefuse = FreeFuse(pipe)
    fail_on_second_token(pipe, monkeypatch)
    with pytest.raises(RuntimeError, match="embedding load failed"):
        freefuse.add_lora(path, words=["ohwx"])
    assert "ohwx" not in (getattr(pipe.transformer, "peft_config", None) or {})
    assert not freefuse.subjects and not pipe.__dict__.get("_freefuse_bundled_words")
    assert_same_text_state(pipe, before)
    monkeypatch.undo()
    subject = freefuse.add_lora(path, words=["ohwx"])  # nothing left in the way
    assert sorted(subject.embeddings) == sorted(
        f"{word}/{encoder}" for word, per_encoder in embeddings.items() for encoder in per_encoder
    )


@pytest.mark.parametrize("failing_rename", [1, 2, 3, 4])
def test_write_all_failing_after_some_renames_leaves_none_of_the_new_files(
    tmp_path, monkeypatch, failing_rename: int
) -> None:
    """Four files, the second already there (replaced with overwrite=True), the manifest last."""
    existing = tmp_path / "image.masks.png"
    existing.write_bytes(b"old")
    files = {
        tmp_path / "image.png": b"image",
        existing: b"new masks",
        tmp_path / "sub" / "image.masks.json": b"{}",
        tmp_path / "image.json": b"manifest",
    }
    real_replace = os.replace
    renames: list[str] = []

    def replace(src, dst):
        renames.append(str(dst))
        if len(renames) == failing_rename:
            raise OSError(errno.EIO, "Input/output error", str(dst))
        return real_replace(src, dst)

    monkeypatch.setattr(files_module.os, "replace", replace)
    with pytest.raises(OSError, match="Input/output error"):
        files_module.write_all(files, overwrite=True)
    monkeypatch.undo()
    assert len(renames) == failing_rename
    for path in files:
        if path != existing:
            assert not path.exists(), f"{path.name} was left after rename {failing_rename} failed"
    assert existing.exists()  # a file that was there before is never removed
    left = sorted(p.name for p in tmp_path.rglob("*") if p.is_file())
    assert left == ["image.masks.png"], left  # no new file, no temporary `.part` file

    # The same files write whole once nothing fails.
    files_module.write_all(files, overwrite=True)
    assert all(path.read_bytes() == data for path, data in files.items())
