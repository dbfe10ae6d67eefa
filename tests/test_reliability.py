"""Bad input, faults and safety: one clear message, exit code 2 (1 for bugs), no partial output.

Each case of docs/reliability.md has a test here that runs the CLI (and the library where it
differs). The tiny model is saved to a folder so that `--model DIR` behaves like a real model.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file
from typer.testing import CliRunner

from freefuse import FreeFuse, FreeFuseWarning, MaskSet
from freefuse.cli import app
from freefuse.files import atomic_open
from freefuse.lora import LoraFileError, read_lora_file
from freefuse.testing import random_lora, random_lora_state_dict, tiny_flux_pipeline, tiny_t5_tokenizer
from freefuse.tokens import WordNotFoundError, find_word

RUNNER = CliRunner()
FAST = ["--steps", "3", "--size", "64x64", "--max-sequence-length", "32"]


def cli(*args: str):
    return RUNNER.invoke(app, list(args))


def generate_args_list(
    assets: Path,
    out: Path,
    *extra: str,
    loras: list[str] | None = None,
    prompt: str = "Alice hugging Bob",
    model: str | Path | None = None,
) -> list[str]:
    if loras is None:
        loras = [f"{assets / 'alice.safetensors'}=Alice", f"{assets / 'bob.safetensors'}=Bob"]
    lora_args = [arg for spec in loras for arg in ("--lora", spec)]
    model = str(model or assets / "model")
    return ["generate", "--model", model, *lora_args, "--prompt", prompt, "--out", str(out), *FAST, *extra]


def generate(assets: Path, out: Path, *extra: str, **options):
    return cli(*generate_args_list(assets, out, *extra, **options))


def assert_user_error(result, *fragments: str) -> None:
    assert result.exit_code == 2, result.output
    for fragment in fragments:
        assert fragment in result.output, result.output
    assert "Traceback" not in result.output


def assert_nothing_written(out: Path) -> None:
    assert not out.exists() or not any(out.iterdir()), list(out.iterdir())


# -- LoRA files ---------------------------------------------------------------------------------------


def test_lora_missing(assets, tmp_path) -> None:
    result = generate(assets, tmp_path / "o", loras=[f"{tmp_path / 'nope.safetensors'}=Alice"])
    assert_user_error(result, "does not exist")
    assert_nothing_written(tmp_path / "o")


def test_lora_is_a_directory(assets, tmp_path) -> None:
    assert_user_error(generate(assets, tmp_path / "o", loras=[f"{tmp_path}=Alice"]), "is a directory")


def test_lora_for_another_architecture(assets, tmp_path) -> None:
    sdxl = tmp_path / "sdxl.safetensors"
    save_file(
        {
            "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 320),
            "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.zeros(320, 4),
        },
        str(sdxl),
    )
    assert_user_error(generate(assets, tmp_path / "o", loras=[f"{sdxl}=Alice"]), "LoRA for a UNet")
    wide = tmp_path / "wide.safetensors"
    save_file(
        {
            "transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(1, 3072),
            "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": torch.zeros(3072, 1),
        },
        str(wide),
    )
    assert_user_error(
        generate(assets, tmp_path / "o", loras=[f"{wide}=Alice"]),
        "does not fit this model",
        "transformer_blocks.0.attn.to_q",
    )


def test_duplicate_names_and_same_file_twice(assets, tmp_path) -> None:
    (tmp_path / "x").mkdir()
    other = tmp_path / "x" / "alice.safetensors"
    other.write_bytes((assets / "bob.safetensors").read_bytes())
    result = generate(assets, tmp_path / "o", loras=[f"{assets / 'alice.safetensors'}=Alice", f"{other}=Bob"])
    assert_user_error(result, "Two LoRAs get the name 'alice'")
    result = generate(
        assets,
        tmp_path / "o",
        loras=[f"{assets / 'alice.safetensors'}=Alice", f"{assets / 'alice.safetensors'}=Bob"],
    )
    assert_user_error(result, "given twice")


def test_weight_not_a_number(assets, tmp_path) -> None:
    result = generate(assets, tmp_path / "o", loras=[f"{assets / 'alice.safetensors'}=Alice@strong"])
    assert_user_error(result, "'strong' is not a number")


# -- words and prompts ----------------------------------------------------------------------------------


def test_word_absent_lists_the_prompt_tokens(assets, tmp_path) -> None:
    result = generate(assets, tmp_path / "o", prompt="Alice hugging a cat")
    assert_user_error(result, "'Bob' is not in the prompt", "'▁cat'")
    assert_nothing_written(tmp_path / "o")


def test_word_only_inside_another_word(assets, tmp_path) -> None:
    result = generate(
        assets,
        tmp_path / "o",
        prompt="Always hugging Bob",
        loras=[f"{assets / 'alice.safetensors'}=Al", f"{assets / 'bob.safetensors'}=Bob"],
    )
    assert_user_error(result, "'Al' appears only inside other words ('Always')")


def test_word_longer_than_the_token_limit(assets, tmp_path) -> None:
    long_word = "x" * 80
    result = generate(
        assets,
        tmp_path / "o",
        prompt=f"{long_word} hugging Bob",
        loras=[f"{assets / 'alice.safetensors'}={long_word}", f"{assets / 'bob.safetensors'}=Bob"],
    )
    assert_user_error(result, "tokens long", "32-token limit")


def test_prompt_longer_than_the_limit_says_what_was_cut(assets, tmp_path) -> None:
    prompt = "Alice hugging Bob " + "in the snow " * 20 + "at the very end"
    result = generate(assets, tmp_path / "o", prompt=prompt)
    assert result.exit_code == 0, result.output
    assert "so this part is cut" in result.output and "at the very end" in result.output


def test_empty_prompt(assets, tmp_path) -> None:
    assert_user_error(generate(assets, tmp_path / "o", prompt="   "), "`prompt` is empty")


# -- sizes and settings ---------------------------------------------------------------------------------


def test_size_not_a_multiple_of_16_names_the_nearest(assets, tmp_path) -> None:
    result = generate(assets, tmp_path / "o", "--size", "130x64")
    assert_user_error(result, "`width` 130 is not a multiple of 16", "nearest valid width is 128")


def test_mask_step_past_the_steps(assets, tmp_path) -> None:
    assert_user_error(
        generate(assets, tmp_path / "o", "--mask-step", "9"), "`mask_step` 9 is past the last of 3"
    )
    result = generate(assets, tmp_path / "o2", "--mask-step", "3")
    assert result.exit_code == 0 and "same as method='merge'" in result.output


def test_block_out_of_range(assets, tmp_path) -> None:
    result = generate(assets, tmp_path / "o", "--block", "7")
    assert_user_error(result, "`block` 7 is out of range", "2 double-stream blocks")
    assert_nothing_written(tmp_path / "o")


def test_more_subjects_than_the_image_has_room_for(assets, tmp_path) -> None:
    result = generate(assets, tmp_path / "o", "--size", "16x16")
    assert_user_error(result, "2 subjects but only 1 image tokens")


def test_user_mask_of_the_wrong_size(assets, tmp_path) -> None:
    masks = MaskSet(["alice", "bob"], torch.ones(2, 48, 48))
    masks.save(tmp_path / "m.json")
    result = generate(assets, tmp_path / "o", "--method", "masks", "--masks", str(tmp_path / "m.json"))
    assert_user_error(result, "has 48x48 masks", "this run needs 64x64 or 4x4")
    freefuse = FreeFuse(tiny_flux_pipeline(seed=0))
    random_lora(freefuse.pipeline, "alice", seed=1)
    freefuse.use_adapter("alice", words=["Alice"])
    with pytest.raises(ValueError, match="no mask for"):
        freefuse(
            "Alice",
            method="masks",
            masks={"bob": torch.ones(64, 64)},
            height=64,
            width=64,
            num_inference_steps=2,
            max_sequence_length=32,
            progress=False,
        )


# -- models ---------------------------------------------------------------------------------------------


def test_model_path_missing(assets, tmp_path) -> None:
    result = generate(
        assets,
        tmp_path / "o",
        model=str(tmp_path / "no-model"),
        loras=[f"{assets / 'alice.safetensors'}=Alice"],
        prompt="Alice",
    )
    assert_user_error(result, "does not exist")


def test_model_folder_incomplete_names_the_missing_file(assets, tmp_path) -> None:
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(assets / "model", broken)
    (broken / "transformer" / "diffusion_pytorch_model.safetensors").unlink()
    (broken / "transformer" / "diffusion_pytorch_model.bin").write_bytes(pickle.dumps({}))
    result = generate(
        assets,
        tmp_path / "o",
        model=str(broken),
        loras=[f"{assets / 'alice.safetensors'}=Alice"],
        prompt="Alice",
    )
    assert_user_error(result, "`transformer/` has no weights", "diffusion_pytorch_model.bin, a pickle file")
    (broken / "model_index.json").unlink()
    result = generate(
        assets,
        tmp_path / "o",
        model=str(broken),
        loras=[f"{assets / 'alice.safetensors'}=Alice"],
        prompt="Alice",
    )
    assert_user_error(result, "model_index.json is missing")


def test_quantized_model_folders_are_refused_before_loading(assets, tmp_path, monkeypatch) -> None:
    import shutil

    quantized = tmp_path / "quanto"
    shutil.copytree(assets / "model", quantized)
    config_path = quantized / "transformer" / "config.json"
    config = json.loads(config_path.read_text())
    config["quantization_config"] = {"quant_method": "quanto", "weights_dtype": "int8"}
    config_path.write_text(json.dumps(config))

    def never_load(*args, **kwargs):
        raise AssertionError("weights were loaded")

    monkeypatch.setattr("diffusers.DiffusionPipeline.from_pretrained", never_load)
    result = generate(assets, tmp_path / "o", model=str(quantized))
    assert_user_error(result, "is quantized with quanto", "--quantize nf4|int8|fp8")
    assert_nothing_written(tmp_path / "o")


def test_a_pipeline_class_no_backend_runs_is_refused_before_loading(assets, tmp_path) -> None:
    import shutil

    other = tmp_path / "sd3"
    shutil.copytree(assets / "model", other)
    index = json.loads((other / "model_index.json").read_text())
    index["_class_name"] = "StableDiffusion3Pipeline"
    (other / "model_index.json").write_text(json.dumps(index))
    result = generate(assets, tmp_path / "o", model=str(other))
    assert_user_error(
        result,
        "is a StableDiffusion3Pipeline",
        "FreeFuse runs ['Flux2KleinPipeline', 'FluxFillPipeline', 'FluxPipeline', 'StableDiffusionXLPipeline', 'ZImagePipeline']",
    )
    assert_nothing_written(tmp_path / "o")


def test_flux_loras_on_an_sdxl_folder_are_refused_before_loading(assets, tmp_path) -> None:
    import shutil

    other = tmp_path / "sdxl"
    shutil.copytree(assets / "model", other)
    index = json.loads((other / "model_index.json").read_text())
    index["_class_name"] = "StableDiffusionXLPipeline"
    (other / "model_index.json").write_text(json.dumps(index))
    result = generate(assets, tmp_path / "o", model=str(other))
    assert_user_error(result, "is a LoRA for a FLUX.1 transformer", "not for an SDXL UNet")
    assert_nothing_written(tmp_path / "o")


def test_hub_model_not_in_cache_with_hf_offline(assets, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    result = generate(
        assets,
        tmp_path / "o",
        model="nobody/no-such-flux",
        loras=[f"{assets / 'alice.safetensors'}=Alice"],
        prompt="Alice",
    )
    assert_user_error(
        result, "nobody/no-such-flux", "not in the local Hugging Face cache", "HF_HUB_OFFLINE=1"
    )


def test_out_of_memory_names_the_settings_that_lower_memory(assets, tmp_path, monkeypatch) -> None:
    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(FreeFuse, "generate", out_of_memory)
    result = generate(assets, tmp_path / "o")
    assert_user_error(result, "ran out of memory", "--offload", "--size")
    assert_nothing_written(tmp_path / "o")


def test_internal_errors_exit_1_and_show_a_traceback_only_with_debug(assets, tmp_path, monkeypatch) -> None:
    def bug(*args, **kwargs):
        raise KeyError("unexpected")

    monkeypatch.setattr(FreeFuse, "generate", bug)
    result = generate(assets, tmp_path / "o")
    assert result.exit_code == 1 and "internal error" in result.output and "--debug" in result.output
    debug = RUNNER.invoke(app, ["--debug", *generate_args_list(assets, tmp_path / "o")])
    assert isinstance(debug.exception, KeyError)


# -- stage-1 fallbacks ----------------------------------------------------------------------------------


def small_freefuse() -> FreeFuse:
    pipe = tiny_flux_pipeline(seed=0)
    pipe.set_progress_bar_config(disable=True)
    freefuse = FreeFuse(pipe)
    for index, name in enumerate(("alice", "bob")):
        random_lora(pipe, name, seed=index + 1)
        freefuse.use_adapter(name, words=[name.capitalize()])
    return freefuse


RUN = {
    "height": 128,
    "width": 128,
    "num_inference_steps": 4,
    "max_sequence_length": 32,
    "progress": False,
    "output_type": "pt",
    "seed": 1,
}


def test_nan_attention_capture_falls_back_to_merge_and_says_so(assets, tmp_path, monkeypatch) -> None:
    from freefuse.backends.flux import FluxAttentionTap

    original = FluxAttentionTap.result

    def poisoned(self):
        captured = original(self)
        captured.q_img[0, 0, 0, 0] = float("nan")
        return captured

    monkeypatch.setattr(FluxAttentionTap, "result", poisoned)
    freefuse = small_freefuse()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = freefuse("Alice hugging Bob", **RUN)
    merge = freefuse("Alice hugging Bob", method="merge", **RUN)
    assert (out.images[0] - merge.images[0]).abs().max() <= 1e-5  # every LoRA everywhere, never black
    assert out.images[0].std() > 0.01
    assert any("NaN/inf" in str(w.message) for w in caught if issubclass(w.category, FreeFuseWarning))
    assert "NaN/inf" in out.manifest["images"][0]["fallbacks"][0]
    result = generate(assets, tmp_path / "o")
    assert result.exit_code == 0 and "note:" in result.output and "NaN/inf" in result.output


@pytest.mark.parametrize("policy", ["global", "off"])
def test_subject_that_wins_no_region_follows_the_stated_policy(monkeypatch, policy: str) -> None:
    import freefuse.core as core_module

    original = core_module.masks_from_attention

    def bob_loses(*args, **kwargs):
        result = original(*args, **kwargs)
        result.image_masks[0] |= result.image_masks[1]
        result.image_masks[1] = False
        result.token_masks[0] = 1.0
        result.token_masks[1] = 0.0
        result.empty = [1]
        return result

    monkeypatch.setattr(core_module, "masks_from_attention", bob_loses)
    freefuse = small_freefuse()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = freefuse("Alice hugging Bob", empty_mask=policy, **RUN)
    message = " ".join(str(w.message) for w in caught)
    assert "'bob' won no region" in message and f"empty_mask='{policy}'" in message
    assert out.manifest["images"][0]["fallbacks"]
    bob = out.masks[0]["bob"]
    assert float(bob.mean()) == (1.0 if policy == "global" else 0.0)
    assert out.images[0].std() > 0.01


def test_nan_output_is_an_error_not_a_black_image(monkeypatch) -> None:
    from freefuse.backends.flux import FluxBackend
    from freefuse.pipeline import NumericalError

    original = FluxBackend.step

    def overflow(self, velocity, timestep, latents):
        return original(self, velocity, timestep, latents) * float("inf")

    monkeypatch.setattr(FluxBackend, "step", overflow)
    with pytest.raises(NumericalError, match="NaN/inf.*bfloat16"):
        small_freefuse()("Alice hugging Bob", **RUN)


# -- outputs --------------------------------------------------------------------------------------------


def test_atomic_write_leaves_nothing_on_failure(tmp_path) -> None:
    target = tmp_path / "image.png"
    with pytest.raises(RuntimeError), atomic_open(target) as handle:
        handle.write(b"half of a png")
        raise RuntimeError("killed mid-write")
    assert list(tmp_path.iterdir()) == []
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic_open(target) as handle:
        handle.write(b"new but broken")
        raise RuntimeError("killed mid-write")
    assert target.read_bytes() == b"old" and list(tmp_path.iterdir()) == [target]


def default_sigint() -> None:
    # As from an interactive shell: a test runner started in the background has SIGINT ignored,
    # and children inherit that.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def wait_for_stage(progress: Path, process: subprocess.Popen, prefix: str, timeout: float = 300.0) -> None:
    """Until the run writes a line starting with `prefix` to its progress file (a signal from the
    process, not a clock: as fast or slow as the machine is)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        lines = progress.read_text().splitlines() if progress.exists() else []
        if any(line.startswith(prefix) for line in lines):
            return
        assert process.poll() is None, f"the run ended before reaching {prefix!r}: {process.communicate()}"
        time.sleep(0.01)
    raise AssertionError(f"the run did not reach {prefix!r} in {timeout} s")


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
@pytest.mark.parametrize("stage", ["started", "step"], ids=["while-starting", "while-running"])
def test_interrupted_run_leaves_no_file(assets, tmp_path, signum, stage) -> None:
    out = tmp_path / "o"
    progress = tmp_path / "progress.txt"
    # Later options win: 1000 steps at 512x512 instead of the fast settings.
    command = [
        sys.executable,
        "-m",
        "freefuse",
        *generate_args_list(assets, out),
        "--steps",
        "1000",
        "--size",
        "512x512",
    ]
    process = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=default_sigint,
        env={**os.environ, "FREEFUSE_PROGRESS_FILE": str(progress)},
    )
    # "started": signal handling is in place and Python is importing torch and diffusers. "step":
    # denoising (1000 steps at 512² take minutes). Neither may leave a file or print a traceback.
    wait_for_stage(progress, process, stage)
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    assert "Interrupted" in stderr and "Traceback" not in stderr
    assert_nothing_written(out)


