"""What a run is conditioned on besides its prompt: an init image and `strength` (img2img), an
inpainting mask, ControlNet images with their scales, an IP-Adapter or Redux reference image with
its scale. Images are untrusted input.

Two forms, as for LoRAs:
- `ConditionsSpec`: paths and numbers, as the command line, a job-file line and a manifest give
  them (and the hashes a replay must find again). `load()` reads the images.
- `Conditions`: the images read and checked (`ConditionImage`: pixels, the hash of the file's
  bytes, where they came from), what `FreeFuse.generate` takes beside its settings.

Every image is read with PIL from bytes read whole and bounded (`MAX_IMAGE_BYTES`), in PNG, JPEG
or WebP only; its size is checked from the header before any pixel is decoded (decompression
bombs are refused), and its mode before it is used: pictures are RGB or grey (L), masks grey (L)
or bilevel (1). What needs the run's settings or model (the size, the mask's coverage against
the run's size, whether the architecture takes the condition at all) is `freefuse.preflight`'s.
"""

from __future__ import annotations

import hashlib
import io
import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    field_validator,
    model_validator,
)

from .core import jsontext
from .errors import InputFileError, SettingsError
from .files import is_hub_id, read_input
from .settings import MAX_SIDE, Number, describe_errors

#: Largest condition image file read (a 8192² PNG of noise is ~200 MB; real ones are far smaller).
MAX_IMAGE_BYTES = 64 << 20
#: Most pixels of a condition image, read from its header before decoding.
MAX_IMAGE_PIXELS = MAX_SIDE * MAX_SIDE
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP")
PICTURE_MODES = ("RGB", "L")
MASK_MODES = ("L", "1")
#: The kinds of condition, as architectures list the ones they take (`Architecture.conditions`).
IMG2IMG, INPAINT, CONTROLNET, IP_ADAPTER, REDUX = "img2img", "inpaint", "controlnet", "ip-adapter", "redux"
#: The folders of a `FluxPriorReduxPipeline` FreeFuse reads (its text encoders are not used: the run's own are).
REDUX_PARTS = ("image_encoder", "feature_extractor", "image_embedder")
MAX_CONTROLS = 8
#: Highest ControlNet or IP-Adapter scale taken (diffusers sets no bound; real runs use 0.3-1.5).
MAX_SCALE = 10.0
#: What `--ip-adapter-model` names in a hub repository or a folder, as XLabs' FLUX IP-Adapters are published.
IP_ADAPTER_WEIGHT_NAME = "ip_adapter.safetensors"
#: The CLIP image encoder FLUX.1 IP-Adapters (XLabs) were trained with, when none is named.
DEFAULT_IMAGE_ENCODER = "openai/clip-vit-large-patch14"
#: The key prefixes of a FLUX IP-Adapter file, as `FluxIPAdapterMixin.load_ip_adapter` sorts them.
IP_ADAPTER_PROJ_PREFIXES = ("ip_adapter_proj_model.", "image_proj.")
IP_ADAPTER_ATTN_PREFIXES = ("double_blocks.", "ip_adapter.")

ImagePath = Annotated[str, StringConstraints(min_length=1, max_length=4096)]
Sha256 = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]


@dataclass(frozen=True)
class ConditionImage:
    """One image a run is conditioned on, read and checked.

    Attributes:
        image: the PIL image (mode RGB or L for pictures, L or 1 for masks), fully decoded.
        sha256: of the file's bytes; of the mode, size and pixels for an image given in memory.
        path: the file it was read from, or None (in memory).
    """

    image: Any
    sha256: str
    path: str | None = None

    @property
    def size(self) -> tuple[int, int]:
        """`(width, height)`, as PIL says it."""
        return tuple(self.image.size)

    def record(self) -> dict:
        """What a manifest keeps of it: where it was read from, and its hash."""
        return {"path": self.path, "sha256": self.sha256}


