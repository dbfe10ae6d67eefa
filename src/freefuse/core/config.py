"""Stage 1's constants: one frozen dataclass, the paper's defaults, checked on construction.

No torch here: the settings model (and with it the command line's `--help`) reads these fields
without loading torch; the mask-method registry is looked up only when a config is made.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

#: Most attention logits held in memory at once (the row computations work in chunks of this).
DEFAULT_CHUNK_ELEMENTS = 1 << 24
#: The mask methods, the paper's first, each with whether it has a background channel unless told
#: otherwise: what settings, the command line and the page offer. `core.methods` registers one
#: implementation under each name (it refuses any other name).
MAP_METHOD_BACKGROUND = {"text-to-image": False, "image-to-text": False, "combined": False, "routing": True}
MAP_METHOD_NAMES = tuple(MAP_METHOD_BACKGROUND)

_BOOL_FIELDS = frozenset({"self_attention", "background"})
_INT_FIELDS = frozenset({"sink_border", "n_segments", "slic_max_side", "chunk_elements"})
_OPTIONAL_FIELDS = frozenset(
    {"n_segments", "slic_max_side", "binarize_threshold", "self_attention", "background"}
)
_CHOICES = {"method": (), "sink_rule": ("border", "shared"), "map_scale": ("density", "peak")}


@dataclass(frozen=True)
class MaskConfig:
    """Every constant of stage 1. Defaults are the paper's (FLUX.1-dev); all go into the manifest.

    Attributes:
        method: the mask method (`freefuse.core.methods.MAP_METHODS`): "text-to-image" (the
            paper), "image-to-text", "combined" or "routing".
        p_sink: top-k fraction for attention-sink handling (k = floor(N * p_sink)); 0 turns it off.
        sink_border: width, in tokens, of the grid border where sinks are looked for.
        p_top: fraction of tokens of each cross-attention map that seed the self-attention refinement.
        self_attention: use the self-attention refinement (M_l^self); False votes on the maps as
            they are. None: the method's default (on for text-to-image and combined, off for
            image-to-text, whose shares already decide per token; routing does not refine).
        n_segments: SLIC superpixel count; None means round(sqrt(H * W)) of the voting image.
        compactness: SLIC compactness.
        slic_sigma: Gaussian smoothing SLIC applies before segmenting (pixels).
        slic_max_side: SLIC runs on a copy of the image shrunk to at most this many pixels per side
            (same `n_segments`, labels scaled back up to full size): at 1024² it is 10x cheaper
            and the masks move by a few pixels, well under one 16-pixel token. None segments at
            full size, as the paper does.
        binarize_threshold: None keeps token masks as area shares (soft at superpixel edges); a
            number makes them one-hot: a token goes to its largest-share subject if that share is
            at least this much.
        background: add a background channel: regions no subject claims strongly go to no subject.
            None: the method's default (on for routing, off for the others).
        background_threshold: with `background` and no background words, a region's best subject
            needs a mean attention density of at least this many times the uniform density (1/N;
            1/T for unrefined image-to-text shares). Routing finds its background from the tokens
            every subject ranks lowest instead.
        routing_seed_fraction: share of the N image tokens that seed each subject in routing.
        chunk_elements: most attention logits held in memory at once.
    """

    method: str = "text-to-image"
    p_sink: float = 0.01
    sink_border: int = 1
    p_top: float = 0.01
    self_attention: bool | None = None
    n_segments: int | None = None
    compactness: float = 10.0
    slic_sigma: float = 0.0
    slic_max_side: int | None = 256
    binarize_threshold: float | None = None
    background: bool | None = None
    background_threshold: float = 1.0
    sink_rule: str = "border"
    map_scale: str = "density"
    peak_background: float = 0.25
    routing_seed_fraction: float = 0.01
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS

    def __post_init__(self) -> None:
        # Values from job files and manifests arrive untyped; a wrong type is a ValueError here,
        # never a TypeError from a comparison below.
        for item in fields(self):
            value = getattr(self, item.name)
            if value is None and item.name in _OPTIONAL_FIELDS:
                continue
            if item.name in _CHOICES:
                choices = list(MAP_METHOD_NAMES) if item.name == "method" else _CHOICES[item.name]
                if value not in choices:
                    raise ValueError(f"`{item.name}` must be one of {choices}, got {value!r}.")
            elif item.name in _BOOL_FIELDS:
                if not isinstance(value, bool):
                    raise ValueError(f"`{item.name}` must be true or false, got {value!r}.")
            elif isinstance(value, bool) or not isinstance(
                value, int if item.name in _INT_FIELDS else int | float
            ):
                kind = "a whole number" if item.name in _INT_FIELDS else "a number"
                raise ValueError(f"`{item.name}` must be {kind}, got {value!r}.")
        for name in ("p_sink", "p_top", "routing_seed_fraction"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"`{name}` must be a fraction in [0, 1], got {value}.")
        if self.sink_border < 0:
            raise ValueError(f"`sink_border` must be >= 0 tokens, got {self.sink_border}.")
        if self.n_segments is not None and self.n_segments < 1:
            raise ValueError(f"`n_segments` must be >= 1 or None (automatic), got {self.n_segments}.")
        if self.slic_max_side is not None and self.slic_max_side < 16:
            raise ValueError(f"`slic_max_side` must be >= 16 pixels or None, got {self.slic_max_side}.")
        if self.compactness <= 0:
            raise ValueError(f"`compactness` must be > 0, got {self.compactness}.")
        if self.binarize_threshold is not None and not 0.0 <= self.binarize_threshold <= 1.0:
            raise ValueError(
                f"`binarize_threshold` must be in [0, 1] or None, got {self.binarize_threshold}."
            )
        if self.background_threshold < 0:
            raise ValueError(f"`background_threshold` must be >= 0, got {self.background_threshold}.")
        if self.chunk_elements < 1:
            raise ValueError(f"`chunk_elements` must be >= 1, got {self.chunk_elements}.")

    @property
    def with_background(self) -> bool:
        """Whether there is a background channel (`background`, or the method's default)."""
        return MAP_METHOD_BACKGROUND[self.method] if self.background is None else self.background

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> MaskConfig:
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"Unknown mask settings {unknown}; valid ones are {sorted(known)}.")
        return cls(**values)


