"""FLUX.2 [klein] (4B, 9B, and their base models): `Flux2Transformer2DModel` in a `Flux2KleinPipeline`.

Token layout as FLUX.1's: double-stream blocks keep text and image in separate layers; the
single-stream blocks see [text ‖ image] in one sequence, through two fused linears each
(`attn.to_qkv_mlp_proj`: queries, keys, values and the MLP input; `attn.to_out`: attention and
MLP output). Modulation is shared by all blocks (`double_stream_modulation_*`,
`single_stream_modulation`) and sees one vector per image. The text is Qwen3's hidden states 9,
18 and 27 of the templated prompt (thinking off), padded to `max_sequence_length`.

The authors tap a single-stream block (`single_transformer_blocks.6` of the 4B's 20, `.3` of the
9B's 24) at step 2 of 4: the tap reads post-norm queries/keys from hooks on that block's `norm_q`
and `norm_k` and applies the rotary embedding the attention receives, as FLUX.2's processor does;
the real attention runs untouched.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from ..core import BiasConfig
from ..core.config import BIAS_BLOCKS
from ..lora import FLUX2_FAMILY, FLUX_FAMILY, check_lora_family
from ..tiny import tiny_qwen_tokenizer
from .base import (
    IMAGE,
    NO_TOKENS,
    TEXT,
    Architecture,
    Backend,
    BiasSite,
    CapturedAttention,
    Conditioning,
    Latents,
    TokenLayout,
    converter_failure,
    keep_first_input,
    keep_output,
    latent_preview,
)
from .flux import joint_bias_sites
from .qwen import ChatPromptTokenizer
from .registry import register

if TYPE_CHECKING:
    from ..lora import LoraFile
    from ..settings import GenerationSettings

# The layers a typical FLUX.2 character LoRA (ai-toolkit, musubi-tuner, kohya) adapts.
FLUX2_LORA_TARGETS = (
    "attn.to_q",
    "attn.to_k",
    "attn.to_v",
    "attn.to_out.0",
    "attn.add_q_proj",
    "attn.add_k_proj",
    "attn.add_v_proj",
    "attn.to_add_out",
    "ff.linear_in",
    "ff.linear_out",
    "ff_context.linear_in",
    "ff_context.linear_out",
    "attn.to_qkv_mlp_proj",
    "attn.to_out",
)
_TEXT_STREAM = ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out", "ff_context.")
# The order of `torch.cat([encoder_hidden_states, hidden_states])` in the transformer.
JOINT: TokenLayout = ("text", "image")


class Flux2AttentionTap:
    """Keeps the tapped single-stream blocks' post-norm queries/keys, rotary embedding and attention
    outputs, and the pass's text length."""

    def __init__(self, blocks: list[int], inner_dim: int) -> None:
        self.blocks = blocks
        self.inner_dim = inner_dim
        self.store: dict[int, dict[str, object]] = {block: {} for block in blocks}
        self.n_text: int | None = None

    def _one(self, block: int) -> dict[str, torch.Tensor]:
        from diffusers.models.embeddings import apply_rotary_emb

        store = self.store[block]
        missing = [key for key in ("q", "k", "rope", "o") if key not in store] + (
            ["text length"] if self.n_text is None else []
        )
        if missing:
            raise RuntimeError(
                f"Block {block} did not run (no {missing}); the capture step saw no forward pass."
            )
        query = apply_rotary_emb(store["q"], store["rope"], sequence_dim=1)
        key = apply_rotary_emb(store["k"], store["rope"], sequence_dim=1)
        n_text = self.n_text
        parts = {
            "q_text": query[:, :n_text],
            "q_img": query[:, n_text:],
            "k_text": key[:, :n_text],
            "k_img": key[:, n_text:],
        }
        # [B, S, heads, D] -> [B, heads, S, D]
        result = {name: tensor.transpose(1, 2) for name, tensor in parts.items()}
        # `to_out` reads [attention output ‖ MLP activations] side by side: the first inner_dim columns.
        result["o_img"] = store["o"][:, n_text:, : self.inner_dim]
        return result

    def result(self) -> CapturedAttention:
        """`CapturedAttention` with RoPE applied, shapes `[B, C, heads, S, D]` (C tapped blocks)."""
        return CapturedAttention.of_blocks([self._one(block) for block in self.blocks])


