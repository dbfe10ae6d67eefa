"""Architecture backends: which block to tap, token layout, x0 prediction, preview, denoiser calls.

A registry, not an if-chain: each backend module registers a class with `register`, and
`backend_for(pipeline)` picks the first whose `matches(pipeline)` is true.
"""

from __future__ import annotations

from .base import Backend, Conditioning

BACKENDS: dict[str, type[Backend]] = {}


def register(cls: type[Backend]) -> type[Backend]:
    BACKENDS[cls.name] = cls
    return cls


def backend_for(pipeline, name: str | None = None) -> Backend:
    """The backend for `pipeline` (or the one called `name`); a clear error when none fits."""
    if name is not None:
        if name not in BACKENDS:
            raise ValueError(f"Unknown backend {name!r}; valid backends are {sorted(BACKENDS)}.")
        return BACKENDS[name](pipeline)
    for cls in BACKENDS.values():
        if cls.matches(pipeline):
            return cls(pipeline)
    raise ValueError(
        f"FreeFuse has no backend for {type(pipeline).__name__} (transformer "
        f"{type(getattr(pipeline, 'transformer', None)).__name__}); supported: {sorted(BACKENDS)}."
    )


from . import flux  # noqa: E402,F401  (registers itself)

__all__ = ["BACKENDS", "Backend", "Conditioning", "backend_for", "register"]