#: Which attention blocks stage 2's attention bias goes into: every block that mixes text and image,
#: FLUX's double-stream (separate text and image weights) or single-stream (one joint sequence)
#: blocks only, the second half of the blocks in the order they run, or none. A backend offers the
#: ones its model has (`Architecture.attention_bias_blocks`).
BIAS_BLOCKS = ("all", "double-stream", "single-stream", "last-half", "none")


@dataclass(frozen=True)
class BiasConfig:
    """Stage 2's attention bias, added to the attention logits once the masks exist.

    Attributes:
        scale: the negative bias: a subject's image tokens toward the other subjects' words (and,
            `bidirectional`, its words toward image tokens outside its region). 0: no bias at all.
        positive: the positive bias: a subject's image tokens toward its own words (and,
            `bidirectional`, its words toward its own region).
        bidirectional: also bias the text queries (joint attention only; a UNet's text never attends).
        blocks: which blocks (`BIAS_BLOCKS`).
    """

    scale: float = 0.0
    positive: float = 0.0
    bidirectional: bool = True
    blocks: str = "all"

    def __post_init__(self) -> None:
        for name in ("scale", "positive"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < float("inf"):
                raise ValueError(f"attention bias `{name}` must be a finite number >= 0, got {value!r}.")
        if not isinstance(self.bidirectional, bool):
            raise ValueError(f"attention bias `bidirectional` must be true or false, got {self.bidirectional!r}.")
        if self.blocks not in BIAS_BLOCKS:
            raise ValueError(f"attention bias `blocks` must be one of {list(BIAS_BLOCKS)}, got {self.blocks!r}.")

    @property
    def active(self) -> bool:
        """Whether any bias is added: a scale above 0 and some blocks (a scale of 0 turns it all off)."""
        return self.scale > 0 and self.blocks != "none"