def read_image(path: str | Path, what: str, modes: Sequence[str] = PICTURE_MODES) -> ConditionImage:
    """`path` read whole (at most `MAX_IMAGE_BYTES`), its header checked (format, pixels, mode),
    then decoded. `what` names it in errors ("--init-image")."""
    from PIL import Image

    path = Path(path).expanduser()
    if not path.is_file():
        raise SettingsError(f"{what} {path} does not exist (or is not a regular file).")
    size = path.stat().st_size
    if size > MAX_IMAGE_BYTES:
        raise SettingsError(
            f"{what} {path} is {size / (1 << 20):.0f} MiB; condition images are at most {MAX_IMAGE_BYTES >> 20} MiB."
        )
    data = read_input(path, what)
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
            _check_header(image.size, image.mode, what, path.name, modes)
            image.load()
        except (Image.DecompressionBombWarning, Image.DecompressionBombError) as error:
            raise SettingsError(f"{what} {path.name} is refused: {error}") from None
        except (Image.UnidentifiedImageError, SyntaxError) as error:
            raise InputFileError(
                f"{what} {path.name} is not a {', '.join(IMAGE_FORMATS)} image ({error}); save it as PNG."
            ) from None
        except OSError as error:  # truncated or damaged after a valid header
            raise InputFileError(f"{what} {path.name} cannot be decoded: {error}") from None
    return ConditionImage(image=image, sha256=hashlib.sha256(data).hexdigest(), path=str(path))


def image_in_memory(image, what: str, modes: Sequence[str] = PICTURE_MODES) -> ConditionImage:
    """A PIL image the caller holds (or a `ConditionImage`, returned as it is), checked as a file's is."""
    if isinstance(image, ConditionImage):
        _check_header(image.image.size, image.image.mode, what, image.path or "in memory", modes)
        return image
    if isinstance(image, str | Path):
        return read_image(image, what, modes)
    from PIL import Image

    if not isinstance(image, Image.Image):
        raise SettingsError(f"`{what}` must be a PIL image or an image file's path, got {type(image).__name__}.")
    _check_header(image.size, image.mode, what, "in memory", modes)
    digest = hashlib.sha256(f"{image.mode} {image.size}".encode())
    digest.update(image.tobytes())
    return ConditionImage(image=image, sha256=digest.hexdigest(), path=None)


def _check_header(size: tuple[int, int], mode: str, what: str, name: str, modes: Sequence[str]) -> None:
    width, height = size
    if width < 1 or height < 1 or width > MAX_SIDE or height > MAX_SIDE or width * height > MAX_IMAGE_PIXELS:
        raise SettingsError(
            f"{what} {name} is {width}x{height} pixels; condition images are at most {MAX_SIDE} pixels a side."
        )
    if mode not in modes:
        kind = "a grey-level (L) image, white where the picture is repainted" if modes == MASK_MODES else "RGB"
        raise SettingsError(
            f"{what} {name} is a {mode!r} image; it must be {' or '.join(repr(m) for m in modes)}: save it as {kind} "
            f"(e.g. `Image.open(path).convert({modes[0]!r}).save(path)`)."
        )


@dataclass(frozen=True)
class Control:
    """One ControlNet input: its picture, its scale (`controlnet_conditioning_scale`), its type
    (a union ControlNet's mode, e.g. "canny", "depth", "pose"; for other ControlNets a label), and
    which of the run's ControlNets reads it."""

    image: ConditionImage
    scale: float = 1.0
    type: str | None = None
    controlnet: int = 0


