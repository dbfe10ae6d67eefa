"""The backend contract: everything the two-stage run needs to know about one architecture.

`freefuse.pipeline` calls only what `Backend` declares here, besides the LoRA API every diffusers
pipeline has (`set_adapters`, `delete_adapters`) and its `progress_bar`. A new architecture is one module in
`backends/` with a `Backend` subclass, registered with `backends.register`, and a tiny pipeline
builder in `freefuse.testing.TINY_PIPELINES` for the contract tests (`tests/test_backend_contract.py`),
which every registered backend must pass.

Token layouts: a LoRA-adapted layer sees a sequence of tokens, and FreeFuse scales each adapter's
delta per token. A backend says, per layer, what that sequence is made of, as a tuple of
segments in order: `("image",)`, `("text",)`, `("text", "image")` for a joint sequence, `()` for
a layer with no token axis (AdaLN modulation, timestep embedders), whose delta is scaled by the
subject's share of the image, or `("spatial",)` for a convolution, whose `[B, C, H, W]` output is
scaled by the mask resized to H×W. An "image" segment may hold the image at another resolution
than the mask grid (a UNet's levels): the mask is area-averaged down, or repeated up, to it.
"""

from __future__ import annotations

import abc
import contextlib
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar, Literal, Protocol

import numpy as np
import torch

from ..core import BiasConfig, MaskConfig
from ..core.config import BIAS_BLOCKS
from ..core.methods import MAP_METHODS, get_map_method, refines
from ..errors import LoraFileError, LoraFitError
from ..lora import LoraFile, check_lora_fits

if TYPE_CHECKING:
    from ..conditions import Conditions
    from ..settings import GenerationSettings

TokenSegment = Literal["text", "image", "spatial"]
TokenLayout = tuple[TokenSegment, ...]
IMAGE: TokenLayout = ("image",)
TEXT: TokenLayout = ("text",)
NO_TOKENS: TokenLayout = ()
SPATIAL: TokenLayout = ("spatial",)
PassName = Literal["cond", "uncond"]


@dataclass
class Conditioning:
    """The encoded text of one forward pass for a batch of B images.

    Attributes:
        prompts: B prompt strings.
        prompt_embeds: `[B, T, C]` token embeddings the denoiser attends to.
        pooled: `[B, P]` pooled embedding, or None.
        text_ids: backend-specific position ids of the text tokens, or None.
        text_lengths: per prompt, how many of the T text positions are its own as the denoiser's
            layers see them (its tokens, and the padding the denoiser adds to them); the rest is
            padding up to the longest prompt of the batch, which no token attends to. None: all T
            (every prompt padded to one length by the text encoder, as FLUX.1 and SDXL do).
        image_embeds: the IP-Adapter's reference image embeddings this pass reads (one `[B, E]`
            tensor per IP-Adapter, as `prepare_ip_adapter_image_embeds` makes them), or None.
    """

    prompts: list[str]
    prompt_embeds: torch.Tensor
    pooled: torch.Tensor | None
    text_ids: torch.Tensor | None
    text_lengths: list[int] | None = None
    image_embeds: list[torch.Tensor] | None = None

    @property
    def num_text_tokens(self) -> int:
        return int(self.prompt_embeds.shape[1])


@dataclass
class CapturedAttention:
    """What the tapped attention saw in one forward pass: B images, C tapped blocks.

    Attributes:
        q_text: `[B, C, heads, T, D]` text queries (post-norm, post-RoPE), or None where text does
            not attend (a UNet's cross-attention).
        q_img: `[B, C, heads, N, D]` image queries (of the attention that reads the text).
        k_img: `[B, C, heads, N, D]` image keys, or None where the backend has none to pair with
            `q_img` (methods refining with self-attention need them).
        k_text: `[B, C, heads, T, D]` text keys.
        o_img: `[B, C, N, heads*D]` the image tokens' attention outputs, before the output projection.
        text_lengths: per image, how many of the T text rows are its own (`Conditioning.text_lengths`);
            the rest is padding of a batch of prompts of different lengths, which its attention
            never saw. None: all T.
    """

    q_text: torch.Tensor | None
    q_img: torch.Tensor
    k_img: torch.Tensor | None
    k_text: torch.Tensor
    o_img: torch.Tensor
    text_lengths: list[int] | None = None

    @staticmethod
    def of_blocks(per_block: list[dict[str, torch.Tensor]], text_lengths: list[int] | None = None) -> CapturedAttention:
        """C tapped blocks' tensors (each `[B, heads, S, D]`, by field name) stacked on the C axis;
        the fields a backend does not tap (SDXL's text queries, image keys) are None."""
        stacked = {name: torch.stack([one[name] for one in per_block], dim=1) for name in per_block[0]}
        return CapturedAttention(**{**dict.fromkeys(_TENSOR_FIELDS), **stacked}, text_lengths=text_lengths)

    @staticmethod
    def concat(captures: list[CapturedAttention]) -> CapturedAttention:
        """Several steps' captures as one, their blocks side by side on the C axis."""
        return CapturedAttention(
            **{
                n: None
                if getattr(captures[0], n) is None
                else torch.cat([getattr(c, n) for c in captures], dim=1)
                for n in _TENSOR_FIELDS
            },
            text_lengths=captures[0].text_lengths,
        )

    def cpu(self) -> CapturedAttention:
        return CapturedAttention(
            **{n: None if getattr(self, n) is None else getattr(self, n).cpu() for n in _TENSOR_FIELDS},
            text_lengths=self.text_lengths,
        )

    def image(self, b: int) -> dict[str, torch.Tensor | None]:
        """Image `b`'s tensors (`[C, heads, S, D]`), its text rows cut to its own (`text_lengths`)."""
        length = None if self.text_lengths is None else self.text_lengths[b]
        found = {}
        for name in _TENSOR_FIELDS:
            tensor = getattr(self, name)
            if tensor is not None:
                tensor = tensor[b]
                if name.endswith("_text") and length is not None:
                    tensor = tensor[..., :length, :]
            found[name] = tensor
        return found


