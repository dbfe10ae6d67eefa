"""LoRA files: read with safetensors only, checked, described, and their trigger words found.

A LoRA file is opened with safetensors only; pickle formats (.ckpt, .pt, .bin, ...) are refused
by name, before any byte is read. Layout conversion (kohya, XLabs, BFL, ai-toolkit,
diffusers/PEFT) is diffusers' own, called by the architecture's backend; this module only reads
files and checks that a converted LoRA fits a model. Masking at run time is `freefuse.masking`.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import re
import struct
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from .core import jsontext
from .embeddings import EmbeddingError, bundled_embeddings, is_bundle_key, split_bundle_key
from .errors import LoraFileError, LoraFitError
from .files import sha256_file

if TYPE_CHECKING:  # torch is imported by the functions that read tensors: `inspect` reads headers only
    import torch

    from .backends.base import Backend

PICKLE_SUFFIXES = {".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle", ".th", ".tar", ".zip"}
MAX_HEADER_BYTES = 100 << 20  # safetensors' own limit
MAX_METADATA_VALUE_CHARS = 4 << 20  # e.g. kohya ss_tag_frequency; longer values are ignored
TRIGGER_KEYS = (
    "modelspec.trigger_phrase",
    "trigger_phrase",
    "trigger_words",
    "trigger_word",
    "ss_trigger_word",
)


#: The strongest LoRA weight accepted. Typical weights are 0 to 2; far past this the LoRA's delta
#: swamps the layer and the image is NaN (1e300 does not even fit in a float32 scale).
MAX_LORA_WEIGHT = 100.0


def check_lora_weight(weight) -> float:
    """`weight` as a float if it is a usable LoRA strength; else a `ValueError` saying what is."""
    if isinstance(weight, bool) or not isinstance(weight, int | float) or not math.isfinite(weight):
        raise ValueError(f"`weight` must be a finite number, got {weight!r}.")
    if abs(weight) > MAX_LORA_WEIGHT:
        raise ValueError(
            f"`weight` {weight!r} is out of range: LoRA weights are usually 0 to 2, at most {MAX_LORA_WEIGHT:g} "
            "either way (a weight this large only gives NaN images)."
        )
    return float(weight)


#: What PEFT accepts as an adapter name (and what masks, manifests and file names show).
ADAPTER_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}$")


def adapter_name(stem: str | Path, taken: Collection[str] = ()) -> str:
    """The adapter name a LoRA gets when none is given: its file's stem (a path's, or the text)
    with other characters as `_`, at most 64, made unique against `taken` with `_2`, `_3`, ...
    The one rule every front end names LoRAs by."""
    text = Path(stem).stem if isinstance(stem, Path) or str(stem).endswith(".safetensors") else str(stem)
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", text)[:64] or "lora"
    if not ADAPTER_NAME.match(name):
        name = ("_" + name)[:64]
    unique, number = name, 1
    while unique in taken:
        number += 1
        suffix = f"_{number}"
        unique = name[: 64 - len(suffix)] + suffix
    return unique


def check_adapter_name(name: str) -> str:
    """`name` if PEFT takes it as an adapter name; else a `LoraFileError` saying what does."""
    if not isinstance(name, str) or not ADAPTER_NAME.match(name):
        raise LoraFileError(
            f"LoRA name {name!r} is not usable as an adapter name; use 1-64 letters, digits, '_', '-' or '.', "
            "not starting with '-' or '.'."
        )
    return name


@dataclass
class LoraFile:
    """A LoRA file read from disk.

    Attributes:
        path: where it was read from.
        sha256: hash of its bytes.
        state_dict: tensors as stored (any layout).
        metadata: the safetensors header metadata (strings).
        layout: detected layout name ("diffusers", "kohya", "xlabs", "bfl", ...).
        embeddings: trigger-word embeddings bundled in the file (pivotal tuning), placeholder →
            {encoder key: `[n_vectors, width]`}; not part of `state_dict`.
    """

    path: Path
    sha256: str
    state_dict: dict[str, torch.Tensor]
    metadata: dict[str, str] = field(default_factory=dict)
    layout: str = "unknown"
    embeddings: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)

    @property
    def adapter_metadata(self) -> bool:
        """The file carries diffusers' own LoRA config (`lora_adapter_metadata`: alpha, rank
        pattern), which diffusers applies only when it reads the file's header itself."""
        return "lora_adapter_metadata" in self.metadata

    @property
    def trigger_words(self) -> list[str]:
        """The metadata's trigger words, else the placeholders of bundled embeddings."""
        return trigger_words_from_metadata(self.metadata) or list(self.embeddings)


