"""FLUX.1 (dev, schnell, fine-tunes in diffusers layout): `FluxTransformer2DModel` in a `FluxPipeline`.

Token layout: double-stream blocks keep text and image in separate layers; single-stream blocks see
[text ‖ image] in one sequence. The tap reads post-norm queries/keys from hooks on the block's
`norm_q`, `norm_k`, `norm_added_q` and applies the block's own rotary embedding, so the real
attention keeps whatever processor (SDPA, flash, ...) is set and nothing is computed twice.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from ..conditions import CONTROLNET, IMG2IMG, INPAINT, IP_ADAPTER, REDUX
from ..core import BiasConfig, jsontext
from ..core.config import BIAS_BLOCKS
from ..lora import FLUX1_FAMILY, FLUX_FAMILY, check_lora_family
from ..tiny import tiny_t5_tokenizer
from .base import (
    IMAGE,
    NO_TOKENS,
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
    from ..conditions import Conditions, Control
    from ..lora import LoraFile
    from ..settings import GenerationSettings

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
#: What FLUX's joint attention's queries and keys hold: `torch.cat([text, image])` in both kinds of block.
JOINT = ("text", "image")
#: FLUX.1's transformer width (24 heads of 128), which diffusers' kohya converter takes for granted.
FLUX1_WIDTH = 3072
_TEXT_STREAM = ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out", "ff_context.")


class FluxAttentionTap:
    """Keeps the tapped blocks' post-norm queries/keys, attention outputs and rotary embedding of
    the last forward pass."""

    def __init__(self, blocks: list[int]) -> None:
        self.blocks = blocks
        self.store: dict[int, dict[str, object]] = {block: {} for block in blocks}

    def _one(self, block: int) -> dict[str, torch.Tensor]:
        from diffusers.models.embeddings import apply_rotary_emb

        store = self.store[block]
        missing = [k for k in ("q_text", "k_text", "q_img", "k_img", "o_img") if k not in store]
        if missing:
            raise RuntimeError(
                f"Block {block} did not run (no {missing}); the capture step saw no forward pass."
            )
        tensors = {name: store[name] for name in ("q_text", "k_text", "q_img", "k_img")}
        rope = store.get("rope")
        if rope is not None:
            cos, sin = rope
            n_text = tensors["q_text"].shape[1]
            for name, tensor in tensors.items():
                part = (cos[:n_text], sin[:n_text]) if name.endswith("text") else (cos[n_text:], sin[n_text:])
                tensors[name] = apply_rotary_emb(tensor, part, sequence_dim=1)
        # [B, S, heads, D] -> [B, heads, S, D]
        result = {name: tensor.transpose(1, 2) for name, tensor in tensors.items()}
        result["o_img"] = store["o_img"]
        return result

    def result(self) -> CapturedAttention:
        """`CapturedAttention` with RoPE applied, shapes `[B, C, heads, S, D]` (C tapped blocks)."""
        return CapturedAttention.of_blocks([self._one(block) for block in self.blocks])


class FluxArchitecture(Architecture):
    """FLUX.1's facts and rules (no pipeline needed)."""

    name = "flux"
    pipeline_classes = ("FluxPipeline",)
    embedding_slots = {"clip_l": ("tokenizer", "text_encoder"), "t5": ("tokenizer_2", "text_encoder_2")}
    denoiser_name = "transformer"
    known_model_ids = ("black-forest-labs/FLUX.1-dev", "black-forest-labs/FLUX.1-schnell")
    block_kind = "double-stream block"
    # The paper taps double-stream block 16 of FLUX.1's 19 (the 17th).
    paper_block = (16, 19)
    max_sequence_length = 512  # T5-XXL's limit in FluxPipeline
    default_guidance = 3.5  # FLUX.1-dev's distilled guidance
    typical_lora_targets = (FLUX_LORA_TARGETS, "transformer_blocks")
    tokenizer_folder = "tokenizer_2"
    conditions = (IMG2IMG, INPAINT, CONTROLNET, IP_ADAPTER, REDUX)
    default_strength = {IMG2IMG: 0.6, INPAINT: 0.6}  # FluxImg2ImgPipeline's and FluxInpaintPipeline's
    controlnet_classes = ("FluxControlNetModel",)
    # The FLUX.1 union ControlNets' modes (InstantX, Shakker-Labs "Union-Pro"), in embedding order.
    union_modes = ("canny", "tile", "depth", "blur", "pose", "gray", "lq")

    @classmethod
    def denoised_steps(cls, num_inference_steps: int, strength: float) -> int:
        """`FluxImg2ImgPipeline.get_timesteps`: the first `int(N - min(N·strength, N))` steps are skipped."""
        skipped = int(max(num_inference_steps - min(num_inference_steps * strength, num_inference_steps), 0))
        return num_inference_steps - skipped
    # Joint attention: every block reads [text ‖ image], so both directions of the bias exist.
    attention_bias_blocks = BIAS_BLOCKS
    default_attention_bias = BiasConfig(scale=0.0, positive=1.0, bidirectional=True, blocks="all")

    @classmethod
    def pixels_per_token(cls, model_folder: Path | None) -> int:
        """The VAE's factor (2 per down block after the first; 8 on FLUX.1) times the 2x2 latent patches."""
        config = None if model_folder is None else Path(model_folder) / "vae" / "config.json"
        if config is not None and config.is_file():
            try:
                channels = jsontext.loads(config.read_bytes()).get("block_out_channels", [0] * 4)
                return 2 ** (len(channels) - 1) * 2
            except (OSError, ValueError, TypeError, AttributeError):
                pass
        return 16

    @classmethod
    def tiny_tokenizer(cls):
        return tiny_t5_tokenizer()

    @classmethod
    def single_file_matches(cls, keys) -> bool:
        """FLUX.1's original layout (BFL's): `double_blocks.*`, with or without a `model.diffusion_model.`
        prefix, and per-block modulation (FLUX.2's files share the block names but not that)."""
        return any(key.startswith(("double_blocks.", "model.diffusion_model.double_blocks.")) for key in keys) and not any(
            "stream_modulation" in key for key in keys
        )

    @classmethod
    def default_single_file_base(cls, keys) -> str | None:
        """FLUX.1-schnell for a file without the guidance embedder, else FLUX.1-dev (the text
        encoders and VAE of a transformer-only file come from there)."""
        schnell = not any("guidance_in." in key for key in keys)
        return cls.known_model_ids[1] if schnell else cls.known_model_ids[0]

    @classmethod
    def check_lora_keys(cls, keys, source: str) -> None:
        """FLUX.1's files, and FLUX files whose names and widths do not tell FLUX.1 from FLUX.2."""
        check_lora_family(keys, source, (FLUX1_FAMILY, FLUX_FAMILY), "a FLUX.1 transformer")

    @classmethod
    def check_settings(cls, settings: GenerationSettings) -> list[str]:
        notes = []
        length = settings.max_sequence_length
        if length is not None and length > cls.max_sequence_length:
            raise ValueError(
                f"`max_sequence_length` {length} is more than FLUX.1's T5 takes; use at most "
                f"{cls.max_sequence_length}."
            )
        if settings.negative_prompt is not None and settings.true_cfg_scale <= 1:
            raise ValueError(
                "`negative_prompt` only acts with true CFG on FLUX.1: pass `true_cfg_scale` > 1 (CLI: "
                "--true-cfg 1.5), or leave the negative prompt out."
            )
        if settings.true_cfg_scale > 1 and settings.negative_prompt is None:
            notes.append("`true_cfg_scale` > 1 has no effect without a `negative_prompt`.")
        return notes

    @classmethod
    def negative_prompt(cls, settings: GenerationSettings) -> str | None:
        """FLUX.1 runs a second pass only with true CFG (as `FluxPipeline` does)."""
        return settings.negative_prompt if settings.true_cfg_scale > 1 else None

    @classmethod
    def cfg_scale(cls, settings: GenerationSettings) -> float:
        return float(settings.true_cfg_scale)