# -- untrusted metadata and manifests -------------------------------------------------------------------


def test_huge_lora_metadata_is_ignored_not_trusted(tmp_path) -> None:
    pipe = tiny_flux_pipeline(seed=0)
    path = tmp_path / "meta.safetensors"
    save_file(
        random_lora_state_dict(pipe.transformer, seed=1),
        str(path),
        metadata={"modelspec.trigger_phrase": "x" * (5 << 20), "ss_output_name": "fine"},
    )
    lora = read_lora_file(path)
    assert lora.trigger_words == [] and lora.metadata["ss_output_name"] == "fine"


def test_bad_manifests_are_refused(assets, tmp_path) -> None:
    big = tmp_path / "big.json"
    big.write_text('{"format": "freefuse-manifest/1", "pad": "' + "x" * (5 << 20) + '"}')
    assert_user_error(
        cli("generate", "--manifest", str(big), "--out", str(tmp_path / "o")), "larger than 4 MiB"
    )
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    assert_user_error(
        cli("generate", "--manifest", str(broken), "--out", str(tmp_path / "o")), "not valid JSON"
    )
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"format": "something-else"}))
    assert_user_error(
        cli("generate", "--manifest", str(other), "--out", str(tmp_path / "o")), "not a FreeFuse manifest"
    )