def check_lora_path(path: str | Path, architecture: type[Backend] | None = None) -> Path:
    """Cheap checks on a LoRA path before any model loads: exists, a file, not pickle, a sane header,
    and (given the model's backend class) tensor names of that architecture."""
    path = Path(path).expanduser()
    try:
        exists = path.exists()
    except OSError as error:  # e.g. a name longer than the file system allows
        raise LoraFileError(
            f"LoRA path {str(path)[:200]!r} cannot be a file here: {error.strerror}."
        ) from None
    if not exists:
        raise LoraFileError(f"LoRA file {path} does not exist.")
    if path.is_dir():
        raise LoraFileError(f"LoRA path {path} is a directory; pass the .safetensors file inside it.")
    if not path.is_file():  # a FIFO, socket or device would block or never end
        raise LoraFileError(f"LoRA path {path} is not a regular file; pass the .safetensors file itself.")
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise LoraFileError(
            f"{path.name} is a pickle file ({path.suffix}); FreeFuse never unpickles files, which can run code. "
            "Convert it to .safetensors first (for example with the `safetensors` convert tool) and pass that."
        )
    size = path.stat().st_size
    if size == 0:
        raise LoraFileError(f"LoRA file {path} is empty (0 bytes); download it again.")
    header = read_header(path)
    if architecture is not None:
        architecture.check_lora_keys(
            {
                key: info.get("shape", []) if isinstance(info, dict) else []
                for key, info in header.items()
                if key != "__metadata__" and not is_bundle_key(key)
            },
            path.name,
        )
    return path


