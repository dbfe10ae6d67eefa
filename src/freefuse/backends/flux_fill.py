"""FLUX.1 Fill (`black-forest-labs/FLUX.1-Fill-dev` and its fine-tunes): a `FluxFillPipeline`.

FLUX.1's transformer with more input channels: each image token reads the noisy latents, the
latents of the picture with the repainted region blacked out, and the mask, side by side
(`FluxFillPipeline`'s `torch.cat((latents, masked_image_latents), dim=2)`). Everything else (text,
schedule, attention, LoRA layers, decode) is FLUX.1's, so the backend is FLUX.1's with its own
start (the pipeline's `prepare_latents` and `prepare_mask_latents`) and its own model input. Unlike
`FluxInpaintPipeline`, the Fill pipeline does not paste the kept picture back after each step: the
model itself keeps it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ..conditions import INPAINT
from .base import Latents
from .flux import FluxArchitecture, FluxBackend
from .registry import register

if TYPE_CHECKING:
    from ..conditions import Conditions
    from ..settings import GenerationSettings
    from .base import Conditioning


class FluxFillArchitecture(FluxArchitecture):
    """FLUX.1 Fill's facts: FLUX.1's, a picture and a mask to repaint, guidance 30."""

    name = "flux-fill"
    pipeline_classes = ("FluxFillPipeline",)
    known_model_ids = ("black-forest-labs/FLUX.1-Fill-dev",)
    default_guidance = 30.0  # FluxFillPipeline's
    conditions = (INPAINT,)
    default_strength = {INPAINT: 1.0}  # FluxFillPipeline's
    controlnet_classes = ()
    union_modes = ()

    @classmethod
    def single_file_matches(cls, keys) -> bool:
        return False  # a Fill checkpoint's keys are FLUX.1's: give its diffusers folder


@dataclass
class FillInputs:
    """What every step of a Fill run reads beside its latents: `[B, N, C_masked + C_mask]` packed
    latents of the masked picture, with the mask (`FluxFillPipeline`'s `masked_image_latents`)."""

    latents: torch.Tensor


@register
class FluxFillBackend(FluxBackend):
    """FLUX.1 Fill's runner parts over a `FluxFillPipeline`."""

    architecture = FluxFillArchitecture

    @classmethod
    def matches(cls, pipeline) -> bool:
        from diffusers import FluxFillPipeline

        return type(pipeline) is FluxFillPipeline

    @property
    def latent_channels(self) -> int:
        return self.pipeline.vae.config.latent_channels

    def prepare_latents(
        self,
        generators: list[torch.Generator] | torch.Generator,
        batch: int,
        height: int,
        width: int,
        dtype: torch.dtype,
        latents: torch.Tensor | None = None,
    ) -> Latents:
        """Without a picture, the whole of a black one is repainted: FLUX.1's noise, and the Fill
        inputs of a black picture under a white mask (the model reads them at every step)."""
        return self.prepare(generators, batch, height, width, dtype, latents, None, None)

    def prepare(
        self,
        generators: list[torch.Generator] | torch.Generator,
        batch: int,
        height: int,
        width: int,
        dtype: torch.dtype,
        latents: torch.Tensor | None,
        conditions: Conditions | None,
        first_timestep: torch.Tensor | None,
        controlnets: Sequence[torch.nn.Module] = (),
    ) -> Latents:
        """As `FluxFillPipeline` prepares: the picture VAE-encoded and noised to `first_timestep`,
        then the masked picture's latents and the mask. One generator per image: each alone."""
        per_image = isinstance(generators, list)
        parts, fills = [], []
        for index, generator in enumerate(generators if per_image else [generators]):
            count = 1 if per_image else batch
            given = None if latents is None else latents[index : index + 1] if per_image else latents
            if conditions is not None and conditions.init_image is not None:
                part, fill = self._picture_start(conditions, generator, count, height, width, dtype, given, first_timestep)
            else:
                part, fill = self._blank_start(generator, count, height, width, dtype, given)
            parts.append(part)
            fills.append(fill)
        return Latents.concat(parts, FillInputs(torch.cat(fills)))

    def _picture_start(self, conditions: Conditions, generator, count: int, height: int, width: int, dtype, given, first):
        pipeline = self.pipeline
        picture = conditions.init_image.image.convert("RGB")
        init = pipeline.image_processor.preprocess(picture, height=height, width=width).to(dtype=torch.float32)
        noised, positions = pipeline.prepare_latents(
            init, first.repeat(count), count, self.latent_channels, height, width, dtype, self.device, generator, given
        )
        region = pipeline.mask_processor.preprocess(conditions.inpaint_mask.image, height=height, width=width)
        return Latents(noised, positions), self._fill_inputs(init, region, generator, count, height, width, dtype)

    def _blank_start(self, generator, count: int, height: int, width: int, dtype, given):
        noise, positions = self._helper("FluxPipeline").prepare_latents(
            count, self.latent_channels, height, width, dtype, self.device, generator, given
        )
        black = torch.full((1, 3, height, width), -1.0)  # a black picture, as the image processor gives it
        white = torch.ones(1, 1, height, width)
        return Latents(noise, positions), self._fill_inputs(black, white, generator, count, height, width, dtype)

    def _fill_inputs(self, init: torch.Tensor, region: torch.Tensor, generator, count: int, height: int, width: int, dtype):
        """`FluxFillPipeline`'s `masked_image_latents`: the picture outside the region, VAE-encoded
        and packed, with the mask packed beside it."""
        masked = (init * (1 - region)).to(device=self.device, dtype=dtype)
        mask, masked_latents = self.pipeline.prepare_mask_latents(
            region, masked, count, self.latent_channels, 1, height, width, dtype, self.device, generator
        )
        return torch.cat((masked_latents, mask), dim=-1)

    def renoise(self, clean: torch.Tensor, noise: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError("FLUX.1 Fill keeps the picture itself: nothing is pasted back")

    def predict(
        self,
        latents: Latents,
        timestep: torch.Tensor,
        conditioning: Conditioning,
        settings: GenerationSettings,
    ) -> torch.Tensor:
        """FLUX.1's velocity, the model reading the masked picture and the mask beside the latents."""
        fill = latents.control
        if not isinstance(fill, FillInputs):
            raise RuntimeError("A FLUX.1 Fill step needs its masked-picture inputs (`prepare` makes them).")
        joined = Latents(torch.cat((latents.latents, fill.latents), dim=2), latents.positions)
        return super().predict(joined, timestep, conditioning, settings)