@pytest.mark.slow
def test_no_traceback_without_debug_in_a_real_process(assets, tmp_path) -> None:
    base = [sys.executable, "-m", "freefuse"]
    args = [
        "generate",
        "--model",
        str(assets / "model"),
        "--lora",
        f"{tmp_path / 'missing.safetensors'}=A",
        "--prompt",
        "A",
        "--out",
        str(tmp_path / "o"),
    ]
    plain = subprocess.run(base + args, capture_output=True, text=True, check=False)
    assert plain.returncode == 2 and "does not exist" in plain.stderr and "Traceback" not in plain.stderr
    debug = subprocess.run(base + ["--debug", *args], capture_output=True, text=True, check=False)
    assert debug.returncode != 0 and "Traceback" in debug.stderr


# -- fuzzing --------------------------------------------------------------------------------------------

TOKENIZER = tiny_t5_tokenizer()


@settings(max_examples=300, deadline=None)
@given(prompt=st.text(max_size=80), word=st.text(max_size=12), limit=st.sampled_from([None, 4, 16, 512]))
def test_fuzz_prompts_and_words_only_raise_documented_errors(prompt: str, word: str, limit) -> None:
    try:
        match = find_word(TOKENIZER, prompt, word, limit)
    except WordNotFoundError:
        return
    assert match.positions and all(position >= 0 for position in match.positions)
    if limit is not None:
        assert max(match.positions) < limit


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=600), header=st.booleans())
def test_fuzz_random_bytes_as_lora_files_are_refused_cleanly(tmp_path, data: bytes, header: bool) -> None:
    path = tmp_path / "fuzz.safetensors"
    if header:  # a plausible length prefix, so the parser gets past the first check
        data = len(data).to_bytes(8, "little") + data
    path.write_bytes(data)
    with pytest.raises(LoraFileError):
        read_lora_file(path)


