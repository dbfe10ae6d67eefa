"""LoRA files: layouts load with the same deltas, trigger words, and files that must be refused."""

from __future__ import annotations

import json
import pickle

import pytest
import torch
from diffusers import FluxPipeline
from safetensors.torch import save_file

from freefuse import FreeFuse
from freefuse.backends.flux import FluxBackend
from freefuse.lora import (
    LoraFileError,
    check_lora_path,
    describe_lora,
    read_lora_file,
    trigger_words_from_metadata,
)
from freefuse.testing import random_lora_state_dict, tiny_flux_pipeline

# kohya (sd-scripts) name of each FLUX layer group, and the diffusers layers it fuses.
DOUBLE = {
    "img_attn_qkv": ["attn.to_q", "attn.to_k", "attn.to_v"],
    "img_attn_proj": ["attn.to_out.0"],
    "img_mlp_0": ["ff.net.0.proj"],
    "img_mlp_2": ["ff.net.2"],
    "txt_attn_qkv": ["attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"],
    "txt_attn_proj": ["attn.to_add_out"],
    "txt_mlp_0": ["ff_context.net.0.proj"],
    "txt_mlp_2": ["ff_context.net.2"],
}
SINGLE = {"linear1": ["attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"], "linear2": ["proj_out"]}


def to_kohya(
    state: dict[str, torch.Tensor], alpha_scale: float = 1.0, bfl: bool = False
) -> dict[str, torch.Tensor]:
    """Write a diffusers-layout FLUX LoRA the way sd-scripts does: fused qkv with block-diagonal up.

    `alpha_scale` sets alpha = alpha_scale * rank, which scales every delta by alpha_scale.
    With `bfl`, use BFL names (`diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight`).
    """
    out = {}
    for kind, groups in (("double", DOUBLE), ("single", SINGLE)):
        prefix = "transformer_blocks" if kind == "double" else "single_transformer_blocks"
        blocks = {int(k.split(".")[2]) for k in state if k.startswith(f"transformer.{prefix}.")}
        for block in blocks:
            for group, layers in groups.items():
                keys = [f"transformer.{prefix}.{block}.{layer}" for layer in layers]
                if not all(f"{key}.lora_A.weight" in state for key in keys):
                    continue
                downs = [state[f"{key}.lora_A.weight"] for key in keys]
                ups = [state[f"{key}.lora_B.weight"] for key in keys]
                down = torch.cat(downs)
                up = torch.block_diag(*ups)
                if bfl:
                    layer = ".".join(group.rsplit("_", 1)) if kind == "double" else group  # img_attn.qkv
                    name = f"diffusion_model.{kind}_blocks.{block}.{layer}"
                    out[f"{name}.lora_A.weight"] = down
                    out[f"{name}.lora_B.weight"] = up
                    out[f"{name}.alpha"] = torch.tensor(alpha_scale * down.shape[0])
                else:
                    name = f"lora_unet_{kind}_blocks_{block}_{group}"
                    out[f"{name}.lora_down.weight"] = down
                    out[f"{name}.lora_up.weight"] = up
                    out[f"{name}.alpha"] = torch.tensor(alpha_scale * down.shape[0])
    return out


def probe(in_features: int) -> torch.Tensor:
    """Fixed random inputs: two low-rank maps that agree on them are (almost surely) equal."""
    return torch.randn(in_features, 8, generator=torch.Generator().manual_seed(in_features))


