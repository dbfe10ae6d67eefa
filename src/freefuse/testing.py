"""Test helpers: random LoRAs, checkpoint layouts, planted attention scenes, a LoRA read-back.

For tests and benchmarks only; product code never imports this module (import-linter checks it).
The tiny models themselves are `freefuse.tiny`'s, re-exported here. Nothing here touches the
network or the disk (unless asked to write a file).
"""

from __future__ import annotations

import contextlib
import math
import socket
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .backends import BACKENDS, backend_for
from .backends.flux import FLUX_LORA_TARGETS
from .core import MaskConfig, masks_from_attention
from .core.attention import border_tokens
from .memory import store_in_fp8
from .tiny import (  # noqa: F401  (the tiny models, re-exported for tests)
    ALL_LAYERS,
    ALL_LINEAR,
    TINY_PIPELINES,
    TINY_TRANSFORMER_CONFIG,
    TINY_UNET_CONFIG,
    TINY_WORDS,
    default_dtype,
    random_lora_weights,
    tiny_clip_tokenizer,
    tiny_flux2_pipeline,
    tiny_flux_fill_pipeline,
    tiny_flux_pipeline,
    tiny_qwen_tokenizer,
    tiny_sdxl_pipeline,
    tiny_t5_tokenizer,
    tiny_zimage_pipeline,
)


def free_port() -> int:
    """A local port no process listens on now (asked of the system, never a fixed number)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# Each backend's typical LoRA: module-name suffixes, inside modules whose names contain the second.
TYPICAL_LORA_TARGETS = {name: backend.architecture.typical_lora_targets for name, backend in BACKENDS.items()}


def random_lora_state_dict(
    transformer: torch.nn.Module,
    rank: int = 4,
    seed: int = 0,
    targets: Iterable[str] | str = FLUX_LORA_TARGETS,
    scale: float = 1.0,
    prefix: str = "transformer",
    within: str = "transformer_blocks",
) -> dict[str, torch.Tensor]:
    """`freefuse.tiny.random_lora_weights` with FLUX's typical targets by default (see there)."""
    return random_lora_weights(
        transformer, targets=targets, within=within, prefix=prefix, rank=rank, seed=seed, scale=scale
    )


def typical_lora_state_dict(
    pipeline, rank: int = 4, seed: int = 0, scale: float = 1.0, targets: Iterable[str] | str | None = None
) -> dict[str, torch.Tensor]:
    """`random_lora_state_dict` for the pipeline's denoiser, by default on the layers a typical
    LoRA of its architecture adapts (`TYPICAL_LORA_TARGETS`)."""
    backend = backend_for(pipeline)
    typical, within = TYPICAL_LORA_TARGETS[backend.name]
    return random_lora_state_dict(
        backend.denoiser,
        rank=rank,
        seed=seed,
        scale=scale,
        targets=typical if targets is None else targets,
        prefix=backend.denoiser_name,
        within=within,
    )


def random_lora(
    pipeline,
    name: str,
    rank: int = 4,
    seed: int = 0,
    path: str | Path | None = None,
    scale: float = 1.0,
    metadata: dict[str, str] | None = None,
    targets: Iterable[str] | str | None = None,
):
    """Add a random LoRA adapter called `name` to the pipeline's denoiser (transformer or UNet).

    `targets`: default the architecture's typical LoRA layers (`TYPICAL_LORA_TARGETS`). With
    `path`, only write it there as a diffusers-layout `.safetensors` file (with `metadata` in its
    header) and leave the pipeline unchanged; return the path. Otherwise load it as a PEFT adapter
    and return its state dict.
    """
    state = typical_lora_state_dict(pipeline, rank=rank, seed=seed, scale=scale, targets=targets)
    if path is not None:
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(state, str(path), metadata={"format": "pt", **(metadata or {})})
        return path
    pipeline.load_lora_weights({k: v.clone() for k, v in state.items()}, adapter_name=name)
    return state


def _wake(module: torch.nn.Module, generator: torch.Generator, spread: float) -> None:
    """Random weights for a ControlNet's zero-initialised output layers (a trained ControlNet's are
    not zero; zeros would make every ControlNet test pass without the ControlNet doing anything)."""
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * spread)


def tiny_flux_controlnet(pipeline, seed: int = 0, union: bool = False, hint: bool = False):
    """A random `FluxControlNetModel` for the tiny FLUX pipeline's transformer (its widths, one
    double- and one single-stream block), in eval mode. `union`: with the union modes' embedding
    (`num_mode`); `hint`: XLabs-style, reading pixels through an `input_hint_block` instead of VAE
    latents."""
    from diffusers import FluxControlNetModel

    config = dict(pipeline.transformer.config)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = FluxControlNetModel(
            patch_size=2 if hint else config["patch_size"],  # XLabs': pixels /8, then 2x2 patches
            in_channels=config["in_channels"],
            num_layers=1,
            num_single_layers=1,
            attention_head_dim=config["attention_head_dim"],
            num_attention_heads=config["num_attention_heads"],
            joint_attention_dim=config["joint_attention_dim"],
            pooled_projection_dim=config["pooled_projection_dim"],
            guidance_embeds=config["guidance_embeds"],
            axes_dims_rope=tuple(config["axes_dims_rope"]),
            num_mode=7 if union else None,
            conditioning_embedding_channels=config["in_channels"] // 4 if hint else None,
        )
    generator = torch.Generator().manual_seed(seed + 1000)
    for module in (net.controlnet_blocks, net.controlnet_single_blocks, net.controlnet_x_embedder):
        _wake(module, generator, 0.05)
    return net.eval().requires_grad_(False)


#: The tiny CLIP image encoder's embedding width (its `projection_dim`).
TINY_IMAGE_EMBED_DIM = 24


