"""Loading to fit a small GPU: `--quantize`, `--quantize-text-encoder`, `--offload`, `--compile`, GGUF files.

What runs on a CPU runs here: int8 (torchao) and fp8 loading of the built-in model and of a model
folder, the manifest record and its replay, every refusal before loading, compiled blocks that
never recompile in a whole FreeFuse run, and GGUF files (their quant type, and, slow, a FLUX-width
file loaded and run). NF4 loading, offload and the memory numbers need a GPU (the tests that need
one skip here); masked LoRAs over each quantized base are `test_quantized.py`'s.
"""

from __future__ import annotations

import importlib.util
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from freefuse import FreeFuse, FreeFuseWarning
from freefuse.backends.flux import FluxBackend
from freefuse.backends.sdxl import SdxlBackend
from freefuse.cli import app
from freefuse.errors import SettingsError
from freefuse.memory import MemoryOptions, SourceFacts, check_memory_options, compile_blocks
from freefuse.models import load_pipeline
from freefuse.testing import ALL_LINEAR, quantize_denoiser, tiny_flux_pipeline, typical_lora_state_dict

RUNNER = CliRunner()
FLUX, SDXL = FluxBackend.architecture, SdxlBackend.architecture
CPU, CUDA = torch.device("cpu"), torch.device("cuda")
# An architecture whose denoiser (here: FLUX's VAE) declares no repeated blocks.
NO_BLOCKS = type("NoBlocks", (), {"name": "noblocks", "pipeline_classes": ("FluxPipeline",), "denoiser_name": "vae"})
HAS = {name: importlib.util.find_spec(name) is not None for name in ("torchao", "bitsandbytes", "gguf")}
needs_torchao = pytest.mark.skipif(not HAS["torchao"], reason="needs `torchao` (pip install 'freefuse[quant]')")
needs_gguf = pytest.mark.skipif(not HAS["gguf"], reason="needs `gguf` (pip install 'freefuse[quant]')")
needs_bitsandbytes = pytest.mark.skipif(
    not HAS["bitsandbytes"], reason="needs `bitsandbytes` (pip install 'freefuse[quant]')"
)
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


# -- refusals, before any weights load ----------------------------------------------------------------

REFUSED = [
    # options, architecture, source, device, the run's settings, what the message says
    ({"quantize": "nf4"}, FLUX, SourceFacts(), CPU, None, "on cpu use --quantize int8 or fp8"),
    ({"quantize_text_encoder": "nf4"}, FLUX, SourceFacts(), CPU, None, "loads only onto a GPU"),
    ({}, FLUX, SourceFacts(prequantized="bitsandbytes"), CPU, None, "loads only onto a GPU"),
    ({"offload": "model"}, FLUX, SourceFacts(), CPU, None, "nothing to offload"),
    ({"offload": "group"}, FLUX, SourceFacts(), CPU, None, "nothing to offload"),
    ({"quantize": "int8"}, FLUX, SourceFacts(gguf="Q5_0"), CUDA, None, "already quantized (GGUF Q5_0)"),
    ({"quantize": "fp8"}, FLUX, SourceFacts(prequantized="bitsandbytes"), CUDA, None, "already quantized"),
    ({"quantize": "nf4"}, FLUX, SourceFacts(built_in=True), CUDA, None, "use --quantize int8 or fp8 with them"),
    ({"offload": "sequential"}, FLUX, SourceFacts(gguf="Q4_0"), CUDA, None, "use --offload group"),
    ({"offload": "sequential", "quantize": "nf4"}, FLUX, SourceFacts(), CUDA, None, "use --offload model"),
    ({"offload": "sequential", "quantize": "fp8"}, FLUX, SourceFacts(), CUDA, None, "use --offload model"),
    ({"offload": "group", "quantize": "nf4"}, FLUX, SourceFacts(), CUDA, None, "use --offload model with NF4"),
    ({"compile": True}, NO_BLOCKS, SourceFacts(), CUDA, None, "declares no repeated blocks to compile"),
    ({"compile": True, "offload": "sequential"}, FLUX, SourceFacts(), CUDA, None, "use --offload model"),
    ({"compile": True, "offload": "group"}, FLUX, SourceFacts(), CUDA, None, "use --offload model"),
    ({"compile": True, "quantize": "fp8"}, FLUX, SourceFacts(), CUDA, None, "use --quantize int8 or a GGUF"),
    ({"compile": True}, FLUX, SourceFacts(), CUDA, {"lora_op": "peft"}, "leave --lora-op peft out"),
    ({"compile": True}, FLUX, SourceFacts(), CUDA, {"attention_bias": 2.0}, "leave one of them out"),
    ({"quantize_text_encoder": "int8"}, SDXL, SourceFacts(), CUDA, None, "only small CLIP text encoders"),
]