def read_header(path: Path) -> dict:
    """The JSON header of a safetensors file (its first bytes only), checked against the file size."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as handle:
            head = handle.read(8)
            raw = handle.read(_header_size(head, size, path))
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        raise
    except OSError as error:
        raise LoraFileError(f"{path} cannot be read ({error.strerror or error}); check the file.") from None
    return _checked_header(raw, size, path)


def parse_header(data: bytes, path: Path) -> dict:
    """The header of a safetensors file already read into memory (`data`), checked as `read_header` does."""
    size = len(data)
    end = 8 + _header_size(data[:8], size, path)
    return _checked_header(data[8:end], size, path)


def _header_size(head: bytes, size: int, path: Path) -> int:
    if len(head) < 8:
        raise LoraFileError(f"{path} is too short to be a safetensors file ({size} bytes); it is truncated.")
    (header_size,) = struct.unpack("<Q", head)
    if header_size > MAX_HEADER_BYTES or 8 + header_size > size:
        # The claimed length is the file's first 8 bytes: not shown, they may be anyone's text.
        raise LoraFileError(
            f"{path} is not a valid safetensors file (its header length does not fit the {size}-byte file): it is "
            "corrupt, truncated, or another format."
        )
    return header_size


def _checked_header(raw: bytes, size: int, path: Path) -> dict:
    try:
        header = jsontext.loads(raw, unique_keys=True)
    except jsontext.DuplicateKeyError as error:
        raise LoraFileError(
            f"{path} has a corrupt safetensors header: tensor {error.key[:80]!r} is listed twice."
        ) from None
    except ValueError as error:  # not UTF-8, not JSON, nested too deeply
        raise LoraFileError(f"{path} has a corrupt safetensors header ({error}).") from None
    if not isinstance(header, dict):
        raise LoraFileError(f"{path} has a corrupt safetensors header (not a JSON object).")
    metadata = header.get("__metadata__", {})
    if not isinstance(metadata, dict):
        raise LoraFileError(f"{path} has a corrupt safetensors header (`__metadata__` is not an object).")
    end = 0
    for key, info in header.items():
        if key == "__metadata__":
            continue
        problem = _header_entry_problem(info, size)
        if problem:
            raise LoraFileError(f"{path} has a corrupt safetensors header: tensor {key[:80]!r} {problem}.")
        end = max(end, info["data_offsets"][1])
    overlap = _overlapping_tensors(header)
    if overlap:
        raise LoraFileError(
            f"{path} has a corrupt safetensors header: tensor {overlap[1][:80]!r} overlaps tensor {overlap[0][:80]!r} "
            "(their byte ranges share bytes). Download or export the file again."
        )
    if 8 + len(raw) + end > size:
        raise LoraFileError(
            f"{path} is truncated: its tensors need {8 + len(raw) + end} bytes but the file has {size}. "
            "Download it again."
        )
    return header


def _header_entry_problem(info, size: int) -> str | None:
    """What is wrong with one tensor's header entry, or None."""
    if not isinstance(info, dict):
        return "is not an object"
    offsets, shape, dtype = info.get("data_offsets"), info.get("shape"), info.get("dtype")
    whole = lambda value: isinstance(value, int) and not isinstance(value, bool)  # noqa: E731
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(whole(v) for v in offsets)):
        return "has no [begin, end] pair of whole-number offsets"
    if not 0 <= offsets[0] <= offsets[1] <= size:
        return f"has offsets {offsets} outside the file"
    if not (isinstance(shape, list) and all(whole(v) and 0 <= v < 1 << 40 for v in shape)):
        return "has a shape that is not a list of sizes"
    if not isinstance(dtype, str):
        return "has no dtype"
    itemsize = DTYPE_BYTES.get(dtype)
    if itemsize is not None and math.prod(shape) * itemsize != offsets[1] - offsets[0]:
        return (
            f"is {dtype} of shape {shape}, which is {math.prod(shape) * itemsize} bytes, but its byte range "
            f"{offsets} holds {offsets[1] - offsets[0]}"
        )
    return None


#: Bytes per element of the safetensors dtypes; a dtype not listed here is left to safetensors.
DTYPE_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1,
    "U16": 2, "I16": 2, "F16": 2, "BF16": 2,
    "U32": 4, "I32": 4, "F32": 4,
    "U64": 8, "I64": 8, "F64": 8, "C64": 8,
}  # fmt: skip


def _overlapping_tensors(header: dict) -> tuple[str, str] | None:
    """Two tensors whose byte ranges share bytes (names, in file order), or None."""
    ranges = sorted(
        (info["data_offsets"][0], info["data_offsets"][1], key)
        for key, info in header.items()
        if key != "__metadata__" and info["data_offsets"][1] > info["data_offsets"][0]
    )
    for (_, end, name), (begin, _, other) in zip(ranges, ranges[1:], strict=False):
        if begin < end:
            return name, other
    return None


def header_metadata(header: dict) -> dict[str, str]:
    """The string metadata of a safetensors header; values over MAX_METADATA_VALUE_CHARS are dropped."""
    return {
        str(key): value
        for key, value in (header.get("__metadata__") or {}).items()
        if isinstance(value, str) and len(value) <= MAX_METADATA_VALUE_CHARS
    }


