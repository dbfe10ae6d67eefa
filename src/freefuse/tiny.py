"""The tiny random models `--model tiny`, `tiny-sdxl`, `tiny-zimage` and `tiny-flux2` build, their
tokenizers, and random LoRAs.

Product code: the offline demo, the built-in models and ShapesWorld's text encoders are made here.
Nothing here touches the network or the disk. Every model is in eval mode, so two builds with one
seed give the same weights and the same images. Imports nothing else of FreeFuse.
"""

from __future__ import annotations

import contextlib
import math
import string
from collections.abc import Iterable, Iterator

import torch

# Words the tiny tokenizers know as whole pieces. Any other word still encodes, as several
# character pieces, which is what tests of multi-token activation words rely on.
TINY_WORDS = (
    "a an the and or with of in on at to by from is are was be it its their his her they both "
    "each other together side left right top bottom middle near next under over behind front "
    "hugging holding hug hold talking walking running sitting standing dancing looking smiling "
    "laughing playing reading eating painting cooking kissing whispering sharing "
    "snow rain sun park beach room city forest garden field street kitchen table sofa mountain "
    "cat dog fox owl bird fish horse rabbit bear girl boy man woman person people friend friends "
    "alice bob carol dave eve frank "
    "red blue green yellow purple orange white black pink brown grey gray "
    "circle square triangle star ring cross heart disk box "
    "striped dotted plain checkered small big large tiny huge round "
    "photo picture painting portrait scene image style film lighting soft warm cold light dark "
    "day night morning evening close up face faces hands hair eyes"
).split()

# FLUX.1 geometry with every width shrunk: 8x VAE, 2x2 latent packing, 16 latent channels -> 4 here.
TINY_TRANSFORMER_CONFIG = {
    "patch_size": 1,
    "in_channels": 16,
    "num_layers": 2,
    "num_single_layers": 2,
    "attention_head_dim": 16,
    "num_attention_heads": 2,
    "joint_attention_dim": 32,
    "pooled_projection_dim": 32,
    "guidance_embeds": True,
    "axes_dims_rope": (4, 6, 6),
}


def tiny_t5_tokenizer(words: Iterable[str] = TINY_WORDS, rare_words: Iterable[str] = ()):
    """A T5 (unigram) tokenizer that keeps known words whole and spells unknown ones out.

    `rare_words` become whole pieces too, appended after everything else so that adding them keeps
    every existing token id (a model trained without them still reads the same ids).
    Built from pieces and scores directly: transformers 5.x ignores `vocab_file=` for T5.
    """
    from transformers import T5TokenizerFast

    vocab: list[tuple[str, float]] = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    seen = {piece for piece, _ in vocab}

    def add(piece: str, score: float) -> None:
        if piece not in seen:
            seen.add(piece)
            vocab.append((piece, score))

    for word in words:
        add("▁" + word, -2.0)
        add("▁" + word.capitalize(), -2.0)
    add("▁", -3.0)
    for char in string.ascii_letters + string.digits + string.punctuation:
        add(char, -5.0)
        add("▁" + char, -5.5)
    for word in rare_words:
        add("▁" + word, -2.0)
    return T5TokenizerFast(vocab=vocab, extra_ids=0)


def tiny_clip_tokenizer(words: Iterable[str] = TINY_WORDS):
    """A byte-pair CLIP tokenizer whose merges spell the known words (lower-cased, as CLIP does)."""
    from transformers import CLIPTokenizer

    chars = string.ascii_lowercase + string.digits + string.punctuation
    vocab: dict[str, int] = {}
    for char in chars:
        vocab[char] = len(vocab)
    for char in chars:
        vocab[char + "</w>"] = len(vocab)
    merges: list[tuple[str, str]] = []
    for word in words:
        pieces = list(word)
        pieces[-1] += "</w>"
        while len(pieces) > 1:
            pair = (pieces[0], pieces[1])
            if pair not in merges:
                merges.append(pair)
            pieces = [pieces[0] + pieces[1], *pieces[2:]]
            vocab.setdefault(pieces[0], len(vocab))
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)


