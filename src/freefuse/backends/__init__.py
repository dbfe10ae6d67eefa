"""Architecture backends: one module per architecture, each with its facts and rules
(`Architecture`: ids, defaults, token limits, LoRA key families, single-file detection) and its
runner parts over a loaded pipeline (`Backend`: encode, latents, predict, step, decode, tap).
"""

from __future__ import annotations

from . import flux, flux2, flux_fill, sdxl, zimage  # register themselves
from .base import (
    IMAGE,
    NO_TOKENS,
    SPATIAL,
    TEXT,
    Architecture,
    AttentionTap,
    Backend,
    CapturedAttention,
    Conditioning,
    Latents,
    TokenLayout,
)
from .flux import FluxArchitecture, FluxBackend
from .flux2 import Flux2Architecture, Flux2Backend
from .flux_fill import FluxFillArchitecture, FluxFillBackend
from .registry import BACKENDS, architectures, backend_for, register
from .sdxl import SdxlArchitecture, SdxlBackend
from .zimage import ZImageArchitecture, ZImageBackend

__all__ = [
    "BACKENDS",
    "IMAGE",
    "NO_TOKENS",
    "SPATIAL",
    "TEXT",
    "Architecture",
    "AttentionTap",
    "Backend",
    "CapturedAttention",
    "Conditioning",
    "Flux2Architecture",
    "Flux2Backend",
    "FluxArchitecture",
    "FluxBackend",
    "FluxFillArchitecture",
    "FluxFillBackend",
    "Latents",
    "SdxlArchitecture",
    "SdxlBackend",
    "TokenLayout",
    "ZImageArchitecture",
    "ZImageBackend",
    "architectures",
    "backend_for",
    "flux",
    "flux2",
    "flux_fill",
    "register",
    "sdxl",
    "zimage",
]
