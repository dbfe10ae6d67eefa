"""Stage 2's attention bias at run time: an additive mask on the attention logits, per forward pass.

Once the masks exist, each biased attention (`Backend.bias_sites`) is called with an
`attention_mask` that FreeFuse's forward pre-hook puts in its keywords; diffusers' processors hand
it to SDPA as a float `attn_mask` (`freefuse.core.bias` says what it holds). Hooks, not processor
subclasses or wrappers: the processor stays whatever the caller set (its attention backend, an
IP-Adapter processor), nothing of diffusers' is copied, and the model is restored by removing the
hook handles (in `finally`), as the attention tap and the LoRA masks are.

Per forward pass (the prompt's, the negative prompt's: each with its own word positions) the mask
is made when the first biased block asks for it, shared by every block with the same token counts,
and dropped when the next pass's bias is set: one `[B, 1, S, S]` mask at a time, nothing more.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator, Sequence, Set
from dataclasses import dataclass, field

import torch

from .backends.base import BiasSite
from .core import BiasConfig
from .core.bias import attention_bias, bias_tables, resize_tokens


@dataclass
class PassBias:
    """What one forward pass of B images is biased by: L subjects' regions and words.

    Attributes:
        regions: `[B, N, L]` each subject's image-token mask on `grid` (zero where it is left out).
        words: `[B, T, L]` 1 on each subject's words in this pass's text.
        grid: `(h, w)` of the N image tokens (attentions at another resolution get the regions resized).
        config: the run's bias.
    """

    regions: torch.Tensor
    words: torch.Tensor
    grid: tuple[int, int]
    config: BiasConfig
    _tables: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = field(default_factory=dict, init=False, repr=False)

    def tables(self, count: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`bias_tables` for an attention that sees `count` image tokens (kept: they are N × T)."""
        if count not in self._tables:
            regions = resize_tokens(self.regions, self.grid, count)
            config = self.config
            self._tables[count] = bias_tables(
                regions, self.words, config.scale, config.positive, config.bidirectional
            )
        return self._tables[count]


def _has_region(mask: torch.Tensor) -> bool:
    """Some of the image and not all of it: only then has a subject an inside and an outside."""
    return bool(mask.any()) and not bool((mask >= 1).all())


def pass_bias(
    image_masks: dict[str, torch.Tensor],
    text_positions: Sequence[dict[str, Sequence[int]]] | None,
    n_text: int,
    config: BiasConfig,
    grid: tuple[int, int],
    everywhere: Set[tuple[str, int]] = frozenset(),
) -> tuple[PassBias | None, list[int]]:
    """One forward pass's bias, and the images of the batch left without one.

    Args:
        image_masks: adapter name → `[B, N]` image-token masks of the masked subjects (global
            LoRAs are not among them, so they get no bias).
        text_positions: per image, {adapter name: positions of its words} in THIS pass's text.
        n_text: T, the text tokens of this pass.
        config: the run's bias.
        grid: `(h, w)` of the N image tokens.
        everywhere: (adapter, image) pairs acting everywhere as a stated fallback, as in `merge`.

    A subject is biased in an image when it has a region there (some of the image, not all of it)
    and does not act everywhere; an image with fewer than two such subjects gets no bias (one
    subject alone has no other subject's words to keep apart from). None when no attention would
    change (no image biased, or none of their words in this pass's text).
    """
    if not config.active or not image_masks or text_positions is None:
        return None, list(range(len(text_positions or [])))
    names = list(image_masks)
    first = image_masks[names[0]]
    batch, n_image = first.shape
    regions = first.new_zeros(batch, n_image, len(names), dtype=torch.float32)
    words = first.new_zeros(batch, n_text, len(names), dtype=torch.float32)
    unbiased = []
    for b in range(batch):
        chosen = [
            slot
            for slot, name in enumerate(names)
            if (name, b) not in everywhere and _has_region(image_masks[name][b])
        ]
        if len(chosen) < 2:
            unbiased.append(b)
            continue
        for slot in chosen:
            regions[b, :, slot] = image_masks[names[slot]][b].float()
            positions = [t for t in text_positions[b].get(names[slot], ()) if t < n_text]
            words[b, positions, slot] = 1.0
    if len(unbiased) == batch or not bool(words.any()):
        return None, unbiased
    return PassBias(regions=regions, words=words, grid=tuple(grid), config=config), unbiased


class AttentionBiaser:
    """Adds the current pass's bias to the attentions of `sites` while inside `installed()`.

    `set_pass(bias)` before each forward pass (None: no bias in that pass, attention untouched).
    """

    def __init__(self, sites: Sequence[BiasSite]) -> None:
        self.sites = list(sites)
        self._pass: PassBias | None = None
        self._masks: dict[tuple, torch.Tensor] = {}

    def set_pass(self, bias: PassBias | None) -> None:
        """The bias of the next forward passes; another pass's masks are dropped."""
        if bias is not self._pass:
            self._pass = bias
            self._masks = {}

    def _mask(self, site: BiasSite, args: tuple, kwargs: dict, like: torch.Tensor) -> torch.Tensor:
        bias = self._pass
        count = site.image_tokens(args, kwargs, bias.words.shape[1])
        key = (site.query, site.key, count, site.heads_axis, like.dtype, like.device)
        mask = self._masks.get(key)
        if mask is None:
            image_to_text, text_to_image = bias.tables(count)
            # Made in the attention's dtype: no float32 copy of the full mask on the way.
            mask = attention_bias(image_to_text, text_to_image, site.query, site.key, dtype=like.dtype)
            mask = mask.to(like.device)
            mask = mask if site.heads_axis else mask[:, 0]
            self._masks[key] = mask
        return mask

    def _hook(self, site: BiasSite):
        # Where `attention_mask` sits among the module's positional parameters (a call that passes it
        # there could not take the bias as a keyword).
        parameters = list(inspect.signature(site.module.forward).parameters)
        position = parameters.index("attention_mask") if "attention_mask" in parameters else None

        def add_bias(module, args, kwargs):
            if self._pass is None:
                return None
            if position is not None and len(args) > position:
                raise RuntimeError(
                    f"{site.name} was called with its attention mask among the positional arguments; the attention "
                    "bias cannot be added there."
                )
            hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            mask = self._mask(site, args, kwargs, hidden)
            given = kwargs.get("attention_mask")
            if given is not None:  # the caller's own mask stays: a boolean one as -inf where it is False
                given = given if given.dtype != torch.bool else mask.new_zeros(given.shape).masked_fill(~given, -torch.inf)
                mask = mask + given
            return args, {**kwargs, "attention_mask": mask}

        return add_bias

    @contextlib.contextmanager
    def installed(self) -> Iterator[AttentionBiaser]:
        """The hooks on every site while inside; removed on exit, even on error."""
        handles = []
        try:
            for site in self.sites:
                handles.append(site.module.register_forward_pre_hook(self._hook(site), with_kwargs=True))
            yield self
        finally:
            for handle in handles:
                handle.remove()
            self.set_pass(None)
