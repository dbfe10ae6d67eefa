"""The backend registry: each backend module registers its class, and a pipeline finds its backend.

A registry, not an if-chain: `register` keys a `Backend` subclass by its architecture's name, and
`backend_for(pipeline)` picks the first whose `matches(pipeline)` is true.
"""

from __future__ import annotations

from .base import Architecture, Backend

BACKENDS: dict[str, type[Backend]] = {}


def register(cls: type[Backend]) -> type[Backend]:
    BACKENDS[cls.name] = cls
    return cls


def architectures() -> dict[str, type[Architecture]]:
    """Every registered architecture's facts and rules, by name."""
    return {name: backend.architecture for name, backend in BACKENDS.items()}


def backend_for(pipeline, name: str | None = None) -> Backend:
    """The backend for `pipeline` (or the one called `name`); a clear error when none fits."""
    if name is not None:
        if name not in BACKENDS:
            raise ValueError(f"Unknown backend {name!r}; valid backends are {sorted(BACKENDS)}.")
        if not BACKENDS[name].matches(pipeline):
            raise ValueError(
                f"Backend {name!r} does not run a {type(pipeline).__name__}; it runs "
                f"{list(BACKENDS[name].architecture.pipeline_classes)}."
            )
        return BACKENDS[name](pipeline)
    for cls in BACKENDS.values():
        if cls.matches(pipeline):
            return cls(pipeline)
    supported = sorted(name for cls in BACKENDS.values() for name in cls.architecture.pipeline_classes)
    raise ValueError(f"FreeFuse has no backend for {type(pipeline).__name__}; it runs {supported}.")