@dataclass(frozen=True)
class Conditions:
    """What a run is conditioned on besides its prompt (all optional).

    Attributes:
        init_image: the picture img2img and inpainting start from (RGB or L, the run's size).
        strength: how much of it is redrawn, in (0, 1]: the run denoises the last `strength` share of
            its steps (None: the architecture's img2img/inpainting default, as diffusers').
        inpaint_mask: white (>= 0.5) where the init image is repainted; the rest is kept.
        controls: ControlNet inputs, each read by `controlnets[control.controlnet]`.
        controlnets: where the run's ControlNets came from (folders or ids), for the manifest.
        ip_adapter: the reference image an IP-Adapter reads (the pipeline must have one loaded:
            `pipe.load_ip_adapter(...)`, or the command line's `--ip-adapter-model`).
        ip_adapter_scale: how strongly it acts (`set_ip_adapter_scale`, every block), for this run
            only; None: the scales the pipeline's IP-Adapter has (what `FluxPipeline` would use).
        ip_adapter_model: where the IP-Adapter came from (a file or hub id), for the manifest.
        image_encoder: where its CLIP image encoder came from, for the manifest.
        redux: the reference image a FLUX Redux model reads (its image tokens are appended to the
            prompt's, as `FluxPriorReduxPipeline` does; the run takes the model as `redux=`).
        redux_scale: `prompt_embeds_scale`: the prompt's and the image's tokens are multiplied by it.
        redux_model: where the Redux model came from (a folder or hub id), for the manifest.
    """

    init_image: ConditionImage | None = None
    strength: float | None = None
    inpaint_mask: ConditionImage | None = None
    controls: tuple[Control, ...] = ()
    controlnets: tuple[str, ...] = ()
    ip_adapter: ConditionImage | None = None
    ip_adapter_scale: float | None = None
    ip_adapter_model: str | None = None
    image_encoder: str | None = None
    redux: ConditionImage | None = None
    redux_scale: float = 1.0
    redux_model: str | None = None

    @classmethod
    def of(
        cls,
        init_image=None,
        strength: float | None = None,
        inpaint_mask=None,
        controls: Sequence[Control | Mapping] = (),
        controlnets: Sequence[str] = (),
        ip_adapter=None,
        ip_adapter_scale: float | None = None,
        ip_adapter_model: str | None = None,
        image_encoder: str | None = None,
        redux=None,
        redux_scale: float = 1.0,
        redux_model: str | None = None,
    ) -> Conditions:
        """From PIL images or paths (checked as files are): the library's way to build one."""
        made = []
        for index, control in enumerate(controls):
            if isinstance(control, Mapping):
                control = Control(**control)
            made.append(
                Control(
                    image=image_in_memory(control.image, f"control image {index + 1}"),
                    scale=control.scale,
                    type=control.type,
                    controlnet=control.controlnet,
                )
            )
        return cls(
            init_image=None if init_image is None else image_in_memory(init_image, "init_image"),
            strength=strength,
            inpaint_mask=None if inpaint_mask is None else image_in_memory(inpaint_mask, "inpaint_mask", MASK_MODES),
            controls=tuple(made),
            controlnets=tuple(controlnets),
            ip_adapter=None if ip_adapter is None else image_in_memory(ip_adapter, "ip_adapter"),
            ip_adapter_scale=ip_adapter_scale,
            ip_adapter_model=ip_adapter_model,
            image_encoder=image_encoder,
            redux=None if redux is None else image_in_memory(redux, "redux"),
            redux_scale=redux_scale,
            redux_model=redux_model,
        )

    @property
    def kinds(self) -> list[str]:
        """The kinds of condition this run has (`IMG2IMG`, `INPAINT`, `CONTROLNET`, `IP_ADAPTER`)."""
        found = []
        if self.init_image is not None and self.inpaint_mask is None:
            found.append(IMG2IMG)
        if self.inpaint_mask is not None:
            found.append(INPAINT)
        if self.controls:
            found.append(CONTROLNET)
        if self.ip_adapter is not None:
            found.append(IP_ADAPTER)
        if self.redux is not None:
            found.append(REDUX)
        return found

    @property
    def empty(self) -> bool:
        """No condition and no setting of one (a setting without its image is preflight's to refuse)."""
        unset = self.strength is None and self.ip_adapter_scale is None and self.redux_scale == 1.0
        return not self.kinds and unset

    def mask_share(self) -> float | None:
        """The share of the inpainting mask's pixels that are repainted (>= 0.5, as diffusers
        binarizes it), or None without a mask."""
        if self.inpaint_mask is None:
            return None
        import numpy as np

        grey = np.asarray(self.inpaint_mask.image.convert("L"), dtype=np.float32) / 255.0
        return float((grey >= 0.5).mean())

    def record(self, strength: float | None = None) -> dict:
        """The manifest's record: every image's path and hash, the strength used, the controls (the
        manifest adds its ControlNets' records)."""
        record: dict[str, Any] = {}
        if self.init_image is not None:
            record["init_image"] = self.init_image.record()
            record["strength"] = self.strength if strength is None else strength
        if self.inpaint_mask is not None:
            record["inpaint_mask"] = self.inpaint_mask.record()
        if self.controls:
            record["controls"] = [
                {"type": c.type, "image": c.image.record(), "scale": c.scale, "controlnet": c.controlnet}
                for c in self.controls
            ]
        if self.ip_adapter is not None:
            record["ip_adapter"] = {
                "image": self.ip_adapter.record(),
                "scale": self.ip_adapter_scale,
                "model": self.ip_adapter_model,
                "image_encoder": self.image_encoder,
            }
        if self.redux is not None:
            record["redux"] = {"image": self.redux.record(), "scale": self.redux_scale, "model": self.redux_model}
        return record