def tiny_clip_image_encoder(seed: int = 0):
    """A random `CLIPVisionModelWithProjection` reading 32-pixel images, in eval mode."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    config = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=32,
        patch_size=8,
        projection_dim=TINY_IMAGE_EMBED_DIM,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return CLIPVisionModelWithProjection(config).eval().requires_grad_(False)


def tiny_flux_ip_adapter_state_dict(transformer, seed: int = 0, spread: float = 0.3) -> dict:
    """A random FLUX IP-Adapter for `transformer`, as `load_ip_adapter` takes it from a dict:
    `{"image_proj": {proj, norm}, "ip_adapter": {"<block>.to_k_ip.weight", ...}}` (4 image tokens
    of the text width, one key/value projection pair per double-stream block)."""
    config = transformer.config
    text_width = config["joint_attention_dim"]
    inner = config["num_attention_heads"] * config["attention_head_dim"]
    generator = torch.Generator().manual_seed(seed)

    def random(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator) * spread

    state = {
        "image_proj": {
            "proj.weight": random(4 * text_width, TINY_IMAGE_EMBED_DIM),
            "proj.bias": random(4 * text_width),
            "norm.weight": 1 + random(text_width),
            "norm.bias": random(text_width),
        },
        "ip_adapter": {},
    }
    for block in range(config["num_layers"]):
        for name in ("to_k_ip", "to_v_ip"):
            state["ip_adapter"][f"{block}.{name}.weight"] = random(inner, text_width)
            state["ip_adapter"][f"{block}.{name}.bias"] = random(inner)
    return state


def xlabs_ip_adapter_file(state: dict) -> dict[str, torch.Tensor]:
    """`tiny_flux_ip_adapter_state_dict`'s weights under the key names of XLabs' ip_adapter.safetensors
    (what `load_ip_adapter` reads from a file)."""
    flat = {f"ip_adapter_proj_model.{key}": value for key, value in state["image_proj"].items()}
    for key, value in state["ip_adapter"].items():
        block, name, kind = key.split(".")
        xlabs = {"to_k_ip": "ip_adapter_double_stream_k_proj", "to_v_ip": "ip_adapter_double_stream_v_proj"}[name]
        flat[f"double_blocks.{block}.processor.{xlabs}.{kind}"] = value.contiguous()
    return flat


def tiny_flux_ip_adapter(pipeline, seed: int = 0) -> dict:
    """A random IP-Adapter loaded into the tiny FLUX `pipeline` (`load_ip_adapter`), with a tiny CLIP
    image encoder registered first; returns the adapter's state dict."""
    state = tiny_flux_ip_adapter_state_dict(pipeline.transformer, seed=seed)
    pipeline.register_modules(image_encoder=tiny_clip_image_encoder(seed))
    pipeline.load_ip_adapter(state, weight_name="in memory", image_encoder_dtype=pipeline.transformer.dtype)
    return state


