"""FreeFuse: several subject LoRAs in one image, each kept to its own subject by masks read from attention.

from freefuse import FreeFuse
ff = FreeFuse(pipeline)                        # a diffusers FluxPipeline
ff.add_lora("alice.safetensors", words=["Alice"])
ff.add_lora("bob.safetensors", words=["Bob"])
out = ff("Alice hugging Bob in the snow", seed=42)
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# Imported on first use, so that `import freefuse` (and the command line's start, which installs
# its Ctrl-C handling first) does not wait for torch and diffusers.
_LAZY = {
    "FreeFuse": ".pipeline",
    "FreeFuseOutput": ".pipeline",
    "FreeFuseWarning": ".pipeline",
    "Subject": ".pipeline",
    "GenerationSettings": ".settings",
    "Conditions": ".conditions",
    "Control": ".conditions",
    "SettingsError": ".settings",
    "MaskConfig": ".core",
    "MaskSet": ".core",
    "masks_from_attention": ".core",
}

if TYPE_CHECKING:
    from .conditions import Conditions, Control
    from .core import MaskConfig, MaskSet, masks_from_attention
    from .pipeline import FreeFuse, FreeFuseOutput, FreeFuseWarning, Subject
    from .settings import GenerationSettings, SettingsError


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'freefuse' has no attribute {name!r}")


__all__ = [
    "Conditions",
    "Control",
    "FreeFuse",
    "FreeFuseOutput",
    "FreeFuseWarning",
    "GenerationSettings",
    "MaskConfig",
    "MaskSet",
    "SettingsError",
    "Subject",
    "__version__",
    "masks_from_attention",
]