@pytest.fixture
def quant_packages(monkeypatch) -> None:
    """torchao, bitsandbytes and gguf look installed: a refusal that comes before loading is the
    same with or without them (their absence has its own test)."""
    monkeypatch.setattr("freefuse.memory._check_packages", lambda options, source: None)


@pytest.mark.parametrize(("options", "architecture", "source", "device", "settings", "says"), REFUSED)
def test_combinations_that_cannot_work_are_refused_before_loading(
    options, architecture, source, device, settings, says, quant_packages
) -> None:
    from freefuse.settings import GenerationSettings

    run = GenerationSettings(prompt="Alice", **settings) if settings is not None else None
    with pytest.raises(SettingsError) as caught:
        check_memory_options(MemoryOptions(**options), architecture, source, device, run)
    assert says in str(caught.value), str(caught.value)


@pytest.mark.parametrize(
    ("options", "source", "device"),
    [
        ({"quantize": "int8", "quantize_text_encoder": "int8"}, SourceFacts(), CPU),
        ({"quantize": "fp8"}, SourceFacts(built_in=True), CPU),
        ({"quantize": "nf4", "quantize_text_encoder": "nf4", "offload": "model", "compile": True}, SourceFacts(), CUDA),
        ({"offload": "group"}, SourceFacts(gguf="Q5_0"), CUDA),
        ({"offload": "sequential", "quantize": "int8"}, SourceFacts(), CUDA),
        ({"compile": True, "offload": "model"}, SourceFacts(gguf="Q8_0"), CUDA),
    ],
)
def test_combinations_that_work_pass(options, source, device, monkeypatch) -> None:
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *rest: object())  # every package "installed"
    check_memory_options(MemoryOptions(**options), FLUX, source, device)


def test_unknown_choices_and_a_missing_package_say_what_to_do(monkeypatch) -> None:
    with pytest.raises(SettingsError, match="--quantize 'int4': use one of nf4, int8, fp8"):
        MemoryOptions(quantize="int4")
    with pytest.raises(SettingsError, match="--offload 'disk': use one of none, model, sequential, group"):
        MemoryOptions(offload="disk")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *rest: None if name == "torchao" else real(name))
    with pytest.raises(SettingsError, match=r"need the `torchao` package: pip install 'freefuse\[quant\]'"):
        check_memory_options(MemoryOptions(quantize="int8"), FLUX, SourceFacts(), CPU)


def test_the_command_line_refuses_nf4_on_a_cpu_before_loading_anything(
    assets, tmp_path, monkeypatch, quant_packages
) -> None:
    def never_load(*args, **kwargs):
        raise AssertionError("weights were loaded")

    monkeypatch.setattr("diffusers.DiffusionPipeline.from_pretrained", never_load)
    result = RUNNER.invoke(
        app,
        [
            "generate",
            "--model",
            str(assets / "model"),
            "--lora",
            f"{assets / 'alice.safetensors'}=Alice",
            "--prompt",
            "Alice",
            "--quantize",
            "nf4",
            "--device",
            "cpu",
            "--out",
            str(tmp_path / "o"),
        ],
    )
    assert result.exit_code == 2 and "bitsandbytes NF4 loads only onto a GPU" in result.output, result.output
    out = tmp_path / "o"
    assert "Traceback" not in result.output and (not out.exists() or not any(out.iterdir()))


# -- loading quantized on a CPU -------------------------------------------------------------------------


def is_torchao(tensor: torch.Tensor) -> bool:
    from torchao.utils import TorchAOBaseTensor

    return isinstance(tensor, TorchAOBaseTensor)


@needs_torchao
def test_the_built_in_model_loads_in_int8_and_its_t5_too() -> None:
    pipe = load_pipeline("tiny", device="cpu", memory=MemoryOptions(quantize="int8", quantize_text_encoder="int8"))
    assert is_torchao(pipe.transformer.transformer_blocks[0].attn.to_q.weight)
    assert is_torchao(pipe.text_encoder_2.encoder.block[0].layer[0].SelfAttention.q.weight)
    clip = next(module for name, module in pipe.text_encoder.named_modules() if name.endswith("q_proj"))
    assert not is_torchao(clip.weight)  # the small CLIP encoder stays as it is