def tiny_flux_redux(pipeline, seed: int = 0, text_encoders: bool = False):
    """A random `FluxPriorReduxPipeline` for the tiny FLUX `pipeline`: a tiny SigLIP vision encoder
    (16 tokens of 32-pixel images) and a `ReduxImageEncoder` out to the transformer's text width.
    `text_encoders`: with the pipeline's own (the prior then encodes a prompt, as diffusers' oracle)."""
    from diffusers import FluxPriorReduxPipeline
    from diffusers.pipelines.flux.modeling_flux import ReduxImageEncoder
    from transformers import SiglipImageProcessor, SiglipVisionConfig, SiglipVisionModel

    config = SiglipVisionConfig(
        hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2, image_size=32, patch_size=8
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        encoder = SiglipVisionModel(config).eval().requires_grad_(False)
        embedder = ReduxImageEncoder(redux_dim=16, txt_in_features=pipeline.transformer.config["joint_attention_dim"])
    texts = {}
    if text_encoders:
        texts = {name: getattr(pipeline, name) for name in ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")}
    return FluxPriorReduxPipeline(
        image_encoder=encoder,
        feature_extractor=SiglipImageProcessor(size={"height": 32, "width": 32}),
        image_embedder=embedder.eval().requires_grad_(False),
        **texts,
    )


def tiny_zimage_controlnet(pipeline, seed: int = 0):
    """A random `ZImageControlNetModel` for the tiny Z-Image pipeline's transformer (control blocks
    beside its layers 0 and 1, one control refiner), in eval mode, its zero-initialised projections
    made random. Its embedders are the transformer's once a pipeline takes it (`from_transformer`)."""
    from diffusers import ZImageControlNetModel

    config = pipeline.transformer.config
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = ZImageControlNetModel(
            control_layers_places=[0, 1],
            control_refiner_layers_places=[0],
            control_in_dim=config["in_channels"],
            add_control_noise_refiner="control_noise_refiner",
            all_patch_size=tuple(config["all_patch_size"]),
            all_f_patch_size=tuple(config["all_f_patch_size"]),
            dim=config["dim"],
            n_refiner_layers=config["n_refiner_layers"],
            n_heads=config["n_heads"],
            n_kv_heads=config["n_kv_heads"],
        )
    _wake(net, torch.Generator().manual_seed(seed + 1000), 0.05)
    return net.eval().requires_grad_(False)


def tiny_sdxl_controlnet(pipeline, seed: int = 0):
    """A random `ControlNetModel` for the tiny SDXL pipeline's UNet (`ControlNetModel.from_unet`,
    its own conditioning embedding), in eval mode, its zero convolutions made random."""
    from diffusers import ControlNetModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = ControlNetModel.from_unet(
            pipeline.unet, conditioning_embedding_out_channels=(8, 16, 16, 16), load_weights_from_unet=False
        )
    generator = torch.Generator().manual_seed(seed + 1000)
    for module in (net.controlnet_down_blocks, net.controlnet_mid_block, net.controlnet_cond_embedding.conv_out):
        _wake(module, generator, 0.05)
    return net.eval().requires_grad_(False)


# The text-encoder layers kohya's SDXL LoRA training adapts by default.
KOHYA_TEXT_ENCODER_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")


_RESNET_TO_ORIGINAL = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_UNET_TOP_TO_ORIGINAL = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}


def _original_unet_key(key: str, per_block: int, up_has_attention: list[bool]) -> str:
    """A diffusers UNet2DConditionModel key under the original SD code base's names."""
    module, _, leaf = key.rpartition(".")
    for name, original in _UNET_TOP_TO_ORIGINAL.items():
        if module == name:
            return f"{original}.{leaf}"
    parts = module.split(".")

    def resnet(rest: list[str]) -> str:
        return ".".join([_RESNET_TO_ORIGINAL.get(rest[0], rest[0]), *rest[1:]])

    if parts[0] == "down_blocks":
        block, kind = int(parts[1]), parts[2]
        if kind == "downsamplers":
            return f"input_blocks.{(block + 1) * (per_block + 1)}.0.op.{leaf}"
        index = 1 + block * (per_block + 1) + int(parts[3])
        inner = resnet(parts[4:]) if kind == "resnets" else ".".join(parts[4:])
        return f"input_blocks.{index}.{0 if kind == 'resnets' else 1}.{inner}.{leaf}"
    if parts[0] == "mid_block":
        index = {"resnets.0": 0, "attentions.0": 1, "resnets.1": 2}[".".join(parts[1:3])]
        inner = resnet(parts[3:]) if parts[1] == "resnets" else ".".join(parts[3:])
        return f"middle_block.{index}.{inner}.{leaf}"
    if parts[0] == "up_blocks":
        block, kind = int(parts[1]), parts[2]
        if kind == "upsamplers":
            slot = 2 if up_has_attention[block] else 1
            return f"output_blocks.{block * (per_block + 1) + per_block}.{slot}.conv.{leaf}"
        index = block * (per_block + 1) + int(parts[3])
        inner = resnet(parts[4:]) if kind == "resnets" else ".".join(parts[4:])
        return f"output_blocks.{index}.{0 if kind == 'resnets' else 1}.{inner}.{leaf}"
    raise ValueError(f"No original name for UNet key {key!r}.")


def _original_vae_key(key: str, n_blocks: int) -> str:
    parts = key.split(".")
    side = parts[0]
    rest = [{"conv_shortcut": "nin_shortcut", "conv_norm_out": "norm_out"}.get(p, p) for p in parts[1:]]
    if rest[0] in ("down_blocks", "up_blocks"):
        block = int(rest[1]) if rest[0] == "down_blocks" else n_blocks - 1 - int(rest[1])
        where = "down" if rest[0] == "down_blocks" else "up"
        if rest[2] == "resnets":
            return ".".join([side, where, str(block), "block", *rest[3:]])
        return ".".join([side, where, str(block), "downsample" if where == "down" else "upsample", *rest[4:]])
    if rest[0] == "mid_block":
        slot = {"resnets.0": "block_1", "resnets.1": "block_2", "attentions.0": "attn_1"}[".".join(rest[1:3])]
        return ".".join([side, "mid", slot, *rest[3:]])
    return ".".join([side, *rest])


def sdxl_single_file_state_dict(pipeline) -> dict[str, torch.Tensor]:
    """An SDXL pipeline's weights as one checkpoint in the original (SGM) layout, as civitai-style
    single files store them: `model.diffusion_model.` (UNet), `first_stage_model.` (VAE),
    `conditioner.embedders.0.transformer.` (CLIP-L) and `conditioner.embedders.1.model.` (OpenCLIP-G,
    fused q/k/v). Lets `from_single_file` be tested offline on the tiny model."""
    unet = pipeline.unet
    per_block = unet.config.layers_per_block
    if not isinstance(per_block, int):
        raise ValueError("sdxl_single_file_state_dict needs one `layers_per_block` for every level.")
    up_attention = ["CrossAttn" in kind for kind in unet.config.up_block_types]
    result = {
        "model.diffusion_model." + _original_unet_key(key, per_block, up_attention): value
        for key, value in unet.state_dict().items()
    }
    n_vae_blocks = len(pipeline.vae.config.block_out_channels)
    result.update(
        {
            "first_stage_model." + _original_vae_key(key, n_vae_blocks): value
            for key, value in pipeline.vae.state_dict().items()
        }
    )
    for key, value in pipeline.text_encoder.state_dict().items():
        key = key if key.startswith("text_model.") else "text_model." + key
        result["conditioner.embedders.0.transformer." + key] = value
    big = "conditioner.embedders.1.model."
    layers: dict[str, dict[str, torch.Tensor]] = {}
    renames = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
    for key, value in pipeline.text_encoder_2.state_dict().items():
        key = key.removeprefix("text_model.")
        if key == "embeddings.token_embedding.weight":
            result[big + "token_embedding.weight"] = value
        elif key == "embeddings.position_embedding.weight":
            result[big + "positional_embedding"] = value
        elif key.startswith("final_layer_norm."):
            result[big + "ln_final." + key.rpartition(".")[2]] = value
        elif key == "text_projection.weight":
            result[big + "text_projection"] = value.T.contiguous()
        elif key.startswith("encoder.layers."):
            index, rest = key.removeprefix("encoder.layers.").split(".", 1)
            stem = f"{big}transformer.resblocks.{index}."
            if rest.startswith("self_attn.") and rest.split(".")[1] in ("q_proj", "k_proj", "v_proj"):
                layers.setdefault(stem, {})[rest] = value
            elif rest.startswith("self_attn.out_proj."):
                result[stem + "attn.out_proj." + rest.rpartition(".")[2]] = value
            else:
                for name, original in renames.items():
                    rest = rest.replace(name, original)
                result[stem + rest] = value
    for stem, parts in layers.items():
        for leaf in ("weight", "bias"):
            result[f"{stem}attn.in_proj_{leaf}"] = torch.cat(
                [parts[f"self_attn.{which}_proj.{leaf}"] for which in ("q", "k", "v")]
            )
    return {key: value.contiguous() for key, value in result.items()}


_FLUX_TOP_TO_ORIGINAL = {
    "time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
    "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
    "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
    "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
    "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
    "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
    "context_embedder": "txt_in",
    "x_embedder": "img_in",
    "proj_out": "final_layer.linear",
}
_FLUX_DOUBLE_TO_ORIGINAL = {
    "norm1.linear": "img_mod.lin",
    "norm1_context.linear": "txt_mod.lin",
    "attn.to_out.0": "img_attn.proj",
    "attn.to_add_out": "txt_attn.proj",
    "ff.net.0.proj": "img_mlp.0",
    "ff.net.2": "img_mlp.2",
    "ff_context.net.0.proj": "txt_mlp.0",
    "ff_context.net.2": "txt_mlp.2",
}
_FLUX_NORMS_TO_ORIGINAL = {
    "attn.norm_q": "img_attn.norm.query_norm",
    "attn.norm_k": "img_attn.norm.key_norm",
    "attn.norm_added_q": "txt_attn.norm.query_norm",
    "attn.norm_added_k": "txt_attn.norm.key_norm",
}


def flux_single_file_state_dict(transformer) -> dict[str, torch.Tensor]:
    """A FLUX transformer's weights in the original (BFL) layout, as transformer-only single files
    store them: `double_blocks.{i}.img_attn.qkv` (fused q/k/v), `single_blocks.{i}.linear1` (fused
    q/k/v and MLP in), `final_layer.adaLN_modulation.1` (shift before scale). diffusers' converter
    assumes FLUX.1's widths (3072), so only a transformer of that width round-trips."""
    weights = transformer.state_dict()
    result: dict[str, torch.Tensor] = {}

    def take(name: str) -> dict[str, torch.Tensor]:
        return {leaf: weights[f"{name}.{leaf}"] for leaf in ("weight", "bias") if f"{name}.{leaf}" in weights}

    for name, original in _FLUX_TOP_TO_ORIGINAL.items():
        for leaf, value in take(name).items():
            result[f"{original}.{leaf}"] = value
    for leaf, value in take("norm_out.linear").items():
        scale, shift = value.chunk(2, dim=0)
        result[f"final_layer.adaLN_modulation.1.{leaf}"] = torch.cat([shift, scale])
    for index in range(len(transformer.transformer_blocks)):
        block, target = f"transformer_blocks.{index}", f"double_blocks.{index}"
        for name, original in _FLUX_DOUBLE_TO_ORIGINAL.items():
            for leaf, value in take(f"{block}.{name}").items():
                result[f"{target}.{original}.{leaf}"] = value
        for name, original in _FLUX_NORMS_TO_ORIGINAL.items():
            result[f"{target}.{original}.scale"] = weights[f"{block}.{name}.weight"]
        for side, names in (
            ("img_attn", ("to_q", "to_k", "to_v")),
            ("txt_attn", ("add_q_proj", "add_k_proj", "add_v_proj")),
        ):
            for leaf in ("weight", "bias"):
                result[f"{target}.{side}.qkv.{leaf}"] = torch.cat(
                    [weights[f"{block}.attn.{n}.{leaf}"] for n in names]
                )
    for index in range(len(transformer.single_transformer_blocks)):
        block, target = f"single_transformer_blocks.{index}", f"single_blocks.{index}"
        for leaf, value in take(f"{block}.norm.linear").items():
            result[f"{target}.modulation.lin.{leaf}"] = value
        for leaf, value in take(f"{block}.proj_out").items():
            result[f"{target}.linear2.{leaf}"] = value
        result[f"{target}.norm.query_norm.scale"] = weights[f"{block}.attn.norm_q.weight"]
        result[f"{target}.norm.key_norm.scale"] = weights[f"{block}.attn.norm_k.weight"]
        for leaf in ("weight", "bias"):
            parts = [weights[f"{block}.attn.{n}.{leaf}"] for n in ("to_q", "to_k", "to_v")]
            result[f"{target}.linear1.{leaf}"] = torch.cat([*parts, weights[f"{block}.proj_mlp.{leaf}"]])
    return {key: value.contiguous() for key, value in result.items()}


def zimage_single_file_state_dict(transformer) -> dict[str, torch.Tensor]:
    """A Z-Image transformer's weights in the original layout, as ComfyUI's transformer-only files
    store them: `attention.qkv` (fused q/k/v), `attention.out`, `q_norm`/`k_norm`, `x_embedder.`
    and `final_layer.` without diffusers' patch-size key."""
    renames = (
        ("all_final_layer.2-1.", "final_layer."),
        ("all_x_embedder.2-1.", "x_embedder."),
        (".attention.to_out.0.", ".attention.out."),
        (".attention.norm_q.", ".attention.q_norm."),
        (".attention.norm_k.", ".attention.k_norm."),
    )
    result: dict[str, torch.Tensor] = {}
    weights = transformer.state_dict()
    for key, value in weights.items():
        if ".attention.to_q." in key or ".attention.to_k." in key or ".attention.to_v." in key:
            continue
        for old, new in renames:
            key = key.replace(old, new)
        result[key] = value
    for key in weights:
        if key.endswith(".attention.to_q.weight"):
            block = key[: -len(".to_q.weight")]
            result[f"{block}.qkv.weight"] = torch.cat([weights[f"{block}.to_{p}.weight"] for p in "qkv"])
    return {key: value.contiguous() for key, value in result.items()}


_FLUX2_TOP_TO_ORIGINAL = {
    "x_embedder": "img_in",
    "context_embedder": "txt_in",
    "time_guidance_embed.timestep_embedder.linear_1": "time_in.in_layer",
    "time_guidance_embed.timestep_embedder.linear_2": "time_in.out_layer",
    "time_guidance_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
    "time_guidance_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
    "double_stream_modulation_img.linear": "double_stream_modulation_img.lin",
    "double_stream_modulation_txt.linear": "double_stream_modulation_txt.lin",
    "single_stream_modulation.linear": "single_stream_modulation.lin",
    "proj_out": "final_layer.linear",
}
# FLUX.2's double-stream block layers (diffusers → BFL); q/k/v are fused separately.
FLUX2_DOUBLE_TO_ORIGINAL = {
    "attn.to_out.0": "img_attn.proj",
    "attn.to_add_out": "txt_attn.proj",
    "ff.linear_in": "img_mlp.0",
    "ff.linear_out": "img_mlp.2",
    "ff_context.linear_in": "txt_mlp.0",
    "ff_context.linear_out": "txt_mlp.2",
}
FLUX2_SINGLE_TO_ORIGINAL = {"attn.to_qkv_mlp_proj": "linear1", "attn.to_out": "linear2"}
FLUX2_QKV = {"img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"), "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")}
_FLUX2_NORMS = {
    "attn.norm_q": "img_attn.norm.query_norm",
    "attn.norm_k": "img_attn.norm.key_norm",
    "attn.norm_added_q": "txt_attn.norm.query_norm",
    "attn.norm_added_k": "txt_attn.norm.key_norm",
}


