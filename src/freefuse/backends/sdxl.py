"""SDXL (base and fine-tunes such as Pony, Illustrious, NoobAI): `UNet2DConditionModel` in a
`StableDiffusionXLPipeline`.

A UNet sees the image at several resolutions ("levels"). Every layer inside a level's attention
blocks sees that level's image tokens, except the cross-attention keys and values, which see the
77 CLIP tokens; convolutions see `[B, C, H, W]`; time and size embeddings see no tokens. The mask
grid is the deepest attention level (32×32 at 1024², 32 pixels per token), where the authors tap
SDXL; layers at finer levels get the mask repeated up, and coarser ones area-averaged.

Stage 1 reads the cross-attention of one transformer block: image queries × text keys (text does
not attend to the image in a UNet, so there are no text queries: methods `image-to-text` and
`routing` only), and the block's self-attention output for routing's similarities.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from ..conditions import CONTROLNET, IMG2IMG, INPAINT
from ..core import BiasConfig, MaskConfig, jsontext
from ..lora import UNET_FAMILY, check_lora_family
from ..tiny import tiny_clip_tokenizer
from .base import (
    IMAGE,
    NO_TOKENS,
    SPATIAL,
    TEXT,
    Architecture,
    Backend,
    BiasSite,
    CapturedAttention,
    Conditioning,
    Inpainting,
    Latents,
    TokenLayout,
    converter_failure,
    flat_controlnets,
    keep_first_input,
    keep_output,
    latent_preview,
)
from .registry import register

if TYPE_CHECKING:
    from ..conditions import Conditions
    from ..lora import LoraFile
    from ..settings import GenerationSettings

# The layers a typical SDXL character LoRA (kohya) adapts: every linear layer of the attention
# blocks, as PEFT module-name suffixes.
SDXL_LORA_TARGETS = (
    "attn1.to_q",
    "attn1.to_k",
    "attn1.to_v",
    "attn1.to_out.0",
    "attn2.to_q",
    "attn2.to_k",
    "attn2.to_v",
    "attn2.to_out.0",
    "ff.net.0.proj",
    "ff.net.2",
    "proj_in",
    "proj_out",
)
_CROSS_ATTENTION_TEXT_SIDE = ("attn2.to_k", "attn2.to_v")


def transformer_block_levels(unet: torch.nn.Module) -> list[tuple[str, int]]:
    """`(module name, level)` of every transformer block of a UNet in forward order; level 0 is the
    latent resolution, each level below it half the size."""
    deepest = len(unet.down_blocks) - 1
    found = []
    for name, module in unet.named_modules():
        if type(module).__name__ != "BasicTransformerBlock":
            continue
        parts = name.split(".")
        if parts[0] == "down_blocks":
            order, level = (0, int(parts[1])), int(parts[1])
        elif parts[0] == "mid_block":
            order, level = (1, 0), deepest
        elif parts[0] == "up_blocks":
            order, level = (2, int(parts[1])), deepest - int(parts[1])
        else:
            continue
        numbers = tuple(int(part) for part in parts[2:] if part.isdigit())
        found.append(((order, numbers), name, level))
    return [(name, level) for _, name, level in sorted(found)]


class SdxlAttentionTap:
    """Keeps the tapped blocks' cross-attention queries and keys, and self-attention outputs."""

    def __init__(self, blocks: list[int], names: list[str], heads: list[int]) -> None:
        self.blocks = blocks
        self.names = names
        self.heads = heads
        self.store: dict[int, dict[str, torch.Tensor]] = {block: {} for block in blocks}

    def result(self) -> CapturedAttention:
        """`CapturedAttention` with `q_img`, `k_text` `[B, C, heads, S, D]`, `o_img` `[B, C, N, heads*D]`;
        `q_text` and `k_img` are None (a UNet's text does not attend)."""
        per_block = []
        for block, name, heads in zip(self.blocks, self.names, self.heads, strict=True):
            store = self.store[block]
            missing = [key for key in ("q_img", "k_text", "o_img") if key not in store]
            if missing:
                raise RuntimeError(
                    f"Block {block} ({name}) did not run (no {missing}); the capture step saw no pass."
                )

            def split(tensor: torch.Tensor, heads: int = heads) -> torch.Tensor:
                batch, tokens, width = tensor.shape
                return tensor.reshape(batch, tokens, heads, width // heads).transpose(1, 2)

            per_block.append(
                {"q_img": split(store["q_img"]), "k_text": split(store["k_text"]), "o_img": store["o_img"]}
            )
        return CapturedAttention.of_blocks(per_block)


class SdxlArchitecture(Architecture):
    """SDXL's facts and rules (no pipeline needed)."""

    name = "sdxl"
    pipeline_classes = ("StableDiffusionXLPipeline",)
    denoiser_name = "unet"
    known_model_ids = ("stabilityai/stable-diffusion-xl-base-1.0",)
    block_kind = "deepest-level transformer block"
    # The authors' SDXL block: up_blocks.0.attentions.0.transformer_blocks.3, the 34th of the 60
    # transformer blocks at SDXL's deepest level (2 x 10 down, 10 mid, 3 x 10 up).
    paper_block = (33, 60)
    max_sequence_length = 77  # one CLIP window; longer prompts are cut there, as diffusers does
    default_steps = 30
    default_guidance = 5.0  # StableDiffusionXLPipeline's
    captured = ("q_img", "k_text", "o_img")
    # The authors' SDXL method: seeds from cross-attention, similarity of self-attention outputs.
    default_mask_config = MaskConfig(method="routing")
    embedding_slots = {"clip_l": ("tokenizer", "text_encoder"), "clip_g": ("tokenizer_2", "text_encoder_2")}
    typical_lora_targets = (SDXL_LORA_TARGETS, ".attentions.")
    tokenizer_folder = "tokenizer"
    conditions = (IMG2IMG, INPAINT, CONTROLNET)
    # StableDiffusionXLImg2ImgPipeline's and StableDiffusionXLInpaintPipeline's defaults.
    default_strength = {IMG2IMG: 0.3, INPAINT: 0.9999}
    controlnet_classes = ("ControlNetModel",)

    @classmethod
    def denoised_steps(cls, num_inference_steps: int, strength: float) -> int:
        """`StableDiffusionXLImg2ImgPipeline.get_timesteps`: `int(N·strength)` steps are denoised."""
        return min(int(num_inference_steps * strength), num_inference_steps)
    # The bias goes into every cross-attention (image queries over the CLIP tokens) at every level;
    # text never attends to the image in a UNet, so there is no text-to-image half.
    attention_bias_blocks = ("all", "last-half", "none")
    attention_bias_text_queries = False
    default_attention_bias = BiasConfig(scale=0.0, positive=1.0, bidirectional=False, blocks="all")

    @classmethod
    def pixels_per_token(cls, model_folder: Path | None) -> int:
        """The VAE's factor times 2 per UNet level above the deepest one with cross-attention."""
        if model_folder is None:
            return 32
        try:
            vae = jsontext.loads((Path(model_folder) / "vae" / "config.json").read_bytes())
            unet = jsontext.loads((Path(model_folder) / "unet" / "config.json").read_bytes())
            vae_factor = 2 ** (len(vae.get("block_out_channels", [0] * 4)) - 1)
            levels = [i for i, kind in enumerate(unet["down_block_types"]) if "CrossAttn" in kind]
            return vae_factor * 2 ** max(levels)
        except (OSError, KeyError, TypeError, ValueError, AttributeError):
            return 32

    @classmethod
    def tiny_tokenizer(cls):
        return tiny_clip_tokenizer()

    @classmethod
    def single_file_matches(cls, keys) -> bool:
        """SDXL's original layout: the second text encoder under `conditioner.embedders.1`, or the
        UNet's size embedding (`label_emb`) beside its `input_blocks`."""
        return any(
            key.startswith(("conditioner.embedders.1.model.", "model.diffusion_model.label_emb."))
            for key in keys
        )

    @classmethod
    def check_lora_keys(cls, keys, source: str) -> None:
        check_lora_family(keys, source, (UNET_FAMILY,), "an SDXL UNet")

    @classmethod
    def check_settings(cls, settings: GenerationSettings) -> list[str]:
        length = settings.max_sequence_length
        if length is not None and length > cls.max_sequence_length:
            raise ValueError(
                f"`max_sequence_length` {length} is more than SDXL's CLIP window of {cls.max_sequence_length} tokens; "
                "use at most 77 (longer prompts are cut at 77 tokens, as diffusers does)."
            )
        if settings.true_cfg_scale > 1:
            raise ValueError(
                "`true_cfg_scale` is FLUX's; SDXL always guides with the negative prompt: set `guidance_scale` "
                "(CLI: --guidance) instead."
            )
        return []

    @classmethod
    def negative_prompt(cls, settings: GenerationSettings) -> str | None:
        """SDXL guides with a negative pass whenever `guidance_scale` > 1 (an unset one is empty)."""
        scale = cls.default_guidance if settings.guidance_scale is None else settings.guidance_scale
        if scale <= 1:
            return None
        return settings.negative_prompt or ""

    @classmethod
    def cfg_scale(cls, settings: GenerationSettings) -> float:
        return float(cls.default_guidance if settings.guidance_scale is None else settings.guidance_scale)


@dataclass
class SdxlControl:
    """An SDXL run's ControlNet inputs, prepared once (`StableDiffusionXLControlNetPipeline`'s step 4).

    Attributes:
        net: the `ControlNetModel`, or a `MultiControlNetModel` for several controls.
        images: `[B, 3, H, W]` control pictures in [0, 1], one per control for a multi-ControlNet.
        scales: `controlnet_conditioning_scale`, one per control for a multi-ControlNet.
    """

    net: torch.nn.Module
    images: torch.Tensor | list[torch.Tensor]
    scales: float | list[float]


@register
class SdxlBackend(Backend):
    """SDXL's runner parts over a `StableDiffusionXLPipeline`."""

    architecture = SdxlArchitecture
    img2img_pipeline = "StableDiffusionXLImg2ImgPipeline"

    @classmethod
    def matches(cls, pipeline) -> bool:
        """Text-to-image SDXL only: img2img, inpainting and ControlNet pipelines feed the UNet more."""
        from diffusers import StableDiffusionXLPipeline

        return type(pipeline) is StableDiffusionXLPipeline

    @classmethod
    def load_single_file(cls, path: Path, keys, config: str | None, **options):
        """`from_single_file` (configs from `config`, or the model type diffusers reads from the file),
        then the scheduler of v-prediction files (NoobAI v-pred and the like mark themselves with
        `v_pred` / `ztsnr` tensors, which diffusers does not read)."""
        pipeline = cls.pipeline_class().from_single_file(str(path), config=config, **options)
        changes = {}
        if "v_pred" in keys:
            changes["prediction_type"] = "v_prediction"
        if "ztsnr" in keys:
            changes.update(rescale_betas_zero_snr=True, timestep_spacing="trailing")
        if changes:
            scheduler = pipeline.scheduler
            pipeline.scheduler = type(scheduler).from_config({**scheduler.config, **changes})
        return pipeline

    # -- the loaded model -------------------------------------------------------------------------------
    @property
    def _levels(self) -> list[tuple[str, int]]:
        return transformer_block_levels(self.denoiser)

    @property
    def _grid_level(self) -> int:
        return max(level for _, level in self._levels)

    @property
    def tap_blocks(self) -> list[str]:
        """Module names of the tappable transformer blocks (the deepest level), in forward order."""
        deepest = self._grid_level
        return [name for name, level in self._levels if level == deepest]

    @property
    def size_multiple(self) -> int:
        return int(self.pipeline.vae_scale_factor) * 2**self._grid_level

    @property
    def tokenizer(self):
        """The first CLIP's; both of SDXL's tokenizers cut words the same way."""
        return self.pipeline.tokenizer

    @property
    def num_blocks(self) -> int:
        return len(self.tap_blocks)

    def token_layout(self, module_name: str) -> TokenLayout:
        """Convolutions: spatial. Inside attention blocks: image tokens of that level, but the
        cross-attention keys/values, which read the text. Time and size embeddings: no tokens."""
        module = self.denoiser.get_submodule(module_name)
        if isinstance(getattr(module, "base_layer", module), torch.nn.Conv2d):
            return SPATIAL
        if ".attentions." in module_name:
            return TEXT if any(module_name.endswith(part) for part in _CROSS_ATTENTION_TEXT_SIDE) else IMAGE
        return NO_TOKENS  # time_embedding, add_embedding, the resnets' time_emb_proj

    def bias_sites(self, blocks: str) -> list[BiasSite]:
        """Every transformer block's cross-attention (`attn2`: the level's image tokens over the text),
        at every level, in forward order; "last-half" is the second half of that order. The mask
        is `[B, N, T]`: diffusers' `AttnProcessor2_0` adds the heads axis itself."""
        sites = [
            BiasSite(f"{name}.attn2", self.denoiser.get_submodule(name).attn2, IMAGE, TEXT, _image_tokens, False)
            for name, _ in self._levels
        ]
        return {"all": sites, "last-half": sites[len(sites) // 2 :], "none": []}[blocks]

    # -- the denoising loop's parts ----------------------------------------------------------------
    def encode(self, prompts: list[str], max_sequence_length: int) -> Conditioning:
        """Both CLIPs' penultimate hidden states side by side `[B, 77, 2048]`, and the second's pooled output."""
        prompt_embeds, _, pooled, _ = self.pipeline.encode_prompt(
            prompt=list(prompts),
            device=self.device,
            num_images_per_prompt=1,
            do_classifier_free_guidance=False,
        )
        return Conditioning(list(prompts), prompt_embeds, pooled, None)

    def encode_negative(self, prompts: list[str], settings: GenerationSettings) -> Conditioning:
        """Zeros for an unset negative prompt where the model asks for it
        (`force_zeros_for_empty_prompt`, SDXL base), as `StableDiffusionXLPipeline` does."""
        encoded = self.encode(prompts, self.architecture.max_sequence_length)
        if settings.negative_prompt is None and self.pipeline.config.get(
            "force_zeros_for_empty_prompt", False
        ):
            return Conditioning(
                list(prompts), torch.zeros_like(encoded.prompt_embeds), torch.zeros_like(encoded.pooled), None
            )
        return encoded

    def prepare_latents(
        self,
        generators: list[torch.Generator] | torch.Generator,
        batch: int,
        height: int,
        width: int,
        dtype: torch.dtype,
        latents: torch.Tensor | None = None,
    ) -> Latents:
        """Noise `[B, 4, H/8, W/8]` scaled by the scheduler's first sigma (call `timesteps` first), and
        the size conditioning `[B, 6]` (original size, crop corner, target size) as positions."""
        channels = self.denoiser.config.in_channels
        noise = self.pipeline.prepare_latents(
            batch, channels, height, width, dtype, self.device, generators, latents
        )
        # Stochastic samplers (Euler ancestral, SDE DPM++) draw noise at every step: from these same
        # generators, as diffusers does, so that a seed replays.
        self._step_options = self.pipeline.prepare_extra_step_kwargs(generators, 0.0)
        return Latents(noise, self._size_ids(height, width, dtype, batch))

    def timesteps(
        self, num_inference_steps: int, height: int, width: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The scheduler's own schedule; its `sigmas` end at 0."""
        from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl import retrieve_timesteps

        scheduler = self.pipeline.scheduler
        name = type(scheduler).__name__
        supported = "use Euler, Euler ancestral, DPM++ 2M / SDE, UniPC or DEIS (diffusers' SDXL schedulers)"
        if name.startswith("EDM"):
            raise ValueError(
                f"{name} preconditions the model input differently (Playground v2.5); {supported}."
            )
        timesteps, _ = retrieve_timesteps(scheduler, num_inference_steps, self.device)
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(0)
        sigmas = getattr(scheduler, "sigmas", None)
        if len(timesteps) != num_inference_steps:
            raise ValueError(
                f"{name} takes {len(timesteps)} model calls for {num_inference_steps} steps; {supported}."
            )
        if sigmas is None or len(sigmas) != len(timesteps) + 1:
            raise ValueError(f"{name} has no per-step sigmas; {supported}.")
        return timesteps, sigmas

    # -- conditioned runs: img2img, inpainting, ControlNets ------------------------------------------
    def prepare(
        self,
        generators: list[torch.Generator] | torch.Generator,
        batch: int,
        height: int,
        width: int,
        dtype: torch.dtype,
        latents: torch.Tensor | None,
        conditions: Conditions | None,
        first_timestep: torch.Tensor,
        controlnets: Sequence[torch.nn.Module] = (),
    ) -> Latents:
        """As `StableDiffusionXLImg2ImgPipeline`, `StableDiffusionXLInpaintPipeline` or
        `StableDiffusionXLControlNetPipeline` prepare: control pictures, then the latents (an init
        image noised to `first_timestep`), then the inpainting mask. With one generator per image,
        each image is prepared alone from its own; one generator draws for the whole batch."""
        if conditions is None or conditions.empty:
            return self.prepare_latents(generators, batch, height, width, dtype, latents)
        control = self._control(conditions, flat_controlnets(controlnets), batch, height, width) if conditions.controls else None
        if conditions.init_image is None:
            state = self.prepare_latents(generators, batch, height, width, dtype, latents)
            state.control = control
            return state
        if latents is not None:
            raise ValueError("`latents` cannot be given with an init image on SDXL: they are made from the image.")
        per_image = isinstance(generators, list)
        parts = [
            self._start(conditions, generator, 1 if per_image else batch, height, width, dtype, first_timestep)
            for generator in (generators if per_image else [generators])
        ]
        state = Latents.concat(parts, control)
        # Stochastic samplers draw their step noise from the same generators, as diffusers does.
        self._step_options = self.pipeline.prepare_extra_step_kwargs(generators, 0.0)
        state.positions = self._size_ids(height, width, dtype, batch)
        return state

    def _start(self, conditions: Conditions, generator, count: int, height: int, width: int, dtype, first) -> Latents:
        """One generator's images from the init image, by the diffusers pipeline's own
        `prepare_latents` (and `prepare_mask_latents` for inpainting)."""
        inpaint = conditions.inpaint_mask is not None
        name = "StableDiffusionXLInpaintPipeline" if inpaint else "StableDiffusionXLImg2ImgPipeline"
        helper = self._helper(name)
        picture = conditions.init_image.image.convert("RGB")  # grey pictures as diffusers' load_image gives them
        init = helper.image_processor.preprocess(picture, height=height, width=width).to(dtype=torch.float32)
        start = first.repeat(count)
        if not inpaint:
            noised = helper.prepare_latents(init, start, count, 1, dtype, self.device, generator, add_noise=True)
            return Latents(noised)
        channels = self.pipeline.vae.config.latent_channels
        noised, noise, image_latents = helper.prepare_latents(
            count,
            channels,
            height,
            width,
            dtype,
            self.device,
            generator,
            None,
            image=init,
            timestep=start,
            is_strength_max=conditions.strength == 1.0,
            add_noise=True,
            return_noise=True,
            return_image_latents=True,
        )
        region = helper.mask_processor.preprocess(conditions.inpaint_mask.image, height=height, width=width)
        mask, _ = helper.prepare_mask_latents(
            region, init * (region < 0.5), count, height, width, dtype, self.device, generator, False
        )
        return Latents(noised, None, Inpainting(image_latents, noise, mask))

    def _size_ids(self, height: int, width: int, dtype: torch.dtype, batch: int) -> torch.Tensor:
        projection = self.pipeline.text_encoder_2.config.projection_dim
        time_ids = self.pipeline._get_add_time_ids(
            (height, width), (0, 0), (height, width), dtype=dtype, text_encoder_projection_dim=projection
        )
        return time_ids.to(self.device).repeat(batch, 1)

    def _control(self, conditions: Conditions, nets: list, batch: int, height: int, width: int) -> SdxlControl:
        """The control pictures as `StableDiffusionXLControlNetPipeline.prepare_image` makes them (no
        CFG doubling: FreeFuse runs the two passes one after the other), and the ControlNet(s): one
        control to its `ControlNetModel`, several to a `MultiControlNetModel` in their order."""
        from diffusers.models.controlnets.multicontrolnet import MultiControlNetModel

        readers = [nets[control.controlnet] for control in conditions.controls]
        helper = self._helper("StableDiffusionXLControlNetPipeline", controlnet=readers[0])
        images = [
            helper.prepare_image(
                image=control.image.image.convert("RGB"),
                width=width,
                height=height,
                batch_size=batch,
                num_images_per_prompt=1,
                device=self.device,
                dtype=readers[0].dtype,
            )
            for control in conditions.controls
        ]
        if len(readers) == 1:
            return SdxlControl(net=readers[0], images=images[0], scales=conditions.controls[0].scale)
        return SdxlControl(
            net=MultiControlNetModel(readers), images=images, scales=[c.scale for c in conditions.controls]
        )

    def renoise(self, clean: torch.Tensor, noise: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        """`StableDiffusionXLInpaintPipeline`'s re-noising of the kept image: the scheduler's `add_noise`."""
        return self.pipeline.scheduler.add_noise(clean, noise, timestep)

    def predict(
        self,
        latents: Latents,
        timestep: torch.Tensor,
        conditioning: Conditioning,
        settings: GenerationSettings,
    ) -> torch.Tensor:
        """The UNet's noise prediction for one pass (the scheduler scales the input first); with
        ControlNets, their residuals for this pass (its own prompt), as diffusers' batched passes
        compute them."""
        hidden = self.pipeline.scheduler.scale_model_input(latents.latents, timestep)
        added = {"text_embeds": conditioning.pooled, "time_ids": latents.positions}
        residuals = {}
        control = latents.control
        if isinstance(control, SdxlControl):
            down, mid = control.net(
                hidden,
                timestep,
                encoder_hidden_states=conditioning.prompt_embeds,
                controlnet_cond=control.images,
                conditioning_scale=control.scales,
                guess_mode=False,
                added_cond_kwargs=added,
                return_dict=False,
            )
            residuals = {"down_block_additional_residuals": down, "mid_block_additional_residual": mid}
        return self.denoiser(
            hidden,
            timestep,
            encoder_hidden_states=conditioning.prompt_embeds,
            added_cond_kwargs=added,
            return_dict=False,
            **residuals,
        )[0]

    def step(self, prediction: torch.Tensor, timestep: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        options = getattr(self, "_step_options", {})
        return self.pipeline.scheduler.step(prediction, timestep, latents, **options, return_dict=False)[0]

    def predict_x0(self, latents: torch.Tensor, prediction: torch.Tensor, sigma: float) -> torch.Tensor:
        """x0 from the model output at noise level σ (the scheduler's Karras-style sigma).

        Euler-type schedulers keep latents x = x0 + σ ε (their first noise is scaled by σ_max);
        DPM-Solver-type ones keep x / √(σ² + 1). With x in the first form: x0 = x - σ ε
        (epsilon models), or x / (σ² + 1) - v σ / √(σ² + 1) (v-prediction).
        """
        scheduler = self.pipeline.scheduler
        kind = scheduler.config.get("prediction_type", "epsilon")
        sigma = float(sigma)
        scale = (sigma**2 + 1) ** 0.5
        if float(getattr(scheduler, "init_noise_sigma", 1.0)) <= 1.0:
            latents = latents * scale  # variance-preserving latents, as the first form
        if kind == "epsilon":
            return latents - sigma * prediction
        if kind == "v_prediction":
            return latents / scale**2 - prediction * sigma / scale
        raise ValueError(
            f"SDXL prediction type {kind!r} is not supported; use an epsilon or v-prediction model."
        )

    def decode(self, latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """`[B, 4, h, w]` latents → `[B, 3, H, W]` images in [0, 1]; float16 VAEs that overflow
        (`force_upcast`) decode in float32, as diffusers does."""
        vae = self.pipeline.vae
        dtype = vae.dtype
        upcast = dtype == torch.float16 and vae.config.get("force_upcast", False)
        mean, std = vae.config.get("latents_mean"), vae.config.get("latents_std")
        if mean is not None and std is not None:
            mean = torch.tensor(mean, device=latents.device).view(1, -1, 1, 1)
            std = torch.tensor(std, device=latents.device).view(1, -1, 1, 1)
            latents = latents * std / vae.config.scaling_factor + mean
        else:
            latents = latents / vae.config.scaling_factor
        try:
            if upcast:
                vae.to(torch.float32)
            image = vae.decode(latents.to(vae.dtype), return_dict=False)[0]
        finally:
            if upcast:
                vae.to(dtype)
        return (image.float() / 2 + 0.5).clamp(0, 1)

    def preview(self, latents: torch.Tensor, height: int, width: int, mode: str) -> np.ndarray:
        """ "vae": decoded at full size; "latent": the latents' 3 principal components at H/8 × W/8."""
        if mode == "vae":
            return self.decode(latents, height, width).permute(0, 2, 3, 1).cpu().numpy()
        return latent_preview(latents)

    @contextlib.contextmanager
    def capture(self, block: int | Sequence[int]) -> Iterator[SdxlAttentionTap]:
        """Hooks recording, in each tapped transformer block, the cross-attention's image queries and
        text keys (`attn2.to_q`, `attn2.to_k` outputs) and the self-attention's output before its
        projection (`attn1.to_out.0` input). The real attention runs untouched."""
        blocks = [block] if isinstance(block, int) else list(block)
        names = [self.tap_blocks[index] for index in blocks]
        modules = [self.denoiser.get_submodule(name) for name in names]
        tap = SdxlAttentionTap(blocks, names, [module.attn2.heads for module in modules])
        handles = []

        try:
            for index, module in zip(blocks, modules, strict=True):
                store = tap.store[index]
                handles += [
                    module.attn2.to_q.register_forward_hook(keep_output(store, "q_img")),
                    module.attn2.to_k.register_forward_hook(keep_output(store, "k_text")),
                    module.attn1.to_out[0].register_forward_pre_hook(keep_first_input(store, "o_img")),
                ]
            yield tap
        finally:
            for handle in handles:
                handle.remove()

    # -- LoRA files --------------------------------------------------------------------------------
    def lora_source(self, lora: LoraFile) -> dict[str, torch.Tensor]:
        """Bare PEFT files go in with the `unet.` prefix; every other layout (kohya `lora_unet_…`,
        `lora_te1_…`, diffusers, LyCORIS where diffusers reads it) by path."""
        state = lora.state_dict
        if lora.layout == "peft" and not any(key.startswith(("unet.", "text_encoder")) for key in state):
            return {"unet." + key.removeprefix("base_model.model."): value for key, value in state.items()}
        return state

    def lora_state_dict(self, lora: LoraFile, source: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """diffusers' SDXL converter, then PEFT names (`unet.<module>.lora_A.weight`); text-encoder
        parts keep their `text_encoder(_2).` keys."""
        from diffusers import StableDiffusionXLPipeline
        from diffusers.utils import convert_unet_state_dict_to_peft

        state = dict(source)
        try:
            converted, _ = StableDiffusionXLPipeline.lora_state_dict(state, unet_config=self.denoiser.config)
        except (ValueError, KeyError, RuntimeError, AssertionError, TypeError, IndexError) as error:
            raise converter_failure(lora, "SDXL", "StableDiffusionXLPipeline.lora_state_dict", error) from None
        unet = {
            key.removeprefix("unet."): value for key, value in converted.items() if key.startswith("unet.")
        }
        others = {key: value for key, value in converted.items() if not key.startswith("unet.")}
        return {
            **{"unet." + key: value for key, value in convert_unet_state_dict_to_peft(unet).items()},
            **others,
        }


def _image_tokens(args: tuple, kwargs: dict, n_text: int) -> int:
    """The level's image tokens: the cross-attention's queries (`hidden_states`, its first argument)."""
    return int((kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]).shape[1])