class Flux2Architecture(Architecture):
    """FLUX.2 [klein]'s facts and rules (no pipeline needed)."""

    name = "flux2"
    pipeline_classes = ("Flux2KleinPipeline",)
    denoiser_name = "transformer"
    known_model_ids = ("black-forest-labs/FLUX.2-klein-4B", "black-forest-labs/FLUX.2-klein-9B")
    block_kind = "single-stream block"
    # The authors tap single_transformer_blocks.6 of the 4B's 20 ...
    paper_block = (6, 20)
    # ... and .3 of the 9B's 24 (other sizes: the 4B's relative depth).
    authors_blocks = {20: 6, 24: 3}
    # At step 2 of 4.
    paper_mask_step = (2, 4)
    max_sequence_length = 512  # Flux2KleinPipeline's default
    default_steps = 4  # the distilled [klein] models'
    default_guidance = 1.0  # distilled: no guidance pass (base models want ~4)
    embedding_slots = {}
    typical_lora_targets = (FLUX2_LORA_TARGETS, "transformer_blocks")
    tokenizer_folder = "tokenizer"
    # Joint attention over [text ‖ image] in both kinds of block, as FLUX.1's (`flux.joint_bias_sites`).
    attention_bias_blocks = BIAS_BLOCKS
    default_attention_bias = BiasConfig(scale=0.0, positive=1.0, bidirectional=True, blocks="all")

    @classmethod
    def default_block(cls, num_blocks: int) -> int:
        if num_blocks in cls.authors_blocks:
            return cls.authors_blocks[num_blocks]
        return super().default_block(num_blocks)

    @classmethod
    def pixels_per_token(cls, model_folder: Path | None) -> int:
        """The VAE's factor (8) times the 2×2 latent patches."""
        config = None if model_folder is None else Path(model_folder) / "vae" / "config.json"
        if config is not None and config.is_file():
            try:
                channels = json.loads(config.read_text()).get("block_out_channels", [0] * 4)
                return 2 ** (len(channels) - 1) * 2
            except (OSError, json.JSONDecodeError, TypeError):
                pass
        return 16

    @classmethod
    def tiny_tokenizer(cls):
        return ChatPromptTokenizer(tiny_qwen_tokenizer(), enable_thinking=False)

    @classmethod
    def load_tokenizer(cls, model_folder: Path | None):
        if model_folder is None:
            return cls.tiny_tokenizer()
        tokenizer = super().load_tokenizer(model_folder)
        return None if tokenizer is None else ChatPromptTokenizer(tokenizer, enable_thinking=False)

    @staticmethod
    def _blocks(keys, kind: str) -> int:
        """How many `kind` blocks (`double_blocks`, `single_blocks`) a BFL-layout file holds."""
        names = (key.removeprefix("model.diffusion_model.") for key in keys)
        return len({name.split(".")[1] for name in names if name.startswith(kind + ".")})

    @classmethod
    def single_file_matches(cls, keys) -> bool:
        """BFL's layout of FLUX.2 [klein] (ComfyUI's `flux-2-klein-*.safetensors`): the block names of
        FLUX.1 and the modulation shared by all blocks (`single_stream_modulation`), which FLUX.1
        lacks; not FLUX.2 [dev]'s 48 single-stream blocks (another pipeline and text encoder)."""
        shared = any(
            key.removeprefix("model.diffusion_model.").startswith("single_stream_modulation.") for key in keys
        )
        return shared and cls._blocks(keys, "single_blocks") < 48

    @classmethod
    def default_single_file_base(cls, keys) -> str | None:
        """[klein] 9B for a file with 8 double-stream blocks, else 4B (5): their text encoders and VAE."""
        return cls.known_model_ids[1] if cls._blocks(keys, "double_blocks") >= 8 else cls.known_model_ids[0]

    @classmethod
    def check_lora_keys(cls, keys, source: str) -> None:
        """FLUX.2's files, and FLUX files whose names and widths do not tell FLUX.1 from FLUX.2."""
        check_lora_family(keys, source, (FLUX2_FAMILY, FLUX_FAMILY), "a FLUX.2 [klein] transformer")

    @classmethod
    def guidance(cls, settings: GenerationSettings) -> float:
        return float(cls.default_guidance if settings.guidance_scale is None else settings.guidance_scale)

    @classmethod
    def check_settings(cls, settings: GenerationSettings) -> list[str]:
        length = settings.max_sequence_length
        if length is not None and length > cls.max_sequence_length:
            raise ValueError(
                f"`max_sequence_length` {length} is more than FLUX.2 [klein] reads; use at most {cls.max_sequence_length}."
            )
        if settings.true_cfg_scale > 1:
            raise ValueError(
                "`true_cfg_scale` is FLUX.1's; FLUX.2 [klein] base models guide with `guidance_scale` > 1 (CLI: "
                "--guidance 4); the distilled 4B/9B models take no guidance."
            )
        if settings.negative_prompt is not None and cls.guidance(settings) <= 1:
            raise ValueError(
                "`negative_prompt` only acts with guidance on FLUX.2 [klein]: pass `guidance_scale` > 1 on a base "
                "model (CLI: --guidance 4), or leave the negative prompt out."
            )
        return []

    @classmethod
    def negative_prompt(cls, settings: GenerationSettings) -> str | None:
        """A second pass when `guidance_scale` > 1, with an empty prompt unless one is given
        (`Flux2KleinPipeline` always uses an empty one)."""
        return (settings.negative_prompt or "") if cls.guidance(settings) > 1 else None

    @classmethod
    def cfg_scale(cls, settings: GenerationSettings) -> float:
        return cls.guidance(settings)


