"""Stage 2 at run time: each subject LoRA's delta scaled per token by its subject's mask.

PEFT forms `base(x) + lora_B(lora_A(x)) * scaling` for every active adapter. A forward hook on
`lora_B[adapter]` that multiplies its output by a per-token mask gives
`base(x) + scaling * mask * B(A(x))`, the masked delta of the method, with PEFT still the owner
of the weights. The backend says what each layer's token axis holds (`Backend.token_layout`);
this module only assembles the per-token mask in that order. Hooks live inside
`LoraMasker.installed()` and are removed in `finally`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence, Set
from dataclasses import dataclass

import torch

from .backends.base import TokenLayout


@dataclass
class AdapterMask:
    """Per-token mask of one adapter for one forward pass of B images.

    Attributes:
        image: `[B, N]` image-token mask in [0, 1].
        text: `[B, T]` text-token mask in [0, 1].
    """

    image: torch.Tensor
    text: torch.Tensor

    def for_layout(self, layout: TokenLayout) -> torch.Tensor:
        """`[B, S, 1]` with the segments of `layout` in order, or `[B, 1]` for a layer without a
        token axis: the share of the image the subject owns."""
        if not layout:
            return self.image.mean(dim=1, keepdim=True)
        parts = [self.text if segment == "text" else self.image for segment in layout]
        return torch.cat(parts, dim=1)[..., None]


def pass_masks(
    image_masks: dict[str, torch.Tensor],
    text_positions: Sequence[dict[str, Sequence[int]]] | None,
    n_text: int,
    text_scope: str,
    everywhere: Set[tuple[str, int]] = frozenset(),
) -> dict[str, AdapterMask]:
    """Every masked adapter's token masks for one forward pass (the prompt's, or the negative one's).

    Args:
        image_masks: adapter name → `[B, N]` image-token masks.
        text_positions: per image, {adapter name: positions of its activation words} in THIS
            pass's text (the negative prompt has its own), or None (no words known).
        n_text: T, the text tokens of this pass.
        text_scope: "exclude-others": an adapter is off on the other subjects' words and on
            elsewhere in the text; "all": on every text token.
        everywhere: (adapter, image) pairs acting on the whole text of that image, as in `merge`.

    A subject whose image mask is all zero in an image is off on that image's text too: a LoRA
    masked out of the picture must leave it exactly as it would be without that LoRA.
    """
    result = {}
    for name, image in image_masks.items():
        batch = image.shape[0]
        text = torch.ones(batch, n_text, dtype=image.dtype, device=image.device)
        for b in range(batch):
            if (name, b) in everywhere:
                continue
            if not bool(image[b].any()):
                text[b] = 0.0
            elif text_scope == "exclude-others" and text_positions is not None:
                for other, tokens in text_positions[b].items():
                    if other != name:
                        text[b, [t for t in tokens if t < n_text]] = 0.0
        result[name] = AdapterMask(image=image, text=text)
    return result


def lora_layers(denoiser: torch.nn.Module, adapter: str) -> Iterator[tuple[str, torch.nn.Module]]:
    """(name, PEFT LoRA layer) for every layer of `denoiser` that `adapter` adapts."""
    for name, module in denoiser.named_modules():
        lora_b = getattr(module, "lora_B", None)
        if isinstance(lora_b, torch.nn.ModuleDict) and adapter in lora_b:
            yield name, module


class LoraMasker:
    """Scales each masked adapter's LoRA delta per token; `set_masks` switches masks between passes.

    Args:
        denoiser: the PEFT-adapted model.
        adapters: names of the adapters to mask (global ones are left out).
        layout_of: module name → its `TokenLayout` (the backend's `token_layout`).
    """

    def __init__(
        self, denoiser: torch.nn.Module, adapters: Sequence[str], layout_of: Callable[[str], TokenLayout]
    ) -> None:
        self.denoiser = denoiser
        self.adapters = list(adapters)
        self.layout_of = layout_of
        self._masks: dict[str, AdapterMask] | None = None
        self._cache: dict[tuple[str, TokenLayout], torch.Tensor] = {}

    def set_masks(self, masks: dict[str, AdapterMask] | None) -> None:
        """Masks for the next forward passes, keyed by adapter; None lets every delta through unchanged."""
        self._masks = masks
        self._cache = {}

    def _mask(self, adapter: str, layout: TokenLayout, output: torch.Tensor) -> torch.Tensor | None:
        if self._masks is None or adapter not in self._masks:
            return None
        key = (adapter, layout)
        mask = self._cache.get(key)
        if mask is None or mask.device != output.device or mask.dtype != output.dtype:
            mask = self._masks[adapter].for_layout(layout).to(device=output.device, dtype=output.dtype)
            self._cache[key] = mask
        return mask

    def _hook(self, adapter: str, layer_name: str, layout: TokenLayout):
        def scale_delta(module, inputs, output):
            mask = self._mask(adapter, layout, output)
            if mask is None:
                return output
            if mask.shape[:-1] != output.shape[:-1]:
                raise RuntimeError(
                    f"Mask for adapter {adapter!r} has shape {tuple(mask.shape)} but layer {layer_name!r} "
                    f"({'+'.join(layout) or 'no'} tokens) gave {tuple(output.shape)}; the backend's token layout "
                    "does not match this model."
                )
            return output * mask

        return scale_delta

    @contextlib.contextmanager
    def installed(self) -> Iterator[LoraMasker]:
        """Hooks on every `lora_B[adapter]` while inside; removed on exit, even on error."""
        handles = []
        try:
            for adapter in self.adapters:
                found = False
                for name, layer in lora_layers(self.denoiser, adapter):
                    found = True
                    if getattr(layer, "merged", False):
                        raise RuntimeError(
                            f"Adapter {adapter!r} is fused into the weights of {name!r}; a fused LoRA cannot be "
                            "masked. Call `pipeline.unfuse_lora()` first."
                        )
                    if adapter in getattr(layer, "lora_variant", {}):
                        raise RuntimeError(
                            f"Adapter {adapter!r} is a DoRA/variant adapter on {name!r}; only plain LoRA can be "
                            "masked per token."
                        )
                    layout = self.layout_of(name)
                    handles.append(
                        layer.lora_B[adapter].register_forward_hook(self._hook(adapter, name, layout))
                    )
                if not found:
                    raise RuntimeError(f"Adapter {adapter!r} adapts no layer of the model.")
            yield self
        finally:
            for handle in handles:
                handle.remove()
            self.set_masks(None)