_TENSOR_FIELDS = ("q_text", "q_img", "k_img", "k_text", "o_img")


class AttentionTap(Protocol):
    """What `Backend.capture` yields: after the forward pass inside, `result()` gives the tensors."""

    def result(self) -> CapturedAttention: ...


@dataclass
class Inpainting:
    """What an inpainting run keeps of its init image, in the latents' own layout.

    Attributes:
        image_latents: the init image's latents.
        noise: the noise its starting latents were made with (the kept part is re-noised with it).
        mask: 1 where the image is repainted, 0 where the init image is kept.
    """

    image_latents: torch.Tensor
    noise: torch.Tensor
    mask: torch.Tensor


@dataclass
class Latents:
    """Initial latents of a batch and what the denoiser needs to place them: the run's state
    besides its prompt, for the denoising loop.

    Attributes:
        latents: the noise (or the caller's latents, or the noised init image) in the denoiser's
            own layout.
        positions: backend-specific position ids of the image tokens, or None.
        inpainting: what an inpainting run keeps of its init image, or None.
        control: the backend's prepared ControlNet inputs (and this step's residuals), or None.
    """

    latents: torch.Tensor
    positions: torch.Tensor | None = None
    inpainting: Inpainting | None = None
    control: object | None = None

    @staticmethod
    def concat(parts: list[Latents], control: object | None = None) -> Latents:
        """Images prepared one by one (each from its own generator) as one batch; `positions` are
        the first part's (the caller makes them for the batch where they have a batch axis)."""
        if len(parts) == 1:
            return replace(parts[0], control=control)
        inpainting = None
        if parts[0].inpainting is not None:
            inpainting = Inpainting(
                *(torch.cat([getattr(p.inpainting, n) for p in parts]) for n in ("image_latents", "noise", "mask"))
            )
        return Latents(torch.cat([p.latents for p in parts]), parts[0].positions, inpainting, control)


@dataclass(frozen=True)
class BiasSite:
    """One attention that takes stage 2's attention bias (`Backend.bias_sites`).

    The bias goes in as the attention module's `attention_mask` keyword (diffusers' processors hand
    it to SDPA as an additive `attn_mask`), from a forward pre-hook; the processor stays the
    caller's.

    Attributes:
        name: the module's name in the denoiser, for messages.
        module: the attention module (`FluxAttention`, `Attention`).
        query, key: what its query and key sequences hold, in order (("text", "image") for a joint
            attention; ("image",) over ("text",) for a cross-attention).
        image_tokens: `(args, kwargs, n_text) -> N`, the image tokens of this call (a UNet level's).
        heads_axis: the mask is `[B, 1, Sq, Sk]` (True) or `[B, Sq, Sk]` (processors that add the
            heads axis themselves, as diffusers' `AttnProcessor2_0`).
    """

    name: str
    module: torch.nn.Module
    query: TokenLayout
    key: TokenLayout
    image_tokens: Callable[[tuple, dict, int], int]
    heads_axis: bool = True