def has_reference(conditions: Conditions | None) -> bool:
    """Whether a run reads an IP-Adapter reference image."""
    return conditions is not None and conditions.ip_adapter is not None


def inpaint_region(conditions: Conditions | None, size: tuple[int, int]):
    """`[H, W]` float tensor, 1 where the inpainting mask repaints (>= 0.5, as diffusers binarizes
    it) at image size `(H, W)`, or None without a mask."""
    if conditions is None or conditions.inpaint_mask is None:
        return None
    import numpy as np
    import torch

    grey = np.asarray(conditions.inpaint_mask.image.convert("L"), dtype=np.float32) / 255.0
    region = torch.from_numpy((grey >= 0.5).astype(np.float32))
    if tuple(region.shape) != tuple(size):
        region = torch.nn.functional.interpolate(region[None, None], size=tuple(size), mode="nearest-exact")[0, 0]
    return region


# -- what the command line, a job file and a manifest give ------------------------------------------------


class ImageRef(BaseModel):
    """An image file, and the hash it must have (a manifest's replay)."""

    model_config = ConfigDict(extra="forbid")

    path: ImagePath
    sha256: Sha256 | None = None


class ControlSpec(BaseModel):
    """`--control TYPE=IMAGE[@SCALE]`, or a job file's `{"type": ..., "image": ..., "scale": ...}`."""

    model_config = ConfigDict(extra="forbid")

    type: Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_.-]{1,32}$")] | None = None
    image: ImageRef
    scale: Number = 1.0
    controlnet: Annotated[int, Field(ge=0, lt=MAX_CONTROLS)] = 0

    @field_validator("image", mode="before")
    @classmethod
    def _path(cls, value: Any) -> Any:
        return {"path": value} if isinstance(value, str) else value

    @field_validator("scale")
    @classmethod
    def _scale(cls, value: float) -> float:
        return check_scale(value, "a ControlNet scale")


def check_scale(value: float, what: str) -> float:
    """`value` if it is a finite number from 0 to `MAX_SCALE`; else a `ValueError` naming `what`."""
    if not math.isfinite(value) or not 0 <= value <= MAX_SCALE:
        raise ValueError(f"{what} is a number from 0 to {MAX_SCALE:g}, got {value!r}")
    return value


