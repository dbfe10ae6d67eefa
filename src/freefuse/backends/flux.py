"""FLUX.1 (dev, schnell, fine-tunes in diffusers layout): `FluxTransformer2DModel` in a `FluxPipeline`.

Token layout: double-stream blocks keep text and image in separate layers; single-stream blocks see
[text ‖ image] in one sequence. The tap reads post-norm queries/keys from hooks on the block's
`norm_q`, `norm_k`, `norm_added_q` and applies the block's own rotary embedding, so the real
attention keeps whatever processor (SDPA, flash, ...) is set and nothing is computed twice.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np
import torch

from ..lora import IMAGE, JOINT, NO_TOKENS, TEXT
from . import register
from .base import Backend, CapturedAttention, Conditioning

# The paper taps double-stream block 16 of FLUX.1's 19 (the 17th).
PAPER_BLOCK, PAPER_NUM_BLOCKS = 16, 19
# The layers a typical FLUX character LoRA (ai-toolkit, kohya) adapts, as PEFT module-name suffixes.
FLUX_LORA_TARGETS = (
    "attn.to_q",
    "attn.to_k",
    "attn.to_v",
    "attn.to_out.0",
    "attn.add_q_proj",
    "attn.add_k_proj",
    "attn.add_v_proj",
    "attn.to_add_out",
    "ff.net.0.proj",
    "ff.net.2",
    "ff_context.net.0.proj",
    "ff_context.net.2",
    "proj_mlp",
    "proj_out",
)
_TEXT_STREAM = ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out", "ff_context.")


class AttentionTap:
    """Keeps the tapped block's post-norm queries/keys and rotary embedding of the last forward pass."""

    def __init__(self) -> None:
        self.store: dict[str, object] = {}

    def result(self) -> CapturedAttention:
        """`CapturedAttention` with RoPE applied, shapes `[B, heads, S, D]`."""
        from diffusers.models.embeddings import apply_rotary_emb

        missing = [k for k in ("q_text", "q_img", "k_img") if k not in self.store]
        if missing:
            raise RuntimeError(
                f"The tapped block did not run (no {missing}); the capture step saw no forward pass."
            )
        q_text, q_img, k_img = self.store["q_text"], self.store["q_img"], self.store["k_img"]
        rope = self.store.get("rope")
        if rope is not None:
            cos, sin = rope
            n_text = q_text.shape[1]
            q_text = apply_rotary_emb(q_text, (cos[:n_text], sin[:n_text]), sequence_dim=1)
            q_img = apply_rotary_emb(q_img, (cos[n_text:], sin[n_text:]), sequence_dim=1)
            k_img = apply_rotary_emb(k_img, (cos[n_text:], sin[n_text:]), sequence_dim=1)
        # [B, S, heads, D] -> [B, heads, S, D]
        return CapturedAttention(q_text.transpose(1, 2), q_img.transpose(1, 2), k_img.transpose(1, 2))


