"""The ShapesWorld text-to-image model: FLUX.1's architecture, shrunk to 64×64 pictures.

A `FluxPipeline` like any other: `FluxTransformer2DModel` (2 double + 2 single blocks, 4 heads of
32), an `AutoencoderKL` with a 4x factor (so a 64×64 picture is an 8×8 grid of 64 image tokens),
tiny T5 and CLIP text encoders, and a flow-matching Euler scheduler. Trained weights are committed
under `weights/` (safetensors) and load with `load_shapesworld()`.

ShapesWorld v3 (`MODEL_CONFIGS["v3"]`): 3 double + 3 single blocks and a 2x VAE, so a 64×64
picture is a 16×16 grid of 256 image tokens (FluxPipeline packs 2×2 latent pixels into a token).
Its weights go to `weights/v3/` once trained.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..tiny import text_encoders, tiny_clip_tokenizer, tiny_t5_tokenizer
from .scenes import SIZE, WORLDS, training_vocabulary

WEIGHTS = Path(__file__).parent / "weights"
MODEL_DIR = WEIGHTS / "model"
LORA_DIR = WEIGHTS / "loras"
#: The text tokens the model was trained on. Its T5 tokenizer declares it (`model_max_length`), so
#: that a run that sets no `max_sequence_length` uses it: read past it, the model draws near-black.
MAX_TEXT_TOKENS = 24

TRANSFORMER_CONFIG = {
    "patch_size": 1,
    "in_channels": 16,  # 4 latent channels in 2x2 patches
    "num_layers": 2,
    "num_single_layers": 2,
    "attention_head_dim": 32,
    "num_attention_heads": 4,
    "joint_attention_dim": 64,
    "pooled_projection_dim": 64,
    "guidance_embeds": False,
    "axes_dims_rope": (8, 12, 12),
}
VAE_CONFIG = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",) * 3,
    "up_block_types": ("UpDecoderBlock2D",) * 3,
    "block_out_channels": (16, 32, 32),
    "layers_per_block": 1,
    "latent_channels": 4,
    "norm_num_groups": 8,
    "sample_size": SIZE,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
    "mid_block_add_attention": False,
}


TRANSFORMER_CONFIG_V3 = {**TRANSFORMER_CONFIG, "num_layers": 3, "num_single_layers": 3}
VAE_CONFIG_V3 = {
    **VAE_CONFIG,
    "down_block_types": ("DownEncoderBlock2D",) * 2,
    "up_block_types": ("UpDecoderBlock2D",) * 2,
    "block_out_channels": (32, 32),
}
#: per world: the transformer, the VAE, and the scheduler's dynamic-shift range (its base at the
#: world's own image sequence length, so both worlds sample with the same time schedule).
MODEL_CONFIGS: dict[str, dict] = {
    "v1": {
        "transformer": TRANSFORMER_CONFIG,
        "vae": VAE_CONFIG,
        "scheduler": {"base_image_seq_len": 64, "max_image_seq_len": 1024},
    },
    "v3": {
        "transformer": TRANSFORMER_CONFIG_V3,
        "vae": VAE_CONFIG_V3,
        "scheduler": {"base_image_seq_len": 256, "max_image_seq_len": 4096},
    },
}
V3_MODEL_DIR = WEIGHTS / "v3" / "model"
V3_LORA_DIR = WEIGHTS / "v3" / "loras"


def token_grid(vae) -> int:
    """Image tokens per side of a 64×64 picture: the VAE's factor, then FLUX's 2×2 patches."""
    return SIZE // 2 ** (len(vae.config.block_out_channels) - 1) // 2


def tokenizers():
    words = training_vocabulary()
    t5 = tiny_t5_tokenizer(words)
    t5.model_max_length = MAX_TEXT_TOKENS
    return tiny_clip_tokenizer(words), t5


def add_subject_words(pipeline, seed: int = 0, world: str = "v1") -> None:
    """Make each subject's made-up word one new T5 token, with a random embedding the model never trained.

    The base model is trained without them; its existing token ids do not change. Spelled out in
    character pieces instead, all four words read almost alike to the tiny T5 (character pieces
    never occur in base captions), and no LoRA could tell them apart; a new token is what a rare
    word is to a real T5.
    """
    old = pipeline.tokenizer_2
    new = tiny_t5_tokenizer(training_vocabulary(), rare_words=list(WORLDS[world].subjects))
    new.model_max_length = MAX_TEXT_TOKENS
    old_vocab, new_vocab = old.get_vocab(), new.get_vocab()
    if any(new_vocab.get(piece) != index for piece, index in old_vocab.items()):
        raise ValueError(
            "The model's T5 tokenizer is not the ShapesWorld base tokenizer; cannot add the words."
        )
    encoder = pipeline.text_encoder_2
    embeddings = encoder.get_input_embeddings().weight
    std = float(embeddings.detach().std())
    encoder.resize_token_embeddings(len(new), mean_resizing=False)
    weight = encoder.get_input_embeddings().weight
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        fresh = torch.randn(len(new) - len(old), weight.shape[1], generator=generator) * std
        weight[len(old) :] = fresh.to(weight.dtype)
    pipeline.register_modules(tokenizer_2=new)


def build_vae(seed: int = 0, world: str = "v1"):
    from diffusers import AutoencoderKL

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AutoencoderKL(**MODEL_CONFIGS[world]["vae"], scaling_factor=1.0, shift_factor=0.0)


def build_pipeline(vae=None, seed: int = 0, world: str = "v1"):
    """An untrained ShapesWorld `FluxPipeline` (with `vae` if given) of `world` ("v1" or "v3")."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    clip_tokenizer, t5_tokenizer = tokenizers()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = FluxTransformer2DModel(**MODEL_CONFIGS[world]["transformer"])
        text_encoder, text_encoder_2 = text_encoders(clip_tokenizer, t5_tokenizer, 64, 64, heads=4, ff=128)
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=1.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        **MODEL_CONFIGS[world]["scheduler"],
    )
    return FluxPipeline(
        scheduler=scheduler,
        vae=vae if vae is not None else build_vae(seed, world),
        text_encoder=text_encoder,
        tokenizer=clip_tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=t5_tokenizer,
        transformer=transformer,
    )


def load_shapesworld(model_dir: str | Path = MODEL_DIR, dtype: torch.dtype = torch.float32):
    """The trained ShapesWorld pipeline (committed weights), in eval mode."""
    from diffusers import FluxPipeline

    model_dir = Path(model_dir)
    if not (model_dir / "model_index.json").is_file():
        raise FileNotFoundError(
            f"No trained ShapesWorld model in {model_dir}; train one with `python scripts/train_shapesworld.py all`."
        )
    pipeline = FluxPipeline.from_pretrained(str(model_dir), torch_dtype=dtype)
    for component in pipeline.components.values():
        if isinstance(component, torch.nn.Module):
            component.eval()
            component.requires_grad_(False)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def lora_path(word: str, lora_dir: str | Path = LORA_DIR) -> Path:
    return Path(lora_dir) / f"{word}.safetensors"