class ConditionsSpec(BaseModel):
    """A run's conditions as files: what `--init-image`, `--strength`, `--inpaint-mask`,
    `--control`, `--controlnet`, `--ip-adapter`, `--ip-adapter-model` and `--image-encoder` give,
    and a job file's and manifest's `conditions`."""

    model_config = ConfigDict(extra="forbid")

    init_image: ImageRef | None = None
    strength: Number | None = None
    inpaint_mask: ImageRef | None = None
    controls: Annotated[list[ControlSpec], Field(max_length=MAX_CONTROLS)] = Field(default_factory=list)
    controlnets: Annotated[list[ImagePath], Field(max_length=MAX_CONTROLS)] = Field(default_factory=list)
    ip_adapter: ImageRef | None = None
    ip_adapter_scale: Number | None = None
    ip_adapter_model: ImagePath | None = None
    image_encoder: ImagePath | None = None
    redux: ImageRef | None = None
    redux_scale: Number | None = None
    redux_model: ImagePath | None = None

    @field_validator("init_image", "inpaint_mask", "ip_adapter", "redux", mode="before")
    @classmethod
    def _path(cls, value: Any) -> Any:
        return {"path": value} if isinstance(value, str) else value

    @field_validator("ip_adapter_scale")
    @classmethod
    def _ip_scale(cls, value: float | None) -> float | None:
        return None if value is None else check_scale(value, "an IP-Adapter scale")

    @field_validator("redux_scale")
    @classmethod
    def _redux_scale(cls, value: float | None) -> float | None:
        return None if value is None else check_scale(value, "a Redux scale")

    @model_validator(mode="after")
    def _nothing_ignored(self) -> ConditionsSpec:
        """A setting of a reference image without the image (or model) it applies to is a mistake to
        say, not something to drop."""
        for setting, needs, flag in (
            ("ip_adapter_scale", "ip_adapter", "--ip-adapter IMAGE@SCALE"),
            ("redux_scale", "redux", "--redux IMAGE@SCALE"),
            ("image_encoder", "ip_adapter_model", "--ip-adapter-model"),
        ):
            if getattr(self, setting) is not None and getattr(self, needs) is None:
                raise ValueError(f"{setting} applies to {needs}, which is not given ({flag})")
        return self

    @classmethod
    def parse(cls, values: Any, where: str) -> ConditionsSpec:
        """From a job file's or manifest's mapping; errors name `where`."""
        try:
            return cls.model_validate(values)
        except ValidationError as error:
            raise SettingsError(f"{where}: conditions: {describe_errors(error)}") from None

    @property
    def empty(self) -> bool:
        return self == ConditionsSpec()

    def paths(self) -> list[str]:
        """Every image file it names."""
        refs = [self.init_image, self.inpaint_mask, self.ip_adapter, self.redux] + [c.image for c in self.controls]
        return [ref.path for ref in refs if ref is not None]

    def load(self) -> Conditions:
        """Every image read and checked (and its hash compared with the one recorded, if any)."""

        def read(ref: ImageRef | None, what: str, modes=PICTURE_MODES) -> ConditionImage | None:
            if ref is None:
                return None
            image = read_image(ref.path, what, modes)
            if ref.sha256 is not None and ref.sha256 != image.sha256:
                raise SettingsError(
                    f"{what} {ref.path} has changed since the manifest was written (sha256 {image.sha256[:12]}… != "
                    f"{ref.sha256[:12]}…); pass the right file."
                )
            return image

        controls = tuple(
            Control(
                image=read(control.image, f"control image {control.image.path}"),
                scale=control.scale,
                type=control.type,
                controlnet=control.controlnet,
            )
            for control in self.controls
        )
        return Conditions(
            init_image=read(self.init_image, "init image"),
            strength=self.strength,
            inpaint_mask=read(self.inpaint_mask, "inpainting mask", MASK_MODES),
            controls=controls,
            controlnets=tuple(self.controlnets),
            ip_adapter=read(self.ip_adapter, "IP-Adapter image"),
            ip_adapter_scale=self.ip_adapter_scale,
            ip_adapter_model=self.ip_adapter_model,
            image_encoder=self.ip_encoder,
            redux=read(self.redux, "Redux image"),
            redux_scale=1.0 if self.redux_scale is None else self.redux_scale,
            redux_model=self.redux_model,
        )

    @property
    def ip_encoder(self) -> str | None:
        """The image encoder the IP-Adapter loads with, or None without an IP-Adapter model: the one
        named; else an `image_encoder` folder beside a local IP-Adapter file (or inside its folder);
        else `DEFAULT_IMAGE_ENCODER`."""
        if self.ip_adapter_model is None:
            return None
        if self.image_encoder is not None:
            return self.image_encoder
        local = Path(self.ip_adapter_model).expanduser()
        beside = (local if local.is_dir() else local.parent) / "image_encoder"
        if local.exists() and beside.is_dir():
            return str(beside)
        return DEFAULT_IMAGE_ENCODER