@dataclass
class FluxControl:
    """A FLUX.1 run's ControlNet inputs, prepared once (`FluxControlNetPipeline`'s step 3), and the
    residuals of the step being run.

    Attributes:
        net: the `FluxControlNetModel`, or a `FluxMultiControlNetModel` for several controls.
        images: the packed control latents `[B, N, C]` (pixels for XLabs-style ControlNets), one
            per control when `net` is a multi-ControlNet.
        modes: a union ControlNet's modes (`[B, 1]`, or one `[B]` per control), or None.
        scales: `controlnet_conditioning_scale`, one per control for a multi-ControlNet.
        repeat: XLabs-style ControlNets (with an `input_hint_block`) repeat their block samples.
        guidance: the ControlNet reads the guidance scale (its `guidance_embeds`).
        residuals: the step's `(block samples, single block samples)`, from the prompt's pass.
    """

    net: torch.nn.Module
    images: torch.Tensor | list[torch.Tensor]
    modes: torch.Tensor | list[torch.Tensor] | None
    scales: float | list[float]
    repeat: bool
    guidance: bool
    residuals: tuple | None = None


@register
class FluxBackend(Backend):
    """FLUX.1's runner parts over a `FluxPipeline`."""

    architecture = FluxArchitecture
    img2img_pipeline = "FluxImg2ImgPipeline"

    @classmethod
    def matches(cls, pipeline) -> bool:
        """Text-to-image FLUX.1 only: Fill, Control, Kontext and img2img pipelines feed the transformer
        other inputs than noise latents and are not supported."""
        from diffusers import FluxPipeline

        return type(pipeline) is FluxPipeline

    @classmethod
    def load_single_file(cls, path: Path, keys, config: str | None, **options):
        """A transformer-only file (what FLUX fine-tunes ship as): the transformer from the file, the
        text encoders, VAE and scheduler from `config`, as diffusers' docs load them. A full
        checkpoint: `FluxPipeline.from_single_file`."""
        from diffusers import FluxPipeline, FluxTransformer2DModel

        if "scaled_fp8" in keys or any(key.endswith(".scale_weight") for key in keys):
            raise ValueError(
                "it is a 'scaled fp8' file (per-tensor scales diffusers does not apply); use a bf16/fp16 or plain "
                "fp8 file"
            )
        config = config or cls.architecture.default_single_file_base(keys)
        if any(key.startswith(("vae.", "first_stage_model.", "text_encoders.")) for key in keys):
            return FluxPipeline.from_single_file(str(path), config=config, **options)
        transformer = FluxTransformer2DModel.from_single_file(
            str(path), config=config, subfolder="transformer", **options
        )
        return FluxPipeline.from_pretrained(config, transformer=transformer, use_safetensors=True, **options)

    @property
    def size_multiple(self) -> int:
        """Pixels per image token along a side: the VAE factor (8 on FLUX.1) times the 2x2 patches."""
        return int(self.pipeline.vae_scale_factor) * 2

    @property
    def tokenizer(self):
        """T5's: the text tokens of the joint attention are T5 tokens."""
        return self.pipeline.tokenizer_2

    @property
    def num_blocks(self) -> int:
        return len(self.denoiser.transformer_blocks)

    def token_layout(self, module_name: str) -> TokenLayout:
        """Double-stream blocks: image and text in separate layers. Single-stream blocks: one
        sequence, `torch.cat([text, image])` in `FluxTransformer2DModel.forward`. Modulation
        (`norm*.linear`), timestep/guidance/pooled embedders: one vector per image."""
        if module_name.startswith("single_transformer_blocks."):
            return NO_TOKENS if ".norm." in module_name else ("text", "image")
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

    @property
    def latent_channels(self) -> int:
        """The VAE's latent channels (the transformer reads them packed 2×2: four times as many)."""
        return self.denoiser.config.in_channels // 4

    def prepare_latents(
        self,
        generators: list[torch.Generator] | torch.Generator,
        batch: int,
        height: int,
        width: int,
        dtype: torch.dtype,
        latents: torch.Tensor | None = None,
    ) -> Latents:
        """Packed noise `[B, N, C]` and the image tokens' position ids (`FluxPipeline.prepare_latents`)."""
        channels = self.latent_channels
        noise, positions = self.pipeline.prepare_latents(
            batch, channels, height, width, dtype, self.device, generators, latents
        )
        return Latents(noise, positions)

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
        """As `FluxImg2ImgPipeline`, `FluxInpaintPipeline` or `FluxControlNetPipeline` prepare: the
        control images VAE-encoded first, then the noise (an init image noised to `first_timestep`),
        then the inpainting mask. With one generator per image, each image is prepared alone from
        its own (its noise never depends on the rest of the batch); one generator draws for the
        whole batch, as diffusers does."""
        if conditions is None or conditions.empty:
            return self.prepare_latents(generators, batch, height, width, dtype, latents)
        nets = flat_controlnets(controlnets)
        helper = self._helper("FluxControlNetPipeline", controlnet=nets[0]) if conditions.controls else None
        per_image = isinstance(generators, list)
        parts, images = [], []
        for index, generator in enumerate(generators if per_image else [generators]):
            count = 1 if per_image else batch
            given = None if latents is None else latents[index : index + 1] if per_image else latents
            images.append(
                [self._control_image(helper, nets, c, generator, count, height, width) for c in conditions.controls]
            )
            parts.append(self._start(conditions, generator, count, height, width, dtype, given, first_timestep))
        control = None
        if conditions.controls:
            per_control = [torch.cat([one[k] for one in images]) for k in range(len(conditions.controls))]
            control = self._control(nets, conditions.controls, per_control, batch)
        return Latents.concat(parts, control)

    def _start(self, conditions: Conditions, generator, count: int, height: int, width: int, dtype, given, first):
        """One generator's images: noise, or the init image noised to `first` (and the inpainting
        mask), by the diffusers pipeline's own `prepare_latents` and `prepare_mask_latents`."""
        channels = self.latent_channels
        if conditions.init_image is None:
            noise, positions = self.pipeline.prepare_latents(
                count, channels, height, width, dtype, self.device, generator, given
            )
            return Latents(noise, positions)
        inpaint = conditions.inpaint_mask is not None
        helper = self._helper("FluxInpaintPipeline" if inpaint else "FluxImg2ImgPipeline")
        picture = conditions.init_image.image.convert("RGB")  # grey pictures as diffusers' load_image gives them
        init = helper.image_processor.preprocess(picture, height=height, width=width).to(dtype=torch.float32)
        start = first.repeat(count)
        if not inpaint:
            noised, positions = helper.prepare_latents(
                init, start, count, channels, height, width, dtype, self.device, generator, given
            )
            return Latents(noised, positions)
        noised, noise, image_latents, positions = helper.prepare_latents(
            init, start, count, channels, height, width, dtype, self.device, generator, given
        )
        region = helper.mask_processor.preprocess(conditions.inpaint_mask.image, height=height, width=width)
        mask, _ = helper.prepare_mask_latents(
            region, init * (region < 0.5), count, channels, 1, height, width, dtype, self.device, generator
        )
        return Latents(noised, positions, Inpainting(image_latents, noise, mask))

    def _control_image(self, helper, nets, control: Control, generator, count: int, height: int, width: int):
        """`FluxControlNetPipeline`'s control image: preprocessed, then (InstantX-style ControlNets,
        without an `input_hint_block`) VAE-encoded with the run's generator and packed."""
        vae = self.pipeline.vae
        image = helper.prepare_image(
            image=control.image.image.convert("RGB"),
            width=width,
            height=height,
            batch_size=count,
            num_images_per_prompt=1,
            device=self.device,
            dtype=vae.dtype,
        )
        if nets[0].input_hint_block is not None:
            return image
        from diffusers.pipelines.flux.pipeline_flux_controlnet import retrieve_latents

        latents = retrieve_latents(vae.encode(image), generator=generator)
        latents = (latents - vae.config.shift_factor) * vae.config.scaling_factor
        channels = self.latent_channels
        return helper._pack_latents(latents, count, channels, *latents.shape[2:])

    def _control(self, nets, controls: Sequence[Control], images: list[torch.Tensor], batch: int) -> FluxControl:
        """The ControlNet(s), modes and scales as `FluxControlNetPipeline` passes them: one control to
        its `FluxControlNetModel`; several to a `FluxMultiControlNetModel` (one union ControlNet
        reading them all, or one ControlNet per control)."""
        from diffusers import FluxMultiControlNetModel

        modes = [self._mode(nets[c.controlnet], c) for c in controls]
        first = nets[controls[0].controlnet]
        if len(controls) == 1:
            mode = None if modes[0] is None else torch.tensor(modes[0]).to(self.device, dtype=torch.long)
            return FluxControl(
                net=first,
                images=images[0],
                modes=None if mode is None else mode.view(-1, 1).expand(images[0].shape[0], 1),
                scales=controls[0].scale,
                repeat=first.input_hint_block is not None,
                guidance=bool(first.config.guidance_embeds),
            )
        readers = [nets[c.controlnet] for c in controls]
        net = FluxMultiControlNetModel([first] if all(r is first for r in readers) else readers)
        return FluxControl(
            net=net,
            images=images,
            modes=[
                torch.tensor(-1 if m is None else m).expand(batch).to(self.device, dtype=torch.long) for m in modes
            ],
            scales=[c.scale for c in controls],
            repeat=net.nets[0].input_hint_block is not None,
            guidance=bool(net.nets[0].config.guidance_embeds),
        )

    def _mode(self, net, control: Control) -> int | None:
        """A union ControlNet's mode index for the control's type (None for other ControlNets)."""
        if getattr(net.config, "num_mode", None) is None:
            return None
        return self.architecture.union_modes.index(control.type)

    # -- IP-Adapter --------------------------------------------------------------------------------

    def add_reference(
        self, conditioning: Conditioning, negative: Conditioning | None, conditions: Conditions, width: int, height: int
    ) -> None:
        """`FluxPipeline`'s IP-Adapter inputs: the reference image's CLIP embeddings (its
        `prepare_ip_adapter_image_embeds`, one image per IP-Adapter) for the prompt's pass, and a
        black image's for the negative prompt's."""
        count = self.denoiser.encoder_hid_proj.num_ip_adapters
        batch = conditioning.prompt_embeds.shape[0]
        reference = conditions.ip_adapter.image.convert("RGB")
        conditioning.image_embeds = self.pipeline.prepare_ip_adapter_image_embeds(
            [reference] * count, None, self.device, batch
        )
        if negative is not None:
            black = np.zeros((width, height, 3), dtype=np.uint8)  # diffusers' shape, (width, height)
            negative.image_embeds = self.pipeline.prepare_ip_adapter_image_embeds(
                [black] * count, None, self.device, negative.prompt_embeds.shape[0]
            )

    def add_redux(self, conditioning: Conditioning, conditions: Conditions, redux) -> None:
        """What `FluxPriorReduxPipeline` hands `FluxPipeline`, for each prompt of the batch: the
        prompt's T5 tokens with the reference image's tokens (its `encode_image`, then its
        `image_embedder`) appended, both multiplied by `prompt_embeds_scale`; text position ids for
        all of them (zeros, as `FluxPipeline.encode_prompt` makes them for given embeddings). The
        subjects' words keep their positions: the image tokens come after every prompt token."""
        embeds = conditioning.prompt_embeds
        batch = embeds.shape[0]
        features = redux.encode_image(conditions.redux.image.convert("RGB"), self.device, 1)
        image_tokens = redux.image_embedder(features).image_embeds.to(device=embeds.device)
        joined = torch.cat([embeds, image_tokens.expand(batch, -1, -1).to(embeds.dtype)], dim=1)
        # In the text's dtype: a Redux model loaded in another one must not change what the transformer reads.
        scale = torch.tensor([conditions.redux_scale] * batch, device=embeds.device, dtype=embeds.dtype)
        conditioning.prompt_embeds = joined * scale[:, None, None]  # the pooled text stays (its scale: 1)
        text_ids = conditioning.text_ids
        conditioning.text_ids = torch.zeros(joined.shape[1], 3, device=text_ids.device, dtype=text_ids.dtype)

    def _ip_processors(self) -> list:
        return [p for p in self.denoiser.attn_processors.values() if hasattr(p, "to_k_ip")]

    def ip_adapter_scales(self) -> float | None:
        scales = {float(scale) for processor in self._ip_processors() for scale in processor.scale}
        return scales.pop() if len(scales) == 1 else None

    @contextlib.contextmanager
    def ip_adapter_scale(self, scale: float) -> Iterator[None]:
        """`set_ip_adapter_scale(scale)` for the run; each processor's own scales put back after."""
        processors = self._ip_processors()
        kept = [list(processor.scale) for processor in processors]
        try:
            self.pipeline.set_ip_adapter_scale(scale)
            yield
        finally:
            for processor, scales in zip(processors, kept, strict=True):
                processor.scale = scales

    @staticmethod
    def _ip_inputs(conditioning: Conditioning) -> dict:
        """The transformer's (and a ControlNet's) `joint_attention_kwargs` for this pass: a new dict
        each call, since the transformer pops the embeddings out of it."""
        if conditioning.image_embeds is None:
            return {}
        return {"joint_attention_kwargs": {"ip_adapter_image_embeds": conditioning.image_embeds}}

    def renoise(self, clean: torch.Tensor, noise: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        """`FluxInpaintPipeline`'s re-noising of the kept image: the scheduler's `scale_noise`."""
        return self.pipeline.scheduler.scale_noise(clean, timestep, noise)

    def guided_prediction(
        self,
        latents: Latents,
        timestep: torch.Tensor,
        conditioning: Conditioning,
        negative: Conditioning | None,
        settings: GenerationSettings,
        before_pass,
        tap_block=None,
    ):
        """As the base's; with ControlNets, their residuals are computed once per step with the
        prompt's pass and reused by the negative one, as `FluxControlNetPipeline` does."""
        control = latents.control
        if isinstance(control, FluxControl):
            control.residuals = self._control_residuals(control, latents, timestep, conditioning, settings)
        return super().guided_prediction(
            latents, timestep, conditioning, negative, settings, before_pass, tap_block
        )

    def _control_residuals(self, control: FluxControl, latents: Latents, timestep, conditioning, settings) -> tuple:
        hidden = latents.latents
        batch = hidden.shape[0]
        guidance = None
        if control.guidance:
            guidance = torch.tensor([self._guidance_scale(settings)], device=self.device).expand(batch)
        return control.net(
            hidden_states=hidden,
            controlnet_cond=control.images,
            controlnet_mode=control.modes,
            conditioning_scale=control.scales,
            timestep=timestep.expand(batch).to(hidden.dtype) / 1000,
            guidance=guidance,
            pooled_projections=conditioning.pooled,
            encoder_hidden_states=conditioning.prompt_embeds,
            txt_ids=conditioning.text_ids,
            img_ids=latents.positions,
            return_dict=False,
        )  # no IP-Adapter inputs: `FluxControlNetPipeline` hands them over, but a ControlNet ignores them

    def _guidance_scale(self, settings: GenerationSettings) -> float:
        return self.architecture.default_guidance if settings.guidance_scale is None else settings.guidance_scale

    def predict(
        self,
        latents: Latents,
        timestep: torch.Tensor,
        conditioning: Conditioning,
        settings: GenerationSettings,
    ) -> torch.Tensor:
        """The velocity; FLUX.1-dev's distilled guidance goes in as an embedding, a ControlNet's
        residuals (`FluxControl.residuals`) as the transformer's block samples, an IP-Adapter's
        reference embeddings (`Conditioning.image_embeds`) as its `joint_attention_kwargs`."""
        hidden = latents.latents
        batch = hidden.shape[0]
        guidance = None
        if self.denoiser.config.guidance_embeds:
            guidance = torch.full([batch], self._guidance_scale(settings), device=hidden.device, dtype=torch.float32)
        control = {}
        if isinstance(latents.control, FluxControl):
            blocks, singles = latents.control.residuals
            control = {
                "controlnet_block_samples": blocks,
                "controlnet_single_block_samples": singles,
                "controlnet_blocks_repeat": latents.control.repeat,
            }
        return self.denoiser(
            hidden_states=hidden,
            timestep=timestep.expand(batch).to(hidden.dtype) / 1000,
            guidance=guidance,
            pooled_projections=conditioning.pooled,
            encoder_hidden_states=conditioning.prompt_embeds,
            txt_ids=conditioning.text_ids,
            img_ids=latents.positions,
            return_dict=False,
            **control,
            **self._ip_inputs(conditioning),
        )[0]

    def step(self, prediction: torch.Tensor, timestep: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        return self.pipeline.scheduler.step(prediction, timestep, latents, return_dict=False)[0]

    def predict_x0(self, latents: torch.Tensor, prediction: torch.Tensor, sigma: float) -> torch.Tensor:
        """Flow matching: x_t = (1 - σ) x0 + σ ε and the velocity v = ε - x0, so x0 = x_t - σ v."""
        return latents - float(sigma) * prediction

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
        return latent_preview(self._unpack(latents, height, width))

    @contextlib.contextmanager
    def capture(self, block: int | Sequence[int]) -> Iterator[FluxAttentionTap]:
        """Hooks that record double-stream blocks' queries/keys (text and image, post-norm) and the
        image tokens' attention output (before `to_out`) during the forward passes inside. Any
        number of blocks can be tapped in one pass; each costs 4·heads·(N+T)·D stored values."""
        blocks = [block] if isinstance(block, int) else list(block)
        tap = FluxAttentionTap(blocks)
        handles = []

        def keep_rope(store: dict):
            def hook(module, args, kwargs):
                store["rope"] = kwargs.get("image_rotary_emb")

            return hook

        try:
            for index in blocks:
                attn = self.denoiser.transformer_blocks[index].attn
                store = tap.store[index]
                handles += [
                    attn.norm_q.register_forward_hook(keep_output(store, "q_img")),
                    attn.norm_k.register_forward_hook(keep_output(store, "k_img")),
                    attn.norm_added_q.register_forward_hook(keep_output(store, "q_text")),
                    attn.norm_added_k.register_forward_hook(keep_output(store, "k_text")),
                    attn.to_out[0].register_forward_pre_hook(keep_first_input(store, "o_img")),
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
        """BFL-named files (`diffusion_model.double_blocks…lora_A`) and bare PEFT files, which diffusers'
        FLUX loader does not recognise, go in renamed; every other layout by path."""
        state = lora.state_dict
        if lora.layout == "bfl" and not any(".lora_down." in key for key in state):
            # The original FLUX code base's names, which diffusers' kohya converter maps; only the
            # A/B suffixes differ from kohya's down/up.
            return {
                key.replace(".lora_A.weight", ".lora_down.weight").replace(
                    ".lora_B.weight", ".lora_up.weight"
                ): value
                for key, value in state.items()
            }
        if lora.layout == "peft" and not any(key.startswith("transformer.") for key in state):
            return {
                "transformer." + key.removeprefix("base_model.model."): value for key, value in state.items()
            }
        return state

    def lora_state_dict(self, lora: LoraFile, source: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        from diffusers import FluxPipeline

        state = dict(source)
        try:
            converted = FluxPipeline.lora_state_dict(state, return_alphas=True)
        except (ValueError, KeyError, RuntimeError, AssertionError, TypeError, IndexError) as error:
            raise converter_failure(
                lora, "FLUX.1", "FluxPipeline.lora_state_dict", error, self._narrow_model_hint(lora)
            ) from None
        return converted[0] if isinstance(converted, tuple) else converted

    def _narrow_model_hint(self, lora: LoraFile) -> str:
        """Why a kohya-layout file fails on a transformer narrower than FLUX.1's (the tiny models)."""
        config = self.denoiser.config
        width = config.num_attention_heads * config.attention_head_dim
        if lora.layout not in ("kohya", "bfl") or width == FLUX1_WIDTH:
            return ""
        return (
            f" diffusers' kohya converter assumes FLUX.1's widths ({FLUX1_WIDTH}, MLP {4 * FLUX1_WIDTH}) where it "
            f"splits fused layers (qkv, single blocks' linear1); this model's transformer is {width} wide, so a "
            "kohya-layout file cannot be converted for it. Save the LoRA in diffusers' layout "
            "(`transformer.<layer>.lora_A.weight`) instead."
        )


def _hidden_states(args: tuple, kwargs: dict) -> torch.Tensor:
    return kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]


def _image_tokens_double(args: tuple, kwargs: dict, n_text: int) -> int:
    return int(_hidden_states(args, kwargs).shape[1])


def _image_tokens_single(args: tuple, kwargs: dict, n_text: int) -> int:
    return int(_hidden_states(args, kwargs).shape[1]) - n_text


def joint_bias_sites(denoiser: torch.nn.Module, blocks: str) -> list[BiasSite]:
    """Every block's joint attention over [text ‖ image] in a FLUX-style transformer (FLUX.1's and
    FLUX.2's): the double-stream blocks (image tokens in `hidden_states`, text in
    `encoder_hidden_states`), then the single-stream ones (both in `hidden_states`); "last-half" is
    the second half of that order."""
    double = [
        BiasSite(f"transformer_blocks.{i}.attn", block.attn, JOINT, JOINT, _image_tokens_double)
        for i, block in enumerate(denoiser.transformer_blocks)
    ]
    single = [
        BiasSite(f"single_transformer_blocks.{i}.attn", block.attn, JOINT, JOINT, _image_tokens_single)
        for i, block in enumerate(denoiser.single_transformer_blocks)
    ]
    ordered = double + single
    chosen = {
        "all": ordered,
        "double-stream": double,
        "single-stream": single,
        "last-half": ordered[len(ordered) // 2 :],
        "none": [],
    }
    return chosen[blocks]
