"""FreeFuse: several subject LoRAs in one image, each kept to its own subject by masks read from attention.

from freefuse import FreeFuse
ff = FreeFuse(pipeline)                        # a diffusers FluxPipeline
ff.add_lora("alice.safetensors", words=["Alice"])
ff.add_lora("bob.safetensors", words=["Bob"])
out = ff("Alice hugging Bob in the snow", seed=42)
"""

__version__ = "0.1.0"

from .core import MaskConfig, MaskSet, masks_from_attention
from .pipeline import FreeFuse, FreeFuseOutput, FreeFuseWarning, Subject
from .settings import GenerationSettings, SettingsError

__all__ = [
    "FreeFuse",
    "FreeFuseOutput",
    "FreeFuseWarning",
    "GenerationSettings",
    "SettingsError",
    "MaskConfig",
    "MaskSet",
    "Subject",
    "__version__",
    "masks_from_attention",
]