def test_fuzz_valid_header_with_random_tensor_bytes(tmp_path) -> None:
    rng = np.random.default_rng(0)
    good = tmp_path / "g.safetensors"
    save_file({"transformer.a.lora_A.weight": torch.zeros(2, 8)}, str(good))
    raw = bytearray(good.read_bytes())
    assert read_lora_file(good).state_dict["transformer.a.lora_A.weight"].shape == (2, 8)
    outcomes = {"read": 0, "refused": 0}
    for trial in range(50):
        mutated = bytearray(raw)
        for _ in range(int(rng.integers(1, 6))):
            mutated[int(rng.integers(0, len(mutated)))] = int(rng.integers(0, 256))
        path = tmp_path / f"m{trial}.safetensors"
        path.write_bytes(bytes(mutated))
        try:
            lora = read_lora_file(path)
        except LoraFileError:
            outcomes["refused"] += 1
            continue
        # Read: then as what its header says, one tensor of finite weights of the recorded shape.
        [tensor] = lora.state_dict.values()
        assert tensor.shape == (2, 8) and bool(torch.isfinite(tensor).all())
        outcomes["read"] += 1
    assert outcomes["read"] > 0 and outcomes["refused"] > 0, outcomes  # both paths taken


# JSON the way a hostile or broken writer might put it in a safetensors header.
JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False)
    | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8,
)
TENSOR_ENTRY = st.fixed_dictionaries(
    {},
    optional={
        "dtype": st.sampled_from(["F32", "F16", "I8", "BOOL"]) | JSON_VALUES,
        "shape": st.lists(st.integers(-2, 8), max_size=3) | JSON_VALUES,
        "data_offsets": st.lists(st.integers(-(2**65), 2**65), min_size=2, max_size=2)
        | st.lists(st.integers(0, 64), min_size=2, max_size=2)
        | JSON_VALUES,
    },
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    tensors=st.dictionaries(st.text(min_size=1, max_size=12), TENSOR_ENTRY | JSON_VALUES, max_size=3),
    metadata=JSON_VALUES,
    payload=st.binary(max_size=64),
)
def test_fuzz_the_header_json_structure(tmp_path, tensors, metadata, payload) -> None:
    from freefuse.lora import describe_lora

    header = {**tensors, "__metadata__": metadata}
    raw = json.dumps(header).encode()
    path = tmp_path / "header.safetensors"
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + payload)
    for read in (read_lora_file, describe_lora):
        with contextlib.suppress(LoraFileError):  # refused cleanly, or read: both fine
            read(path)
    # The valid path: the same names and metadata as a well-formed file are read, not refused.
    names = [name for name in tensors if name != "__metadata__" and not name.startswith("bundle_emb.")]
    if names:
        strings = metadata if isinstance(metadata, dict) else {}
        strings = {str(k): v for k, v in strings.items() if isinstance(v, str)}
        valid = tmp_path / "valid.safetensors"
        save_file({name: torch.ones(1, 2) for name in names}, str(valid), metadata=strings or None)
        lora = read_lora_file(valid)
        assert sorted(lora.state_dict) == sorted(names) and lora.metadata == strings
        assert describe_lora(valid)["tensors"] == len(names)


