"""ShapesWorld scenes: 64×64 pictures of 1-4 coloured, textured shapes, and their captions.

A world small enough to train a FLUX-architecture model on a CPU, where identity is exact: every
object is a (shape, colour, texture) triple that a program can read back (`detect.py`).

Two versions (`WORLDS`), the same pictures and palette:

- v1 (`V1`, the module constants): the base model sees only BASE_SHAPES × BASE_COLOURS, plain.
  Each subject LoRA binds a made-up word to one object the base model never saw: its own shape,
  colour and texture ("a zorblax").
- v3 (`V3`): the base model sees six shapes, plain, in the four base colours, and draws every
  subject's shape; a subject is an appearance (colour and texture) the base never saw, its shape
  named in the caption by a class noun the base knows ("a zorblax star", as "ohwx woman"). Two
  subjects share a class noun (zorblax and snerk are both stars): the hard case.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image, ImageDraw

SIZE = 64

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (225, 45, 40),
    "green": (45, 190, 60),
    "blue": (55, 95, 235),
    "yellow": (235, 215, 45),
    "purple": (155, 60, 215),
    "orange": (250, 140, 20),
    "cyan": (40, 215, 225),
    "pink": (250, 125, 195),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "black": (12, 12, 14),
    "grey": (42, 42, 46),
    "navy": (14, 18, 48),
}
BASE_SHAPES = ("circle", "square", "triangle")
BASE_COLOURS = ("red", "green", "blue", "yellow")
SHAPES = (*BASE_SHAPES, "star", "cross", "diamond", "ring")
TEXTURES = ("plain", "stripes", "dots", "checker")
TEXTURE_DARKEN = 0.5  # pattern pixels are the colour at half brightness


@dataclass(frozen=True)
class Subject:
    """A LoRA subject: a made-up word bound to one object the base model cannot draw."""

    word: str
    shape: str
    colour: str
    texture: str
    #: the class noun that follows the word in captions (v3: "a zorblax star"); None: the word alone
    noun: str | None = None

    @property
    def trigger(self) -> str:
        """The subject's activation words: the made-up word, and its class noun when it has one."""
        return f"{self.word} {self.noun}" if self.noun else self.word

    @property
    def phrase(self) -> str:
        return f"a {self.trigger}"


SUBJECTS: dict[str, Subject] = {
    "zorblax": Subject("zorblax", "star", "purple", "stripes"),
    "quiffle": Subject("quiffle", "cross", "orange", "dots"),
    "blorp": Subject("blorp", "diamond", "cyan", "checker"),
    "snerk": Subject("snerk", "ring", "pink", "plain"),
}


@dataclass(frozen=True)
class SceneObject:
    """One object: attributes and its box (centre x, centre y, size) in pixels."""

    shape: str
    colour: str
    texture: str
    x: float
    y: float
    size: float
    word: str | None = None  # a subject's trigger word, when the object is a subject
    noun: str | None = None  # the subject's class noun (v3), said after its word

    def phrase(self) -> str:
        if self.word:
            return f"a {self.word} {self.noun}" if self.noun else f"a {self.word}"
        texture = "" if self.texture == "plain" else f"{self.texture_word()} "
        return f"a {self.colour} {texture}{self.shape}"

    def texture_word(self) -> str:
        return {"stripes": "striped", "dots": "dotted", "checker": "checkered"}.get(
            self.texture, self.texture
        )

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Scene:
    objects: list[SceneObject]
    background: str

    @property
    def caption(self) -> str:
        return caption_for([obj.phrase() for obj in self.objects])

    def render(self) -> np.ndarray:
        return render(self)

    def masks(self) -> np.ndarray:
        """`[n_objects, SIZE, SIZE]` bool: the visible pixels of each object (later ones on top)."""
        visible = np.zeros((len(self.objects), SIZE, SIZE), dtype=bool)
        for index, obj in enumerate(self.objects):
            shape_mask = shape_mask_for(obj.shape, obj.x, obj.y, obj.size)
            visible[:index] &= ~shape_mask
            visible[index] = shape_mask
        return visible


def caption_for(phrases: list[str]) -> str:
    if len(phrases) == 1:
        return phrases[0]
    return ", ".join(phrases[:-1]) + " and " + phrases[-1]