@register
class Flux2Backend(Backend):
    """FLUX.2 [klein]'s runner parts over a `Flux2KleinPipeline`."""

    architecture = Flux2Architecture

    @classmethod
    def matches(cls, pipeline) -> bool:
        """Text-to-image [klein] only (FLUX.2 [dev] has another text encoder; the KV and inpainting
        pipelines feed reference images)."""
        from diffusers import Flux2KleinPipeline

        return type(pipeline) is Flux2KleinPipeline

    @classmethod
    def load_single_file(cls, path: Path, keys, config: str | None, **options):
        """A transformer-only file (how FLUX.2 [klein] ships for ComfyUI): the transformer from the
        file, the text encoder, VAE and scheduler from `config`."""
        from diffusers import Flux2KleinPipeline, Flux2Transformer2DModel

        config = config or cls.architecture.default_single_file_base(keys)
        transformer = Flux2Transformer2DModel.from_single_file(
            str(path), config=config, subfolder="transformer", **options
        )
        return Flux2KleinPipeline.from_pretrained(
            config, transformer=transformer, use_safetensors=True, **options
        )

    # -- the loaded model ------------------------------------------------------------------------------
    @property
    def size_multiple(self) -> int:
        """Pixels per image token along a side: the VAE factor (8) times the 2×2 latent patches."""
        return int(self.pipeline.vae_scale_factor) * 2

    @property
    def tokenizer(self):
        """Qwen3's, inside the chat template the pipeline puts a prompt in (thinking off)."""
        return ChatPromptTokenizer(self.pipeline.tokenizer, enable_thinking=False)

    @property
    def num_blocks(self) -> int:
        return len(self.denoiser.single_transformer_blocks)

    def token_layout(self, module_name: str) -> TokenLayout:
        """Single-stream blocks: [text ‖ image]; double-stream blocks: text or image; the embedders
        and output projection: text or image; modulation and time embedders: no tokens."""
        if module_name.startswith("single_transformer_blocks."):
            return JOINT
        if module_name.startswith("transformer_blocks."):
            return TEXT if any(part in module_name for part in _TEXT_STREAM) else IMAGE
        if module_name.startswith("context_embedder"):
            return TEXT
        if module_name.startswith("x_embedder") or module_name == "proj_out":
            return IMAGE
        return NO_TOKENS  # shared modulation, time embedder, final norm modulation

    # -- the denoising loop's parts ----------------------------------------------------------------
    def encode(self, prompts: list[str], max_sequence_length: int) -> Conditioning:
        """Qwen3's hidden states 9, 18, 27 side by side, `[B, max_sequence_length, 3·width]`, and the
        text position ids (`Flux2KleinPipeline.encode_prompt`)."""
        prompt_embeds, text_ids = self.pipeline.encode_prompt(
            prompt=list(prompts),
            device=self.device,
            num_images_per_prompt=1,
            max_sequence_length=max_sequence_length,
        )
        return Conditioning(list(prompts), prompt_embeds, None, text_ids)

    def encode_negative(self, prompts: list[str], settings: GenerationSettings) -> Conditioning:
        """The negative pass of a [klein] base model; the distilled models take none (diffusers
        ignores their guidance scale), which is said here rather than run."""
        if self.pipeline.config.get("is_distilled", False):
            raise ValueError(
                f"`guidance_scale` {settings.guidance_scale} asks for a guidance pass, but this FLUX.2 [klein] model is "
                "step-distilled and takes none; leave `guidance_scale` at 1 (or use a [klein] base model)."
            )
        return self.encode(prompts, settings.max_sequence_length)

    def prepare_latents(
        self,
        generators: list[torch.Generator] | torch.Generator,
        batch: int,
        height: int,
        width: int,
        dtype: torch.dtype,
        latents: torch.Tensor | None = None,
    ) -> Latents:
        """Packed noise `[B, N, 128]` and the image tokens' position ids (`Flux2KleinPipeline.prepare_latents`;
        a caller's `latents` are `[B, 128, H/16, W/16]`, as there)."""
        channels = self.denoiser.config.in_channels // 4
        noise, positions = self.pipeline.prepare_latents(
            batch, channels, height, width, dtype, self.device, generators, latents
        )
        return Latents(noise, positions)

    def timesteps(
        self, num_inference_steps: int, height: int, width: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Flux2KleinPipeline's schedule: linear sigmas shifted by an empirical `mu` of the image
        size and the step count."""
        from diffusers.pipelines.flux2.pipeline_flux2_klein import compute_empirical_mu, retrieve_timesteps

        scheduler = self.pipeline.scheduler
        sigmas = np.linspace(1.0, 1 / num_inference_steps, num_inference_steps)
        if getattr(scheduler.config, "use_flow_sigmas", False):
            sigmas = None
        h, w = self.grid(height, width)
        mu = compute_empirical_mu(image_seq_len=h * w, num_steps=num_inference_steps)
        timesteps, _ = retrieve_timesteps(scheduler, num_inference_steps, self.device, sigmas=sigmas, mu=mu)
        scheduler.set_begin_index(0)
        return timesteps, scheduler.sigmas

    def predict(
        self,
        latents: Latents,
        timestep: torch.Tensor,
        conditioning: Conditioning,
        settings: GenerationSettings,
    ) -> torch.Tensor:
        """The velocity of the image tokens."""
        hidden = latents.latents
        batch, n_image = hidden.shape[:2]
        output = self.denoiser(
            hidden_states=hidden.to(self.denoiser.dtype),
            timestep=timestep.expand(batch).to(hidden.dtype) / 1000,
            guidance=None,
            encoder_hidden_states=conditioning.prompt_embeds,
            txt_ids=conditioning.text_ids,
            img_ids=latents.positions,
            return_dict=False,
        )[0]
        return output[:, :n_image]

    def step(self, prediction: torch.Tensor, timestep: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        return self.pipeline.scheduler.step(prediction, timestep, latents, return_dict=False)[0]

    def predict_x0(self, latents: torch.Tensor, prediction: torch.Tensor, sigma: float) -> torch.Tensor:
        """Flow matching: x0 = x_t − σ v."""
        return latents - float(sigma) * prediction

    def _unpack(self, latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """`[B, N, 128]` → the VAE's `[B, 32, H/8, W/8]`: tokens to the grid, the batch-norm statistics
        undone, the 2×2 patches unfolded (as `Flux2KleinPipeline` does before decoding)."""
        pipeline, vae = self.pipeline, self.pipeline.vae
        h, w = self.grid(height, width)
        grid = latents.new_zeros(latents.shape[0], latents.shape[2], h, w)
        ids = pipeline._prepare_latent_ids(grid).to(latents.device)
        grid = pipeline._unpack_latents_with_ids(latents, ids, h, w)
        mean = vae.bn.running_mean.view(1, -1, 1, 1).to(grid.device, grid.dtype)
        std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps).to(
            grid.device, grid.dtype
        )
        return pipeline._unpatchify_latents(grid * std + mean)

    def decode(self, latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """`[B, N, 128]` packed latents → `[B, 3, H, W]` images in [0, 1]."""
        vae = self.pipeline.vae
        image = vae.decode(self._unpack(latents, height, width).to(vae.dtype), return_dict=False)[0]
        return (image.float() / 2 + 0.5).clamp(0, 1)

    def preview(self, latents: torch.Tensor, height: int, width: int, mode: str) -> np.ndarray:
        """ "vae": decoded at full size; "latent": the VAE latents' 3 principal components at H/8 × W/8."""
        if mode == "vae":
            return self.decode(latents, height, width).permute(0, 2, 3, 1).cpu().numpy()
        return latent_preview(self._unpack(latents, height, width))

    @contextlib.contextmanager
    def capture(self, block: int | Sequence[int]) -> Iterator[Flux2AttentionTap]:
        """Hooks that record, in each tapped single-stream block, the post-norm queries/keys over
        [text ‖ image], the rotary embedding the attention receives, and its output before `to_out`;
        and the pass's text length (from the transformer's inputs)."""
        blocks = [block] if isinstance(block, int) else list(block)
        inner = self.denoiser.config.num_attention_heads * self.denoiser.config.attention_head_dim
        tap = Flux2AttentionTap(blocks, inner)

        def keep_text_length(module, args, kwargs):
            text = kwargs.get("encoder_hidden_states", args[1] if len(args) > 1 else None)
            tap.n_text = int(text.shape[1])

        def keep_rope(store: dict):
            def hook(module, args, kwargs):
                store["rope"] = kwargs.get("image_rotary_emb", args[2] if len(args) > 2 else None)

            return hook

        handles = []
        try:
            handles.append(self.denoiser.register_forward_pre_hook(keep_text_length, with_kwargs=True))
            for index in blocks:
                attn = self.denoiser.single_transformer_blocks[index].attn
                store = tap.store[index]
                handles += [
                    attn.norm_q.register_forward_hook(keep_output(store, "q")),
                    attn.norm_k.register_forward_hook(keep_output(store, "k")),
                    attn.to_out.register_forward_pre_hook(keep_first_input(store, "o")),
                    attn.register_forward_pre_hook(keep_rope(store), with_kwargs=True),
                ]
            yield tap
        finally:
            for handle in handles:
                handle.remove()

    def bias_sites(self, blocks: str) -> list[BiasSite]:
        return joint_bias_sites(self.denoiser, blocks)

    # -- LoRA files --------------------------------------------------------------------------------
    def lora_source(self, lora: LoraFile) -> dict[str, torch.Tensor]:
        """Bare PEFT files (no prefix) go in under `transformer.`; diffusers, ai-toolkit/BFL
        (`diffusion_model.`), PEFT (`base_model.model.`) and kohya/musubi (`lora_unet_…`) files as they
        are, for diffusers' converters."""
        state = lora.state_dict
        if lora.layout == "peft" and not any(
            key.startswith(("transformer.", "base_model.model.")) for key in state
        ):
            return {"transformer." + key: value for key, value in state.items()}
        return state

    def lora_state_dict(self, lora: LoraFile, source: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """diffusers' FLUX.2 converters (`Flux2KleinPipeline.lora_state_dict`)."""
        from diffusers import Flux2KleinPipeline

        state = dict(source)
        try:
            converted = Flux2KleinPipeline.lora_state_dict(state)
        except (ValueError, KeyError, RuntimeError, AssertionError, TypeError, IndexError) as error:
            raise converter_failure(lora, "FLUX.2", "Flux2KleinPipeline.lora_state_dict", error) from None
        converted = converted[0] if isinstance(converted, tuple) else converted
        if not any(key.startswith("transformer.") for key in converted):
            # diffusers' own layout without the prefix (what `Flux2LoraLoaderMixin` also accepts).
            converted = {"transformer." + key: value for key, value in converted.items()}
        return converted