def read_lora_file(path: str | Path) -> LoraFile:
    """Read a `.safetensors` LoRA once: its bytes give the header (metadata), the hash and the
    tensors (safetensors' own parser, from memory), checked and with its layout detected."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    path = check_lora_path(path)
    try:
        data = path.read_bytes()
    except OSError as error:
        raise LoraFileError(f"{path} cannot be read ({error.strerror or error}); check the file.") from None
    metadata = header_metadata(parse_header(data, path))
    try:
        state_dict = load(data)
    except (SafetensorError, RuntimeError, ValueError) as error:
        raise LoraFileError(f"{path} could not be read as safetensors: {error}") from None
    if not state_dict:
        raise LoraFileError(f"{path} holds no tensors; it is not a LoRA.")
    for key, tensor in state_dict.items():
        check_lora_tensor(path, key, tensor)
    try:
        embeddings = bundled_embeddings(state_dict)
    except EmbeddingError as error:
        raise LoraFileError(f"{path.name}: {error}") from None
    lora_only = {key: value for key, value in state_dict.items() if not is_bundle_key(key)}
    if not lora_only:
        raise LoraFileError(f"{path} holds only bundled embeddings and no LoRA weights; it is not a LoRA.")
    return LoraFile(
        path=path,
        sha256=hashlib.sha256(data).hexdigest(),
        state_dict=lora_only,
        metadata=metadata,
        layout=detect_layout(lora_only),
        embeddings=embeddings,
    )


def check_lora_tensor(path: Path, key: str, tensor: torch.Tensor) -> None:
    """LoRA weights are finite floating-point numbers; name the file and tensor when not."""
    import torch

    if not tensor.is_floating_point():
        raise LoraFileError(
            f"{path.name}: tensor {key!r} holds {str(tensor.dtype).removeprefix('torch.')} values; LoRA weights "
            "are floating point (the file is quantized, damaged or not a LoRA)."
        )
    if not bool(torch.isfinite(tensor).all()):
        raise LoraFileError(
            f"{path.name}: tensor {key!r} holds NaN or infinite values; the file is damaged (download or export "
            "it again)."
        )


def check_lora_contents(path: Path) -> None:
    """Every tensor of a LoRA file checked, one at a time (before any model loads)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            for key in handle.keys():  # noqa: SIM118 (safe_open is not a mapping)
                check_lora_tensor(path, key, handle.get_tensor(key))
    except (SafetensorError, OSError, RuntimeError) as error:
        raise LoraFileError(f"{path} could not be read as safetensors: {error}") from None


# Block names only a UNet has (the original SD code base's and diffusers').
_UNET_BLOCKS = (
    "_input_blocks_",
    "_middle_block_",
    "_output_blocks_",
    "_down_blocks_",
    "_up_blocks_",
    "_mid_block_",
)


def detect_layout(state_dict: dict[str, torch.Tensor]) -> str:
    """Name the layout of a LoRA state dict (informational; conversion is diffusers')."""
    keys = list(state_dict)
    if any(".lora_down.weight" in k for k in keys):
        unet = [k for k in keys if k.startswith("lora_unet_")]
        if any(part in k for k in unet for part in _UNET_BLOCKS) or (
            unet
            and not any(
                "double_blocks" in k or "single_blocks" in k or "transformer_blocks" in k or _ZIMAGE.search(k)
                for k in keys
            )
        ):
            return "kohya-unet"
        return "kohya"
    if any("processor" in k for k in keys):
        return "xlabs"
    if any(k.startswith("diffusion_model.") for k in keys):
        return "bfl"
    if any(re.match(r"(transformer|unet|text_encoder(_2)?)\.", k) and ".lora_A." in k for k in keys):
        return "diffusers"
    if any(k.startswith("base_model.model.") for k in keys):
        return "peft"
    if any(".lora_A." in k for k in keys):
        return "peft"
    return "unknown"