def test_fp8_storage_keeps_norms_and_says_its_compute_dtype() -> None:
    pipe = load_pipeline("tiny", device="cpu", memory=MemoryOptions(quantize="fp8"))
    to_q = pipe.transformer.transformer_blocks[0].attn.to_q
    assert to_q.weight.dtype == torch.float8_e4m3fn and to_q.compute_dtype == torch.float32
    assert pipe.transformer.transformer_blocks[0].attn.norm_q.weight.dtype == torch.float32


@needs_torchao
def test_a_model_folder_loads_in_int8_and_replays_so(assets, tmp_path) -> None:
    """Quantized while loading (`TorchAoConfig` through `PipelineQuantizationConfig`), run with two
    LoRAs on the fused op, recorded in the manifest, and replayed with the same options."""
    from freefuse.runner import RunService
    from freefuse.settings import GenerationSettings
    from freefuse.spec import LoraSpec, RunSpec, replay_spec

    memory = MemoryOptions(quantize="int8", quantize_text_encoder="int8")
    loras = [
        LoraSpec(path=str(assets / "alice.safetensors"), words=["Alice"]),
        LoraSpec(path=str(assets / "bob.safetensors"), words=["Bob"]),
    ]
    settings = GenerationSettings(prompt="Alice hugging Bob", height=64, width=64, num_inference_steps=3)
    spec = RunSpec(str(assets / "model"), loras, settings, memory=memory)
    service = RunService(device="cpu")
    output = service.run(spec).output
    pipe = service.pipeline(spec.model, None, memory)
    assert is_torchao(pipe.transformer.transformer_blocks[0].attn.to_q.get_base_layer().weight)
    assert type(pipe.transformer.transformer_blocks[0].attn.to_q).__name__ == "TorchaoLoraLinear"
    assert output.manifest["model"]["load"] == memory.to_record()
    manifest = tmp_path / "run.json"
    manifest.write_text(json.dumps(output.manifest))
    replayed = replay_spec(manifest, here=Path("/"), settings={})
    assert replayed.memory == memory and not replayed.notes
    changed = replay_spec(manifest, here=Path("/"), memory={"quantize": "fp8", "offload": None})
    assert changed.memory == MemoryOptions(quantize="fp8", quantize_text_encoder="int8")
    assert any("quantize 'int8' -> 'fp8'" in note for note in changed.notes), changed.notes


def test_a_replay_through_the_command_line_loads_fp8_again(assets, tmp_path, monkeypatch) -> None:
    args = [
        "--lora",
        f"{assets / 'alice.safetensors'}=Alice",
        "--lora",
        f"{assets / 'bob.safetensors'}=Bob",
        "--steps",
        "3",
        "--size",
        "64x64",
        "--device",
        "cpu",
    ]
    first = RUNNER.invoke(
        app, ["generate", "--model", "tiny", "--prompt", "Alice hugging Bob", "--quantize", "fp8", *args, "--out", str(tmp_path / "a")]
    )
    assert first.exit_code == 0, first.output
    recorded = json.loads((tmp_path / "a" / "freefuse.json").read_text())
    assert recorded["model"]["load"]["quantize"] == "fp8"
    monkeypatch.chdir(assets)
    again = RUNNER.invoke(app, ["generate", "--manifest", str(tmp_path / "a" / "freefuse.json"), "--out", str(tmp_path / "b")])
    assert again.exit_code == 0, again.output
    assert json.loads((tmp_path / "b" / "freefuse.json").read_text())["model"]["load"]["quantize"] == "fp8"
    assert (tmp_path / "a" / "freefuse.png").read_bytes() == (tmp_path / "b" / "freefuse.png").read_bytes()
    if HAS["torchao"]:  # loaded otherwise: said, and the weights' hash is not held against it
        other = RUNNER.invoke(
            app,
            ["generate", "--manifest", str(tmp_path / "a" / "freefuse.json"), "--quantize", "int8", "--out", str(tmp_path / "c")],
        )
        assert other.exit_code == 0 and "quantize 'fp8' -> 'int8'" in " ".join(other.output.split()), other.output


# -- --compile: no recompile in a whole run -------------------------------------------------------------