@register
class FluxBackend(Backend):
    name = "flux"

    @property
    def size_multiple(self) -> int:
        """Pixels per image token along a side: the VAE factor (8 on FLUX.1) times the 2x2 patches."""
        return int(self.pipeline.vae_scale_factor) * 2

    @classmethod
    def matches(cls, pipeline) -> bool:
        """Text-to-image FLUX.1 only: Fill, Control, Kontext and img2img pipelines feed the transformer
        other inputs than noise latents and are not supported."""
        from diffusers import FluxPipeline

        return type(pipeline) is FluxPipeline

    @property
    def tokenizer(self):
        return self.pipeline.tokenizer_2

    @property
    def max_sequence_length(self) -> int:
        return 512

    @property
    def num_blocks(self) -> int:
        return len(self.transformer.transformer_blocks)

    def default_block(self) -> int:
        """Block 16 on FLUX.1; the same relative depth on models with fewer double-stream blocks."""
        return round(PAPER_BLOCK / (PAPER_NUM_BLOCKS - 1) * (self.num_blocks - 1))

    def token_layout(self, module_name: str) -> str:
        if module_name.startswith("single_transformer_blocks."):
            return NO_TOKENS if ".norm." in module_name else JOINT
        if module_name.startswith("transformer_blocks."):
            if ".norm1.linear" in module_name or ".norm1_context.linear" in module_name:
                return NO_TOKENS
            return TEXT if any(part in module_name for part in _TEXT_STREAM) else IMAGE
        if module_name.startswith("context_embedder"):
            return TEXT
        if module_name.startswith("x_embedder") or module_name == "proj_out":
            return IMAGE
        return NO_TOKENS  # time/guidance/pooled-text embedders, final norm modulation

    # -- denoising loop parts ----------------------------------------------------------------------

    def encode(self, prompts: list[str], max_sequence_length: int) -> Conditioning:
        prompt_embeds, pooled, text_ids = self.pipeline.encode_prompt(
            prompt=prompts,
            prompt_2=None,
            device=self.device,
            num_images_per_prompt=1,
            max_sequence_length=max_sequence_length,
        )
        return Conditioning(list(prompts), prompt_embeds, pooled, text_ids)

    def prepare_latents(self, seeds: list[int], height: int, width: int, dtype: torch.dtype):
        """Noise for each image from its own CPU generator, so a seed means the same noise anywhere."""
        generators = [torch.Generator("cpu").manual_seed(int(seed)) for seed in seeds]
        channels = self.transformer.config.in_channels // 4
        return self.pipeline.prepare_latents(
            len(seeds), channels, height, width, dtype, self.device, generators
        )

    def timesteps(
        self, num_inference_steps: int, height: int, width: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """FluxPipeline's schedule: linear sigmas shifted by image size (`mu`)."""
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift, retrieve_timesteps

        scheduler = self.pipeline.scheduler
        config = scheduler.config
        sigmas = np.linspace(1.0, 1 / num_inference_steps, num_inference_steps)
        if getattr(config, "use_flow_sigmas", False):
            sigmas = None
        h, w = self.grid(height, width)
        mu = calculate_shift(
            h * w,
            config.get("base_image_seq_len", 256),
            config.get("max_image_seq_len", 4096),
            config.get("base_shift", 0.5),
            config.get("max_shift", 1.15),
        )
        timesteps, _ = retrieve_timesteps(scheduler, num_inference_steps, self.device, sigmas=sigmas, mu=mu)
        scheduler.set_begin_index(0)
        return timesteps, scheduler.sigmas

    def predict(self, latents, timestep, conditioning: Conditioning, guidance_scale: float, image_ids):
        batch = latents.shape[0]
        guidance = None
        if self.transformer.config.guidance_embeds:
            guidance = torch.full([1], guidance_scale, device=latents.device, dtype=torch.float32).expand(
                batch
            )
        timestep = timestep.expand(batch).to(latents.dtype)
        return self.transformer(
            hidden_states=latents,
            timestep=timestep / 1000,
            guidance=guidance,
            pooled_projections=conditioning.pooled,
            encoder_hidden_states=conditioning.prompt_embeds,
            txt_ids=conditioning.text_ids,
            img_ids=image_ids,
            return_dict=False,
        )[0]

    def step(self, velocity: torch.Tensor, timestep, latents: torch.Tensor) -> torch.Tensor:
        return self.pipeline.scheduler.step(velocity, timestep, latents, return_dict=False)[0]

    def predict_x0(self, latents: torch.Tensor, velocity: torch.Tensor, sigma: float) -> torch.Tensor:
        """Flow matching: x_t = (1 - σ) x0 + σ ε and v = ε - x0, so x0 = x_t - σ v."""
        return latents - float(sigma) * velocity

    def _unpack(self, latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
        return self.pipeline._unpack_latents(latents, height, width, self.pipeline.vae_scale_factor)

    def decode(self, latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """`[B, N, C]` packed latents → `[B, 3, H, W]` images in [0, 1]."""
        vae = self.pipeline.vae
        latents = self._unpack(latents, height, width)
        latents = latents / vae.config.scaling_factor + vae.config.shift_factor
        image = vae.decode(latents.to(vae.dtype), return_dict=False)[0]
        return (image.float() / 2 + 0.5).clamp(0, 1)

    def preview(self, latents: torch.Tensor, height: int, width: int, mode: str) -> np.ndarray:
        """Images for superpixels, `[B, H', W', 3]` float in [0, 1].

        "vae" decodes at full size; "latent" projects the latent channels on their 3 principal
        components at latent resolution (H/8 × W/8): no VAE, a fraction of the cost.
        """
        if mode == "vae":
            return self.decode(latents, height, width).permute(0, 2, 3, 1).cpu().numpy()
        unpacked = self._unpack(latents, height, width).float()
        previews = []
        for image in unpacked:
            channels = image.reshape(image.shape[0], -1)
            centred = channels - channels.mean(dim=1, keepdim=True)
            _, _, basis = torch.linalg.svd(centred.T, full_matrices=False)
            rgb = (basis[:3] @ centred).reshape(-1, *image.shape[1:])
            if rgb.shape[0] < 3:
                rgb = torch.cat([rgb, rgb.new_zeros(3 - rgb.shape[0], *rgb.shape[1:])])
            low = rgb.reshape(3, -1).quantile(0.01, dim=1)[:, None, None]
            high = rgb.reshape(3, -1).quantile(0.99, dim=1)[:, None, None]
            previews.append(((rgb - low) / (high - low).clamp_min(1e-6)).clamp(0, 1).permute(1, 2, 0))
        return torch.stack(previews).cpu().numpy()

    @contextlib.contextmanager
    def capture(self, block: int) -> Iterator[AttentionTap]:
        """Hooks that record block `block`'s queries/keys during the forward passes inside."""
        attn = self.transformer.transformer_blocks[block].attn
        tap = AttentionTap()

        def keep(name: str):
            def hook(module, inputs, output):
                tap.store[name] = output.detach()

            return hook

        def keep_rope(module, args, kwargs):
            tap.store["rope"] = kwargs.get("image_rotary_emb")

        handles = [
            attn.norm_q.register_forward_hook(keep("q_img")),
            attn.norm_k.register_forward_hook(keep("k_img")),
            attn.norm_added_q.register_forward_hook(keep("q_text")),
            attn.register_forward_pre_hook(keep_rope, with_kwargs=True),
        ]
        try:
            yield tap
        finally:
            for handle in handles:
                handle.remove()