def check_lora_fits(
    state_dict: dict[str, torch.Tensor], denoiser: torch.nn.Module, prefix: str, source: str
) -> None:
    """Raise LoraFileError naming the first LoRA key that has no layer in `denoiser` or wrong shapes.

    `state_dict` is in diffusers layout; `prefix` is the denoiser's key prefix ("transformer").
    """
    import torch

    denoiser_keys = [k for k in state_dict if k.startswith(prefix + ".")]
    if not denoiser_keys:
        raise LoraFitError(
            f"{source} has no layers for this model's {prefix} (first key {next(iter(state_dict), None)!r}); "
            "it is a LoRA for another architecture."
        )
    modules = dict(denoiser.named_modules())
    ranks: dict[str, int] = {}
    pattern = re.compile(re.escape(prefix) + r"\.(.+)\.lora_([AB])(?:\.[^.]+)?\.weight$")
    for key in sorted(denoiser_keys):
        match = pattern.match(key)
        if match is None:
            continue
        module_name, which = match.groups()
        module = modules.get(module_name)
        if module is None:
            raise LoraFitError(
                f"{source} does not fit this model: key {key!r} names layer {module_name!r}, which the "
                f"{prefix} does not have (a LoRA for another model or version)."
            )
        base = getattr(module, "base_layer", module)
        in_features = getattr(base, "in_features", getattr(base, "in_channels", None))
        out_features = getattr(base, "out_features", getattr(base, "out_channels", None))
        tensor = state_dict[key]
        expected_ndim = 4 if isinstance(base, torch.nn.Conv2d) else 2
        if tensor.ndim != expected_ndim:
            kind = "convolution kernels" if expected_ndim == 4 else "matrices"
            raise LoraFileError(
                f"{source}: key {key!r} has shape {tuple(tensor.shape)}; LoRA weights of layer {module_name!r} "
                f"are {kind}."
            )
        if which == "A" and tensor.shape[1] != in_features:
            raise LoraFitError(
                f"{source} does not fit this model: key {key!r} has shape {tuple(tensor.shape)} but layer "
                f"{module_name!r} takes {in_features} inputs (a LoRA for a model of another size)."
            )
        if which == "B" and tensor.shape[0] != out_features:
            raise LoraFitError(
                f"{source} does not fit this model: key {key!r} has shape {tuple(tensor.shape)} but layer "
                f"{module_name!r} gives {out_features} outputs (a LoRA for a model of another size)."
            )
        rank = tensor.shape[0] if which == "A" else tensor.shape[1]
        if ranks.setdefault(module_name, rank) != rank:
            raise LoraFileError(
                f"{source} is inconsistent: key {key!r} has rank {rank} but its other half has rank "
                f"{ranks[module_name]}; the file is damaged."
            )


def trigger_words_from_metadata(metadata: dict[str, str]) -> list[str]:
    """Trigger words a LoRA file declares (see `trigger_words_and_source`)."""
    return trigger_words_and_source(metadata)[0]


# kohya's dataset folders are named "<repeats>_<instance prompt>", e.g. "10_ohwx woman".
_KOHYA_FOLDER = re.compile(r"^\s*\d+_(.+?)\s*$")


