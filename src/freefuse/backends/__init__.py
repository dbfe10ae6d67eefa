"""Architecture backends: which block to tap, token layout, x0 prediction, preview, denoiser calls.

A registry, not an if-chain: each backend module registers a class with `register`, and
`backend_for(pipeline)` picks the first whose `matches(pipeline)` is true.
"""

from __future__ import annotations

from .base import (
    IMAGE,
    NO_TOKENS,
    SPATIAL,
    TEXT,
    AttentionTap,
    Backend,
    CapturedAttention,
    Conditioning,
    Latents,
    TokenLayout,
)

BACKENDS: dict[str, type[Backend]] = {}


def register(cls: type[Backend]) -> type[Backend]:
    BACKENDS[cls.name] = cls
    return cls


def backend_for(pipeline, name: str | None = None) -> Backend:
    """The backend for `pipeline` (or the one called `name`); a clear error when none fits."""
    if name is not None:
        if name not in BACKENDS:
            raise ValueError(f"Unknown backend {name!r}; valid backends are {sorted(BACKENDS)}.")
        if not BACKENDS[name].matches(pipeline):
            raise ValueError(
                f"Backend {name!r} does not run a {type(pipeline).__name__}; it runs "
                f"{list(BACKENDS[name].pipeline_classes)}."
            )
        return BACKENDS[name](pipeline)
    for cls in BACKENDS.values():
        if cls.matches(pipeline):
            return cls(pipeline)
    supported = sorted(name for cls in BACKENDS.values() for name in cls.pipeline_classes)
    raise ValueError(f"FreeFuse has no backend for {type(pipeline).__name__}; it runs {supported}.")


from . import flux, sdxl  # noqa: E402,F401  (register themselves)

__all__ = [
    "BACKENDS",
    "IMAGE",
    "NO_TOKENS",
    "SPATIAL",
    "TEXT",
    "AttentionTap",
    "Backend",
    "CapturedAttention",
    "Conditioning",
    "Latents",
    "TokenLayout",
    "backend_for",
    "register",
]