def never_loaded_model(assets: Path, tmp_path: Path) -> Path:
    """A model folder that passes every check made before loading and fails loudly if loaded."""
    import shutil

    folder = tmp_path / "never-loaded"
    if not folder.exists():
        shutil.copytree(assets / "model", folder)
        weights = folder / "transformer" / "diffusion_pytorch_model.safetensors"
        weights.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")  # valid-looking, no tensors
    return folder


def test_lora_contents_that_are_not_weights_are_refused_by_name(assets, tmp_path) -> None:
    state = random_lora_state_dict(tiny_flux_pipeline(seed=0).transformer, seed=1)
    first = sorted(state)[0]
    for label, broken_value in (
        ("int8", state[first].to(torch.int8)),
        ("bool", state[first] > 0),
        ("NaN", state[first].clone().fill_(float("nan"))),
        ("infinite", state[first].clone().fill_(float("inf"))),
    ):
        path = tmp_path / f"{label}.safetensors"
        save_file({**state, first: broken_value}, str(path))
        result = generate(
            assets, tmp_path / "o", loras=[f"{path}=Alice", f"{assets / 'bob.safetensors'}=Bob"]
        )
        expected = "NaN or infinite" if label in ("NaN", "infinite") else "floating point"
        assert_user_error(result, f"{path.name}: tensor {first!r}", expected)
        assert_nothing_written(tmp_path / "o")