def flux2_single_file_state_dict(transformer) -> dict[str, torch.Tensor]:
    """A FLUX.2 transformer's weights in BFL's layout, as ComfyUI's transformer-only files store
    them: fused `img_attn.qkv`, `single_blocks.{i}.linear1/linear2`, the shared modulation's `.lin`,
    norms as `.scale`, `final_layer.adaLN_modulation.1` with shift before scale."""
    weights = transformer.state_dict()
    result: dict[str, torch.Tensor] = {}

    def take(name: str) -> dict[str, torch.Tensor]:
        return {leaf: weights[f"{name}.{leaf}"] for leaf in ("weight", "bias") if f"{name}.{leaf}" in weights}

    for name, original in _FLUX2_TOP_TO_ORIGINAL.items():
        for leaf, value in take(name).items():
            result[f"{original}.{leaf}"] = value
    scale, shift = weights["norm_out.linear.weight"].chunk(2, dim=0)
    result["final_layer.adaLN_modulation.1.weight"] = torch.cat([shift, scale])
    for index in range(len(transformer.transformer_blocks)):
        block, target = f"transformer_blocks.{index}", f"double_blocks.{index}"
        for name, original in FLUX2_DOUBLE_TO_ORIGINAL.items():
            for leaf, value in take(f"{block}.{name}").items():
                result[f"{target}.{original}.{leaf}"] = value
        for name, original in _FLUX2_NORMS.items():
            result[f"{target}.{original}.scale"] = weights[f"{block}.{name}.weight"]
        for original, names in FLUX2_QKV.items():
            result[f"{target}.{original}.weight"] = torch.cat([weights[f"{block}.{n}.weight"] for n in names])
    for index in range(len(transformer.single_transformer_blocks)):
        block, target = f"single_transformer_blocks.{index}", f"single_blocks.{index}"
        for name, original in FLUX2_SINGLE_TO_ORIGINAL.items():
            for leaf, value in take(f"{block}.{name}").items():
                result[f"{target}.{original}.{leaf}"] = value
        result[f"{target}.norm.query_norm.scale"] = weights[f"{block}.attn.norm_q.weight"]
        result[f"{target}.norm.key_norm.scale"] = weights[f"{block}.attn.norm_k.weight"]
    return {key: value.contiguous() for key, value in result.items()}