# -- ControlNets, before and after loading ----------------------------------------------------------------


@dataclass(frozen=True)
class ControlNetFacts:
    """What is known of one ControlNet before its weights load (its `config.json`), or from the
    loaded model: its class, how many union modes it has (None: not a union ControlNet), and
    whether it pools its conditions (SDXL "shuffle"-style, which diffusers runs in guess mode)."""

    source: str
    class_name: str | None
    modes: int | None = None
    global_pool: bool = False


def controlnet_facts(source: str) -> ControlNetFacts:
    """A ControlNet folder's facts from its `config.json` (no weights); a hub id that is not a
    folder here says nothing yet (checked once loaded)."""
    folder = Path(source).expanduser()
    config_file = folder / "config.json"
    if not folder.is_dir():
        return ControlNetFacts(source=source, class_name=None)
    if not config_file.is_file():
        raise SettingsError(
            f"ControlNet {source} has no config.json; give a diffusers ControlNet folder (or a Hugging Face id)."
        )
    try:
        config = jsontext.loads(read_input(config_file, "ControlNet config").decode("utf-8"))
    except ValueError as error:
        raise SettingsError(f"ControlNet {source}: config.json is not valid JSON ({error}).") from None
    if not isinstance(config, dict):
        raise SettingsError(f"ControlNet {source}: config.json is not a JSON object.")
    return ControlNetFacts(
        source=source,
        class_name=str(config.get("_class_name")) if config.get("_class_name") else None,
        modes=config.get("num_mode") if isinstance(config.get("num_mode"), int) else None,
        global_pool=bool(config.get("global_pool_conditions", False)),
    )


def loaded_controlnet_facts(model, source: str = "in memory") -> ControlNetFacts:
    """The same facts from a loaded ControlNet model."""
    config = getattr(model, "config", {}) or {}
    modes = config.get("num_mode") if hasattr(config, "get") else None
    return ControlNetFacts(
        source=source,
        class_name=type(model).__name__,
        modes=modes if isinstance(modes, int) else None,
        global_pool=bool(config.get("global_pool_conditions", False)) if hasattr(config, "get") else False,
    )