def test_subjects_sharing_or_overlapping_words_are_refused_before_loading(assets, tmp_path) -> None:
    model = never_loaded_model(assets, tmp_path)
    alice, bob = f"{assets / 'alice.safetensors'}", f"{assets / 'bob.safetensors'}"
    same = generate(
        assets, tmp_path / "o", loras=[f"{alice}=ohwx", f"{bob}=ohwx"], prompt="ohwx and ohwx", model=model
    )
    assert_user_error(
        same, "LoRAs 'alice' and 'bob' share the activation word 'ohwx'", "give each LoRA a word"
    )
    overlap = generate(
        assets,
        tmp_path / "o",
        loras=[f"{alice}=Alice", f"{bob}=Alice hugging"],
        prompt="Alice hugging",
        model=model,
    )
    assert_user_error(overlap, "overlapping activation words 'Alice' and 'Alice hugging'")
    merge = generate(
        assets, tmp_path / "m", "--method", "merge", loras=[f"{alice}=ohwx", f"{bob}=ohwx"], prompt="ohwx"
    )
    assert merge.exit_code == 0, merge.output  # merge does not tell subjects apart: nothing to refuse
    freefuse = FreeFuse(tiny_flux_pipeline(seed=0))
    for name in ("alice", "bob"):
        random_lora(freefuse.pipeline, name, seed=1)
        freefuse.use_adapter(name, words=["ohwx"])
    with pytest.raises(ValueError, match="share the activation word 'ohwx'"):
        freefuse("ohwx and ohwx", height=64, width=64, num_inference_steps=2, progress=False)


def test_a_changed_file_in_a_cache_blob_folder_gets_its_real_hash(tmp_path) -> None:
    import hashlib

    from freefuse.files import sha256_file

    blobs = tmp_path / "blobs"
    blobs.mkdir()
    claimed = hashlib.sha256(b"what was downloaded").hexdigest()
    (blobs / claimed).write_bytes(b"what is there now")
    assert sha256_file(blobs / claimed) == hashlib.sha256(b"what is there now").hexdigest()


