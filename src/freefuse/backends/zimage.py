"""Z-Image (Turbo and base): `ZImageTransformer2DModel` in a `ZImagePipeline`.

The transformer refines the image tokens (`noise_refiner`) and the text tokens (`context_refiner`)
apart, then runs single-stream `layers` over one sequence per image: [image ‖ text], each part
padded to a multiple of 32 tokens, and the images of a batch padded to the longest (prompts have
their own lengths: Qwen3's padding is cut off before the transformer). So in `layers` one linear
sees image and text tokens; the image part takes the subject's mask, the text part follows
`text_scope`. The embedders see the batch's tokens image after image, without a batch axis.

The tap reads post-norm queries and keys from hooks on a layer's `norm_q`/`norm_k` and applies
the rotary embedding the attention receives (`freqs_cis`), as Z-Image's processor does; the real
attention runs untouched.

The pipeline's own conventions, kept here: the transformer predicts minus the velocity at time
`(1000 - t) / 1000`, latents stay float32, and guidance is `pos + scale · (pos − neg)`, on when
`guidance_scale` > 0 (Z-Image-Turbo runs without: 0).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from ..conditions import CONTROLNET, IMG2IMG, INPAINT
from ..lora import ZIMAGE_FAMILY, check_lora_family
from ..tiny import tiny_qwen_tokenizer
from .base import (
    IMAGE,
    NO_TOKENS,
    TEXT,
    Architecture,
    Backend,
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
from .qwen import ChatPromptTokenizer, rotate
from .registry import register

if TYPE_CHECKING:
    from ..conditions import Conditions, Control
    from ..lora import LoraFile
    from ..settings import GenerationSettings

# The layers a typical Z-Image character LoRA (ai-toolkit, musubi-tuner) adapts.
ZIMAGE_LORA_TARGETS = (
    "attention.to_q",
    "attention.to_k",
    "attention.to_v",
    "attention.to_out.0",
    "feed_forward.w1",
    "feed_forward.w2",
    "feed_forward.w3",
)
JOINT: TokenLayout = ("image", "text")  # the order of `ZImageTransformer2DModel._build_unified_sequence`


def padded(length: int, multiple: int) -> int:
    """`length` rounded up to a multiple of `multiple`."""
    return length + (-length % multiple)


@dataclass
class ZImageConditioning(Conditioning):
    """`Conditioning` with each prompt's own embeddings `[T_b, C]` (Qwen3's padding cut off), as
    the transformer takes them; `prompt_embeds` holds them zero-padded to the batch's text axis."""

    embeds: list[torch.Tensor] = field(default_factory=list)


class ZImageAttentionTap:
    """Keeps the tapped layers' post-norm queries/keys, rotary embedding and attention outputs, and
    the sizes of the pass (image tokens, each prompt's text tokens)."""

    def __init__(self, blocks: list[int], multiple: int) -> None:
        self.blocks = blocks
        self.multiple = multiple
        self.store: dict[int, dict[str, torch.Tensor]] = {block: {} for block in blocks}
        self.sizes: dict[str, object] = {}

    def _one(self, block: int) -> dict[str, torch.Tensor]:
        store = self.store[block]
        missing = [key for key in ("q", "k", "freqs", "o") if key not in store] + (
            [] if self.sizes else ["sizes"]
        )
        if missing:
            raise RuntimeError(
                f"Layer {block} did not run (no {missing}); the capture step saw no forward pass."
            )
        n_image = int(self.sizes["image"])
        text_start = padded(n_image, self.multiple)
        text_end = text_start + max(padded(n, self.multiple) for n in self.sizes["text"])
        query, key = rotate(store["q"], store["freqs"]), rotate(store["k"], store["freqs"])
        parts = {
            "q_img": query[:, :n_image],
            "k_img": key[:, :n_image],
            "q_text": query[:, text_start:text_end],
            "k_text": key[:, text_start:text_end],
        }
        # [B, S, heads, D] -> [B, heads, S, D]
        result = {name: tensor.transpose(1, 2) for name, tensor in parts.items()}
        result["o_img"] = store["o"][:, :n_image]
        return result

    def result(self) -> CapturedAttention:
        """`CapturedAttention`, shapes `[B, C, heads, S, D]`; text rows cut to the longest prompt's
        padded tokens, `text_lengths` saying each image's own."""
        lengths = [padded(n, self.multiple) for n in self.sizes["text"]]
        return CapturedAttention.of_blocks([self._one(block) for block in self.blocks], text_lengths=lengths)