def ip_adapter_file(source: str) -> tuple[str, str] | None:
    """`--ip-adapter-model`'s `(folder or hub id, weight file name)` for `load_ip_adapter`: a local
    `.safetensors` file, a folder holding `IP_ADAPTER_WEIGHT_NAME`, or a hub id (None: not found here).
    A local file is checked from its header (no tensor is read): an IP-Adapter for FLUX has image
    projection keys and per-block key/value projections; a file of another kind is refused, and
    nothing but safetensors is read."""
    from safetensors import safe_open

    path = Path(source).expanduser()
    if path.is_dir():
        path = path / IP_ADAPTER_WEIGHT_NAME
        if not path.is_file():
            raise SettingsError(f"IP-Adapter folder {source} has no {IP_ADAPTER_WEIGHT_NAME}; give the file itself.")
    elif not path.exists():
        if not is_hub_id(source):
            raise SettingsError(
                f"IP-Adapter {source} does not exist; give a FLUX IP-Adapter .safetensors file, its folder, or a "
                "Hugging Face id (e.g. XLabs-AI/flux-ip-adapter)."
            )
        return None
    if path.suffix != ".safetensors":
        raise SettingsError(f"IP-Adapter {path.name} is not a .safetensors file; FreeFuse reads safetensors only.")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as opened:
            keys = list(opened.keys())
    except Exception as error:  # safetensors raises its own error types for a damaged header
        raise InputFileError(f"IP-Adapter {path.name} is not a readable safetensors file ({error}).") from None
    has_projection = any(key.startswith(IP_ADAPTER_PROJ_PREFIXES) for key in keys)
    has_attention = any(key.startswith(IP_ADAPTER_ATTN_PREFIXES) for key in keys)
    if not (has_projection and has_attention):
        raise SettingsError(
            f"{path.name} is not a FLUX IP-Adapter: it needs image projection keys ({IP_ADAPTER_PROJ_PREFIXES[0]}…) and "
            f"per-block keys ({IP_ADAPTER_ATTN_PREFIXES[0]}…), as XLabs' flux-ip-adapter files have."
        )
    return str(path.parent), path.name


def redux_source(source: str) -> str:
    """`--redux-model`: a `FluxPriorReduxPipeline` folder (its `model_index.json` and the parts
    FreeFuse reads, each with safetensors weights where it has weights) or a hub id."""
    folder = Path(source).expanduser()
    if folder.is_dir():
        missing = [part for part in REDUX_PARTS if not (folder / part).is_dir()]
        if not (folder / "model_index.json").is_file() or missing:
            raise SettingsError(
                f"Redux model {source} is not a FluxPriorReduxPipeline folder (missing "
                f"{', '.join(missing) or 'model_index.json'}); give its folder or a Hugging Face id (e.g. "
                "black-forest-labs/FLUX.1-Redux-dev)."
            )
        for part in ("image_encoder", "image_embedder"):
            if not any((folder / part).glob("*.safetensors")):
                raise SettingsError(f"Redux model {source}: {part} has no .safetensors weights; FreeFuse reads safetensors only.")
        return str(folder)
    if not is_hub_id(source):
        raise SettingsError(
            f"Redux model {source} is neither a folder nor a Hugging Face id (e.g. black-forest-labs/FLUX.1-Redux-dev)."
        )
    return source


def image_encoder_source(source: str) -> str:
    """An IP-Adapter's image encoder: a local folder of CLIP vision weights in safetensors
    (`model.safetensors`, or its sharded index; refused otherwise: nothing else is unpickled), or a
    hub id, returned as `from_pretrained` takes it (with `use_safetensors=True`)."""
    folder = Path(source).expanduser()
    if folder.is_dir():
        weights = ("model.safetensors", "model.safetensors.index.json")
        if not (folder / "config.json").is_file() or not any((folder / name).is_file() for name in weights):
            raise SettingsError(
                f"Image encoder {source} needs config.json and model.safetensors (a CLIP vision model saved with "
                "`save_pretrained`); FreeFuse reads safetensors only."
            )
        return str(folder)
    if not is_hub_id(source):
        raise SettingsError(f"Image encoder {source} is neither a folder nor a Hugging Face id (e.g. {DEFAULT_IMAGE_ENCODER}).")
    return source


@dataclass
class ConditionFacts:
    """What preflight checks of a run's conditions: the conditions, its ControlNets' facts, and
    whether the model has an IP-Adapter and whether the run has a Redux model (None: not known)."""

    conditions: Conditions
    controlnets: list[ControlNetFacts] = field(default_factory=list)
    ip_adapter: bool | None = None
    redux: bool | None = None