def test_broken_mask_files_are_refused_before_loading(assets, tmp_path) -> None:
    from PIL import Image

    model = never_loaded_model(assets, tmp_path)
    good = MaskSet(["alice", "bob"], torch.ones(2, 64, 64))
    cases = {}
    folder = tmp_path / "corrupt"
    good.save(folder / "m.json")
    (folder / "m.0-alice.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    cases["corrupt PNG"] = (folder / "m.json", "cannot be read")
    folder = tmp_path / "sizes"
    good.save(folder / "m.json")
    Image.new("L", (32, 32)).save(folder / "m.1-bob.png")
    cases["different sizes"] = (folder / "m.json", "different sizes")
    listed = tmp_path / "list.json"
    listed.write_text("[1, 2]")
    cases["a list"] = (listed, "JSON object")
    empty = tmp_path / "empty.safetensors"
    save_file({"other": torch.zeros(1)}, str(empty), metadata={"names": json.dumps(["alice", "bob"])})
    cases["no masks tensor"] = (empty, "no `masks` tensor")
    folder = tmp_path / "bomb"
    good.save(folder / "m.json")
    Image.new("1", (9000, 9000)).save(folder / "m.0-alice.png")  # tiny on disk, 81 megapixels
    cases["decompression bomb"] = (folder / "m.json", "masks are at most")
    for label, (path, message) in cases.items():
        result = generate(assets, tmp_path / "o", "--method", "masks", "--masks", str(path), model=model)
        assert_user_error(result, message)
        assert_nothing_written(tmp_path / "o")
        assert label


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--size", "100000x100000"], "more than 8192 pixels"),
        (["--steps", "1000000000"], "more than 1000"),
        (["--steps", str(2**63)], "more than 1000"),
        (["--steps", "1e9"], "Invalid value for '--steps'"),
    ],
)
def test_limits_are_stated_up_front(assets, tmp_path, flags, message) -> None:
    result = generate(assets, tmp_path / "o", *flags, model=never_loaded_model(assets, tmp_path))
    assert result.exit_code == 2 and message in result.output, result.output
    assert "Traceback" not in result.output


# -- outputs, round two --------------------------------------------------------------------------------


def test_an_output_folder_that_cannot_be_written_is_refused_before_loading(
    assets, tmp_path, monkeypatch
) -> None:
    import errno
    import tempfile as tempfile_module

    model = never_loaded_model(assets, tmp_path)
    a_file = tmp_path / "taken.txt"
    a_file.write_text("x")
    assert_user_error(generate(assets, a_file, model=model), "is a file, not a folder")
    assert_user_error(generate(assets, Path("/dev/full"), model=model), "is a file, not a folder")

    def no_permission(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(tempfile_module, "TemporaryFile", no_permission)
    assert_user_error(
        generate(assets, tmp_path / "locked", model=model), "cannot be written", "Permission denied"
    )


@pytest.mark.parametrize("failing_write", [1, 3, 6])
def test_a_full_disk_leaves_nothing_and_says_so(assets, tmp_path, monkeypatch, failing_write) -> None:
    import errno

    import freefuse.core.storage as files_module

    original = files_module._temporary
    calls = {"count": 0}

    def full_disk(path, data):
        calls["count"] += 1
        if calls["count"] == failing_write:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return original(path, data)

    monkeypatch.setattr(files_module, "_temporary", full_disk)
    out = tmp_path / "o"
    result = generate(assets, out)
    assert_user_error(result, "No space left on device", "Nothing of this run was kept")
    assert_nothing_written(out)
    monkeypatch.setattr(files_module, "_temporary", original)
    assert generate(assets, out).exit_code == 0  # the next run starts clean, no --overwrite needed


KILLER = """
import os, signal, sys
import freefuse.files as files
count = {"n": 0}
real_replace = os.replace
def replace(src, dst):
    count["n"] += 1
    if count["n"] == int(os.environ["KILL_AT"]):
        os.kill(os.getpid(), signal.SIGKILL)
    return real_replace(src, dst)
files.os.replace = replace
from freefuse.__main__ import main
sys.argv = ["freefuse", *sys.argv[1:]]
main()
"""


@pytest.mark.slow
def test_sigkill_at_any_write_leaves_either_a_finished_run_or_one_the_next_run_replaces(
    assets, tmp_path
) -> None:
    out = tmp_path / "o"
    args = generate_args_list(assets, out)
    files = None
    for kill_at in range(1, 8):
        if out.exists():
            import shutil

            shutil.rmtree(out)
        env = {**os.environ, "KILL_AT": str(kill_at)}
        done = subprocess.run([sys.executable, "-c", KILLER, *args], env=env, capture_output=True, text=True)
        finished = (out / "freefuse.json").exists()
        if done.returncode == 0:
            files = sorted(p.name for p in out.iterdir())
            break  # this run made fewer writes than kill_at: all of them were checked
        assert done.returncode == -signal.SIGKILL, done.stderr
        assert not finished, f"a manifest was written though the run was killed at write {kill_at}"
        again = cli(*args)  # no --overwrite: leftovers of a killed run are not a finished output
        assert again.exit_code == 0, again.output
        assert (out / "freefuse.json").exists() and not list(out.glob(".*.part"))
    assert files is not None and "freefuse.json" in files and kill_at > 4


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    fields=st.dictionaries(
        st.sampled_from(
            [
                "model",
                "prompt",
                "seed",
                "steps",
                "size",
                "method",
                "loras",
                "masks",
                "mask_step",
                "guidance",
                "images",
            ]
        ),
        JSON_VALUES,
        max_size=6,
    ),
    lora=st.dictionaries(
        st.sampled_from(["path", "words", "weight", "scope", "name", "sha256"]), JSON_VALUES
    ),
)
def test_fuzz_job_file_fields(tmp_path, fields, lora) -> None:
    from freefuse.batch import JobFileError, load_jobs

    path = tmp_path / "jobs.jsonl"
    entry = {"model": "tiny", "prompt": "Alice", "loras": [lora], **fields}
    path.write_text(json.dumps(entry) + "\n")
    with contextlib.suppress(JobFileError, LoraFileError, FileNotFoundError):  # refused cleanly, or read
        load_jobs(path)
    # The valid path: the same fields on a well-formed job are read as given, or refused by name.
    good = {"model": "tiny", "prompt": "Alice", "loras": [{"path": "a.safetensors", "words": ["Alice"]}]}
    path.write_text(json.dumps({**good, **fields}) + "\n")
    try:
        [job] = load_jobs(path)
    except JobFileError as error:
        named = {"size": ("size", "width", "height")}  # `size` is checked as width and height
        message = str(error).lower()
        assert any(name in message for key in fields for name in named.get(key, (key,))), error  # by name
        return
    names = {"steps": "num_inference_steps", "guidance": "guidance_scale", "images": "num_images_per_prompt"}
    for key in fields.keys() & {"seed", "steps", "method", "mask_step", "guidance", "images"}:
        assert getattr(job.settings, names.get(key, key)) == fields[key], (key, fields[key])