def trigger_words_and_source(metadata: dict[str, str]) -> tuple[list[str], str | None]:
    """Trigger words a LoRA file declares and the metadata key they came from. In this order:

    1. explicit keys: `modelspec.trigger_phrase`, `trigger_phrase`, `trigger_words`,
       `trigger_word`, `ss_trigger_word` (a JSON list or comma-separated text);
    2. kohya's dataset folder name, `<repeats>_<instance prompt>`, a key of `ss_dataset_dirs`
       or `ss_tag_frequency` ("10_ohwx woman" → "ohwx woman"); of several folders, the one
       with the most images × repeats (or captions);
    3. kohya's most frequent caption tag (`ss_tag_frequency`).
    """
    for key in TRIGGER_KEYS:
        value = metadata.get(key)
        if value and value.strip():
            with contextlib.suppress(ValueError):  # not JSON, or nested too deeply: plain text
                parsed = jsontext.loads(value)
                if isinstance(parsed, list):
                    return [str(word).strip() for word in parsed if str(word).strip()][:16], key
            return [word.strip() for word in value.split(",") if word.strip()][:16], key
    for key in ("ss_dataset_dirs", "ss_tag_frequency"):
        try:
            folders = jsontext.loads(metadata.get(key) or "null")
        except ValueError:  # not JSON, or nested too deeply: untrusted metadata, ignored
            continue
        if isinstance(folders, dict):
            weighted = [
                (_folder_weight(name, content), match.group(1))
                for name, content in folders.items()
                if (match := _KOHYA_FOLDER.match(str(name)))
            ]
            if weighted:
                return [max(weighted, key=lambda item: item[0])[1]], f"{key} (folder name)"
    tags = tag_frequencies(metadata)
    return ([tags[0][0]], "ss_tag_frequency (most frequent tag)") if tags else ([], None)


def _folder_weight(name: str, content) -> float:
    """How much of the training a kohya dataset folder was: images × repeats, else caption tags.
    Untrusted metadata: anything that is not a plain number counts as nothing."""

    def number(value) -> float | None:
        ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
        return float(value) if ok else None

    prefix = str(name).split("_", 1)[0]
    repeats = float(prefix) if prefix.isdigit() else 1.0
    if not isinstance(content, dict):
        return 0.0
    images = number(content.get("img_count"))
    if images is not None:
        return images * (number(content.get("n_repeats")) or repeats)
    return float(sum(value for value in map(number, content.values()) if value is not None))


def tag_frequencies(metadata: dict[str, str], limit: int = 10) -> list[tuple[str, int]]:
    """Kohya's `ss_tag_frequency` summed over datasets, most frequent first."""
    raw = metadata.get("ss_tag_frequency")
    if not raw:
        return []
    try:
        datasets = jsontext.loads(raw)
    except ValueError:
        return []
    counts: dict[str, int] = {}
    if isinstance(datasets, dict):
        for tags in datasets.values():
            if isinstance(tags, dict):
                for tag, count in tags.items():
                    if isinstance(count, int | float) and str(tag).strip():
                        counts[str(tag).strip()] = counts.get(str(tag).strip(), 0) + int(count)
    return sorted(counts.items(), key=lambda item: (-item[1], item[0]))[:limit]


UNET_FAMILY = "UNet (SD 1.x / SDXL)"
FLUX_FAMILY = "FLUX transformer"  # FLUX.1 or FLUX.2: the names shared by both, no width that tells
FLUX1_FAMILY = "FLUX.1 transformer"
FLUX2_FAMILY = "FLUX.2 transformer"
ZIMAGE_FAMILY = "Z-Image transformer"
#: Families a file can be refused as (a "text encoder only" or "unknown" file is left to the loader).
MODEL_FAMILIES = (UNET_FAMILY, FLUX_FAMILY, FLUX1_FAMILY, FLUX2_FAMILY, ZIMAGE_FAMILY)