def two_loras(kind: str | None = None) -> FreeFuse:
    pipe = tiny_flux_pipeline(seed=0)
    pipe.set_progress_bar_config(disable=True)
    states = [typical_lora_state_dict(pipe, rank=4, seed=seed, scale=0.5, targets=ALL_LINEAR) for seed in (1, 2)]
    if kind is not None:
        quantize_denoiser(pipe, kind)
    freefuse = FreeFuse(pipe)
    for name, state in zip(("alice", "bob"), states, strict=True):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pipe.load_lora_weights({key: value.clone() for key, value in state.items()}, adapter_name=name)
        freefuse.use_adapter(name, words=[name.capitalize()])
    return freefuse


RUN = {"height": 128, "width": 128, "num_inference_steps": 4, "mask_step": 2, "max_sequence_length": 16}


def batch_images(freefuse: FreeFuse, prompts: list[str], **settings) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FreeFuseWarning)
        output = freefuse(prompts, output_type="pt", progress=False, **{**RUN, **settings})
    return torch.stack(output.images)


COMPILED_BASES = [
    pytest.param(None, id="plain", marks=pytest.mark.slow),
    pytest.param("gguf-Q8_0", id="gguf", marks=[pytest.mark.slow, needs_gguf]),
    pytest.param("int8", id="int8", marks=[pytest.mark.slow, needs_torchao]),
    pytest.param("nf4", id="nf4", marks=[pytest.mark.slow, needs_bitsandbytes]),  # bitsandbytes' CPU kernels
]


@pytest.mark.parametrize("kind", COMPILED_BASES)
def test_a_compiled_freefuse_run_never_recompiles(kind) -> None:
    """Two prompts in one batch, plain steps, the capture step, stage-2 steps, a negative-prompt
    pass each step; then a second run with other words' masks and another LoRA weight: each block
    class is compiled once
    (dynamo's own backend, "eager": the guards and recompiles are the same as inductor's). Then
    one image at a time, twice."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    freefuse = two_loras(kind)
    settings = {"seed": 3, "true_cfg_scale": 2.0, "negative_prompt": "blurry"}
    prompts = ["Alice hugging Bob", "Bob beside Alice"]
    eager = batch_images(freefuse, prompts, **settings)
    torch._dynamo.reset()
    counters.clear()
    compile_blocks(freefuse.backend.denoiser, backend="eager")
    # (torch's own `config.patch`: pytest's monkeypatch deletes the setting on undo)
    with torch._dynamo.config.patch(error_on_recompile=True):
        compiled = batch_images(freefuse, prompts, **settings)
        assert counters["stats"]["unique_graphs"] == 2  # one per block class: double- and single-stream
        assert torch.equal(compiled, eager)
        freefuse.set_weight("bob", 0.6)  # LoRA weights ride in the mask buffers: no recompile either
        batch_images(freefuse, ["Bob and Alice in the snow", "Alice alone, Bob far"], seed=9)
        assert counters["stats"]["unique_graphs"] == 2
    # One image: a new batch size is a new shape, compiled once more; then nothing recompiles (a
    # batch of one makes views look contiguous, see `freefuse.memory._dense`).
    batch_images(freefuse, ["Alice hugging Bob"], seed=1)
    with torch._dynamo.config.patch(error_on_recompile=True):
        batch_images(freefuse, ["Bob beside Alice"], seed=2)
    assert counters["stats"]["unique_graphs"] == 4  # each block class once more, for one image
    torch._dynamo.reset()


def test_compiled_blocks_run_merge_and_the_lora_free_base() -> None:
    """`method="merge"` masks nothing (nor does a run with the LoRAs switched off): compiled
    blocks run it as the eager blocks do, with no mask buffer to write."""
    import torch._dynamo

    freefuse = two_loras()
    settings = {"seed": 3, "method": "merge"}
    eager = batch_images(freefuse, ["Alice hugging Bob"], **settings)
    freefuse.pipeline.disable_lora()
    eager_base = batch_images(freefuse, ["Alice hugging Bob"], **settings)
    freefuse.pipeline.enable_lora()
    torch._dynamo.reset()
    compile_blocks(freefuse.backend.denoiser, backend="eager")
    try:
        assert torch.equal(batch_images(freefuse, ["Alice hugging Bob"], **settings), eager)
        freefuse.pipeline.disable_lora()
        assert torch.equal(batch_images(freefuse, ["Alice hugging Bob"], **settings), eager_base)
    finally:
        torch._dynamo.reset()


@pytest.mark.slow
@pytest.mark.parametrize("architecture", ["flux2", "zimage", "sdxl"])
def test_compiled_runs_on_the_other_backends_never_recompile(architecture: str) -> None:
    """FLUX.2 [klein] compiles its two block classes once, as FLUX.1 does. Z-Image's block class
    runs as its noise refiner, context refiner and main layers, each on its own token count, and
    SDXL's at each UNet level: diffusers' regional compilation compiles each of those once in the
    first run; FreeFuse adds none, so a second whole run recompiles nothing."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    from freefuse.tiny import TINY_PIPELINES

    pipe = TINY_PIPELINES[architecture](seed=0)
    pipe.set_progress_bar_config(disable=True)
    freefuse = FreeFuse(pipe)
    for seed, name in enumerate(("alice", "bob"), start=1):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pipe.load_lora_weights(typical_lora_state_dict(pipe, rank=4, seed=seed, scale=0.5), adapter_name=name)
        freefuse.use_adapter(name, words=[name.capitalize()])
    run = {"height": 128, "width": 128, "num_inference_steps": 4, "mask_step": 2}
    prompts = ["Alice hugging Bob", "Bob beside Alice in the snow"]
    eager = batch_images(freefuse, prompts, seed=3, **run)
    torch._dynamo.reset()
    counters.clear()
    compile_blocks(freefuse.backend.denoiser, backend="eager")
    strict = torch._dynamo.config.patch(error_on_recompile=architecture == "flux2")
    with strict:
        assert torch.equal(batch_images(freefuse, prompts, seed=3, **run), eager)
    compiled = counters["stats"]["unique_graphs"]
    with torch._dynamo.config.patch(error_on_recompile=True):
        batch_images(freefuse, ["Bob and Alice", "Alice, then Bob"], seed=5, **run)
    assert counters["stats"]["unique_graphs"] == compiled
    torch._dynamo.reset()