def test_lora_paths_the_system_cannot_name_are_refused_cleanly(tmp_path) -> None:
    """Found by the fuzz test above: a path that is not text, or a name longer than the file system
    allows (its `stat` raises ENAMETOOLONG), is a clear error, not an OSError."""
    from freefuse.batch import JobFileError, load_jobs
    from freefuse.lora import check_lora_path

    path = tmp_path / "jobs.jsonl"
    path.write_text(json.dumps({"model": "tiny", "prompt": "Alice", "loras": [{"path": {"a": 1}}]}) + "\n")
    with pytest.raises(JobFileError, match="a `path`"):
        load_jobs(path)
    long_name = "x" * 300 + ".safetensors"
    path.write_text(json.dumps({"model": "tiny", "prompt": "{A}", "loras": [{"path": long_name}]}) + "\n")
    with contextlib.suppress(JobFileError, LoraFileError):
        load_jobs(path)
    with pytest.raises(LoraFileError, match="cannot be a file here"):
        check_lora_path(tmp_path / long_name)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(index=JSON_VALUES, png=st.binary(max_size=200), valid_png=st.booleans())
def test_fuzz_mask_files(tmp_path, index, png, valid_png) -> None:
    from PIL import Image

    folder = tmp_path / "masks"
    folder.mkdir(exist_ok=True)
    if valid_png:
        Image.new("L", (8, 8), 255).save(folder / "a.png")
    else:
        (folder / "a.png").write_bytes(png)
    (folder / "m.json").write_text(json.dumps(index))
    (folder / "n.json").write_text(json.dumps({"names": ["alice"], "files": ["a.png"]}))
    with contextlib.suppress(ValueError, FileNotFoundError):  # refused cleanly, or read
        MaskSet.load(folder / "m.json")
    if valid_png:  # the valid path: a well-formed index naming a real PNG is read, not refused
        loaded = MaskSet.load(folder / "n.json")
        assert loaded.names == ["alice"] and loaded.size == (8, 8) and bool((loaded["alice"] == 1).all())
    else:
        with contextlib.suppress(ValueError):  # random bytes are refused cleanly (or are a PNG)
            MaskSet.load(folder / "n.json")


def test_a_missing_word_is_said_before_the_model_loads(assets, tmp_path) -> None:
    result = generate(
        assets, tmp_path / "o", prompt="Alice hugging a cat", model=never_loaded_model(assets, tmp_path)
    )
    assert_user_error(result, "LoRA 'bob'", "'Bob' is not in the prompt", "'▁cat'")