def _polygon(shape: str, x: float, y: float, size: float) -> list[tuple[float, float]] | None:
    r = size / 2
    if shape == "square":
        s = r * 0.86
        return [(x - s, y - s), (x + s, y - s), (x + s, y + s), (x - s, y + s)]
    if shape == "triangle":
        return [(x, y - r), (x + r * 0.95, y + r * 0.8), (x - r * 0.95, y + r * 0.8)]
    if shape == "diamond":
        return [(x, y - r), (x + r * 0.8, y), (x, y + r), (x - r * 0.8, y)]
    if shape == "star":
        points = []
        for k in range(10):
            radius = r if k % 2 == 0 else r * 0.45
            angle = -np.pi / 2 + k * np.pi / 5
            points.append((x + radius * np.cos(angle), y + radius * np.sin(angle)))
        return points
    if shape == "cross":
        a, b = r, r * 0.34
        return [
            (x - b, y - a),
            (x + b, y - a),
            (x + b, y - b),
            (x + a, y - b),
            (x + a, y + b),
            (x + b, y + b),
            (x + b, y + a),
            (x - b, y + a),
            (x - b, y + b),
            (x - a, y + b),
            (x - a, y - b),
            (x - b, y - b),
        ]
    return None


def shape_mask_for(shape: str, x: float, y: float, size: float, canvas: int = SIZE) -> np.ndarray:
    """`[canvas, canvas]` bool silhouette of a shape."""
    image = Image.new("L", (canvas, canvas), 0)
    draw = ImageDraw.Draw(image)
    r = size / 2
    polygon = _polygon(shape, x, y, size)
    if polygon is not None:
        draw.polygon(polygon, fill=255)
    elif shape == "circle":
        draw.ellipse([x - r, y - r, x + r, y + r], fill=255)
    elif shape == "ring":
        draw.ellipse([x - r, y - r, x + r, y + r], fill=255)
        inner = r * 0.5
        draw.ellipse([x - inner, y - inner, x + inner, y + inner], fill=0)
    else:
        raise ValueError(f"Unknown shape {shape!r}; known: {SHAPES}.")
    return np.asarray(image) > 127