def deltas(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Module name → (B @ A) applied to `probe` inputs, for a diffusers-layout state dict."""
    return {
        key.removesuffix(".lora_A.weight"): state[key.replace("lora_A", "lora_B")].float()
        @ (state[key].float() @ probe(state[key].shape[1]))
        for key in state
        if key.endswith(".lora_A.weight")
    }


def real_width_source(rank: int = 1) -> dict[str, torch.Tensor]:
    """A rank-1 diffusers-layout LoRA at FLUX.1 widths on double block 0 and single block 0."""
    generator = torch.Generator().manual_seed(0)
    shapes = {
        "transformer.transformer_blocks.0.attn.to_q": (3072, 3072),
        "transformer.transformer_blocks.0.attn.to_k": (3072, 3072),
        "transformer.transformer_blocks.0.attn.to_v": (3072, 3072),
        "transformer.transformer_blocks.0.attn.to_out.0": (3072, 3072),
        "transformer.transformer_blocks.0.ff.net.0.proj": (12288, 3072),
        "transformer.transformer_blocks.0.ff.net.2": (3072, 12288),
        "transformer.transformer_blocks.0.attn.add_q_proj": (3072, 3072),
        "transformer.transformer_blocks.0.attn.add_k_proj": (3072, 3072),
        "transformer.transformer_blocks.0.attn.add_v_proj": (3072, 3072),
        "transformer.single_transformer_blocks.0.attn.to_q": (3072, 3072),
        "transformer.single_transformer_blocks.0.attn.to_k": (3072, 3072),
        "transformer.single_transformer_blocks.0.attn.to_v": (3072, 3072),
        "transformer.single_transformer_blocks.0.proj_mlp": (12288, 3072),
        "transformer.single_transformer_blocks.0.proj_out": (3072, 15360),
    }
    state = {}
    for name, (out_features, in_features) in shapes.items():
        state[f"{name}.lora_A.weight"] = torch.randn(rank, in_features, generator=generator)
        state[f"{name}.lora_B.weight"] = torch.randn(out_features, rank, generator=generator)
    return state


@pytest.mark.parametrize("bfl", [False, True], ids=["kohya", "bfl"])
@pytest.mark.parametrize("alpha_scale", [1.0, 0.5])
def test_kohya_and_bfl_files_at_real_flux_widths_convert_to_the_same_deltas(
    tmp_path, bfl, alpha_scale
) -> None:
    source = real_width_source()
    path = tmp_path / "real.safetensors"
    save_file(to_kohya(source, alpha_scale, bfl=bfl), str(path))
    lora = read_lora_file(path)
    assert lora.layout == ("bfl" if bfl else "kohya")
    backend = FluxBackend(tiny_flux_pipeline(seed=0))
    converted = backend.lora_state_dict(lora, backend.lora_source(lora))
    got, want = deltas(converted), deltas(source)
    assert set(got) == set(want)
    for name in want:
        torch.testing.assert_close(got[name], want[name] * alpha_scale, rtol=1e-5, atol=1e-5)


def adapter_deltas(pipe, adapter: str) -> dict[str, torch.Tensor]:
    result = {}
    for name, module in pipe.transformer.named_modules():
        lora_b = getattr(module, "lora_B", None)
        if isinstance(lora_b, torch.nn.ModuleDict) and adapter in lora_b:
            down = module.lora_A[adapter].weight
            result["transformer." + name] = (
                lora_b[adapter].weight @ (down @ probe(down.shape[1])) * module.scaling[adapter]
            )
    return result


@pytest.mark.parametrize("layout", ["diffusers", "peft", "kohya"])
def test_lora_files_load_with_the_deltas_of_the_adapter_they_came_from(tmp_path, layout) -> None:
    pipe = tiny_flux_pipeline(seed=0)
    source = random_lora_state_dict(pipe.transformer, rank=2, seed=5)
    if layout == "kohya":
        # sd-scripts' converter knows FLUX.1's single-block widths only; at tiny width use double blocks.
        source = {k: v for k, v in source.items() if "single_transformer_blocks" not in k}
        data = to_kohya(source)
    elif layout == "peft":
        data = {"base_model.model." + k.removeprefix("transformer."): v for k, v in source.items()}
    else:
        data = source
    path = tmp_path / f"{layout}.safetensors"
    save_file(data, str(path))
    freefuse = FreeFuse(pipe)
    subject = freefuse.add_lora(path, words=["Alice"], name="alice")
    assert subject.layout == layout
    got, want = adapter_deltas(pipe, "alice"), deltas(source)
    assert set(got) == set(want)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6)


def test_lora_for_another_model_size_names_the_first_mismatching_key(tmp_path) -> None:
    path = tmp_path / "big.safetensors"
    save_file(real_width_source(), str(path))
    freefuse = FreeFuse(tiny_flux_pipeline(seed=0))
    with pytest.raises(LoraFileError, match=r"does not fit this model: key 'transformer\..*' has shape"):
        freefuse.add_lora(path, words=["x"])
    assert not getattr(freefuse.pipeline.transformer, "peft_config", None)  # nothing half-loaded


def test_sdxl_lora_is_refused_as_another_architecture(tmp_path) -> None:
    path = tmp_path / "sdxl.safetensors"
    save_file(
        {
            "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 320),
            "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.zeros(320, 4),
        },
        str(path),
    )
    with pytest.raises(LoraFileError, match=r"LoRA for a UNet \(SD 1.x / SDXL\).*not for a FLUX.1 transformer"):
        FreeFuse(tiny_flux_pipeline(seed=0)).add_lora(path, words=["x"])


def test_rank_mismatch_is_refused(tmp_path) -> None:
    pipe = tiny_flux_pipeline(seed=0)
    state = random_lora_state_dict(pipe.transformer, rank=2, seed=1)
    key = next(k for k in state if k.endswith("lora_B.weight"))
    state[key] = torch.zeros(state[key].shape[0], 3)
    path = tmp_path / "bad.safetensors"
    save_file(state, str(path))
    with pytest.raises(LoraFileError, match="rank"):
        FreeFuse(pipe).add_lora(path, words=["x"])


@pytest.mark.parametrize("suffix", [".ckpt", ".pt", ".bin", ".pth"])
def test_pickle_files_are_refused_without_being_opened(tmp_path, monkeypatch, suffix) -> None:
    path = tmp_path / f"evil{suffix}"
    path.write_bytes(pickle.dumps({"x": 1}))

    def forbidden(*args, **kwargs):
        raise AssertionError("a pickle was loaded")

    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)
    monkeypatch.setattr(torch, "load", forbidden)
    with pytest.raises(LoraFileError, match="pickle"):
        check_lora_path(path)


def test_damaged_files_get_clear_errors(tmp_path) -> None:
    with pytest.raises(LoraFileError, match="does not exist"):
        check_lora_path(tmp_path / "missing.safetensors")
    with pytest.raises(LoraFileError, match="directory"):
        check_lora_path(tmp_path)
    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    with pytest.raises(LoraFileError, match="empty"):
        check_lora_path(empty)
    good = tmp_path / "good.safetensors"
    save_file({"transformer.x.lora_A.weight": torch.zeros(4, 64)}, str(good))
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[:-100])
    with pytest.raises(LoraFileError, match="truncated"):
        check_lora_path(truncated)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(LoraFileError, match="corrupt"):
        check_lora_path(garbage)


def test_same_file_twice_and_duplicate_names_are_refused(tmp_path) -> None:
    pipe = tiny_flux_pipeline(seed=0)
    state = random_lora_state_dict(pipe.transformer, rank=2, seed=1)
    save_file(state, str(tmp_path / "a.safetensors"))
    save_file(state, str(tmp_path / "copy.safetensors"))
    save_file(random_lora_state_dict(pipe.transformer, rank=2, seed=2), str(tmp_path / "b.safetensors"))
    freefuse = FreeFuse(pipe)
    freefuse.add_lora(tmp_path / "a.safetensors", words=["Alice"])
    with pytest.raises(LoraFileError, match="same file"):
        freefuse.add_lora(tmp_path / "copy.safetensors", words=["Bob"])
    with pytest.raises(ValueError, match="already added"):
        freefuse.add_lora(tmp_path / "b.safetensors", words=["Bob"], name="a")
    with pytest.raises(ValueError, match="weight"):
        freefuse.add_lora(tmp_path / "b.safetensors", words=["Bob"], weight="strong")


def test_trigger_words_come_from_metadata(tmp_path) -> None:
    assert trigger_words_from_metadata({"modelspec.trigger_phrase": "ohwx man, ohwx"}) == ["ohwx man", "ohwx"]
    assert trigger_words_from_metadata({"trigger_words": json.dumps(["zorblax"])}) == ["zorblax"]
    tags = {"10_alice": {"alice": 30, "smiling": 12, "red hair": 20}, "5_more": {"alice": 5, "outdoors": 9}}
    assert trigger_words_from_metadata({"ss_tag_frequency": json.dumps(tags)}) == ["alice"]
    assert trigger_words_from_metadata({"ss_tag_frequency": "{not json"}) == []
    pipe = tiny_flux_pipeline(seed=0)
    path = tmp_path / "alice.safetensors"
    save_file(
        random_lora_state_dict(pipe.transformer, seed=1),
        str(path),
        metadata={"ss_tag_frequency": json.dumps(tags), "ss_output_name": "alice_v2"},
    )
    subject = FreeFuse(pipe).add_lora(path)
    assert subject.words == ["alice"]
    report = describe_lora(path)
    assert report["trigger_words"] == ["alice"]
    assert report["top_tags"][0] == "alice (35)"
    assert report["rank"] == [4] and report["layout"] == "diffusers"
    assert report["metadata"]["ss_output_name"] == "alice_v2"


def test_the_lora_files_own_alpha_sets_its_scale(tmp_path) -> None:
    """diffusers stores lora_alpha in the header metadata; loading must keep scale = alpha / rank."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    source = tiny_flux_pipeline(seed=0)
    source.transformer.add_adapter(
        LoraConfig(r=2, lora_alpha=4, target_modules=["to_q"], init_lora_weights=False), adapter_name="x"
    )
    FluxPipeline.save_lora_weights(
        tmp_path,
        transformer_lora_layers=get_peft_model_state_dict(source.transformer, adapter_name="x"),
        transformer_lora_adapter_metadata=source.transformer.peft_config["x"].to_dict(),
        weight_name="alpha.safetensors",
    )
    pipe = tiny_flux_pipeline(seed=0)
    FreeFuse(pipe).add_lora(tmp_path / "alpha.safetensors", words=["x"], name="alpha")
    assert pipe.transformer.transformer_blocks[0].attn.to_q.scaling["alpha"] == 2.0


def test_a_failed_load_leaves_no_adapter_behind(tmp_path, monkeypatch) -> None:
    pipe = tiny_flux_pipeline(seed=0)
    path = tmp_path / "a.safetensors"
    save_file(random_lora_state_dict(pipe.transformer, seed=1), str(path))
    freefuse = FreeFuse(pipe)
    with pytest.raises(ValueError, match="empty activation word"):
        freefuse.add_lora(path, words=[""], name="alice")
    original = FluxPipeline.load_lora_weights

    def load_then_fail(self, *args, **kwargs):
        original(self, *args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(FluxPipeline, "load_lora_weights", load_then_fail)
    with pytest.raises(KeyboardInterrupt):
        freefuse.add_lora(path, words=["Alice"], name="alice")
    monkeypatch.undo()
    assert "alice" not in (getattr(pipe.transformer, "peft_config", None) or {})
    assert freefuse.add_lora(path, words=["Alice"], name="alice").name == "alice"


def test_what_a_lora_is_for_and_untrusted_kohya_metadata() -> None:
    from freefuse.lora import lora_family, trigger_words_and_source

    assert lora_family(
        ["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight"]
    ) == ("UNet (SD 1.x / SDXL)")
    assert lora_family(
        ["unet.up_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight"]
    ).startswith("UNet")
    assert lora_family(["lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight"]) == "FLUX transformer"
    assert lora_family(["transformer.transformer_blocks.0.attn.to_q.lora_A.weight"]) == "FLUX transformer"
    assert (
        lora_family(["lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight"]) == "text encoder only"
    )
    folders = {"10_ohwx": {"n_repeats": [1], "img_count": "many"}, "3_other": {"img_count": 5}, "2_x": [1, 2]}
    words, source = trigger_words_and_source({"ss_dataset_dirs": json.dumps(folders)})
    assert words == ["other"] and source == "ss_dataset_dirs (folder name)"


def test_kohya_file_on_a_narrow_model_says_why_and_where_the_converter_stopped(tmp_path) -> None:
    """diffusers' kohya converter asserts FLUX.1's widths without a message; ours names it all."""
    pipe = tiny_flux_pipeline(seed=0)
    path = tmp_path / "kohya_flux_carol_double.safetensors"
    save_file(to_kohya(random_lora_state_dict(pipe.transformer, rank=2, seed=5)), str(path))
    with pytest.raises(LoraFileError) as caught:
        FreeFuse(pipe).add_lora(path, words=["Carol"])
    message = str(caught.value)
    assert not message.rstrip().endswith(":")
    assert "FluxPipeline.lora_state_dict" in message and "AssertionError with no message" in message
    assert "on key 'lora_unet_single_blocks_" in message  # where it stopped, not the file's first key
    assert "assumes FLUX.1's widths (3072" in message and "32 wide" in message


def test_inspect_shows_the_rank_of_an_xlabs_lora(tmp_path) -> None:
    path = tmp_path / "xlabs.safetensors"
    state = {}
    for block in range(2):
        for part, width in (("qkv", 3 * 3072), ("proj", 3072)):
            prefix = f"double_blocks.{block}.processor.{part}_lora1"
            state[f"{prefix}.down.weight"] = torch.zeros(16, 3072)
            state[f"{prefix}.up.weight"] = torch.zeros(width, 16)
    save_file(state, str(path))
    report = describe_lora(path)
    assert report["layout"] == "xlabs" and report["for"] == "FLUX transformer"
    assert report["rank"] == [16]
    assert report["layers"] == 4  # qkv_lora1 and proj_lora1 of two blocks