def text_encoders(clip_tokenizer, t5_tokenizer, clip_width: int, t5_width: int, heads: int = 2, ff: int = 64):
    """Small random CLIP and T5 encoders (2 layers each) for the given tokenizers and widths.

    Random draws come from the global generator: call it inside a seeded `fork_rng`.
    """
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    clip = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(clip_tokenizer),
            hidden_size=clip_width,
            intermediate_size=ff,
            num_hidden_layers=2,
            num_attention_heads=heads,
            max_position_embeddings=77,
            projection_dim=clip_width,
            bos_token_id=clip_tokenizer.bos_token_id,
            eos_token_id=clip_tokenizer.eos_token_id,
            pad_token_id=clip_tokenizer.pad_token_id,
        )
    )
    t5 = T5EncoderModel(
        T5Config(
            vocab_size=len(t5_tokenizer),
            d_model=t5_width,
            d_kv=16,
            d_ff=ff,
            num_layers=2,
            num_heads=heads,
            relative_attention_num_buckets=8,
            dropout_rate=0.0,
            feed_forward_proj="gated-gelu",
            is_encoder_decoder=False,
            pad_token_id=t5_tokenizer.pad_token_id,
            eos_token_id=t5_tokenizer.eos_token_id,
        )
    )
    return clip, t5


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """New parameters are made in `dtype` while inside."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def tiny_flux_pipeline(
    seed: int = 0,
    transformer_config: dict | None = None,
    vae_config: dict | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
):
    """A complete diffusers `FluxPipeline` with tiny random weights, in eval mode.

    `transformer_config` and `vae_config` override the tiny defaults (benchmarks build mid-size and
    full FLUX.1 shapes this way; text encoders follow the transformer's widths). The pipeline
    round-trips through `save_pretrained` / `FluxPipeline.from_pretrained`, so it also stands in
    for a real model directory.
    """
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    config = {**TINY_TRANSFORMER_CONFIG, **(transformer_config or {})}
    tokenizer = tiny_clip_tokenizer()
    tokenizer_2 = tiny_t5_tokenizer()
    latent_channels = config["in_channels"] // 4

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        # Built directly on `device` in `dtype`: a 12B transformer made in float32 and then cast
        # would need twice the memory on the way.
        with torch.device(device), default_dtype(dtype):
            transformer = FluxTransformer2DModel(**config)
        text_encoder, text_encoder_2 = text_encoders(
            tokenizer,
            tokenizer_2,
            clip_width=config["pooled_projection_dim"],
            t5_width=config["joint_attention_dim"],
        )
        vae = AutoencoderKL(
            **{
                "in_channels": 3,
                "out_channels": 3,
                "down_block_types": ("DownEncoderBlock2D",) * 4,
                "up_block_types": ("UpDecoderBlock2D",) * 4,
                "block_out_channels": (8, 8, 16, 16),
                "layers_per_block": 1,
                "latent_channels": latent_channels,
                "norm_num_groups": 4,
                "sample_size": 64,
                "scaling_factor": 0.3611,
                "shift_factor": 0.1159,
                "use_quant_conv": False,
                "use_post_quant_conv": False,
                "mid_block_add_attention": False,
                **(vae_config or {}),
            }
        )
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )
    for model in (transformer, text_encoder, text_encoder_2, vae):
        model.eval()
        model.requires_grad_(False)
    text_encoder, text_encoder_2, vae = (
        m.to(device=device, dtype=dtype) for m in (text_encoder, text_encoder_2, vae)
    )
    return FluxPipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        transformer=transformer,
    )


def tiny_flux_fill_pipeline(seed: int = 0, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """A `FluxFillPipeline` with tiny random weights: the tiny FLUX.1 pipeline's components, its
    transformer reading the noise, the masked picture's latents and the mask side by side (as FLUX.1
    Fill's: 16 + 16 + 8·8·4 packed channels in, 16 out)."""
    from diffusers import FluxFillPipeline, FluxTransformer2DModel

    base = tiny_flux_pipeline(seed=seed, dtype=dtype, device=device)
    latent = TINY_TRANSFORMER_CONFIG["in_channels"]
    mask = base.vae_scale_factor**2 * 4
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        with torch.device(device), default_dtype(dtype):
            transformer = FluxTransformer2DModel(
                **{**TINY_TRANSFORMER_CONFIG, "in_channels": 2 * latent + mask, "out_channels": latent}
            )
    components = {**base.components, "transformer": transformer.eval().requires_grad_(False)}
    return FluxFillPipeline(**{name: components[name] for name in FluxFillPipeline._get_signature_keys(FluxFillPipeline)[0]})


TINY_UNET_CONFIG = {
    "block_out_channels": (32, 64),
    "layers_per_block": 1,
    "sample_size": 32,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
    "attention_head_dim": (2, 4),
    "transformer_layers_per_block": (1, 2),
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 8,
    "norm_num_groups": 8,
}


def tiny_sdxl_pipeline(
    seed: int = 0,
    unet_config: dict | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    clip_width: int = 32,
):
    """A complete diffusers `StableDiffusionXLPipeline` with tiny random weights, in eval mode.

    Two levels (the second with cross-attention, 2 transformer blocks down, 1 mid, 2 x 3 up), two
    CLIP encoders of `clip_width` and twice that (the UNet's cross-attention reads both side by side), SDXL's
    Euler scheduler and a 4-channel VAE with SDXL's factor 8. `unet_config` overrides the UNet's
    (benchmarks build mid-size UNets this way).
    """
    from diffusers import (
        AutoencoderKL,
        EulerDiscreteScheduler,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    tokenizer = tiny_clip_tokenizer()
    # The second encoder is wider than the first, as on SDXL (768 and 1280): diffusers'
    # single-file loader tells the two apart by width.
    widths = (clip_width, 2 * clip_width)
    config = {
        **TINY_UNET_CONFIG,
        "cross_attention_dim": sum(widths),
        "projection_class_embeddings_input_dim": 6 * TINY_UNET_CONFIG["addition_time_embed_dim"] + widths[1],
        **(unet_config or {}),
    }
    text_configs = [
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=width,
            intermediate_size=2 * width,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=77,
            projection_dim=width,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        for width in widths
    ]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        with torch.device(device), default_dtype(dtype):
            unet = UNet2DConditionModel(**config)
        text_encoder = CLIPTextModel(text_configs[0])
        text_encoder_2 = CLIPTextModelWithProjection(text_configs[1])
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(8, 8, 16, 16),
            layers_per_block=1,
            latent_channels=4,
            norm_num_groups=4,
            sample_size=64,
            scaling_factor=0.13025,
            mid_block_add_attention=False,
        )
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        timestep_spacing="leading",
        steps_offset=1,
        prediction_type="epsilon",
    )
    for model in (unet, text_encoder, text_encoder_2, vae):
        model.eval()
        model.requires_grad_(False)
    text_encoder, text_encoder_2, vae = (
        m.to(device=device, dtype=dtype) for m in (text_encoder, text_encoder_2, vae)
    )
    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tiny_clip_tokenizer(),
        unet=unet,
        scheduler=scheduler,
    )


