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
import functools
import sys
from collections.abc import Callable, Iterator, Sequence, Set
from dataclasses import dataclass, field

import torch

from .backends.base import TokenLayout
from .errors import MaskingError


@dataclass
class AdapterMask:
    """Per-token mask of one adapter for one forward pass of B images.

    Attributes:
        image: `[B, N]` image-token mask in [0, 1], on the `grid`.
        text: `[B, T]` text-token mask in [0, 1].
        grid: `(h, w)` with h * w = N; layers that see the image at another resolution (a UNet's
            levels, its convolutions) get the mask resized to theirs. None: N tokens only.
        text_lengths: per image, how many of the T text positions are its own
            (`Conditioning.text_lengths`); None: all T. Layers that see the batch's text tokens
            one image after the other (no batch axis) see those of each image.
        image_multiple: the denoiser pads each image's N image tokens to a multiple of this many
            (`Backend.sequence_multiple`); a padding token takes the subject's share of the image.
    """

    image: torch.Tensor
    text: torch.Tensor
    grid: tuple[int, int] | None = None
    text_lengths: Sequence[int] | None = None
    image_multiple: int = 1

    def image_map(self, size: tuple[int, int]) -> torch.Tensor:
        """`[B, 1, H', W']`: the image mask at `size`, area-averaged down (a coarse token gets the
        share of it the subject owns) or repeated up (nearest)."""
        if self.grid is None or self.grid[0] * self.grid[1] != self.image.shape[1]:
            raise RuntimeError(
                f"An image mask of {self.image.shape[1]} tokens without its grid cannot be resized to {size}."
            )
        mask = self.image.reshape(-1, 1, *self.grid)
        if tuple(size) == tuple(self.grid):
            return mask
        if size[0] <= self.grid[0] and size[1] <= self.grid[1]:
            return torch.nn.functional.interpolate(mask.float(), size=tuple(size), mode="area").to(mask.dtype)
        return torch.nn.functional.interpolate(mask, size=tuple(size), mode="nearest")

    def image_tokens(self, count: int) -> torch.Tensor:
        """`[B, count]`: the image mask on a grid of `count` tokens of the same aspect (a UNet level),
        or the N tokens followed by the denoiser's padding tokens (`image_multiple`)."""
        n_image = self.image.shape[1]
        if count == n_image:
            return self.image
        padding = -n_image % self.image_multiple
        if padding and count == n_image + padding:
            share = self.image.mean(dim=1, keepdim=True)
            return torch.cat([self.image, share.expand(-1, padding)], dim=1)
        if self.grid is None:
            raise RuntimeError(
                f"An image mask of {self.image.shape[1]} tokens has no grid to resize to {count}."
            )
        h, w = self.grid
        scale = (count / (h * w)) ** 0.5
        size = (max(1, round(h * scale)), max(1, round(w * scale)))
        if size[0] * size[1] != count:
            raise RuntimeError(
                f"A layer sees {count} image tokens, which is no {h}:{w} grid; the backend's token layout does not "
                "match this model."
            )
        return self.image_map(size).reshape(self.image.shape[0], count)

    def for_layout(self, layout: TokenLayout, shape: Sequence[int] | None = None) -> torch.Tensor:
        """The mask shaped to multiply a layer's output of `shape` (default: the grid's own sizes).

        `[B, S, 1]` with the segments of `layout` in order; `[B, 1]` for a layer without a token
        axis (the share of the image the subject owns); `[B, 1, H, W]` for a convolution; `[ΣS, 1]`
        for a layer with tokens but no batch axis (2-d input: the images' tokens one after the
        other, as Z-Image's embedders see them).
        """
        if not layout:
            return self.image.mean(dim=1, keepdim=True)
        if layout == ("spatial",):
            return self.image_map(tuple(shape[-2:]) if shape is not None else self.grid)
        if shape is not None and len(shape) == 2:
            return self._flat(layout, int(shape[0]))
        n_text = self.text.shape[1] * layout.count("text")
        n_image = (
            self.image.shape[1]
            if shape is None
            else (int(shape[1]) - n_text) // max(1, layout.count("image"))
        )
        parts = [self.text if segment == "text" else self.image_tokens(n_image) for segment in layout]
        return torch.cat(parts, dim=1)[..., None]

    def _flat(self, layout: TokenLayout, rows: int) -> torch.Tensor:
        """`[rows, 1]`: each image's tokens of `layout`, image after image, without a batch axis."""
        batch = self.image.shape[0]
        lengths = list(self.text_lengths) if self.text_lengths is not None else [self.text.shape[1]] * batch
        n_text = [length * layout.count("text") for length in lengths]
        per_image = (rows - sum(n_text)) // batch // max(1, layout.count("image"))
        image = self.image_tokens(per_image) if "image" in layout else None
        pieces = [
            part
            for b in range(batch)
            for part in (self.text[b, : lengths[b]] if segment == "text" else image[b] for segment in layout)
        ]
        return torch.cat(pieces)[:, None]


