"""Known before loading, said before loading; and no silent wrong result (round three, classes 3 and 4).

Every case runs the command line against a model folder that fails loudly if it is ever loaded,
so a message that comes only after a model load fails the test.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from freefuse.cli import app
from freefuse.models import load_pipeline
from freefuse.testing import random_lora_state_dict, tiny_flux_pipeline

RUNNER = CliRunner()
FAST = ["--steps", "3", "--size", "64x64", "--max-sequence-length", "32"]


def never_loaded(assets: Path, tmp_path: Path) -> Path:
    """A copy of the tiny model folder that passes every check made before loading and fails if loaded."""
    folder = tmp_path / "never-loaded"
    shutil.copytree(assets / "model", folder)
    weights = folder / "transformer" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")  # valid-looking, no tensors
    return folder


def generate(model: Path, out: Path, loras: list[str], *extra: str, prompt: str = "Alice hugging Bob"):
    lora_args = [arg for spec in loras for arg in ("--lora", spec)]
    args = ["generate", "--model", str(model), *lora_args, "--prompt", prompt, "--out", str(out), *FAST, *extra]
    return RUNNER.invoke(app, args)


def refused(result, *fragments: str) -> None:
    assert result.exit_code == 2, result.output
    for fragment in fragments:
        assert fragment in result.output, result.output


def lora_with(tmp_path: Path, name: str, seed: int, bundles: dict | None = None, metadata=None) -> Path:
    state = random_lora_state_dict(tiny_flux_pipeline(seed=0).transformer, rank=2, seed=seed)
    path = tmp_path / f"{name}.safetensors"
    save_file({**state, **(bundles or {})}, str(path), metadata={"format": "pt", **(metadata or {})})
    return path


# -- class 3: silent wrong results ------------------------------------------------------------------


def test_a_bundled_embedding_for_a_special_token_is_refused(assets, tmp_path) -> None:
    hostile = lora_with(tmp_path, "eos", 5, {"bundle_emb.</s>.t5": torch.randn(1, 32)})
    result = generate(never_loaded(assets, tmp_path), tmp_path / "o", [f"{hostile}=Alice", f"{assets / 'bob.safetensors'}=Bob"])
    refused(result, "'</s>'", "special tokens")


def test_a_background_word_that_is_a_subjects_word_is_refused(assets, tmp_path) -> None:
    loras = [f"{assets / 'alice.safetensors'}=Alice", f"{assets / 'bob.safetensors'}=Bob"]
    result = generate(never_loaded(assets, tmp_path), tmp_path / "o", loras, "--background-word", "bob")
    refused(result, "Background word 'bob'", "LoRA 'bob'")


def test_subjects_whose_words_become_the_same_tokens_are_refused(assets, tmp_path) -> None:
    # Cyrillic is outside the tiny T5's pieces: both names read as <unk>.
    loras = [f"{assets / 'alice.safetensors'}=Жанна", f"{assets / 'bob.safetensors'}=Пётр"]
    result = generate(never_loaded(assets, tmp_path), tmp_path / "o", loras, prompt="Жанна hugging Пётр")
    refused(result, "the same tokens", "'alice'", "'bob'")


def test_a_replay_refuses_a_model_folder_that_changed_since_its_manifest(assets, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path.parent)  # the LoRAs the manifest names lie under the working folder
    model = tmp_path / "model"
    shutil.copytree(assets / "model", model)
    loras = [f"{assets / 'alice.safetensors'}=Alice", f"{assets / 'bob.safetensors'}=Bob"]
    assert generate(model, tmp_path / "first", loras).exit_code == 0
    weights = model / "transformer" / "diffusion_pytorch_model.safetensors"
    state = load_file(str(weights))
    key = next(iter(state))
    state[key] = state[key] + 1.0  # the same file name, other weights (a fine-tune saved over it)
    save_file(state, str(weights), metadata={"format": "pt"})
    monkeypatch.setattr("freefuse.runner.load_pipeline", loud)
    result = RUNNER.invoke(app, ["generate", "--manifest", str(tmp_path / "first" / "freefuse.json"), "--out", str(tmp_path / "r")])
    refused(result, "not the one the manifest recorded", "transformer/diffusion_pytorch_model.safetensors (changed)")
    monkeypatch.setattr("freefuse.runner.load_pipeline", load_pipeline)
    forced = ["generate", "--manifest", str(tmp_path / "first" / "freefuse.json"), "--model", str(model)]
    assert RUNNER.invoke(app, [*forced, "--out", str(tmp_path / "r2")]).exit_code == 0  # asked for: allowed


def test_a_replay_of_a_built_in_model_compares_its_weights(assets, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path.parent)
    loras = [f"{assets / 'alice.safetensors'}=Alice", f"{assets / 'bob.safetensors'}=Bob"]
    assert generate(Path("tiny"), tmp_path / "first", loras).exit_code == 0
    manifest_path = tmp_path / "first" / "freefuse.json"
    manifest = json.loads(manifest_path.read_text())
    assert len(manifest["model"]["base_weights_sha256"]) == 64
    manifest["model"]["base_weights_sha256"] = "0" * 64  # as if recorded on other weights
    manifest_path.write_text(json.dumps(manifest))
    result = RUNNER.invoke(app, ["generate", "--manifest", str(manifest_path), "--out", str(tmp_path / "r")])
    refused(result, "the denoiser's weights (changed)")
    assert not any((tmp_path / "r").iterdir())  # nothing written


# -- class 4: known before loading, said before loading ---------------------------------------------


def test_an_embedding_for_an_encoder_the_model_lacks_is_said_before_loading(assets, tmp_path) -> None:
    bad = lora_with(tmp_path, "g", 6, {"bundle_emb.ohwx.clip_g": torch.randn(1, 32)})
    result = generate(never_loaded(assets, tmp_path), tmp_path / "o", [f"{bad}=Alice", f"{assets / 'bob.safetensors'}=Bob"])
    refused(result, "text encoder 'clip_g'")


def test_two_loras_bundling_one_word_are_said_before_loading(assets, tmp_path) -> None:
    first = lora_with(tmp_path, "one", 7, {"bundle_emb.ohwx.t5": torch.randn(1, 32)})
    second = lora_with(tmp_path, "two", 8, {"bundle_emb.ohwx.t5": torch.randn(1, 32)})
    result = generate(never_loaded(assets, tmp_path), tmp_path / "o", [f"{first}=Alice", f"{second}=Bob"])
    refused(result, "both bundle an embedding for 'ohwx'")


def test_a_lora_without_words_is_said_before_loading(assets, tmp_path) -> None:
    result = generate(never_loaded(assets, tmp_path), tmp_path / "o", [str(assets / "bob.safetensors")])
    refused(result, "LoRA 'bob' has no activation words")


def test_a_tampered_lora_hash_in_a_manifest_is_said_before_loading(assets, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path.parent)
    loras = [f"{assets / 'alice.safetensors'}=Alice", f"{assets / 'bob.safetensors'}=Bob"]
    assert generate(assets / "model", tmp_path / "first", loras).exit_code == 0
    manifest_path = tmp_path / "first" / "freefuse.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["loras"][0]["sha256"] = "f" * 64
    manifest_path.write_text(json.dumps(manifest))
    monkeypatch.setattr("freefuse.runner.load_pipeline", loud)
    result = RUNNER.invoke(app, ["generate", "--manifest", str(manifest_path), "--out", str(tmp_path / "r")])
    refused(result, "has changed since the manifest was written")


def loud(*args, **kwargs):
    raise AssertionError("the model was loaded before the mistake was said")


@pytest.mark.parametrize("placeholder", ["<pad>", "<unk>"])
def test_every_special_token_is_guarded(assets, tmp_path, placeholder) -> None:
    hostile = lora_with(tmp_path, "special", 9, {f"bundle_emb.{placeholder}.t5": torch.randn(1, 32)})
    result = generate(never_loaded(assets, tmp_path), tmp_path / "o", [f"{hostile}=Alice", f"{assets / 'bob.safetensors'}=Bob"])
    refused(result, "special tokens")


def test_a_model_missing_from_the_cache_gets_our_own_words(monkeypatch) -> None:
    """Not diffusers' "root cause in the stacktrace above", which nobody is shown: the cause itself."""
    from diffusers import DiffusionPipeline

    from freefuse.errors import ModelLoadError

    with pytest.raises(ModelLoadError) as offline:
        load_pipeline("nobody-here/not-a-cached-model", device="cpu")  # HF_HUB_OFFLINE=1 (conftest)
    assert "not in the local Hugging Face cache" in str(offline.value)
    assert "HF_HUB_OFFLINE=1" in str(offline.value) and "hf download nobody-here/not-a-cached-model" in str(
        offline.value
    )

    def unreachable(cls, *args, **kwargs):
        try:
            raise ConnectionError("[Errno -2] Name or service not known")
        except ConnectionError as error:
            raise OSError(
                "Cannot load model x: the model is not fully cached locally and an error occurred while trying to "
                "fetch metadata from the Hub. Please check out the root cause in the stacktrace above."
            ) from error

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(DiffusionPipeline, "from_pretrained", classmethod(unreachable))
    with pytest.raises(ModelLoadError) as online:
        load_pipeline("nobody-here/not-a-cached-model", device="cpu")
    message = str(online.value)
    assert "stacktrace" not in message
    assert "could not be fetched from the Hub (ConnectionError: [Errno -2] Name or service not known)" in message


def test_the_text_length_is_the_models_own_by_default() -> None:
    """ShapesWorld reads 24 T5 tokens (its tokenizer says so); past them it draws near-black. A run
    that sets no length gets the model's, on the CLI and the page alike (both go through preflight)."""
    from freefuse.settings import GenerationSettings
    from freefuse.shapesworld.model import MAX_TEXT_TOKENS
    from freefuse.spec import LoraSpec, RunSpec

    lora = Path(__file__).resolve().parent.parent / "src/freefuse/shapesworld/weights/loras/zorblax.safetensors"
    settings = GenerationSettings(prompt="a zorblax", width=64, height=64, num_inference_steps=4)
    spec = RunSpec("shapesworld", [LoraSpec(path=str(lora), words=["zorblax"])], settings)
    assert spec.check().settings.max_sequence_length == MAX_TEXT_TOKENS == 24
    tiny = RunSpec("tiny", [LoraSpec(path=str(lora), words=["zorblax"])], settings)
    assert tiny.check().settings.max_sequence_length == 512  # FLUX.1's, where the model declares no shorter one
    given = settings.model_copy(update={"max_sequence_length": 16})
    assert RunSpec("shapesworld", spec.loras, given).check().settings.max_sequence_length == 16