def kohya_names(state: dict[str, torch.Tensor], prefix: str = "transformer", alpha_ratio: float = 0.5) -> dict:
    """A diffusers-layout LoRA (`<prefix>.<module>.lora_A.weight`) under kohya's and musubi-tuner's
    names: `lora_unet_<module, dots as underscores>.lora_down/lora_up.weight` and an `.alpha` of
    `alpha_ratio` × rank; the up weights are divided by that ratio, so the deltas stay the same."""
    result: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        module, half = key.removeprefix(prefix + ".").rsplit(".lora_", 1)
        name = "lora_unet_" + module.replace(".", "_")
        if half.startswith("A"):
            result[f"{name}.lora_down.weight"] = value
            result[f"{name}.alpha"] = torch.tensor(alpha_ratio * value.shape[0])
        else:
            result[f"{name}.lora_up.weight"] = value / alpha_ratio
    return result


def ai_toolkit_names(state: dict[str, torch.Tensor], prefix: str = "transformer") -> dict:
    """A diffusers-layout LoRA under ai-toolkit's names: `diffusion_model.<module>.lora_A.weight`."""
    return {"diffusion_model." + key.removeprefix(prefix + "."): value for key, value in state.items()}


def share_qkv_down(state: dict[str, torch.Tensor], groups: Iterable[tuple[str, str, str]]) -> dict:
    """The LoRA with the q/k/v layers of each group (suffixes, e.g. `("to_q", "to_k", "to_v")`)
    sharing the first one's down matrix: the LoRA a fused-qkv file (one down, stacked ups) is."""
    result = dict(state)
    for key in state:
        for group in groups:
            if key.endswith(f".{group[0]}.lora_A.weight"):
                for other in group[1:]:
                    result[key.replace(f".{group[0]}.", f".{other}.")] = state[key].clone()
    return result


def flux2_bfl_lora_state_dict(state: dict[str, torch.Tensor], kohya: bool = False, alpha_ratio: float = 0.5) -> dict:
    """A diffusers-layout FLUX.2 LoRA whose q/k/v share their down matrices (`share_qkv_down`) in
    BFL's names, as ai-toolkit writes them (`diffusion_model.double_blocks.0.img_attn.qkv.lora_A`),
    or with `kohya`, as kohya/musubi-tuner do (`lora_unet_double_blocks_0_img_attn_qkv.lora_down`)."""
    original: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        module, half = key.removeprefix("transformer.").rsplit(".lora_", 1)
        parts = module.split(".")
        block, inner = ".".join(parts[:2]), ".".join(parts[2:])
        if parts[0] == "single_transformer_blocks":
            original[f"single_blocks.{parts[1]}.{FLUX2_SINGLE_TO_ORIGINAL[inner]}.lora_{half}"] = value
        elif inner in FLUX2_DOUBLE_TO_ORIGINAL:
            original[f"double_blocks.{parts[1]}.{FLUX2_DOUBLE_TO_ORIGINAL[inner]}.lora_{half}"] = value
        else:
            for fused, names in FLUX2_QKV.items():
                if inner == names[0]:
                    target = f"double_blocks.{parts[1]}.{fused}.lora_{half}"
                    if half.startswith("A"):
                        original[target] = value
                    else:
                        original[target] = torch.cat([state[f"transformer.{block}.{n}.lora_B.weight"] for n in names])
    if not kohya:
        return {"diffusion_model." + key: value for key, value in original.items()}
    return kohya_names({"t." + key: value for key, value in original.items()}, prefix="t", alpha_ratio=alpha_ratio)


def kohya_sdxl_lora_state_dict(
    state: dict[str, torch.Tensor], unet, text_encoders: dict | None = None
) -> dict:
    """A diffusers-layout SDXL LoRA (`unet.<module>.lora_A.weight`) in kohya's layout: the original
    SD code base's block names (`lora_unet_input_blocks_4_1_…`, `…_in_layers_2` for a LoCon
    convolution), `lora_down`/`lora_up`, and an alpha equal to the rank (scale 1).

    `text_encoders`: {"te1" or "te2": the text encoder} to add a random text-encoder part to each
    (`lora_te1_text_model_encoder_layers_0_self_attn_q_proj…`), as kohya trains by default.
    """
    per_block = unet.config.layers_per_block
    if not isinstance(per_block, int):
        raise ValueError("kohya_sdxl_lora_state_dict needs one `layers_per_block` for every level.")
    up_attention = ["CrossAttn" in kind for kind in unet.config.up_block_types]

    def original_name(module: str) -> str:
        return _original_unet_key(module + ".weight", per_block, up_attention).removesuffix(".weight")

    result: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        module, which = key.removeprefix("unet.").rsplit(".lora_", 1)
        stem = "lora_unet_" + original_name(module).replace(".", "_")
        result[f"{stem}.lora_{'down' if which.startswith('A') else 'up'}.weight"] = value
        if which.startswith("A"):
            result[f"{stem}.alpha"] = torch.tensor(float(value.shape[0]))
    generator = torch.Generator().manual_seed(len(state))
    for prefix, encoder in (text_encoders or {}).items():
        for name, module in encoder.named_modules():
            if isinstance(module, torch.nn.Linear) and name.endswith(KOHYA_TEXT_ENCODER_TARGETS):
                stem = f"lora_{prefix}_" + name.replace(".", "_")
                out_features, in_features = module.weight.shape
                result[f"{stem}.lora_down.weight"] = (
                    torch.randn(4, in_features, generator=generator) / in_features**0.5
                )
                result[f"{stem}.lora_up.weight"] = torch.randn(out_features, 4, generator=generator) * 0.5
                result[f"{stem}.alpha"] = torch.tensor(4.0)
    return result


PLANTED_COLOURS = ((0.9, 0.2, 0.1), (0.1, 0.3, 0.9), (0.1, 0.8, 0.2), (0.9, 0.9, 0.1), (0.6, 0.1, 0.7))