# -- Qwen3-conditioned models: Z-Image and FLUX.2 [klein] --------------------------------------------

# Qwen's special tokens; the first is also the padding token.
QWEN_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
# Qwen3's chat template, for the one user turn both pipelines send: the user turn, then the
# assistant's opening, and with `enable_thinking=False` (FLUX.2 [klein]) an empty thinking block.
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)


def tiny_qwen_tokenizer(words: Iterable[str] = TINY_WORDS):
    """A byte-level BPE tokenizer in Qwen's layout: the 256 byte symbols, merges that spell the
    known words (" alice" and "Alice" are one token each, as in Qwen's own vocabulary), Qwen's
    special tokens and chat template. Unknown words still encode, byte by byte."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import Qwen2TokenizerFast

    vocab = {symbol: index for index, symbol in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    merges: list[tuple[str, str]] = []
    seen = set()
    # Merges of the words after a space first: BPE applies the earliest merge first, so " hugging"
    # becomes one token instead of " " + "hugging".
    for space in ("Ġ", ""):
        for word in [*words, "user", "assistant", "system"]:
            for form in sorted({word, word.capitalize()}):
                pieces = list(space + form)
                while len(pieces) > 1:
                    pair = (pieces[0], pieces[1])
                    if pair not in seen:
                        seen.add(pair)
                        merges.append(pair)
                    pieces = [pieces[0] + pieces[1], *pieces[2:]]
                    vocab.setdefault(pieces[0], len(vocab))
    model = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    model.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    model.decoder = decoders.ByteLevel()
    model.post_processor = processors.ByteLevel(trim_offsets=False)
    tokenizer = Qwen2TokenizerFast(
        tokenizer_object=model,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=list(QWEN_SPECIAL_TOKENS[1:]),
    )
    tokenizer.add_tokens(["<think>", "</think>"])  # Qwen3's thinking markers: added, not special
    tokenizer.chat_template = QWEN_CHAT_TEMPLATE
    return tokenizer


def qwen3_encoder(tokenizer, width: int, layers: int, causal_lm: bool = False, heads: int = 2):
    """A small random Qwen3 text encoder (`Qwen3Model`, or `Qwen3ForCausalLM` as FLUX.2 [klein]
    loads it) for `tokenizer`. Random draws come from the global generator."""
    from transformers import Qwen3Config, Qwen3ForCausalLM, Qwen3Model

    config = Qwen3Config(
        vocab_size=len(tokenizer),
        hidden_size=width,
        intermediate_size=2 * width,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        head_dim=max(8, width // heads),
        max_position_embeddings=2048,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    return Qwen3ForCausalLM(config) if causal_lm else Qwen3Model(config)


def _tiny_vae(kind, latent_channels: int, **overrides):
    """A 4-level VAE (factor 8, as the real ones) of a few thousand weights."""
    return kind(
        **{
            "in_channels": 3,
            "out_channels": 3,
            "down_block_types": ("DownEncoderBlock2D",) * 4,
            "up_block_types": ("UpDecoderBlock2D",) * 4,
            "block_out_channels": (8, 8, 16, 16),
            "layers_per_block": 1,
            "latent_channels": latent_channels,
            "norm_num_groups": 4,
            "sample_size": 64,
            "mid_block_add_attention": False,
            **overrides,
        }
    )


def _finish(transformer, text_encoder, vae, dtype: torch.dtype, device: str | torch.device):
    """Every model in eval mode without gradients; the text encoder and VAE (made in float32 on the
    CPU) moved to `dtype` and `device` when those differ."""
    for model in (transformer, text_encoder, vae):
        model.eval()
        model.requires_grad_(False)
    if dtype != torch.float32 or torch.device(device).type != "cpu":
        text_encoder, vae = (m.to(device=device, dtype=dtype) for m in (text_encoder, vae))
    return text_encoder, vae


# Z-Image geometry (16 latent channels, 2x2 patches, 8x VAE: 16 pixels per token) at tiny widths.
TINY_ZIMAGE_CONFIG = {
    "all_patch_size": (2,),
    "all_f_patch_size": (1,),
    "in_channels": 16,
    "dim": 32,
    "n_layers": 2,
    "n_refiner_layers": 1,
    "n_heads": 2,
    "n_kv_heads": 2,
    "cap_feat_dim": 32,
    "axes_dims": [4, 6, 6],
    "axes_lens": [1024, 128, 128],
}


def tiny_zimage_pipeline(
    seed: int = 0,
    transformer_config: dict | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
):
    """A complete diffusers `ZImagePipeline` with tiny random weights, in eval mode: a 2-layer
    Qwen3 text encoder as wide as `cap_feat_dim` (the pipeline reads its second-to-last hidden
    states), the transformer (refiners, then single-stream `layers` over [image, text]), a VAE
    with Z-Image's scaling and shift, and Z-Image's scheduler (shift 3). `transformer_config`
    overrides the transformer's (benchmarks build mid-size ones this way)."""
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        ZImagePipeline,
        ZImageTransformer2DModel,
    )

    config = {**TINY_ZIMAGE_CONFIG, **(transformer_config or {})}
    tokenizer = tiny_qwen_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        with torch.device(device), default_dtype(dtype):
            transformer = ZImageTransformer2DModel(**config)
            # A trained model's padding tokens are not zero (diffusers starts them at zero).
            with torch.no_grad():
                transformer.x_pad_token.normal_()
                transformer.cap_pad_token.normal_()
        text_encoder = qwen3_encoder(tokenizer, config["cap_feat_dim"], layers=2)
        vae = _tiny_vae(
            AutoencoderKL,
            config["in_channels"],
            scaling_factor=0.3611,
            shift_factor=0.1159,
            use_quant_conv=False,
            use_post_quant_conv=False,
        )
    text_encoder, vae = _finish(transformer, text_encoder, vae, dtype=dtype, device=device)
    return ZImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=transformer,
    )