class Architecture:
    """What FreeFuse knows of one architecture without a pipeline: ids, defaults, token limits,
    LoRA key families, single-file detection, and the rules its settings follow.

    Class-level only (never instantiated): `freefuse.preflight` and the command line read it before
    any weights load, from a model folder's configs at most.
    """

    #: Registry key, and what the manifest records.
    name: ClassVar[str]
    #: `_class_name` values of `model_index.json` (diffusers pipeline classes) this architecture runs.
    pipeline_classes: ClassVar[tuple[str, ...]]
    #: The pipeline attribute holding the denoiser, which is also the LoRA key prefix.
    denoiser_name: ClassVar[str] = "transformer"
    #: Hub ids of models of this architecture, tried (from the local cache only) by `freefuse demo`.
    known_model_ids: ClassVar[tuple[str, ...]] = ()
    #: What a tappable block is called in messages ("double-stream block").
    block_kind: ClassVar[str] = "block"
    #: The block the paper (or the authors' code) taps, of how many: other sizes get the same depth.
    paper_block: ClassVar[tuple[int, int]] = (0, 1)
    #: The step the paper (or the authors' code for this architecture) reads masks at, of how many
    #: steps: other step counts get the same share (`default_mask_step`). The paper's 6 of 28 by default;
    #: few-step models read earlier in their short schedule.
    paper_mask_step: ClassVar[tuple[int, int]] = (6, 28)
    #: Most text tokens the text encoder takes.
    max_sequence_length: ClassVar[int]
    #: Defaults a user expects on this architecture, for settings left unset.
    default_steps: ClassVar[int] = 28
    default_size: ClassVar[int] = 1024
    default_guidance: ClassVar[float]
    #: The `CapturedAttention` fields this architecture's tap fills (the others are None).
    captured: ClassVar[tuple[str, ...]] = ("q_text", "q_img", "k_img", "k_text", "o_img")
    #: Stage 1's constants when the caller sets none (`mask_config`): the method must read only
    #: what `captured` holds.
    default_mask_config: ClassVar[MaskConfig] = MaskConfig()
    #: Bundled trigger-word embeddings (`bundle_emb.<word>.<encoder>` in LoRA files): encoder key →
    #: (tokenizer attribute, text encoder attribute) of the pipeline.
    embedding_slots: ClassVar[dict[str, tuple[str, str]]] = {}
    #: The layers a typical LoRA of this architecture adapts: PEFT module-name suffixes, inside
    #: modules whose names contain the second item (random LoRAs for the demo and the tests).
    typical_lora_targets: ClassVar[tuple[tuple[str, ...], str]] = ((), "")
    #: The model folder's subfolder with the tokenizer of the tapped attention's text tokens.
    tokenizer_folder: ClassVar[str | None] = None
    #: What a run may be conditioned on besides its prompt (`freefuse.conditions` kinds: img2img,
    #: inpaint, controlnet); the others are refused before loading.
    conditions: ClassVar[tuple[str, ...]] = ()
    #: diffusers' default `strength` of this architecture's img2img and inpainting pipelines.
    default_strength: ClassVar[dict[str, float]] = {}
    #: `_class_name`s (config.json) of the ControlNets this architecture runs.
    controlnet_classes: ClassVar[tuple[str, ...]] = ()
    #: How many control images one run may have (None: any; the pipeline's own limit otherwise).
    max_controls: ClassVar[int | None] = None
    #: A union ControlNet's modes by name, in the order of its mode embedding (`--control TYPE=…`).
    union_modes: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def denoised_steps(cls, num_inference_steps: int, strength: float) -> int:
        """How many of `num_inference_steps` a run from an init image denoises: the last `strength`
        share, rounded as this architecture's img2img pipeline rounds it (its `get_timesteps`)."""
        raise NotImplementedError

    #: Stage 2's attention bias: this architecture's defaults, the block choices its model has
    #: (`core.config.BIAS_BLOCKS`; empty: FreeFuse cannot reach its attention), and why not then.
    default_attention_bias: ClassVar[BiasConfig] = BiasConfig()
    attention_bias_blocks: ClassVar[tuple[str, ...]] = ()
    attention_bias_refusal: ClassVar[str] = "FreeFuse does not add an attention bias to this architecture's attention"
    #: Whether its text tokens attend to the image (joint attention), so that the bias's bidirectional half exists.
    attention_bias_text_queries: ClassVar[bool] = True

    @classmethod
    def default_block(cls, num_blocks: int) -> int:
        """The block the paper taps, or the same relative depth on a model with `num_blocks` blocks."""
        block, of = cls.paper_block
        return round(block / max(1, of - 1) * (num_blocks - 1))

    @classmethod
    def default_mask_step(cls, num_inference_steps: int) -> int:
        """The step whose attention gives the masks when the caller sets none: the paper's share of
        the steps (`paper_mask_step`), at least the first."""
        step, of = cls.paper_mask_step
        return min(num_inference_steps, max(1, round(step / of * num_inference_steps)))

    @classmethod
    def pixels_per_token(cls, model_folder: Path | None) -> int:
        """Image pixels per token along a side, read from a model folder's configs without weights
        (None: the architecture's usual value)."""
        raise NotImplementedError

    @classmethod
    def tiny_tokenizer(cls):
        """That tokenizer of the built-in tiny model, or None."""
        return None

    @classmethod
    def default_sequence_length(cls, tokenizer) -> int:
        """The text token limit of a run that sets none: the model's own when its tokenizer declares a
        shorter one (`model_max_length` in its config: ShapesWorld's T5 reads 24 tokens), else the
        architecture's (`tokenizer`: the tapped text's, or None before the model can be read)."""
        declared = getattr(tokenizer, "model_max_length", None)
        if isinstance(declared, int) and 0 < declared < cls.max_sequence_length:
            return declared
        return cls.max_sequence_length

    @classmethod
    def load_tokenizer(cls, model_folder: Path | None):
        """The activation-word tokenizer from a model folder alone (no weights; the tiny model's
        when None), or None when it cannot be had that way; lets word mistakes be said before a
        model loads."""
        if model_folder is None:
            return cls.tiny_tokenizer()
        folder = Path(model_folder) / cls.tokenizer_folder if cls.tokenizer_folder else None
        if folder is None or not folder.is_dir():
            return None
        try:
            from transformers import AutoTokenizer

            return AutoTokenizer.from_pretrained(str(folder), local_files_only=True, use_fast=True)
        except (OSError, ValueError, KeyError):
            return None

    @classmethod
    def single_file_matches(cls, keys: Sequence[str]) -> bool:
        """True when a single-file checkpoint's tensor names are this architecture's (original
        code base's layout, as civitai-style downloads store them)."""
        return False

    @classmethod
    def default_single_file_base(cls, keys: Sequence[str]) -> str | None:
        """Where a single file's configs come from when the caller names none (a hub id), or None to
        let diffusers tell the model type from the file."""
        return None

    @classmethod
    def check_lora_keys(cls, keys: Sequence[str] | Mapping[str, Sequence[int]], source: str) -> None:
        """Raise `LoraFileError` when a LoRA file's tensor names say it is for another architecture.

        `keys`: the tensor names, or names → shapes where the header gives them (FLUX.1 and FLUX.2
        files share their block names; their widths tell them apart)."""
        raise NotImplementedError

    @classmethod
    def check_settings(cls, settings: GenerationSettings) -> list[str]:
        """Raise ValueError for settings this architecture cannot run; return notes for odd ones."""
        raise NotImplementedError

    @classmethod
    def negative_prompt(cls, settings: GenerationSettings) -> str | None:
        """The text of the second (unconditional) pass, or None when this run has one pass."""
        raise NotImplementedError

    @classmethod
    def cfg_scale(cls, settings: GenerationSettings) -> float:
        """The scale combining the two passes, `uncond + scale * (cond - uncond)`."""
        raise NotImplementedError

    @classmethod
    def mask_config(cls, settings: GenerationSettings) -> MaskConfig:
        """The caller's `mask_config`, or this architecture's default when none was given."""
        if "mask_config" in settings.model_fields_set:
            return settings.mask_config
        return cls.default_mask_config

    @classmethod
    def attention_bias(cls, settings: GenerationSettings) -> BiasConfig:
        """The run's attention bias: the caller's values where given, this architecture's elsewhere."""
        default = cls.default_attention_bias
        given = {
            "scale": settings.attention_bias,
            "positive": settings.attention_bias_positive,
            "bidirectional": settings.attention_bias_bidirectional,
            "blocks": settings.attention_bias_blocks,
        }
        return BiasConfig(**{k: getattr(default, k) if v is None else v for k, v in given.items()})

    @classmethod
    def check_attention_bias(cls, settings: GenerationSettings) -> None:
        """Raise ValueError for an attention bias this architecture cannot add."""
        config = cls.attention_bias(settings)
        if not config.active:
            return
        if not cls.attention_bias_blocks:
            raise ValueError(
                f"`attention_bias` {config.scale:g} on {cls.name}: {cls.attention_bias_refusal}. Leave it out or set "
                "it to 0 (CLI: --attn-bias 0)."
            )
        if config.bidirectional and not cls.attention_bias_text_queries:
            raise ValueError(
                f"`attention_bias_bidirectional`: {cls.name}'s text never attends to the image (its cross-attention "
                "has image queries over text keys), so only the image-to-text half of the bias exists; turn it off "
                "(CLI: --attn-bias-one-way)."
            )
        if config.blocks not in cls.attention_bias_blocks:
            offered = [name for name in BIAS_BLOCKS if name in cls.attention_bias_blocks]
            raise ValueError(
                f"`attention_bias_blocks` {config.blocks!r}: {cls.name} models have {offered} (CLI: --attn-bias-blocks)."
            )

    @classmethod
    def check_mask_config(cls, settings: GenerationSettings) -> None:
        """Raise ValueError when the mask method reads attention this architecture's tap does not give."""
        config = cls.mask_config(settings)
        method = get_map_method(config.method)
        needs = set(method.needs) | ({"k_img"} if refines(config, default=False) else set())
        missing = sorted(needs - set(cls.captured))
        if missing:
            usable = [name for name, other in MAP_METHODS.items() if set(other.needs) <= set(cls.captured)]
            refinement = (
                " (self-attention refinement)" if "k_img" in missing and refines(config, False) else ""
            )
            raise ValueError(
                f"Mask method {config.method!r}{refinement} reads {missing}, which {cls.name}'s {cls.block_kind}s "
                f"do not give; use a method among {usable} (CLI: --mask-method), with `self_attention` off."
            )


