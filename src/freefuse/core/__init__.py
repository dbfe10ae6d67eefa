"""The model-agnostic FreeFuse core: pure torch/numpy, no diffusers import, nothing else of FreeFuse.

Stage 1 (`masks_from_attention`) turns one attention block's queries and keys into one mask per
subject; `MaskSet` holds named masks for saving, loading and drawing. `MaskConfig` (stage 1's
constants) needs no torch; the rest is imported on first use, so that reading settings (and the
command line's `--help`) does not wait for torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from .config import BiasConfig, MaskConfig

_LAZY = {
    "attention_bias": ".bias",
    "bias_tables": ".bias",
    "border_tokens": ".attention",
    "cross_attention_maps": ".attention",
    "filter_sinks": ".attention",
    "head_mean_attention": ".attention",
    "refine_with_self_attention": ".attention",
    "MaskResult": ".masks",
    "NonFiniteError": ".masks",
    "check_inputs": ".masks",
    "masks_from_attention": ".masks",
    "MaskSet": ".maskset",
    "load_mask_image": ".maskset",
    "subject_colour": ".maskset",
    "superpixels": ".voting",
    "to_token_grid": ".voting",
    "vote_superpixels": ".voting",
    "vote_tokens": ".voting",
}

if TYPE_CHECKING:
    from .attention import (
        border_tokens,
        cross_attention_maps,
        filter_sinks,
        head_mean_attention,
        refine_with_self_attention,
    )
    from .bias import attention_bias, bias_tables
    from .masks import MaskResult, NonFiniteError, check_inputs, masks_from_attention
    from .maskset import MaskSet, load_mask_image, subject_colour
    from .voting import superpixels, to_token_grid, vote_superpixels, vote_tokens


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'freefuse.core' has no attribute {name!r}")


__all__ = [
    "BiasConfig",
    "MaskConfig",
    "MaskResult",
    "MaskSet",
    "NonFiniteError",
    "attention_bias",
    "bias_tables",
    "border_tokens",
    "check_inputs",
    "cross_attention_maps",
    "filter_sinks",
    "head_mean_attention",
    "load_mask_image",
    "masks_from_attention",
    "refine_with_self_attention",
    "subject_colour",
    "superpixels",
    "to_token_grid",
    "vote_superpixels",
    "vote_tokens",
]