# FLUX.2 geometry (32 latent channels in 2x2 patches = 128 inputs per token, 8x VAE) at tiny widths.
# The text side is three of the text encoder's hidden states side by side (layers 9, 18, 27).
TINY_FLUX2_CONFIG = {
    "patch_size": 1,
    "in_channels": 128,
    "num_layers": 2,
    "num_single_layers": 3,
    "attention_head_dim": 16,
    "num_attention_heads": 2,
    "joint_attention_dim": 48,
    "timestep_guidance_channels": 32,
    "axes_dims_rope": (4, 4, 4, 4),
    "guidance_embeds": False,
}
# FLUX.2 [klein] reads the text encoder's hidden states 9, 18 and 27: it needs 28 layers.
FLUX2_TEXT_LAYERS = (9, 18, 27)


def tiny_flux2_pipeline(
    seed: int = 0,
    transformer_config: dict | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    is_distilled: bool = True,
):
    """A complete diffusers `Flux2KleinPipeline` with tiny random weights, in eval mode: a 28-layer
    Qwen3 causal LM a third as wide as `joint_attention_dim`, the FLUX.2 transformer (double-stream
    blocks, then single-stream blocks over [text, image]), FLUX.2's VAE (latents batch-normalised)
    and scheduler. `is_distilled`: as the 4B/9B [klein] models (no guidance pass)."""
    from diffusers import (
        AutoencoderKLFlux2,
        FlowMatchEulerDiscreteScheduler,
        Flux2KleinPipeline,
        Flux2Transformer2DModel,
    )

    config = {**TINY_FLUX2_CONFIG, **(transformer_config or {})}
    tokenizer = tiny_qwen_tokenizer()
    width = config["joint_attention_dim"] // len(FLUX2_TEXT_LAYERS)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        with torch.device(device), default_dtype(dtype):
            transformer = Flux2Transformer2DModel(**config)
        text_encoder = qwen3_encoder(tokenizer, width, layers=max(FLUX2_TEXT_LAYERS) + 1, causal_lm=True)
        vae = _tiny_vae(AutoencoderKLFlux2, config["in_channels"] // 4)
        # Latent statistics of a trained VAE are not 0 and 1: random ones, so that decoding uses them.
        vae.bn.running_mean.normal_(0.0, 0.1)
        vae.bn.running_var.uniform_(0.5, 2.0)
    text_encoder, vae = _finish(transformer, text_encoder, vae, dtype=dtype, device=device)
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, time_shift_type="exponential"
    )
    return Flux2KleinPipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=transformer,
        is_distilled=is_distilled,
    )


