"""The model-agnostic FreeFuse core: pure torch/numpy, no diffusers import.

Stage 1 (`masks_from_attention`) turns one attention block's queries and keys into one mask per
subject; `MaskSet` holds named masks for saving, loading and drawing.
"""

from .attention import (
    border_tokens,
    cross_attention_maps,
    filter_sinks,
    head_mean_attention,
    refine_with_self_attention,
)
from .masks import MaskConfig, MaskResult, NonFiniteError, check_inputs, masks_from_attention
from .maskset import MaskSet, load_mask_image, subject_colour
from .voting import superpixels, to_token_grid, vote_superpixels, vote_tokens

__all__ = [
    "MaskConfig",
    "MaskResult",
    "MaskSet",
    "NonFiniteError",
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