# Z-Image's blocks in every layout: diffusers' (`layers.0.attention.to_q`), ai-toolkit's
# (`diffusion_model.` + those), kohya/musubi's (`lora_unet_layers_0_attention_qkv`).
_ZIMAGE = re.compile(
    r"(^|[._])(layers|noise_refiner|context_refiner)[._]\d+[._](attention|feed_forward|adaLN_modulation)"
    r"|(^|[._])(cap_embedder|all_x_embedder|all_final_layer)[._]"
)
# Layer names only one FLUX generation has. FLUX.2: fused single-block projections, SwiGLU
# feed-forwards, modulation shared by all blocks. FLUX.1: GELU feed-forwards, per-block modulation.
_FLUX2_ONLY = re.compile(r"to_qkv_mlp_proj|[._]linear_(in|out)[._]|stream_modulation|time_guidance_embed")
_FLUX1_ONLY = re.compile(
    r"proj_mlp|[._]ff(_context)?[._]net[._]|norm1(_context)?[._]linear|time_text_embed|vector_in"
    r"|(img|txt)_mod[._]lin|single_blocks[._]\d+[._]modulation[._]lin"
)
# Where the two share names (BFL, kohya, musubi layouts), the feed-forward widths differ: output
# (input) width over the block's width of each layer, for FLUX.1 and FLUX.2.
_FLUX_WIDTHS = (
    (re.compile(r"(img|txt)_mlp[._]0$"), "out", 4, 6),
    (re.compile(r"(img|txt)_mlp[._]2$"), "in", 4, 3),
    (re.compile(r"linear1$"), "out", 7, 9),
    (re.compile(r"linear2$"), "in", 5, 4),
)
_HALVES = ((".lora_down.weight", ".lora_up.weight"), (".lora_A.weight", ".lora_B.weight"))


def _flux_generation(keys: list[str], shapes: Mapping[str, Sequence[int]] | None) -> str:
    """FLUX.1 or FLUX.2 from the names one of them alone has, else from a feed-forward's widths."""
    if any(_FLUX2_ONLY.search(key) for key in keys):
        return FLUX2_FAMILY
    if any(_FLUX1_ONLY.search(key) for key in keys):
        return FLUX1_FAMILY
    for key in keys if shapes is not None else ():
        for down_suffix, up_suffix in _HALVES:
            if not key.endswith(down_suffix):
                continue
            module = key[: -len(down_suffix)]
            down, up = shapes.get(key), shapes.get(module + up_suffix)
            if not down or not up or len(down) != 2 or len(up) != 2:
                continue
            for pattern, side, flux1, flux2 in _FLUX_WIDTHS:
                if pattern.search(module):
                    # The block's width is the other side of the layer; the ratio is an integer.
                    ratio = up[0] / down[1] if side == "out" else down[1] / up[0]
                    if ratio in (flux1, flux2):
                        return FLUX1_FAMILY if ratio == flux1 else FLUX2_FAMILY
    return FLUX_FAMILY


def lora_family(keys) -> str:
    """What a LoRA file is for, from its tensor names (and shapes, given a mapping name → shape):
    "Z-Image transformer", "FLUX.1 transformer", "FLUX.2 transformer", "FLUX transformer" (FLUX.1
    or FLUX.2: nothing in the file tells which), "UNet (SD 1.x / SDXL)", "text encoder only", or
    "unknown"."""
    shapes = keys if isinstance(keys, Mapping) else None
    keys = list(keys)
    # Z-Image first (its kohya files start with lora_unet_ too), then FLUX's own block names (kohya
    # FLUX files also start with lora_unet_), then UNet names (SD and SDXL attention layers are also
    # called transformer_blocks), then diffusers' FLUX.
    if any(_ZIMAGE.search(key) for key in keys):
        return ZIMAGE_FAMILY
    if any(
        part in key
        for key in keys
        for part in ("double_blocks", "single_blocks", "single_transformer_blocks")
    ) or any(_FLUX2_ONLY.search(key) for key in keys):
        return _flux_generation(keys, shapes)
    unet_parts = ("down_blocks", "up_blocks", "mid_block", "input_blocks", "output_blocks")
    if any(key.startswith(("lora_unet_", "unet.")) or any(p in key for p in unet_parts) for key in keys):
        return UNET_FAMILY
    if any(key.startswith(("transformer.", "diffusion_model.")) for key in keys):
        return _flux_generation(keys, shapes)
    if keys and all(key.startswith(("lora_te", "text_encoder")) for key in keys):
        return "text encoder only"
    return "unknown"