def pass_masks(
    image_masks: dict[str, torch.Tensor],
    text_positions: Sequence[dict[str, Sequence[int]]] | None,
    n_text: int,
    text_scope: str,
    everywhere: Set[tuple[str, int]] = frozenset(),
    grid: tuple[int, int] | None = None,
    text_lengths: Sequence[int] | None = None,
    image_multiple: int = 1,
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
        grid: `(h, w)` of the N image tokens, for layers at other resolutions.
        text_lengths, image_multiple: how the denoiser pads each image's text and image tokens
            (`AdapterMask`).

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
        result[name] = AdapterMask(
            image=image, text=text, grid=grid, text_lengths=text_lengths, image_multiple=image_multiple
        )
    return result


LORA_OPS = ("fused", "peft")


@dataclass
class _FusedLayer:
    """One layer's adapters concatenated: `down` `[Σr, in]`, `up` `[out, Σr]`, per-slot scaling `[Σr]`."""

    name: str
    layout: TokenLayout
    adapters: tuple[str, ...]
    ranks: torch.Tensor
    scales: torch.Tensor
    down: torch.Tensor
    up: torch.Tensor
    #: Static masking (compiled blocks): this pass's coefficients, a buffer shared by the layers
    #: with the same `cache_key` and shape, written in place by `LoraMasker.set_masks`; and the
    #: shape of the layer's rank activations per pass signature, measured by its first forward.
    coefficients: torch.Tensor | None = None
    shapes: dict[tuple, tuple[int, ...]] = field(default_factory=dict)

    @functools.cached_property
    def cache_key(self) -> tuple:
        """Layers with the same key take the same coefficients in a pass (scales differ per layer
        when a LoRA file sets alpha per layer)."""
        return (self.layout, self.adapters, tuple(self.ranks.tolist()), tuple(self.scales.tolist()))


def _sums_like_peft(layer: torch.nn.Module) -> bool:
    """A PEFT LoRA layer whose forward is `base_layer(x) + Σ_a lora_B(lora_A(dropout(x))) · scaling_a`,
    whatever its base layer: `lora.Linear` (over `nn.Linear`, GGUF's `GGUFLinear`, an fp8-stored
    linear), its subclasses that keep that forward (torchao's `TorchaoLoraLinear`), and PEFT's
    bitsandbytes layers (`Linear4bit`, `Linear8bitLt`), whose forward is that sum written out
    again. The fused op forms the same sum (`tests/test_quantized.py` pins it per base)."""
    from peft.tuners.lora.layer import Linear as LoraLinear

    if isinstance(layer, LoraLinear):
        return type(layer).forward is LoraLinear.forward
    # A bitsandbytes layer exists only once bitsandbytes is imported; without it PEFT's module
    # does not even import (ModuleNotFoundError), so it is not asked.
    if sys.modules.get("bitsandbytes") is None:
        return False
    from peft.tuners.lora import bnb as peft_bnb

    return type(layer) in {getattr(peft_bnb, name, None) for name in ("Linear4bit", "Linear8bitLt")}


def _fusable(layer: torch.nn.Module, adapters: Sequence[str]) -> bool:
    """A PEFT LoRA linear layer (see `_sums_like_peft`) whose adapters are plain LoRA: not merged, no
    DoRA or other variant, no bias on B, no live dropout, weights in memory (not offloaded to "meta")."""
    if not _sums_like_peft(layer) or getattr(layer, "merged", False):
        return False
    for adapter in adapters:
        if layer.lora_A[adapter].weight.device.type == "meta":
            # Sequential CPU offload keeps weights on "meta" between forwards and brings each
            # module's own in its pre-forward hook: concatenated copies made now would be empty.
            return False
        if adapter in getattr(layer, "lora_variant", {}):
            return False
        dropout = layer.lora_dropout[adapter]
        if getattr(layer.lora_B[adapter], "bias", None) is not None:
            return False
        if isinstance(dropout, torch.nn.Dropout) and dropout.training and dropout.p > 0:
            return False
    return True


class LoraMasker:
    """Applies the run's adapters with per-token masks during the forward passes inside `installed()`.

    Args:
        denoiser: the PEFT-adapted model.
        masked: adapters whose deltas are masked per token (subject LoRAs).
        layout_of: module name → its `TokenLayout` (the backend's `token_layout`).
        unmasked: adapters that act everywhere (global LoRAs).
        op: "fused": one op per linear layer for all the run's adapters,
            `base(x) + B_cat((A_cat x) ⊙ c)` with `c` = scaling × mask per token and rank slot; a
            mask is per token, so `m ⊙ B(Ax) = B(m ⊙ Ax)` and masking costs Σr multiplies per token
            instead of `out`. "peft": PEFT's own per-adapter path with a hook scaling each masked
            adapter's output (the reference the fused op is tested against). Layers the fused op
            cannot take (not `lora.Linear`, bias on B, live dropout) use the "peft" path.
        static: for compiled blocks (`--compile`). Every pass comes with masks (all ones where
            every LoRA acts), and each fused layer reads its coefficients from a buffer that
            `set_masks` overwrites in place, so the compiled code sees the same tensors at every
            step, pass and stage: nothing to recompile. A layer measures its shape in its first
            forward for a pass's token counts, which must run uncompiled (the caller's first step).
            Every adapted layer must take the fused op.

    `set_masks` switches masks between forward passes (the prompt's and the negative prompt's).
    """

    def __init__(
        self,
        denoiser: torch.nn.Module,
        masked: Sequence[str],
        layout_of: Callable[[str], TokenLayout],
        unmasked: Sequence[str] = (),
        op: str = "fused",
        static: bool = False,
    ) -> None:
        if op not in LORA_OPS:
            raise ValueError(f"Unknown LoRA op {op!r}; use one of {list(LORA_OPS)}.")
        if static and op != "fused":
            raise MaskingError("Compiled blocks take the fused LoRA op only; leave lora_op at 'fused'.")
        self.denoiser = denoiser
        self.masked = list(masked)
        self.unmasked = list(unmasked)
        self.layout_of = layout_of
        self.op = op
        self.static = static
        self._forget_masks()

    def _forget_masks(self) -> None:
        self._masks: dict[str, AdapterMask] | None = None
        self._plans: list[_FusedLayer] = []
        self._buffers: dict[tuple, torch.Tensor] = {}
        self._signature: tuple = ()
        self._cache: dict[tuple, torch.Tensor] = {}
        # Each masks object with what was built from it (kept with the object, not keyed by id():
        # a freed dict's id can be reused).
        self._caches: list[tuple[dict[str, AdapterMask] | None, dict[tuple, torch.Tensor]]] = [
            (None, self._cache)
        ]

    def set_masks(self, masks: dict[str, AdapterMask] | None) -> None:
        """Masks for the next forward passes, keyed by adapter; None lets every delta through unchanged.

        Setting the same masks object again (every step of a run) keeps what was built from it, so
        the per-layer coefficients are made once per run and pass, not once per step.
        """
        if self.static:
            self._write_static(masks)
            return
        if masks is self._masks:
            return
        self._masks = masks
        for seen, cache in self._caches:
            if seen is masks:
                self._cache = cache
                return
        self._cache = {}
        self._caches.append((masks, self._cache))

    # -- the "peft" op: a hook on each masked adapter's lora_B -----------------------------------------
    def _mask(self, adapter: str, layout: TokenLayout, output: torch.Tensor) -> torch.Tensor | None:
        if self._masks is None or adapter not in self._masks:
            return None
        # What the mask's shape depends on: the token count, or a convolution's H x W.
        key = (adapter, layout, tuple(output.shape[2:] if layout == ("spatial",) else output.shape[:-1]))
        mask = self._cache.get(key)
        if mask is None or mask.device != output.device or mask.dtype != output.dtype:
            mask = (
                self._masks[adapter]
                .for_layout(layout, output.shape)
                .to(device=output.device, dtype=output.dtype)
            )
            self._cache[key] = mask
        return mask

    def _hook(self, adapter: str, layer_name: str, layout: TokenLayout):
        def scale_delta(module, inputs, output):
            mask = self._mask(adapter, layout, output)
            if mask is None:
                return output
            _check_shape(mask, output, adapter, layer_name, layout)
            return output * mask

        return scale_delta

    # -- the "fused" op -----------------------------------------------------------------------------
    def _coefficients(self, plan: _FusedLayer, low: torch.Tensor) -> torch.Tensor:
        """Per rank slot: scaling × the adapter's mask for this pass (`[B, S, Σr]`, `[B, Σr]` or `[Σr]`)."""
        key = (*plan.cache_key, tuple(low.shape[:-1]) if plan.layout else 0)
        coefficients = self._cache.get(key)
        if coefficients is not None and coefficients.device == low.device:
            return coefficients
        coefficients = _coefficient_values(plan, self._masks or {}, low.shape).to(low.device)
        self._cache[key] = coefficients
        return coefficients

    def _write_static(self, masks: dict[str, AdapterMask] | None) -> None:
        """Every fused layer's coefficients for the next passes, written into its shared buffer; a
        layer not yet measured for these masks' shapes is measured by its next forward."""
        if masks is None:
            raise MaskingError("Compiled blocks need masks for every pass (all ones where every LoRA acts); got None.")
        self._masks = masks
        if not masks and not self._plans:
            return  # nothing masked (`method="merge"`, LoRAs off): no layer reads a buffer
        self._signature = _pass_signature(masks)
        device = next(iter(masks.values())).image.device
        written: dict[tuple, torch.Tensor] = {}
        for plan in self._plans:
            if plan.down.device != device:
                plan.down, plan.up = plan.down.to(device), plan.up.to(device)
            shape = plan.shapes.get(self._signature)
            if shape is None:
                plan.coefficients = None
                continue
            key = (*plan.cache_key, shape)
            if key not in written:
                values = _coefficient_values(plan, masks, shape).to(device)
                buffer = self._buffers.get(key)
                if buffer is None or buffer.shape != values.shape or buffer.device != values.device:
                    buffer = self._buffers[key] = values
                else:
                    buffer.copy_(values)
                written[key] = buffer
            plan.coefficients = written[key]

    def _measure(self, plan: _FusedLayer, low: torch.Tensor) -> torch.Tensor:
        """A layer's first forward for a pass signature (run uncompiled): its shape, its buffer."""
        shape = tuple(low.shape)
        plan.shapes[self._signature] = shape
        key = (*plan.cache_key, shape)
        buffer = self._buffers.get(key)
        if buffer is None:
            buffer = self._buffers[key] = _coefficient_values(plan, self._masks, low.shape).to(low.device)
        plan.coefficients = buffer
        return buffer

    @property
    def measured(self) -> bool:
        """Whether every fused layer knows its shape for the current masks (static masking)."""
        return all(plan.coefficients is not None for plan in self._plans)

    def _fused_forward(self, layer: torch.nn.Module, plan: _FusedLayer):
        static = self.static

        def forward(x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
            result = layer.base_layer(x, *args, **kwargs)
            if layer.disable_adapters:
                return result
            if plan.down.device != x.device:
                # Model CPU offload moves the layer's own weights to the GPU, not these copies.
                plan.down, plan.up = plan.down.to(x.device), plan.up.to(x.device)
            low = torch.nn.functional.linear(x.to(plan.down.dtype), plan.down)
            coefficients = plan.coefficients if static else self._coefficients(plan, low)
            if coefficients is None:  # static: this layer's first forward for these shapes, uncompiled
                coefficients = self._measure(plan, low)
            if coefficients.ndim > 1:
                _check_shape(coefficients, low, "+".join(plan.adapters), plan.name, plan.layout)
            # bf16 × float32 promotes inside the one multiply kernel: no separate upcast of `low`.
            scaled = (low * coefficients).to(plan.up.dtype)
            if plan.up.dtype == result.dtype:
                # The add rides in the matmul's epilogue: one pass over the full-width output, where
                # `result + linear(...)` takes three (write the delta, read both, write the sum).
                summed = torch.addmm(
                    result.reshape(-1, result.shape[-1]), scaled.reshape(-1, scaled.shape[-1]), plan.up.t()
                )
                return summed.view(result.shape)
            return (result + torch.nn.functional.linear(scaled, plan.up)).to(result.dtype)

        return forward

    def _plan(self, name: str, layer: torch.nn.Module, adapters: list[str]) -> _FusedLayer:
        dtype = _compute_dtype(layer, adapters[0])
        return _FusedLayer(
            name=name,
            layout=self.layout_of(name),
            adapters=tuple(adapters),
            ranks=torch.tensor([layer.lora_A[a].weight.shape[0] for a in adapters]),
            scales=torch.cat(
                [torch.full((layer.lora_A[a].weight.shape[0],), float(layer.scaling[a])) for a in adapters]
            ),
            down=torch.cat([layer.lora_A[a].weight.detach().to(dtype) for a in adapters], dim=0),
            up=torch.cat([layer.lora_B[a].weight.detach().to(dtype) for a in adapters], dim=1),
        )

    @contextlib.contextmanager
    def installed(self) -> Iterator[LoraMasker]:
        """The masked op on every adapted layer while inside; the model is exactly as before on exit,
        even on error (hooks removed, layers' own forward back)."""
        handles = []
        replaced: list[tuple[torch.nn.Module, object]] = []
        everyone = self.masked + self.unmasked
        try:
            found = dict.fromkeys(self.masked, False)
            for name, layer in self.denoiser.named_modules():
                lora_a = getattr(layer, "lora_A", None)
                if not isinstance(lora_a, torch.nn.ModuleDict):
                    continue
                adapters = [a for a in everyone if a in lora_a]
                if not adapters:
                    continue
                for adapter in adapters:
                    if adapter in self.masked:
                        _check_maskable(layer, adapter, name)
                        found[adapter] = True
                if self.op == "fused" and _fusable(layer, adapters):
                    # An instance `forward` may already be there (accelerate's offload hooks): kept and put back.
                    # Planned first: a layer is put on the list only once its forward is really replaced.
                    plan = self._plan(name, layer, adapters)
                    fused = self._fused_forward(layer, plan)
                    replaced.append((layer, layer.__dict__.get("forward")))
                    layer.forward = fused
                    self._plans.append(plan)
                    continue
                if self.static:
                    raise MaskingError(
                        f"Layer {name!r} ({type(layer).__name__} over {type(layer.get_base_layer()).__name__}) cannot "
                        "take the fused LoRA op, which compiled blocks need; leave --compile out for this model."
                    )
                layout = self.layout_of(name)
                for adapter in adapters:
                    if adapter in self.masked:
                        handles.append(
                            layer.lora_B[adapter].register_forward_hook(self._hook(adapter, name, layout))
                        )
            missing = [adapter for adapter, seen in found.items() if not seen]
            if missing:
                raise MaskingError(f"Adapter {missing[0]!r} adapts no layer of the model.")
            yield self
        finally:
            for handle in handles:
                handle.remove()
            for layer, previous in replaced:
                if previous is None:
                    del layer.forward  # the instance attribute; the class's forward is back
                else:
                    layer.forward = previous
            self._forget_masks()


def is_compiled(module: torch.nn.Module) -> bool:
    """Whether `module`, or any part of it, runs compiled: `torch.compile(module)`, or
    `Module.compile()` on its blocks, as diffusers' `compile_repeated_blocks` does."""
    if isinstance(module, torch._dynamo.eval_frame.OptimizedModule):
        return True
    return any(getattr(part, "_compiled_call_impl", None) is not None for part in module.modules())


def _pass_signature(masks: dict[str, AdapterMask]) -> tuple:
    """What the shapes of a pass's layers depend on: the batch, text and image token counts."""
    mask = next(iter(masks.values()))
    lengths = None if mask.text_lengths is None else tuple(mask.text_lengths)
    return (tuple(mask.image.shape), tuple(mask.text.shape), lengths, mask.image_multiple, mask.grid)


def _coefficient_values(
    plan: _FusedLayer, masks: dict[str, AdapterMask], shape: Sequence[int] | None
) -> torch.Tensor:
    """Scaling × mask per rank slot for a layer whose rank activations have `shape` (None: the
    masks' own grid), float32 as PEFT's Python-float scaling is (a bf16 0.8 would be 0.80078)."""
    per_adapter = [masks[a].for_layout(plan.layout, shape) if a in masks else None for a in plan.adapters]
    if all(mask is None for mask in per_adapter):
        return plan.scales.to(torch.float32)
    like = next(mask for mask in per_adapter if mask is not None)
    stacked = torch.cat([like.new_ones(like.shape) if m is None else m for m in per_adapter], dim=-1)
    coefficients = stacked.repeat_interleave(plan.ranks.to(stacked.device), dim=-1) * plan.scales.to(stacked.device)
    return coefficients.to(torch.float32)


def _compute_dtype(layer: torch.nn.Module, adapter: str) -> torch.dtype:
    """The dtype of a layer's concatenated LoRA copies: the LoRA weights' own, except for weights
    stored in a one-byte float (fp8 layerwise casting applied to the LoRA layers too), which
    compute in the casting's compute dtype: the copies are never fp8."""
    weight = layer.lora_A[adapter].weight
    if weight.dtype.itemsize > 1:
        return weight.dtype
    registry = getattr(layer.lora_A[adapter], "_diffusers_hook", None)  # diffusers' hook registry
    hook = registry.get_hook("layerwise_casting") if registry is not None else None
    compute = getattr(hook, "compute_dtype", None) or getattr(layer.get_base_layer(), "compute_dtype", None)
    if compute is None:
        raise MaskingError(
            f"Adapter {adapter!r} is stored in {weight.dtype} with no compute dtype to run in; load LoRAs in "
            "bfloat16 or float32."
        )
    return compute


def _check_maskable(layer: torch.nn.Module, adapter: str, name: str) -> None:
    if getattr(layer, "merged", False):
        raise MaskingError(
            f"Adapter {adapter!r} is fused into the weights of {name!r}; a fused LoRA cannot be masked. Call "
            "`pipeline.unfuse_lora()` first."
        )
    if adapter in getattr(layer, "lora_variant", {}):
        raise MaskingError(
            f"Adapter {adapter!r} is a DoRA/variant adapter on {name!r}; only plain LoRA can be masked per token."
        )


def _check_shape(
    mask: torch.Tensor, output: torch.Tensor, adapter: str, layer_name: str, layout: TokenLayout
) -> None:
    spatial = layout == ("spatial",)
    if (
        (mask.shape[0], *mask.shape[2:]) != (output.shape[0], *output.shape[2:])
        if spatial
        else (mask.shape[:-1] != output.shape[:-1])
    ):
        raise RuntimeError(
            f"Mask for adapter {adapter!r} has shape {tuple(mask.shape)} but layer {layer_name!r} "
            f"({'+'.join(layout) or 'no'} tokens) gave {tuple(output.shape)}; the backend's token layout does not "
            "match this model."
        )


@contextlib.contextmanager
def adapters_for_run(pipeline, names: Sequence[str], weights: Sequence[float]) -> Iterator[bool]:
    """The run's adapters active with the run's weights while inside, and enabled even where the
    caller disabled the LoRA layers (`disable_lora()`: a run of FreeFuse's LoRAs that applied none
    would be a silent wrong result); yields whether it had to enable them. Afterwards every adapted
    layer of every component has the caller's state back (active adapters, scalings, enabled or
    not, `requires_grad`), even after an error."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    saved = []
    for component in pipeline.components.values():
        if isinstance(component, torch.nn.Module):
            for module in component.modules():
                if isinstance(module, BaseTunerLayer):
                    grads = {name: p.requires_grad for name, p in module.named_parameters()}
                    state = (list(module.active_adapters), dict(getattr(module, "scaling", {})), grads)
                    saved.append((module, *state, bool(module.disable_adapters)))
    try:
        pipeline.set_adapters(list(names), adapter_weights=list(weights))
        disabled = [module for module, *_, off in saved if off]
        for module in disabled:
            module.enable_adapters(True)
        yield bool(disabled)
    finally:
        for module, active, scaling, grads, off in saved:
            module.set_adapter(active)  # PEFT also switches requires_grad here: put it back below
            if scaling:
                module.scaling.update(scaling)
            module.enable_adapters(not off)
            for name, parameter in module.named_parameters():
                if name in grads:
                    parameter.requires_grad_(grads[name])