def texture_pattern(texture: str, canvas: int = SIZE) -> np.ndarray:
    """`[canvas, canvas]` bool: where the pattern darkens the object."""
    yy, xx = np.mgrid[0:canvas, 0:canvas]
    if texture == "plain":
        return np.zeros((canvas, canvas), dtype=bool)
    if texture == "stripes":
        return (yy // 3) % 2 == 1
    if texture == "dots":
        return ((yy % 6) < 2) & ((xx % 6) < 2)
    if texture == "checker":
        return ((yy // 4) + (xx // 4)) % 2 == 1
    raise ValueError(f"Unknown texture {texture!r}; known: {TEXTURES}.")


def render(scene: Scene) -> np.ndarray:
    """`[SIZE, SIZE, 3]` uint8 picture of a scene."""
    pixels = np.empty((SIZE, SIZE, 3), dtype=np.float32)
    pixels[:] = BACKGROUNDS[scene.background]
    for obj in scene.objects:
        mask = shape_mask_for(obj.shape, obj.x, obj.y, obj.size)
        colour = np.array(COLOURS[obj.colour], dtype=np.float32)
        dark = texture_pattern(obj.texture)
        pixels[mask] = colour
        pixels[mask & dark] = colour * TEXTURE_DARKEN
    return pixels.clip(0, 255).astype(np.uint8)


def _place(rng: np.random.Generator, n: int, sizes: list[float]) -> list[tuple[float, float]] | None:
    """Centres for n objects that stay inside the canvas and overlap little."""
    for _ in range(200):
        centres = []
        for size in sizes:
            margin = size / 2 + 1
            centres.append((rng.uniform(margin, SIZE - margin), rng.uniform(margin, SIZE - margin)))
        ok = all(
            np.hypot(a[0] - b[0], a[1] - b[1]) > 0.85 * (sizes[i] + sizes[j]) / 2
            for i, a in enumerate(centres)
            for j, b in enumerate(centres)
            if i < j
        )
        if ok:
            return centres
    return None


@dataclass(frozen=True)
class World:
    """One version of ShapesWorld: what the base model is shown, its subjects, how big objects are.

    `sizes[n]`: the range of object sizes (pixels) in a scene of n objects. `distinct`: no two base
    objects of a scene share both shape and colour (each object's words name it alone, which the
    grounding loss needs). `repeat_shape`: the chance that a scene of several base objects has two
    of one shape in different colours ("a red star and a blue star": the colour word decides).
    """

    name: str
    base_shapes: tuple[str, ...]
    base_colours: tuple[str, ...]
    subject_list: tuple[Subject, ...]
    sizes: tuple[tuple[int, float, float], ...]
    distinct: bool = False
    repeat_shape: float = 0.0

    @property
    def subjects(self) -> dict[str, Subject]:
        return {subject.word: subject for subject in self.subject_list}

    def size_range(self, n_objects: int) -> tuple[float, float]:
        ranges = {n: (low, high) for n, low, high in self.sizes}
        return ranges.get(n_objects, ranges[max(ranges)])


V1 = World(
    name="v1",
    base_shapes=BASE_SHAPES,
    base_colours=BASE_COLOURS,
    subject_list=tuple(SUBJECTS.values()),
    sizes=((1, 14, 30), (2, 14, 26), (3, 14, 22), (4, 14, 20), (5, 14, 18)),
)
V3 = World(
    name="v3",
    base_shapes=("circle", "square", "triangle", "star", "cross", "diamond"),
    base_colours=BASE_COLOURS,
    subject_list=(
        Subject("zorblax", "star", "purple", "stripes", noun="star"),
        Subject("quiffle", "cross", "orange", "dots", noun="cross"),
        Subject("blorp", "diamond", "cyan", "checker", noun="diamond"),
        Subject("snerk", "star", "pink", "plain", noun="star"),
    ),
    sizes=((1, 18, 34), (2, 16, 30), (3, 16, 26), (4, 16, 22), (5, 14, 20)),
    distinct=True,
    repeat_shape=0.3,
)
WORLDS: dict[str, World] = {"v1": V1, "v3": V3}


def _base_kinds(rng: np.random.Generator, world: World, count: int) -> list[tuple[str, str]]:
    """(shape, colour) of `count` base objects, as `world` draws them."""
    if not world.distinct:  # v1: independent draws (kept as they were: same seeds, same scenes)
        return [
            (str(rng.choice(world.base_shapes)), str(rng.choice(world.base_colours))) for _ in range(count)
        ]
    kinds: list[tuple[str, str]] = []
    if count >= 2 and rng.random() < world.repeat_shape:
        shape = str(rng.choice(world.base_shapes))
        first, second = rng.choice(len(world.base_colours), size=2, replace=False)
        kinds = [(shape, world.base_colours[first]), (shape, world.base_colours[second])]
    while len(kinds) < count:
        kind = (str(rng.choice(world.base_shapes)), str(rng.choice(world.base_colours)))
        if kind not in kinds:
            kinds.append(kind)
    return kinds


def random_scene(
    rng: np.random.Generator,
    n_objects: int | None = None,
    subjects: tuple[Subject, ...] = (),
    base_objects: int | None = None,
    world: World = V1,
) -> Scene:
    """A random scene. Without `subjects`: 1-4 base objects (plain, base shapes and colours).

    With `subjects`: those subject objects plus `base_objects` base ones (default 0-2).
    """
    if subjects:
        n_base = int(rng.integers(0, 3)) if base_objects is None else base_objects
        n_objects = len(subjects) + n_base
    else:
        n_objects = int(rng.integers(1, 5)) if n_objects is None else n_objects
        n_base = n_objects
    min_size, max_size = world.size_range(n_objects)
    while True:
        sizes = [float(rng.uniform(min_size, max_size)) for _ in range(n_objects)]
        centres = _place(rng, n_objects, sizes)
        if centres is not None:
            break
    objects = []
    kinds = [*subjects, *([None] * n_base)]
    order = rng.permutation(n_objects)
    base_kinds = None if not world.distinct else iter(_base_kinds(rng, world, n_base))
    for slot, index in enumerate(order):
        kind = kinds[index]
        x, y = centres[slot]
        if kind is None:
            shape, colour = next(base_kinds) if base_kinds is not None else _base_kinds(rng, world, 1)[0]
            objects.append(SceneObject(shape, colour, "plain", x, y, sizes[slot]))
        else:
            objects.append(
                SceneObject(
                    kind.shape, kind.colour, kind.texture, x, y, sizes[slot], word=kind.word, noun=kind.noun
                )
            )
    return Scene(objects=objects, background=str(rng.choice(list(BACKGROUNDS))))


def training_vocabulary() -> list[str]:
    """Every word a ShapesWorld caption or evaluation prompt uses (the tokenizer's whole pieces)."""
    words = ["a", "and", ",", "next", "to", "with", "above", "below", "the", "on", "left", "right"]
    words += list(COLOURS) + list(SHAPES) + ["striped", "dotted", "checkered", "plain"]
    return words
