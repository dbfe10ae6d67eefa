"""Generation methods: a registry, so that `method=` names one and an unknown name lists the valid ones.

- `merge`: plain joint LoRAs, every delta everywhere (what diffusers does with several adapters).
- `masks`: each subject LoRA inside a mask the user gives (files or tensors), from the first step.
- `freefuse`: masks read from attention at `mask_step` (stage 1), applied for the remaining steps.

A single-LoRA baseline is `merge` with one subject LoRA added (or all but one masked to zero).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Method:
    """How a run decides each subject LoRA's mask.

    Attributes:
        name: the `method=` value.
        description: one line for `--help`.
        needs_words: activation words must be found in the prompt.
        user_masks: masks come from the caller (`masks=`).
        reads_attention: masks come from attention at `mask_step`.
        masks_loras: subject LoRAs are masked at all (False: every LoRA acts everywhere).
    """

    name: str
    description: str
    needs_words: bool = False
    user_masks: bool = False
    reads_attention: bool = False
    masks_loras: bool = True


METHODS: dict[str, Method] = {}


def register_method(method: Method) -> Method:
    METHODS[method.name] = method
    return method


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise ValueError(f"Unknown method {name!r}; valid methods are {sorted(METHODS)}.")
    return METHODS[name]


MERGE = register_method(
    Method("merge", "plain joint LoRAs: every LoRA acts everywhere (the baseline)", masks_loras=False)
)
USER_MASKS = register_method(
    Method("masks", "each subject LoRA acts only inside a mask you give (--masks)", user_masks=True)
)
FREEFUSE = register_method(
    Method(
        "freefuse",
        "masks read from the model's attention at mask_step, then each LoRA only inside its mask",
        needs_words=True,
        reads_attention=True,
    )
)