@pytest.mark.slow
def test_compile_through_loading_with_inductor(assets) -> None:
    """`--compile` as loading does it (inductor, minutes on a CPU): no recompile, the same images."""
    import torch._dynamo

    from freefuse.runner import RunService
    from freefuse.settings import GenerationSettings
    from freefuse.spec import LoraSpec, RunSpec

    loras = [
        LoraSpec(path=str(assets / "alice.safetensors"), words=["Alice"]),
        LoraSpec(path=str(assets / "bob.safetensors"), words=["Bob"]),
    ]
    settings = GenerationSettings(prompt="Alice hugging Bob", height=64, width=64, num_inference_steps=3, seed=2)
    plain = RunService(device="cpu").run(RunSpec("tiny", loras, settings, memory=MemoryOptions()))
    torch._dynamo.reset()
    with torch._dynamo.config.patch(error_on_recompile=True):
        compiled = RunService(device="cpu").run(RunSpec("tiny", loras, settings, memory=MemoryOptions(compile=True)))
    torch._dynamo.reset()
    first, second = (np.asarray(run.output.images[0], dtype=np.float32) for run in (plain, compiled))
    assert np.abs(first - second).max() <= 1.0  # 8-bit pixels: inductor's kernels round differently
    assert compiled.output.manifest["model"]["load"]["compile"] is True


# -- GGUF files -----------------------------------------------------------------------------------------