class Backend(abc.ABC):
    """One architecture's runner parts over a loaded pipeline: the denoising loop's steps, the
    attention tap, the token layout of its layers, and loading its LoRA files. Its facts and
    rules are its `architecture`'s."""

    #: diffusers' img2img pipeline of this architecture, whose `get_timesteps` a run from an init
    #: image follows (`schedule`); None: the backend runs no img2img.
    img2img_pipeline: ClassVar[str | None] = None

    architecture: ClassVar[type[Architecture]]
    #: The architecture's name and denoiser attribute (copied from `architecture`).
    name: ClassVar[str]
    denoiser_name: ClassVar[str]
    #: The denoiser pads each image's image tokens (and text tokens) to a multiple of this many
    #: (Z-Image: 32). Padding image tokens take the subject's share of the image (as a layer without
    #: tokens does); padding text tokens follow `text_scope` like any text token that is no word.
    sequence_multiple: ClassVar[int] = 1

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if "architecture" in cls.__dict__:
            cls.name = cls.architecture.name
            cls.denoiser_name = cls.architecture.denoiser_name

    def __init__(self, pipeline) -> None:
        self.pipeline = pipeline

    # -- which pipelines ---------------------------------------------------------------------------
    @classmethod
    def matches(cls, pipeline) -> bool:
        """True when this backend runs `pipeline` exactly (subclasses feeding other inputs are refused)."""
        return type(pipeline).__name__ in cls.architecture.pipeline_classes

    @classmethod
    def pipeline_class(cls):
        """The diffusers pipeline class this backend runs (for `from_single_file`)."""
        import diffusers

        return getattr(diffusers, cls.architecture.pipeline_classes[0])

    @classmethod
    def load_single_file(cls, path: Path, keys: Sequence[str], config: str | None, **options):
        """The pipeline of a single-file checkpoint (tensor names `keys`), configs from `config` (a
        diffusers folder or hub id); `options` go to diffusers (`torch_dtype`, `local_files_only`)."""
        return cls.pipeline_class().from_single_file(str(path), config=config, **options)

    # -- the loaded model ------------------------------------------------------------------------------
    @property
    def denoiser(self) -> torch.nn.Module:
        """The LoRA-adapted network (a transformer or a UNet)."""
        return getattr(self.pipeline, self.denoiser_name)

    @property
    def device(self) -> torch.device:
        return self.pipeline._execution_device

    @property
    @abc.abstractmethod
    def size_multiple(self) -> int:
        """Height and width must be multiples of this many pixels (one image token per square)."""

    @property
    @abc.abstractmethod
    def tokenizer(self):
        """The fast tokenizer whose tokens the tapped attention's text side holds (activation words)."""

    @property
    @abc.abstractmethod
    def num_blocks(self) -> int:
        """How many blocks can be tapped (`block` is 0..num_blocks-1)."""

    def default_block(self) -> int:
        """The block the paper taps, or the same relative depth on this model."""
        return self.architecture.default_block(self.num_blocks)

    @abc.abstractmethod
    def token_layout(self, module_name: str) -> TokenLayout:
        """What the token axis of the input of denoiser layer `module_name` holds, in order."""

    def grid(self, height: int, width: int) -> tuple[int, int]:
        """`(h, w)` image tokens for an image of `height` x `width` pixels."""
        return height // self.size_multiple, width // self.size_multiple

    # -- the denoising loop's parts ----------------------------------------------------------------
    @abc.abstractmethod
    def encode(self, prompts: list[str], max_sequence_length: int) -> Conditioning:
        """Encode B prompts for one forward pass."""

    def encode_negative(self, prompts: list[str], settings: GenerationSettings) -> Conditioning:
        """Encode the negative pass's B prompts (some models use zeros for an unset negative prompt)."""
        return self.encode(prompts, settings.max_sequence_length)

    @abc.abstractmethod
    def prepare_latents(
        self,
        generators: list[torch.Generator] | torch.Generator,
        batch: int,
        height: int,
        width: int,
        dtype: torch.dtype,
        latents: torch.Tensor | None = None,
    ) -> Latents:
        """Noise for `batch` images: image b from `generators[b]` alone, or the whole batch from one
        generator as diffusers draws it, or the caller's `latents`."""

    @abc.abstractmethod
    def timesteps(
        self, num_inference_steps: int, height: int, width: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`(timesteps [S], sigmas [S + 1])`: sigmas[i] is the noise level at step i, ending at 0."""

    def schedule(
        self, num_inference_steps: int, height: int, width: int, strength: float | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`(timesteps [S], sigmas [S + 1])` of the steps this run denoises: all of them (`timesteps`),
        or from an init image the last `strength` share of them (the img2img pipeline's
        `get_timesteps`, which also sets the scheduler's first step)."""
        if strength is not None and self.img2img_pipeline is None:
            raise NotImplementedError(f"{self.name} runs no img2img (preflight refuses it before loading)")
        timesteps, sigmas = self.timesteps(num_inference_steps, height, width)
        if strength is None:
            return timesteps, sigmas
        timesteps, _ = self._helper(self.img2img_pipeline).get_timesteps(num_inference_steps, strength, self.device)
        return timesteps, sigmas[len(sigmas) - 1 - len(timesteps) :]

    def prepare(
        self,
        generators: list[torch.Generator] | torch.Generator,
        batch: int,
        height: int,
        width: int,
        dtype: torch.dtype,
        latents: torch.Tensor | None,
        conditions: Conditions | None,
        first_timestep: torch.Tensor,
        controlnets: Sequence[torch.nn.Module] = (),
    ) -> Latents:
        """The run's starting state: `prepare_latents`, or with `conditions` (an init image, an
        inpainting mask, ControlNet images read by `controlnets`) what the matching diffusers
        pipeline prepares, drawn from the generators in the order that pipeline draws them.
        `first_timestep`: the schedule's first (`schedule`), where an init image is noised to."""
        if conditions is None or conditions.empty:
            return self.prepare_latents(generators, batch, height, width, dtype, latents)
        raise NotImplementedError(f"{self.name} takes no {conditions.kinds} (preflight refuses it before loading)")

    def renoise(self, clean: torch.Tensor, noise: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        """`clean` latents noised to `timestep` with `noise` (what inpainting keeps of its init image)."""
        raise NotImplementedError(f"{self.name} runs no inpainting (preflight refuses it before loading)")

    def keep_outside_mask(self, state: Latents, next_timestep: torch.Tensor | None) -> torch.Tensor:
        """After a step of an inpainting run: outside the mask, the init image's latents noised to the
        next step's level (clean after the last step); inside, the step's latents (as the inpainting
        pipelines blend them)."""
        keep = state.inpainting
        kept = keep.image_latents
        if next_timestep is not None:
            kept = self.renoise(kept, keep.noise, torch.tensor([next_timestep]))
        return (1 - keep.mask) * kept + keep.mask * state.latents

    @property
    def has_ip_adapter(self) -> bool:
        """Whether the pipeline has an IP-Adapter loaded (`load_ip_adapter`)."""
        return ip_adapter_loaded(self.denoiser)

    def add_reference(
        self, conditioning: Conditioning, negative: Conditioning | None, conditions: Conditions, width: int, height: int
    ) -> None:
        """Put the IP-Adapter's reference image embeddings on the passes' conditionings (the
        negative pass reads a black image's, as diffusers' pipelines do). Backends without
        IP-Adapters take none (preflight refuses them first)."""
        raise NotImplementedError(f"{self.name} runs take no IP-Adapter.")

    def add_redux(self, conditioning: Conditioning, conditions: Conditions, redux) -> None:
        """Append a Redux model's reference image tokens to the prompt's pass (the negative prompt's
        pass reads none, as in diffusers). Backends without Redux take none (preflight refuses it first)."""
        raise NotImplementedError(f"{self.name} runs take no Redux image.")

    def ip_adapter_scales(self) -> float | None:
        """The IP-Adapter's scale now, when every block has the same one (None: per-block scales)."""
        return None

    def ip_adapter_scale(self, scale: float) -> contextlib.AbstractContextManager[None]:
        """The IP-Adapter's scale set for the run inside, and the caller's put back after."""
        return contextlib.nullcontext()

    def _helper(self, name: str, **extra):
        """diffusers' pipeline `name` over this pipeline's components, whose own methods a conditioned
        run calls (`get_timesteps`, `prepare_latents`, `prepare_image`, image processors): theirs,
        not copies."""
        import diffusers

        return getattr(diffusers, name)(**self.pipeline.components, **extra)

    def check_controlnets(self, controlnets: Sequence[torch.nn.Module]) -> None:
        """Raise ValueError when a loaded ControlNet is not one this backend runs."""
        allowed = self.architecture.controlnet_classes
        for index, net in enumerate(controlnets):
            if type(net).__name__ not in allowed:
                raise ValueError(
                    f"ControlNet {index + 1} is a {type(net).__name__}; {self.name} runs {list(allowed) or 'none'}."
                )

    @abc.abstractmethod
    def predict(
        self,
        latents: Latents,
        timestep: torch.Tensor,
        conditioning: Conditioning,
        settings: GenerationSettings,
    ) -> torch.Tensor:
        """One forward pass of the denoiser: the model output for `latents.latents`."""

    def guided_prediction(
        self,
        latents: Latents,
        timestep: torch.Tensor,
        conditioning: Conditioning,
        negative: Conditioning | None,
        settings: GenerationSettings,
        before_pass: Callable[[PassName], None],
        tap_block: int | Sequence[int] | None = None,
    ) -> tuple[torch.Tensor, AttentionTap | None]:
        """The model output of one step: the conditional pass, guided by the negative one if any.

        `before_pass(name)` runs before each forward pass, so that the caller can switch masks
        (the passes' texts differ, so do their activation-word positions). With `tap_block`, block
        `tap_block` of the conditional pass alone is tapped (the prompt's words are read there);
        the tap is returned with the prediction.
        """
        before_pass("cond")
        with self.capture(tap_block) if tap_block is not None else contextlib.nullcontext() as tap:
            prediction = self.predict(latents, timestep, conditioning, settings)
        if negative is not None:
            before_pass("uncond")
            unconditional = self.predict(latents, timestep, negative, settings)
            prediction = self.combine(prediction, unconditional, settings)
        return prediction, tap

    def combine(
        self, prediction: torch.Tensor, unconditional: torch.Tensor, settings: GenerationSettings
    ) -> torch.Tensor:
        """The guided output of the two passes: `uncond + scale · (cond − uncond)` (a backend whose
        pipeline writes it another way, rounding differently, says so here)."""
        return unconditional + self.architecture.cfg_scale(settings) * (prediction - unconditional)

    @abc.abstractmethod
    def step(self, prediction: torch.Tensor, timestep: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        """The scheduler's update of `latents` from this step's model output."""

    @abc.abstractmethod
    def predict_x0(self, latents: torch.Tensor, prediction: torch.Tensor, sigma: float) -> torch.Tensor:
        """The clean latents the model output implies at noise level `sigma` (stage 1's preview)."""

    @abc.abstractmethod
    def decode(self, latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """Latents → `[B, 3, H, W]` images in [0, 1]."""

    @abc.abstractmethod
    def preview(self, latents: torch.Tensor, height: int, width: int, mode: str) -> np.ndarray:
        """`[B, H', W', 3]` float pictures in [0, 1] for superpixels ("vae": decoded; "latent": cheap)."""

    @abc.abstractmethod
    def capture(self, block: int | Sequence[int]) -> contextlib.AbstractContextManager[AttentionTap]:
        """Hooks recording the tapped blocks' queries, keys and attention outputs during the forward
        passes inside (`CapturedAttention`, one entry per block on its C axis)."""

    def bias_sites(self, blocks: str) -> list[BiasSite]:
        """The attentions stage 2's attention bias goes into, for a `blocks` choice among
        `architecture.attention_bias_blocks` (`core.config.BIAS_BLOCKS`). An architecture that
        offers none keeps this default: preflight refuses a bias on it before anything loads."""
        raise NotImplementedError(f"{self.architecture.attention_bias_refusal} ({self.name}).")

    # -- LoRA files --------------------------------------------------------------------------------
    def lora_source(self, lora: LoraFile) -> dict[str, torch.Tensor]:
        """The tensors to hand to the pipeline's `load_lora_weights`, under names its converters
        understand (the file's own names, unless the backend renames a layout diffusers misses)."""
        return lora.state_dict

    @abc.abstractmethod
    def lora_state_dict(self, lora: LoraFile, source: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The LoRA in diffusers layout (`<denoiser>.<module>.lora_A.weight`), by diffusers' converter.

        `source` is what `lora_source(lora)` gave. Raises `LoraFileError` for a layout it cannot read.
        """

    def load_lora(self, lora: LoraFile, adapter_name: str) -> None:
        """Convert, check that it fits the denoiser, and load it as PEFT adapter `adapter_name`.

        diffusers is handed the tensors already read (`lora.state_dict`), except for files that
        carry diffusers' own LoRA config in their header (`lora_adapter_metadata`: alpha and rank
        patterns), which diffusers applies only when it reads that header itself. On any failure
        nothing of the adapter stays behind.
        """
        shapes = {key: tuple(tensor.shape) for key, tensor in lora.state_dict.items()}
        self.architecture.check_lora_keys(shapes, lora.path.name)
        source = self.lora_source(lora)
        converted = self.lora_state_dict(lora, source)
        check_lora_fits(converted, self.denoiser, self.denoiser_name, source=lora.path.name)
        if lora.adapter_metadata and not lora.embeddings:
            source = str(lora.path)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "no LoRA keys for the text encoder" and the like
                self.pipeline.load_lora_weights(
                    dict(source) if isinstance(source, dict) else source,
                    adapter_name=adapter_name,
                    use_safetensors=True,
                )
        except BaseException:
            if adapter_name in (getattr(self.denoiser, "peft_config", None) or {}):
                self.pipeline.delete_adapters(adapter_name)
            raise


def converter_failure(lora: LoraFile, model: str, converter: str, error: BaseException, hint: str = "") -> LoraFileError:
    """A diffusers LoRA converter's failure, said in full: its own message, or, when it has none (a
    bare `assert` in the converter), where it stopped and on which key; then `hint`."""
    text = str(error).strip().splitlines()[0][:300] if str(error).strip() else ""
    where = _stopped_at(error)
    if not text:
        text = f"{type(error).__name__} with no message{where}"
    kind = LoraFitError if hint else LoraFileError  # a hint says why it does not fit this model
    return kind(
        f"{lora.path.name} is not a LoRA layout {model} understands: diffusers' converter ({converter}) "
        f"stopped with: {text}.{hint}"
    )


def _stopped_at(error: BaseException) -> str:
    """`, at FILE:LINE in FUNCTION (`source`), on key 'KEY'` from the innermost frame of `error`."""
    import linecache

    trace = error.__traceback__
    if trace is None:
        return ""
    while trace.tb_next is not None:
        trace = trace.tb_next
    code = trace.tb_frame.f_code
    source = linecache.getline(code.co_filename, trace.tb_lineno).strip()
    text = f", at {Path(code.co_filename).name}:{trace.tb_lineno} in {code.co_name}"
    text += f" (`{source[:120]}`)" if source else ""
    keys = [
        value
        for name, value in trace.tb_frame.f_locals.items()
        if name.endswith("key") and isinstance(value, str) and value
    ]
    return text + (f", on key {keys[0]!r}" if keys else "")


def latent_preview(latents: torch.Tensor) -> np.ndarray:
    """`[B, C, h, w]` latents → `[B, h, w, 3]` float pictures in [0, 1]: each image's channels
    projected on their 3 principal components, 1-99 % percentiles stretched. No VAE: a cheap
    picture for superpixels at latent resolution."""
    previews = []
    for image in latents.float():
        channels = image.reshape(image.shape[0], -1)
        centred = channels - channels.mean(dim=1, keepdim=True)
        _, _, basis = torch.linalg.svd(centred.T, full_matrices=False)
        rgb = (basis[:3] @ centred).reshape(-1, *image.shape[1:])
        if rgb.shape[0] < 3:
            rgb = torch.cat([rgb, rgb.new_zeros(3 - rgb.shape[0], *rgb.shape[1:])])
        low = rgb.reshape(3, -1).quantile(0.01, dim=1)[:, None, None]
        high = rgb.reshape(3, -1).quantile(0.99, dim=1)[:, None, None]
        previews.append(((rgb - low) / (high - low).clamp_min(1e-6)).clamp(0, 1).permute(1, 2, 0))
    return torch.stack(previews).cpu().numpy()


def keep_output(store: dict, key: str):
    """A forward hook that keeps its module's output (detached) in `store[key]` (attention taps)."""

    def hook(module, inputs, output):
        store[key] = output.detach()

    return hook


def keep_first_input(store: dict, key: str):
    """A forward pre-hook that keeps its module's first input (detached) in `store[key]`."""

    def hook(module, args):
        store[key] = args[0].detach()

    return hook


def flat_controlnets(controlnets) -> list[torch.nn.Module]:
    """ControlNets as a list: one model, several, or a multi-ControlNet (diffusers'
    `FluxMultiControlNetModel`, `MultiControlNetModel`), whose `nets` they are."""
    if controlnets is None:
        return []
    found = []
    for net in [controlnets] if isinstance(controlnets, torch.nn.Module) else list(controlnets):
        found.extend(net.nets if hasattr(net, "nets") else [net])
    return found


def ip_adapter_loaded(denoiser: torch.nn.Module) -> bool:
    """Whether `load_ip_adapter` put an IP-Adapter into `denoiser`: its image projection
    (`encoder_hid_proj`) and attention processors with key/value projections for the image."""
    return getattr(denoiser, "encoder_hid_proj", None) is not None and any(
        hasattr(processor, "to_k_ip") for processor in getattr(denoiser, "attn_processors", {}).values()
    )