def planted_scene(
    n_subjects: int,
    grid: tuple[int, int] = (32, 32),
    heads: int = 2,
    dim: int = 32,
    seed: int = 0,
    n_sinks: int | None = None,
    sink_strength: float = 12.0,
    leak: float = 0.0,
    noise: float = 0.3,
    pixels_per_token: int = 16,
) -> dict:
    """A synthetic attention scene whose right answer is known, for testing stage 1.

    The grid is split into `n_subjects` Voronoi regions. Image keys and queries of region l point
    along a direction e_l (so self-attention stays inside the region); subject l's two text tokens
    query e_l, plus `leak` times the next subject's direction (cross-attention that spills over).
    `n_sinks` border tokens (default: the top-1% count) get keys along a sink direction that every
    text query also has, the attention-sink pattern of FLUX: raw cross-attention piles up there.
    `image` paints each region a distinct colour (plus noise), `pixels_per_token` pixels per token.

    Returns a dict with `q_text` `[heads, T, dim]`, `q_img` and `k_img` `[heads, N, dim]`,
    `token_sets`, `grid`, `image` `H×W×3`, `regions` `[h, w]` int64 (true subject of each token)
    and `sinks` (token indices).
    """
    if not 1 <= n_subjects <= len(PLANTED_COLOURS) or dim < n_subjects + 1:
        raise ValueError(f"`n_subjects` must be 1..{len(PLANTED_COLOURS)} and `dim` > n_subjects.")
    generator = torch.Generator().manual_seed(seed)
    h, w = grid
    n_tokens = h * w
    centres = torch.rand(n_subjects, 2, generator=generator) * torch.tensor([h, w])
    yy, xx = torch.meshgrid(torch.arange(h) + 0.5, torch.arange(w) + 0.5, indexing="ij")
    distance = (yy[None] - centres[:, 0, None, None]) ** 2 + (xx[None] - centres[:, 1, None, None]) ** 2
    regions = distance.argmin(dim=0)
    # Orthonormal directions: one per subject, the last one for the sinks.
    directions = torch.linalg.qr(torch.randn(dim, dim, generator=generator))[0][:, : n_subjects + 1].T
    own = directions[regions.reshape(-1)]
    k_img = noise * torch.randn(heads, n_tokens, dim, generator=generator) + 3.0 * own[None]
    q_img = noise * torch.randn(heads, n_tokens, dim, generator=generator) + 3.0 * own[None]
    n_text = 2 * n_subjects + 3
    q_text = 0.3 * torch.randn(heads, n_text, dim, generator=generator)
    token_sets = []
    for subject in range(n_subjects):
        positions = [1 + 2 * subject, 2 + 2 * subject]
        spill = directions[(subject + 1) % n_subjects] if n_subjects > 1 else 0.0
        for position in positions:
            q_text[:, position] += 3.0 * directions[subject] + leak * 3.0 * spill + 3.0 * directions[-1]
        token_sets.append(positions)
    border = border_tokens(grid, 1).nonzero().reshape(-1)
    n_sinks = int(n_tokens * 0.01) if n_sinks is None else n_sinks
    sinks = border[torch.randperm(len(border), generator=generator)[:n_sinks]]
    k_img[:, sinks] = directions[-1] * sink_strength
    colours = torch.tensor(PLANTED_COLOURS[:n_subjects])
    image = colours[regions].repeat_interleave(pixels_per_token, 0).repeat_interleave(pixels_per_token, 1)
    image = (image + 0.03 * torch.randn(image.shape, generator=generator)).clamp(0, 1).numpy()
    return {
        "q_text": q_text,
        "q_img": q_img,
        "k_img": k_img,
        "token_sets": token_sets,
        "grid": grid,
        "image": image,
        "regions": regions,
        "sinks": sinks,
    }


@dataclass
class LayerCall:
    """One forward call of a LoRA-adapted layer, as `LoraDeltaRecorder` saw it.

    Attributes:
        layer: module name inside the transformer.
        label: what the recorder's `label` said when the call happened (e.g. "cond", "uncond").
        tokens: length of the token axis of the layer's input, or None for `[B, C]` inputs.
        masks: adapter name → recovered coefficients, `[B, S]` (or `[B]` without a token axis, `[R]`
            for a 2-d input); NaN where every adapter's delta is exactly zero (nothing to read).
        fit_error: largest relative residual of the fit; ~0 when the output is exactly base plus
            per-token multiples of each adapter's delta.
    """

    layer: str
    label: str
    tokens: int | None
    masks: dict[str, torch.Tensor]
    fit_error: float