class ZImageArchitecture(Architecture):
    """Z-Image's facts and rules (no pipeline needed)."""

    name = "zimage"
    pipeline_classes = ("ZImagePipeline",)
    denoiser_name = "transformer"
    known_model_ids = ("Tongyi-MAI/Z-Image-Turbo", "Tongyi-MAI/Z-Image")
    block_kind = "single-stream layer"
    # The authors tap `layers.18` of Z-Image's 30 single-stream layers ...
    paper_block = (18, 30)
    # ... at step 3 of a 12-step Turbo schedule (their diffusers workflow).
    paper_mask_step = (3, 12)
    max_sequence_length = 512  # ZImagePipeline's default and Qwen3's cut
    default_steps = 8  # Z-Image-Turbo's (diffusers' example)
    default_guidance = 0.0  # Turbo is distilled: no guidance pass; Z-Image base wants ~4
    embedding_slots = {}
    typical_lora_targets = (ZIMAGE_LORA_TARGETS, "layers.")
    tokenizer_folder = "tokenizer"
    conditions = (IMG2IMG, INPAINT, CONTROLNET)
    default_strength = {IMG2IMG: 0.6, INPAINT: 1.0}  # ZImageImg2ImgPipeline's and ZImageInpaintPipeline's
    controlnet_classes = ("ZImageControlNetModel",)
    max_controls = 1  # ZImageControlNetPipeline: one ControlNet, one control image
    attention_bias_refusal = (
        "FreeFuse does not add the attention bias to Z-Image yet: its layers attend over [image ‖ text] with each "
        "part padded per image, a layout the bias's mask does not follow"
    )

    @classmethod
    def denoised_steps(cls, num_inference_steps: int, strength: float) -> int:
        """`ZImageImg2ImgPipeline.get_timesteps`: the first `int(N - min(N·strength, N))` steps are skipped."""
        skipped = int(max(num_inference_steps - min(num_inference_steps * strength, num_inference_steps), 0))
        return num_inference_steps - skipped

    @classmethod
    def pixels_per_token(cls, model_folder: Path | None) -> int:
        """The VAE's factor (8) times the transformer's patch (2)."""
        if model_folder is not None:
            try:
                vae = json.loads((Path(model_folder) / "vae" / "config.json").read_text())
                transformer = json.loads((Path(model_folder) / "transformer" / "config.json").read_text())
                patch = int(transformer.get("all_patch_size", [2])[0])
                return 2 ** (len(vae.get("block_out_channels", [0] * 4)) - 1) * patch
            except (OSError, json.JSONDecodeError, TypeError, ValueError, IndexError):
                pass
        return 16

    @classmethod
    def tiny_tokenizer(cls):
        return ChatPromptTokenizer(tiny_qwen_tokenizer(), enable_thinking=True)

    @classmethod
    def load_tokenizer(cls, model_folder: Path | None):
        if model_folder is None:
            return cls.tiny_tokenizer()
        tokenizer = super().load_tokenizer(model_folder)
        return None if tokenizer is None else ChatPromptTokenizer(tokenizer, enable_thinking=True)

    @classmethod
    def single_file_matches(cls, keys) -> bool:
        """The original layout (ComfyUI's `z_image_turbo_*.safetensors`): `layers.N.adaLN_modulation`
        beside the noise refiner, with or without a `model.diffusion_model.` prefix."""
        names = [key.removeprefix("model.diffusion_model.").removeprefix("diffusion_model.") for key in keys]
        return "layers.0.adaLN_modulation.0.weight" in names and any(
            n.startswith("noise_refiner.") for n in names
        )

    @classmethod
    def default_single_file_base(cls, keys) -> str | None:
        return cls.known_model_ids[0]

    @classmethod
    def check_lora_keys(cls, keys, source: str) -> None:
        check_lora_family(keys, source, (ZIMAGE_FAMILY,), "a Z-Image transformer")

    @classmethod
    def check_settings(cls, settings: GenerationSettings) -> list[str]:
        length = settings.max_sequence_length
        if length is not None and length > cls.max_sequence_length:
            raise ValueError(
                f"`max_sequence_length` {length} is more than Z-Image reads; use at most {cls.max_sequence_length}."
            )
        if settings.true_cfg_scale > 1:
            raise ValueError(
                "`true_cfg_scale` is FLUX.1's; Z-Image guides with `guidance_scale` > 0 (CLI: --guidance 4 on "
                "Z-Image base; Z-Image-Turbo runs with 0)."
            )
        if settings.negative_prompt is not None and cls.guidance(settings) <= 0:
            raise ValueError(
                "`negative_prompt` only acts with guidance on Z-Image: pass `guidance_scale` > 0 (CLI: --guidance 4, "
                "for Z-Image base), or leave the negative prompt out (Z-Image-Turbo runs without guidance)."
            )
        return []

    @classmethod
    def guidance(cls, settings: GenerationSettings) -> float:
        """The run's `guidance_scale`, or Z-Image-Turbo's 0."""
        return float(cls.default_guidance if settings.guidance_scale is None else settings.guidance_scale)

    @classmethod
    def negative_prompt(cls, settings: GenerationSettings) -> str | None:
        """A second pass whenever `guidance_scale` > 0 (an unset negative prompt is empty), as
        `ZImagePipeline` does."""
        return (settings.negative_prompt or "") if cls.guidance(settings) > 0 else None

    @classmethod
    def cfg_scale(cls, settings: GenerationSettings) -> float:
        """`pos + s · (pos − neg)` is `neg + (1 + s) · (pos − neg)`."""
        return 1.0 + cls.guidance(settings)


