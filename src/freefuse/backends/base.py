"""What a backend provides to the two-stage run (`freefuse.pipeline`)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class Conditioning:
    """The encoded text of one forward pass for a batch of B images.

    Attributes:
        prompts: B prompt strings.
        prompt_embeds: `[B, T, C]` token embeddings the transformer attends to.
        pooled: `[B, P]` pooled embedding, or None.
        text_ids: backend-specific position ids of the text tokens.
    """

    prompts: list[str]
    prompt_embeds: torch.Tensor
    pooled: torch.Tensor | None
    text_ids: torch.Tensor | None


@dataclass
class CapturedAttention:
    """Queries and keys of the tapped block for one forward pass (B images).

    Attributes:
        q_text: `[B, heads, T, D]`.
        q_img: `[B, heads, N, D]`.
        k_img: `[B, heads, N, D]`.
    """

    q_text: torch.Tensor
    q_img: torch.Tensor
    k_img: torch.Tensor


class Backend:
    """One architecture. Subclasses fill in every method; see `backends/flux.py`."""

    name: str = "base"
    #: Height and width must be multiples of this many pixels (one image token per square).
    size_multiple: int = 16

    def __init__(self, pipeline) -> None:
        self.pipeline = pipeline

    @classmethod
    def matches(cls, pipeline) -> bool:
        raise NotImplementedError

    # -- model facts -------------------------------------------------------------------------------
    @property
    def transformer(self) -> torch.nn.Module:
        return self.pipeline.transformer

    @property
    def tokenizer(self):
        """The tokenizer whose tokens the tapped block attends to (for activation words)."""
        raise NotImplementedError

    @property
    def max_sequence_length(self) -> int:
        raise NotImplementedError

    @property
    def num_blocks(self) -> int:
        raise NotImplementedError

    def default_block(self) -> int:
        raise NotImplementedError

    def token_layout(self, module_name: str) -> str:
        raise NotImplementedError

    def grid(self, height: int, width: int) -> tuple[int, int]:
        return height // self.size_multiple, width // self.size_multiple

    @property
    def device(self) -> torch.device:
        return self.pipeline._execution_device

    # -- the denoising loop's parts ----------------------------------------------------------------
    def encode(self, prompts: list[str], max_sequence_length: int) -> Conditioning:
        raise NotImplementedError

    def prepare_latents(self, seeds: list[int], height: int, width: int, dtype: torch.dtype):
        raise NotImplementedError

    def timesteps(
        self, num_inference_steps: int, height: int, width: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def predict(
        self, latents, timestep, conditioning: Conditioning, guidance_scale: float, extra
    ) -> torch.Tensor:
        raise NotImplementedError

    def step(self, velocity: torch.Tensor, timestep, latents: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def predict_x0(self, latents: torch.Tensor, velocity: torch.Tensor, sigma: float) -> torch.Tensor:
        raise NotImplementedError

    def decode(self, latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
        raise NotImplementedError

    def preview(self, latents: torch.Tensor, height: int, width: int, mode: str) -> np.ndarray:
        raise NotImplementedError

    @contextlib.contextmanager
    def capture(self, block: int) -> Iterator[dict]:
        raise NotImplementedError
        yield {}