class LoraDeltaRecorder:
    """Reads back, from every LoRA layer's real input and output, how much of each adapter acted per token.

    For a PEFT LoRA layer with input x and output y, the base output is b = base_layer(x) and each
    adapter's whole delta is d_a = scaling_a · B_a(A_a(x)), formed here from the weights (no hook of
    the layer runs). Per token, the coefficients m_a solving y - b = Σ_a m_a · d_a (least squares,
    float64) are the masks that were really applied. It uses nothing of FreeFuse's masking code, so
    tests of ownership and token layout built on it can catch bugs there.

    Args:
        transformer: the PEFT-adapted model.
        adapters: adapter names to recover (every one active during the run).
    """

    def __init__(self, transformer: torch.nn.Module, adapters: list[str]) -> None:
        self.transformer = transformer
        self.adapters = list(adapters)
        self.label = ""
        self.calls: list[LayerCall] = []

    def _layers(self) -> list[tuple[str, torch.nn.Module]]:
        found = []
        for name, module in self.transformer.named_modules():
            lora_a = getattr(module, "lora_A", None)
            if isinstance(lora_a, torch.nn.ModuleDict) and any(a in lora_a for a in self.adapters):
                found.append((name, module))
        return found

    def _record(self, name: str, module: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
        x64 = x.detach().double()
        residual = y.detach().double() - torch.nn.functional.linear(
            x64,
            module.base_layer.weight.double(),
            None if module.base_layer.bias is None else module.base_layer.bias.double(),
        )
        adapters = [a for a in self.adapters if a in module.lora_A]
        deltas = []
        for adapter in adapters:
            down = module.lora_A[adapter].weight.double()
            up = module.lora_B[adapter].weight.double()
            deltas.append((x64 @ down.T @ up.T) * float(module.scaling[adapter]))
        system = torch.stack(deltas, dim=-1)  # [..., out, k]
        solution = torch.linalg.lstsq(system, residual[..., None]).solution[..., 0]  # [..., k]
        # A token whose input makes every delta exactly zero (a zero padding row) says nothing.
        silent = (system == 0).all(dim=-1).all(dim=-1)
        solution = solution.masked_fill(silent[..., None], float("nan"))
        fitted = (system @ solution.nan_to_num()[..., None])[..., 0]
        scale = residual.abs().amax().clamp_min(1e-12)
        fit_error = float((fitted - residual).abs().amax() / scale)
        self.calls.append(
            LayerCall(
                layer=name,
                label=self.label,
                tokens=x.shape[1] if x.ndim == 3 else None,
                masks={adapter: solution[..., i].float() for i, adapter in enumerate(adapters)},
                fit_error=fit_error,
            )
        )

    @contextlib.contextmanager
    def recording(self) -> Iterator[LoraDeltaRecorder]:
        """Record every call of every adapted layer inside; hooks removed on exit, even on error."""
        handles = []
        try:
            for name, module in self._layers():

                def hook(module, inputs, output, name=name):
                    self._record(name, module, inputs[0], output)

                handles.append(module.register_forward_hook(hook))
            yield self
        finally:
            for handle in handles:
                handle.remove()


def _scene_regions(
    n_subjects: int, grid: tuple[int, int], layout: str, area: float, touching: bool, generator: torch.Generator
) -> torch.Tensor:
    """`[h, w]` subject index per token (-1: background): Voronoi regions, or one disc per subject."""
    h, w = grid
    n_tokens = h * w
    yy, xx = torch.meshgrid(torch.arange(h) + 0.5, torch.arange(w) + 0.5, indexing="ij")
    if layout == "regions":
        centres = torch.rand(n_subjects, 2, generator=generator) * torch.tensor([h, w])
        distance = (yy[None] - centres[:, 0, None, None]) ** 2 + (xx[None] - centres[:, 1, None, None]) ** 2
        regions = distance.argmin(dim=0)
    else:
        radius = math.sqrt(area * n_tokens / math.pi)
        regions = torch.full((h, w), -1, dtype=torch.int64)
        placed: list[tuple[float, float]] = []
        for subject in range(n_subjects):
            for _ in range(1000):
                if touching and placed:
                    angle = float(torch.rand(1, generator=generator)) * 2 * math.pi
                    cy = placed[-1][0] + 2 * radius * math.sin(angle)
                    cx = placed[-1][1] + 2 * radius * math.cos(angle)
                else:
                    cy = radius + 1 + float(torch.rand(1, generator=generator)) * (h - 2 * radius - 2)
                    cx = radius + 1 + float(torch.rand(1, generator=generator)) * (w - 2 * radius - 2)
                inside = radius + 1 <= cy <= h - radius - 1 and radius + 1 <= cx <= w - radius - 1
                apart = all(math.hypot(cy - py, cx - px) >= 2 * radius - 0.5 for py, px in placed)
                far = touching or all(math.hypot(cy - py, cx - px) >= 2 * radius + 2 for py, px in placed)
                if inside and apart and far:
                    break
            else:
                raise ValueError(f"{n_subjects} discs of area {area} do not fit on a {h}x{w} grid.")
            placed.append((cy, cx))
            disc = ((yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2) & (regions == -1)
            regions[disc] = subject
    return regions


def _scene_picture(
    regions: torch.Tensor, n_subjects: int, pixels_per_token: int, generator: torch.Generator
) -> np.ndarray:
    """`H×W×3` in [0, 1]: each region in its own colour (the background light grey), a little noise."""
    palette = torch.tensor([*PLANTED_COLOURS, (0.5, 0.5, 0.5)])[: n_subjects + 1]
    colours = torch.where(
        (regions >= 0)[..., None], palette[regions.clamp(min=0)], torch.tensor([0.85, 0.85, 0.8])
    )
    image = colours.repeat_interleave(pixels_per_token, 0).repeat_interleave(pixels_per_token, 1)
    image = (image + 0.03 * torch.randn(image.shape, generator=generator)).clamp(0, 1).numpy()
    return image


def attention_scene(
    n_subjects: int,
    grid: tuple[int, int] = (32, 32),
    layout: str = "regions",
    area: float = 0.035,
    touching: bool = False,
    sinks: str = "border",
    n_sinks: int | None = None,
    text_signal: float = 3.0,
    noise: float = 0.3,
    background_words: bool = True,
    heads: int = 2,
    dim: int = 32,
    n_text: int = 24,
    seed: int = 0,
    pixels_per_token: int = 16,
) -> dict:
    """A synthetic joint-attention scene with a known answer, for every stage-1 method.

    Subjects: `layout="regions"` splits the whole grid into Voronoi regions (no background);
    `layout="discs"` puts one disc of `area` (fraction of the grid) per subject on a background,
    apart, or side by side with `touching`. Directions: e_l per subject, e_bg for the background,
    e_sink for image-key sinks, e_eos for the text tokens that soak up attention (EOS, padding).

    - Image tokens of subject l (and of the background) have queries, keys and values along e_l
      (e_bg), plus noise, so self-attention stays inside a region.
    - Text: subject l has two tokens whose queries look for e_l (text→image) and whose keys
      answer to e_l (image→text), both `text_signal` strong; two background-word tokens do the
      same for e_bg when `background_words`; the last tokens are EOS and padding with keys along
      e_eos, which every image query also has a little of (they take most image→text attention
      everywhere, as in FLUX).
    - Sinks: `n_sinks` image tokens (default 1 % of N) with keys along e_sink, which every text
      query also has: raw text→image attention piles up there. `sinks="border"` places them on
      the grid border (FLUX), `"anywhere"` anywhere, `"none"` makes none.

    Returns a dict: `q_text`, `k_text` `[heads, T, dim]`; `q_img`, `k_img` `[heads, N, dim]`;
    `o_img` `[N, heads*dim]` (the real joint attention output of the image tokens);
    `token_sets` (L lists), `background_tokens` (list, empty without background words), `grid`,
    `image` `H×W×3`, `regions` `[h, w]` int64 (subject index, -1 for background), `sinks`.
    """
    if layout not in ("regions", "discs") or sinks not in ("border", "anywhere", "none"):
        raise ValueError("`layout` is 'regions' or 'discs'; `sinks` is 'border', 'anywhere' or 'none'.")
    n_directions = n_subjects + 3
    if dim < n_directions or n_text < 2 * n_subjects + 4:
        raise ValueError(f"`dim` must be >= {n_directions} and `n_text` >= {2 * n_subjects + 4}.")
    generator = torch.Generator().manual_seed(seed)
    h, w = grid
    n_tokens = h * w
    regions = _scene_regions(n_subjects, grid, layout, area, touching, generator)
    directions = torch.linalg.qr(torch.randn(dim, dim, generator=generator))[0][:, :n_directions].T
    e_subject, e_bg, e_sink, e_eos = (
        directions[:n_subjects],
        directions[n_subjects],
        directions[-2],
        directions[-1],
    )
    flat = regions.reshape(-1)
    own = torch.where((flat >= 0)[:, None], e_subject[flat.clamp(min=0)], e_bg[None].expand(n_tokens, dim))

    def noisy(base: torch.Tensor, scale: float = 3.0) -> torch.Tensor:
        return noise * torch.randn(heads, *base.shape, generator=generator) + scale * base[None]

    q_img = noisy(own) + 1.0 * e_eos  # every image query looks a little for EOS/padding
    k_img = noisy(own)
    v_img = noisy(own)
    q_text = 0.3 * torch.randn(heads, n_text, dim, generator=generator)
    k_text = 0.3 * torch.randn(heads, n_text, dim, generator=generator)
    v_text = 0.3 * torch.randn(heads, n_text, dim, generator=generator)
    token_sets = [[1 + 2 * subject, 2 + 2 * subject] for subject in range(n_subjects)]
    for subject, tokens in enumerate(token_sets):
        q_text[:, tokens] += text_signal * e_subject[subject] + 3.0 * e_sink
        k_text[:, tokens] += text_signal * e_subject[subject]
    background_tokens = [2 * n_subjects + 1, 2 * n_subjects + 2] if background_words else []
    if background_tokens:
        q_text[:, background_tokens] += text_signal * e_bg + 3.0 * e_sink
        k_text[:, background_tokens] += text_signal * e_bg
    eos = list(range(2 * n_subjects + 3, n_text))
    k_text[:, eos] += 4.0 * e_eos
    sink_tokens = torch.zeros(0, dtype=torch.int64)
    if sinks != "none":
        pool = border_tokens(grid, 1).nonzero().reshape(-1) if sinks == "border" else torch.arange(n_tokens)
        count = max(1, int(n_tokens * 0.01)) if n_sinks is None else n_sinks
        sink_tokens = pool[torch.randperm(len(pool), generator=generator)[:count]]
        k_img[:, sink_tokens] = e_sink * 12.0
    keys = torch.cat([k_text, k_img], dim=1)
    values = torch.cat([v_text, v_img], dim=1)
    attention = torch.softmax(q_img @ keys.transpose(1, 2) / math.sqrt(dim), dim=-1)
    o_img = (attention @ values).transpose(0, 1).reshape(n_tokens, heads * dim)
    image = _scene_picture(regions, n_subjects, pixels_per_token, generator)
    tensors = {"q_text": q_text, "k_text": k_text, "q_img": q_img, "k_img": k_img, "o_img": o_img}
    found = {"token_sets": token_sets, "background_tokens": background_tokens, "regions": regions}
    return {**tensors, **found, "grid": grid, "image": image, "sinks": sink_tokens}


def scene_masks(scene: dict, config=None, image: bool = True):
    """`masks_from_attention` on a planted scene (`planted_scene` or `attention_scene`), with every
    tensor the scene has (text keys, attention outputs and background words when present)."""
    return masks_from_attention(
        scene["q_text"],
        scene["q_img"],
        scene["k_img"],
        scene["token_sets"],
        scene["grid"],
        scene["image"] if image else None,
        config if config is not None else MaskConfig(),
        background_tokens=scene.get("background_tokens") or None,
        k_text=scene.get("k_text"),
        o_img=scene.get("o_img"),
    )


def scene_ious(scene: dict, result) -> list[float]:
    """Per subject, IoU of its token mask (> 0.5) with its planted region."""
    found = []
    for subject in range(len(scene["token_sets"])):
        mask, truth = result.token_masks[subject] > 0.5, scene["regions"] == subject
        found.append(float((mask & truth).sum() / (mask | truth).sum().clamp_min(1)))
    return found


# -- quantized bases ------------------------------------------------------------------------------------

#: `quantize_denoiser` kinds: GGUF types, bitsandbytes NF4 and LLM.int8, torchao int8, fp8 storage.
QUANTIZED_BASES = ("gguf-Q8_0", "gguf-Q5_0", "gguf-Q4_0", "nf4", "bnb-int8", "int8", "fp8")
#: The package each kind needs (tests skip without it).
QUANTIZED_BASE_PACKAGES = {"gguf": "gguf", "nf4": "bitsandbytes", "bnb-int8": "bitsandbytes", "int8": "torchao"}


def _swap_linears(module: torch.nn.Module, make) -> None:
    """Every plain `nn.Linear` under `module` replaced by `make(linear)` (None: kept)."""
    for name, child in module.named_children():
        if type(child) is torch.nn.Linear:
            made = make(child)
            if made is not None:
                setattr(module, name, made)
        else:
            _swap_linears(child, make)


def _gguf_linear(linear: torch.nn.Linear, kind: str, random_blocks: bool):
    """`linear` as diffusers' `GGUFLinear` with its weight in GGUF type `kind` ("Q8_0"); with
    `random_blocks`, random blocks of that type (a benchmark's random model: quantizing 12B
    weights in numpy would take longer than the benchmark)."""
    import gguf
    from diffusers.quantizers.gguf.utils import GGUFLinear, GGUFParameter

    qtype = gguf.GGMLQuantizationType[kind]
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    weight = linear.weight.detach()
    if weight.shape[1] % block:
        return None  # as GGUF files keep such tensors unquantized
    if random_blocks:
        rows, blocks = weight.shape[0], weight.shape[1] // block
        data = torch.randint(0, 256, (rows, blocks, size), dtype=torch.uint8, device=weight.device)
        scale = torch.full((rows, blocks), float(weight.float().std()) / 64, dtype=torch.float16, device=weight.device)
        data[..., :2] = scale.view(torch.uint8).view(rows, blocks, 2)  # every type here starts with an fp16 scale
        data = data.reshape(rows, blocks * size)
    else:
        data = torch.from_numpy(gguf.quants.quantize(weight.float().cpu().numpy(), qtype)).to(weight.device)
    layer = GGUFLinear(
        linear.in_features, linear.out_features, bias=linear.bias is not None, compute_dtype=weight.dtype, device="meta"
    )
    layer.weight = GGUFParameter(data, quant_type=qtype)
    if linear.bias is not None:
        layer.bias = torch.nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
    return layer


def _bnb_linear(linear: torch.nn.Linear, four_bit: bool):
    """`linear` as a bitsandbytes layer, quantized on its device (as `from_pretrained` leaves it)."""
    import bitsandbytes as bnb

    device = linear.weight.device
    if four_bit:
        layer = bnb.nn.Linear4bit(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            compute_dtype=linear.weight.dtype,
            quant_type="nf4",
            device="cpu",
        )
    else:
        layer = bnb.nn.Linear8bitLt(
            linear.in_features, linear.out_features, bias=linear.bias is not None, has_fp16_weights=False, device="cpu"
        )
    layer.load_state_dict({key: value.cpu() for key, value in linear.state_dict().items()})
    return layer.to(device)  # bitsandbytes quantizes as the weight moves


def quantize_denoiser(pipeline, kind: str, random_blocks: bool = False) -> None:
    """The pipeline's denoiser quantized in place, its layers as loading a quantized model leaves
    them (GGUF's `GGUFLinear`, bitsandbytes' `Linear4bit`/`Linear8bitLt`, torchao's int8 tensors,
    fp8 storage), for tests and benchmarks of random models without a file. LoRAs made before
    (`typical_lora_state_dict`) load onto it as onto a loaded quantized model. `kind`: one of
    `QUANTIZED_BASES`."""
    denoiser = backend_for(pipeline).denoiser
    if kind.startswith("gguf-"):
        _swap_linears(denoiser, lambda linear: _gguf_linear(linear, kind.removeprefix("gguf-"), random_blocks))
    elif kind in ("nf4", "bnb-int8"):
        _swap_linears(denoiser, lambda linear: _bnb_linear(linear, kind == "nf4"))
        # What diffusers' bitsandbytes quantizer sets; PEFT reads it to pick its bitsandbytes LoRA layers.
        setattr(denoiser, "is_loaded_in_4bit" if kind == "nf4" else "is_loaded_in_8bit", True)
    elif kind == "int8":
        from torchao.quantization import Int8WeightOnlyConfig, quantize_

        quantize_(denoiser, Int8WeightOnlyConfig())
    elif kind == "fp8":
        store_in_fp8(denoiser, next(denoiser.parameters()).dtype)
    else:
        raise ValueError(f"Unknown quantized base {kind!r}; use one of {list(QUANTIZED_BASES)}.")