def write_gguf(path: Path, state: dict[str, torch.Tensor], kind: str = "Q8_0") -> Path:
    """A GGUF file as FLUX GGUFs are made: 2-D weights in `kind`, the rest in F32."""
    import gguf

    qtype = gguf.GGMLQuantizationType[kind]
    writer = gguf.GGUFWriter(str(path), "flux")
    for name, tensor in state.items():
        values = tensor.float().numpy()
        if values.ndim == 2 and values.shape[1] % gguf.GGML_QUANT_SIZES[qtype][0] == 0:
            packed = gguf.quants.quantize(values, qtype)
            writer.add_tensor(name, packed, raw_shape=packed.shape, raw_dtype=qtype)
        else:
            writer.add_tensor(name, values.astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@needs_gguf
def test_inspect_names_a_gguf_files_quant_type_and_quantize_is_refused_on_it(assets, tmp_path, quant_packages) -> None:
    generator = torch.Generator().manual_seed(0)
    state = {
        "double_blocks.0.img_attn.qkv.weight": torch.randn(96, 64, generator=generator),
        "double_blocks.0.img_attn.qkv.bias": torch.randn(96, generator=generator),
        "guidance_in.in_layer.weight": torch.randn(32, 64, generator=generator),
    }
    path = write_gguf(tmp_path / "flux-q5.gguf", state, "Q5_0")
    shown = RUNNER.invoke(app, ["inspect", str(path), "--json"])
    assert shown.exit_code == 0, shown.output
    report = json.loads(shown.output)[0]
    assert report["format"] == "GGUF" and report["quant_type"] == "Q5_0"
    assert report["tensor_types"] == {"Q5_0": 2, "F32": 1}
    refused = RUNNER.invoke(
        app,
        [
            "generate",
            "--model",
            str(path),
            "--base-model",
            str(assets / "model"),
            "--lora",
            f"{assets / 'alice.safetensors'}=Alice",
            "--prompt",
            "Alice",
            "--quantize",
            "int8",
            "--out",
            str(tmp_path / "o"),
        ],
    )
    assert refused.exit_code == 2 and "already quantized (GGUF Q5_0); leave --quantize out" in refused.output


FLUX_WIDTH = {
    "num_layers": 1,
    "num_single_layers": 1,
    "attention_head_dim": 128,
    "num_attention_heads": 24,
    "axes_dims_rope": (16, 56, 56),
}


@pytest.mark.slow
@needs_gguf
def test_a_flux_gguf_file_loads_and_runs_masked_loras(tmp_path) -> None:
    """diffusers' BFL converter assumes FLUX.1's width: one block of each kind at that width,
    written as Q8_0 (0.5B parameters), loaded with the rest from a base folder, two LoRAs on top:
    the fused op takes the GGUF layers and gives PEFT's images; all-ones masks give merge."""
    import shutil

    from freefuse import MaskSet
    from freefuse.testing import flux_single_file_state_dict

    base = tmp_path / "base"
    tiny_flux_pipeline(seed=0).save_pretrained(base)
    wide = tiny_flux_pipeline(seed=1, transformer_config=FLUX_WIDTH, dtype=torch.bfloat16).transformer
    shutil.rmtree(base / "transformer")
    wide.save_config(base / "transformer")
    path = write_gguf(tmp_path / "flux1-q8_0.gguf", flux_single_file_state_dict(wide))
    states = [typical_lora_state_dict(tiny_flux_pipeline(seed=1, transformer_config=FLUX_WIDTH), rank=4, seed=s) for s in (1, 2)]
    del wide

    pipe = load_pipeline(str(path), device="cpu", base=str(base))
    pipe.set_progress_bar_config(disable=True)
    assert type(pipe.transformer.transformer_blocks[0].attn.to_q).__name__ == "GGUFLinear"
    freefuse = FreeFuse(pipe)
    for name, state in zip(("alice", "bob"), states, strict=True):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pipe.load_lora_weights({key: value.clone() for key, value in state.items()}, adapter_name=name)
        freefuse.use_adapter(name, words=[name.capitalize()])
    run = {"height": 64, "width": 64, "num_inference_steps": 2, "max_sequence_length": 16, "seed": 1}
    masks = torch.zeros(2, 64, 64)
    masks[0, :, :32], masks[1, :, 32:] = 1.0, 1.0

    def image(**settings):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FreeFuseWarning)
            return freefuse("Alice and Bob", output_type="pt", progress=False, **{**run, **settings}).images[0]

    fused = image(method="masks", masks=MaskSet(["alice", "bob"], masks))
    assert (fused - image(method="masks", masks=MaskSet(["alice", "bob"], masks), lora_op="peft")).abs().max() <= 2e-5
    ones = MaskSet(["alice", "bob"], torch.ones(2, 64, 64))
    assert (image(method="masks", masks=ones, text_scope="all") - image(method="merge")).abs().max() <= 2e-5


# -- on a GPU ---------------------------------------------------------------------------------------------


@needs_cuda
@pytest.mark.parametrize("offload", ["model", "group"])
def test_offloaded_quantized_runs_give_the_images_of_one_on_the_gpu(offload: str) -> None:
    kind = "int8" if HAS["torchao"] else None
    on_gpu = two_loras(kind)
    on_gpu.pipeline.to("cuda")
    expected = batch_images(on_gpu, ["Alice hugging Bob"], seed=1)
    offloaded = two_loras(kind)
    from freefuse.memory import offload as apply_offload

    apply_offload(offloaded.pipeline, MemoryOptions(offload=offload, quantize=kind), CUDA)
    assert (batch_images(offloaded, ["Alice hugging Bob"], seed=1) - expected).abs().max() <= 1e-4