ALL_LINEAR = "all-linear"
#: Every linear layer and every convolution (a LyCORIS/LoCon-style LoRA on a UNet).
ALL_LAYERS = "all-layers"


# One tiny pipeline builder per registered backend (`freefuse.backends.BACKENDS`), by its name: the
# built-in models (`--model tiny`, `tiny-sdxl`, `tiny-zimage`, `tiny-flux2`), the offline demo and the
# contract tests.
TINY_PIPELINES = {
    "flux": tiny_flux_pipeline,
    "sdxl": tiny_sdxl_pipeline,
    "zimage": tiny_zimage_pipeline,
    "flux2": tiny_flux2_pipeline,
    "flux-fill": tiny_flux_fill_pipeline,
}


def random_lora_weights(
    transformer: torch.nn.Module,
    targets: Iterable[str] | str,
    within: str,
    prefix: str,
    rank: int = 4,
    seed: int = 0,
    scale: float = 1.0,
) -> dict[str, torch.Tensor]:
    """A random LoRA for a denoiser in diffusers layout (`<prefix>.<module>.lora_A.weight`).

    `targets`: module-name suffixes inside modules whose names contain `within`, or `ALL_LINEAR`
    for every linear layer of the denoiser, modulation (AdaLN) and embedders included, as kohya's
    and ai-toolkit's "train everything" LoRAs do, or `ALL_LAYERS` for convolutions too. The delta
    B @ A of every layer has roughly `scale` times the spread of the layer's own output, so masking
    it changes images visibly.
    """
    everything = targets in (ALL_LINEAR, ALL_LAYERS)
    kinds = (torch.nn.Linear, torch.nn.Conv2d) if targets == ALL_LAYERS else (torch.nn.Linear,)
    targets = () if everything else tuple(targets)
    generator = torch.Generator().manual_seed(seed)
    state: dict[str, torch.Tensor] = {}
    for name, module in transformer.named_modules():
        # Once a LoRA is loaded, PEFT wraps each adapted layer: its weights sit at `<name>.base_layer`.
        name = name.removesuffix(".base_layer")
        if type(module) not in kinds or ".lora_" in name:
            continue
        if not everything and (
            within not in name or not any(name.endswith("." + target) for target in targets)
        ):
            continue
        out_features, in_features = module.weight.shape[:2]
        kernel = tuple(module.weight.shape[2:])
        fan_in = in_features * math.prod(kernel)
        down = torch.randn(rank, in_features, *kernel, generator=generator) / fan_in**0.5
        # The layer may sit on a GPU; the LoRA is made on the CPU (a file's tensors), so the
        # layer's spread comes over as a number.
        spread = float(module.weight.detach().float().std())
        up = (
            torch.randn(out_features, rank, *(1,) * len(kernel), generator=generator)
            * scale
            * spread
            * fan_in**0.5
        )
        up = up / rank**0.5
        state[f"{prefix}.{name}.lora_A.weight"] = down.to(module.weight.dtype).contiguous()
        state[f"{prefix}.{name}.lora_B.weight"] = up.to(module.weight.dtype).contiguous()
    if not state:
        raise ValueError(f"No layer of the {prefix} matches the LoRA targets {targets}.")
    return state