def check_lora_family(keys, source: str, accepted: Sequence[str], model: str) -> None:
    """Refuse a LoRA file whose tensor names (and shapes) say it is for another model family than
    `accepted` (a file that says nothing is left to the loader), naming both: the file's family and
    `model`, what it was given to."""
    family = lora_family(keys)
    if family in MODEL_FAMILIES and family not in accepted:
        first = next(iter(keys), None)
        raise LoraFileError(
            f"{source} is a LoRA for a {family} (keys such as {first!r}), not for {model}; use a LoRA "
            "trained for this model."
        )


_TEXT_ENCODER_PREFIXES = {
    "lora_te_": "text_encoder",
    "lora_te1_": "text_encoder",
    "lora_te2_": "text_encoder_2",
    "text_encoder.": "text_encoder",
    "text_encoder_2.": "text_encoder_2",
}


def text_encoder_parts(keys) -> list[str]:
    """The text encoders a LoRA file also adapts (kohya `lora_te1_…`, diffusers `text_encoder.…`).

    Those parts change the encoded prompt, which every image token reads: they act on the whole
    image and cannot be masked per region."""
    found = {
        part for key in keys for prefix, part in _TEXT_ENCODER_PREFIXES.items() if key.startswith(prefix)
    }
    return sorted(found)


#: The down (A) half of a LoRA layer, whose first axis is the rank: kohya's `.lora_down.weight`,
#: PEFT's `.lora_A[.adapter].weight`, XLabs' `.processor.qkv_lora1.down.weight`.
_DOWN_KEY = re.compile(r"\.lora_down\.|\.lora_A\.|_lora\d*\.down\.weight$")
_LAYER_SUFFIX = re.compile(r"\.(lora_down|lora_A|lora_up|lora_B|alpha|down|up)(\.weight)?$")


def describe_lora(path: str | Path) -> dict:
    """What `freefuse inspect` shows: layout, architecture, rank, adapted layers, trigger words and
    where they came from, selected metadata. Read from the safetensors header alone."""
    path = check_lora_path(path)
    header = read_header(path)
    metadata = header_metadata(header)
    shapes = {key: info.get("shape", []) for key, info in header.items() if key != "__metadata__"}
    bundled = {key: shapes.pop(key) for key in list(shapes) if is_bundle_key(key)}
    ranks = sorted(
        {
            int(shape[0])
            for key, shape in shapes.items()
            if isinstance(shape, list) and len(shape) == 2 and _DOWN_KEY.search(key)
        }
    )
    layers = {_LAYER_SUFFIX.sub("", key) for key in shapes}
    shown = (
        "ss_output_name",
        "ss_base_model_version",
        "ss_network_dim",
        "ss_network_alpha",
        "modelspec.title",
        "modelspec.architecture",
        "modelspec.trigger_phrase",
        "trigger_word",
        "trigger_words",
    )
    words, source = trigger_words_and_source(metadata)
    if not words and bundled:
        try:
            words = sorted({split_bundle_key(key)[0] for key in bundled})
        except EmbeddingError as error:
            raise LoraFileError(f"{path.name}: {error}") from None
        source = "bundled embeddings"
    return {
        "path": str(path),
        "layout": detect_layout(shapes),
        "for": lora_family(shapes),
        "sha256": sha256_file(path),
        "size_bytes": path.stat().st_size,
        "tensors": len(shapes),
        "rank": ranks,
        "layers": len(layers),
        "text_encoder": (
            f"{', '.join(parts)}: applied to the whole prompt, not masked per region"
            if (parts := text_encoder_parts(shapes))
            else "none"
        ),
        "trigger_words": words,
        "trigger_words_from": source or "none found",
        "bundled_embeddings": (
            ", ".join(f"{key[len('bundle_emb.') :]} {shape}" for key, shape in sorted(bundled.items()))
            + ": loaded into the text encoders with the LoRA"
            if bundled
            else "none"
        ),
        "top_tags": [f"{tag} ({count})" for tag, count in tag_frequencies(metadata, limit=5)],
        "metadata": {key: metadata[key][:200] for key in shown if key in metadata},
    }