@dataclass
class ZImageControl:
    """A Z-Image ControlNet run's inputs: the ControlNet (holding the transformer's embedders), the
    encoded control picture `[B, control_in_dim, 1, h, w]`, its scale (`controlnet_conditioning_scale`)."""

    net: torch.nn.Module
    image: torch.Tensor
    scale: float


@register
class ZImageBackend(Backend):
    """Z-Image's runner parts over a `ZImagePipeline`."""

    architecture = ZImageArchitecture
    img2img_pipeline = "ZImageImg2ImgPipeline"
    sequence_multiple = 32  # `SEQ_MULTI_OF` of diffusers' Z-Image transformer (checked in the tests)

    @classmethod
    def matches(cls, pipeline) -> bool:
        """Text-to-image only: the img2img, inpainting, ControlNet and Omni pipelines feed more."""
        from diffusers import ZImagePipeline

        return type(pipeline) is ZImagePipeline

    @classmethod
    def load_single_file(cls, path: Path, keys, config: str | None, **options):
        """A transformer-only file (how Z-Image ships for ComfyUI): the transformer from the file, the
        text encoder, VAE and scheduler from `config`."""
        from diffusers import ZImagePipeline, ZImageTransformer2DModel

        config = config or cls.architecture.default_single_file_base(keys)
        transformer = ZImageTransformer2DModel.from_single_file(
            str(path), config=config, subfolder="transformer", **options
        )
        return ZImagePipeline.from_pretrained(
            config, transformer=transformer, use_safetensors=True, **options
        )

    # -- the loaded model ------------------------------------------------------------------------------
    @property
    def size_multiple(self) -> int:
        """The VAE's factor times the transformer's 2×2 patches."""
        return int(self.pipeline.vae_scale_factor) * int(self.denoiser.config.all_patch_size[0])

    @property
    def tokenizer(self):
        """Qwen3's, inside the chat template the pipeline puts a prompt in (thinking on)."""
        return ChatPromptTokenizer(self.pipeline.tokenizer, enable_thinking=True)

    @property
    def num_blocks(self) -> int:
        return len(self.denoiser.layers)

    def token_layout(self, module_name: str) -> TokenLayout:
        """`layers` and the final layer: [image ‖ text]; the noise refiner: image; the context
        refiner: text; AdaLN modulation and the timestep embedder: no tokens; the image and caption
        embedders: image and text tokens of the whole batch (2-d input)."""
        if "adaLN_modulation" in module_name or module_name.startswith("t_embedder."):
            return NO_TOKENS
        if module_name.startswith(("layers.", "all_final_layer.")):
            return JOINT
        if module_name.startswith(("noise_refiner.", "all_x_embedder.")):
            return IMAGE
        if module_name.startswith(("context_refiner.", "cap_embedder.")):
            return TEXT
        return NO_TOKENS

    # -- the denoising loop's parts ----------------------------------------------------------------
    def encode(self, prompts: list[str], max_sequence_length: int) -> ZImageConditioning:
        """Qwen3's second-to-last hidden states of each templated prompt, its padding cut off
        (`ZImagePipeline._encode_prompt`)."""
        embeds = self.pipeline._encode_prompt(
            list(prompts), device=self.device, max_sequence_length=max_sequence_length
        )
        lengths = [padded(len(one), self.sequence_multiple) for one in embeds]
        stacked = embeds[0].new_zeros(len(embeds), max(lengths), embeds[0].shape[-1])
        for b, one in enumerate(embeds):
            stacked[b, : len(one)] = one
        return ZImageConditioning(
            list(prompts), stacked, None, None, text_lengths=lengths, embeds=list(embeds)
        )

    def prepare_latents(
        self,
        generators: list[torch.Generator] | torch.Generator,
        batch: int,
        height: int,
        width: int,
        dtype: torch.dtype,
        latents: torch.Tensor | None = None,
    ) -> Latents:
        """Noise `[B, 16, H/8, W/8]` in float32, whatever the model's dtype (as `ZImagePipeline`)."""
        noise = self.pipeline.prepare_latents(
            batch, self.denoiser.in_channels, height, width, torch.float32, self.device, generators, latents
        )
        return Latents(noise)

    def timesteps(
        self, num_inference_steps: int, height: int, width: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """ZImagePipeline's schedule: linear sigmas, shifted by the scheduler (by image size when it
        shifts dynamically)."""
        from diffusers.pipelines.z_image.pipeline_z_image import (
            calculate_shift,
            get_default_z_image_sigmas,
            retrieve_timesteps,
        )

        scheduler = self.pipeline.scheduler
        config = scheduler.config
        h, w = self.grid(height, width)
        mu = calculate_shift(
            h * w,
            config.get("base_image_seq_len", 256),
            config.get("max_image_seq_len", 4096),
            config.get("base_shift", 0.5),
            config.get("max_shift", 1.15),
        )
        sigmas = get_default_z_image_sigmas(num_inference_steps)
        timesteps, _ = retrieve_timesteps(scheduler, num_inference_steps, self.device, sigmas=sigmas, mu=mu)
        scheduler.set_begin_index(0)
        return timesteps, scheduler.sigmas

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
        """As `ZImageImg2ImgPipeline` or `ZImageInpaintPipeline` prepare: the init image noised to
        `first_timestep` (and, inpainting, the noise and clean latents kept for the blend and the
        mask at latent size), by their own `prepare_latents` and `prepare_mask_latents`. With one
        generator per image, each image is prepared alone from its own."""
        if conditions is None or (conditions.init_image is None and not conditions.controls):
            return self.prepare_latents(generators, batch, height, width, dtype, latents)
        helper = None
        if conditions.controls:  # as the pipeline's __init__: the ControlNet takes the transformer's embedders
            helper = self._helper("ZImageControlNetPipeline", controlnet=flat_controlnets(controlnets)[0])
        per_image = isinstance(generators, list)
        parts, images = [], []
        for index, generator in enumerate(generators if per_image else [generators]):
            count = 1 if per_image else batch
            given = None if latents is None else latents[index : index + 1] if per_image else latents
            if helper is not None:
                images.append(self._control_image(helper, conditions.controls[0], generator, count, height, width))
                parts.append(self.prepare_latents(generator, count, height, width, dtype, given))
            else:
                parts.append(self._start(conditions, generator, count, height, width, dtype, given, first_timestep))
        control = None
        if helper is not None:
            control = ZImageControl(helper.controlnet, torch.cat(images), conditions.controls[0].scale)
        return Latents.concat(parts, control)

    def _control_image(self, helper, control: Control, generator, count: int, height: int, width: int) -> torch.Tensor:
        """`ZImageControlNetPipeline`'s control input: the picture VAE-encoded (the distribution's
        mode: no draw from the generator), scaled, and padded with zero channels to the
        ControlNet's `control_in_dim`."""
        from diffusers.pipelines.z_image.pipeline_z_image_controlnet import retrieve_latents

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
        encoded = retrieve_latents(vae.encode(image), generator=generator, sample_mode="argmax")
        encoded = ((encoded - vae.config.shift_factor) * vae.config.scaling_factor).unsqueeze(2)
        wanted = helper.controlnet.config.control_in_dim
        if encoded.shape[1] != wanted:
            padding = torch.zeros(encoded.shape[0], wanted - encoded.shape[1], *encoded.shape[2:])
            encoded = torch.cat([encoded, padding.to(device=encoded.device, dtype=encoded.dtype)], dim=1)
        return encoded

    def _start(self, conditions: Conditions, generator, count: int, height: int, width: int, dtype, given, first):
        inpaint = conditions.inpaint_mask is not None
        helper = self._helper("ZImageInpaintPipeline" if inpaint else "ZImageImg2ImgPipeline")
        picture = conditions.init_image.image.convert("RGB")
        init = helper.image_processor.preprocess(picture, height=height, width=width).to(dtype=torch.float32)
        channels = self.denoiser.in_channels
        start = first.repeat(count)
        if not inpaint:
            noised = helper.prepare_latents(init, start, count, channels, height, width, dtype, self.device, generator, given)
            return Latents(noised)
        noised, noise, image_latents = helper.prepare_latents(
            init, start, count, channels, height, width, dtype, self.device, generator, given
        )
        region = helper.mask_processor.preprocess(conditions.inpaint_mask.image, height=height, width=width)
        mask, _ = helper.prepare_mask_latents(region, init * (region < 0.5), count, height, width, dtype, self.device, generator)
        return Latents(noised, None, Inpainting(image_latents, noise, mask))

    def renoise(self, clean: torch.Tensor, noise: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        """`ZImageInpaintPipeline`'s re-noising of the kept image: the scheduler's `scale_noise`."""
        return self.pipeline.scheduler.scale_noise(clean, timestep, noise)

    def _forward(
        self, latents: torch.Tensor, timestep: torch.Tensor, embeds: list[torch.Tensor], control: ZImageControl | None = None
    ) -> list:
        """The transformer's outputs, one `[C, 1, h, w]` per image (minus the velocity); with a
        ControlNet, its block samples for this pass first (as `ZImageControlNetPipeline` calls it)."""
        batch = latents.shape[0]
        time = (1000 - timestep.expand(batch)) / 1000
        images = list(latents.to(self.denoiser.dtype).unsqueeze(2).unbind(dim=0))
        extra = {}
        if control is not None:
            extra["controlnet_block_samples"] = control.net(
                images, time, embeds, control.image, conditioning_scale=control.scale
            )
        return self.denoiser(images, time, embeds, return_dict=False, **extra)[0]

    @staticmethod
    def _embeds(conditioning: Conditioning) -> list[torch.Tensor]:
        found = getattr(conditioning, "embeds", None)
        if found:
            return list(found)
        lengths = conditioning.text_lengths or [conditioning.num_text_tokens] * len(conditioning.prompts)
        return [conditioning.prompt_embeds[b, :n] for b, n in enumerate(lengths)]

    def predict(
        self,
        latents: Latents,
        timestep: torch.Tensor,
        conditioning: Conditioning,
        settings: GenerationSettings,
    ) -> torch.Tensor:
        """The velocity in float32 (the transformer predicts its negative)."""
        control = latents.control if isinstance(latents.control, ZImageControl) else None
        outputs = self._forward(latents.latents, timestep, self._embeds(conditioning), control)
        return -torch.stack([one.float() for one in outputs], dim=0).squeeze(2)

    def combine(
        self, prediction: torch.Tensor, unconditional: torch.Tensor, settings: GenerationSettings
    ) -> torch.Tensor:
        """As ZImagePipeline writes it: `pos + s · (pos − neg)`."""
        return prediction + self.architecture.guidance(settings) * (prediction - unconditional)

    def step(self, prediction: torch.Tensor, timestep: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        return self.pipeline.scheduler.step(
            prediction.to(torch.float32), timestep, latents, return_dict=False
        )[0]

    def predict_x0(self, latents: torch.Tensor, prediction: torch.Tensor, sigma: float) -> torch.Tensor:
        """Flow matching: x0 = x_t − σ v."""
        return latents - float(sigma) * prediction

    def decode(self, latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """`[B, 16, h, w]` latents → `[B, 3, H, W]` images in [0, 1]."""
        vae = self.pipeline.vae
        latents = latents.to(vae.dtype) / vae.config.scaling_factor + vae.config.shift_factor
        image = vae.decode(latents, return_dict=False)[0]
        return (image.float() / 2 + 0.5).clamp(0, 1)

    def preview(self, latents: torch.Tensor, height: int, width: int, mode: str) -> np.ndarray:
        """ "vae": decoded at full size; "latent": the latents' 3 principal components at H/8 × W/8."""
        if mode == "vae":
            return self.decode(latents, height, width).permute(0, 2, 3, 1).cpu().numpy()
        return latent_preview(latents)

    @contextlib.contextmanager
    def capture(self, block: int | Sequence[int]) -> Iterator[ZImageAttentionTap]:
        """Hooks that record, in each tapped layer, the post-norm queries/keys (`norm_q`, `norm_k`),
        the rotary embedding the attention receives, its output before `to_out`, and the pass's
        token counts (from the transformer's inputs)."""
        blocks = [block] if isinstance(block, int) else list(block)
        tap = ZImageAttentionTap(blocks, self.sequence_multiple)
        patch = int(self.denoiser.config.all_patch_size[0])

        def keep_sizes(module, args, kwargs):
            images = args[0] if args else kwargs["x"]
            captions = args[2] if len(args) > 2 else kwargs["cap_feats"]
            frames, height, width = images[0].shape[1:]
            tap.sizes.update(
                image=frames * (height // patch) * (width // patch), text=[len(c) for c in captions]
            )

        def keep_rope(store: dict):
            def hook(module, args, kwargs):
                store["freqs"] = kwargs["freqs_cis"].detach()

            return hook

        handles = []
        try:
            handles.append(self.denoiser.register_forward_pre_hook(keep_sizes, with_kwargs=True))
            for index in blocks:
                attention = self.denoiser.layers[index].attention
                store = tap.store[index]
                handles += [
                    attention.norm_q.register_forward_hook(keep_output(store, "q")),
                    attention.norm_k.register_forward_hook(keep_output(store, "k")),
                    attention.to_out[0].register_forward_pre_hook(keep_first_input(store, "o")),
                    attention.register_forward_pre_hook(keep_rope(store), with_kwargs=True),
                ]
            yield tap
        finally:
            for handle in handles:
                handle.remove()

    # -- LoRA files --------------------------------------------------------------------------------
    def lora_source(self, lora: LoraFile) -> dict[str, torch.Tensor]:
        """Bare PEFT files go in under `transformer.`; diffusers, ai-toolkit (`diffusion_model.`),
        kohya and musubi-tuner (`lora_unet_…`) files as they are, for diffusers' converter."""
        state = lora.state_dict
        if lora.layout == "peft" and not any(key.startswith("transformer.") for key in state):
            return {
                "transformer." + key.removeprefix("base_model.model."): value for key, value in state.items()
            }
        return state

    def lora_state_dict(self, lora: LoraFile, source: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """diffusers' Z-Image converter (`ZImagePipeline.lora_state_dict`)."""
        from diffusers import ZImagePipeline

        state = dict(source)
        try:
            converted = ZImagePipeline.lora_state_dict(state)
        except (ValueError, KeyError, RuntimeError, AssertionError, TypeError, IndexError) as error:
            raise converter_failure(lora, "Z-Image", "ZImagePipeline.lora_state_dict", error) from None
        return converted[0] if isinstance(converted, tuple) else converted
