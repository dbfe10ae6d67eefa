"""Trigger-word embeddings bundled in LoRA files (pivotal tuning).

Character LoRAs are often trained with their trigger word's embedding (textual inversion + LoRA,
"pivotal tuning"). OneTrainer stores that embedding inside the LoRA file, one tensor per text
encoder, under `bundle_emb.<placeholder>.<encoder>` (`clip_l`, `clip_g`, `t5`); kohya's older
form is `bundle_emb.<placeholder>.string_to_param.*` (one CLIP encoder). ComfyUI reads both. A
LoRA loaded without its embedding still loads, but its trigger word means what the base model
thinks it means, and the LoRA draws its subject worse.

`add_lora` puts each bundled embedding into the pipeline's text encoder: a placeholder the
tokenizer does not know becomes a new token (diffusers' `load_textual_inversion`); a placeholder
that is already one token of the vocabulary gets its embedding row replaced. `remove` puts every
row and token back.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .errors import EmbeddingError

if TYPE_CHECKING:  # torch is imported where tensors are changed: `inspect` reads headers only
    import torch

BUNDLE_PREFIX = "bundle_emb."
MAX_PLACEHOLDER_CHARS = 100
#: kohya's single-encoder form, read as the first CLIP encoder.
_KOHYA_SUFFIX = ".string_to_param.*"
#: OneTrainer's "output embeddings" (`t5_out`, `clip_l_out`) change what the encoder puts out, not its input.
_OUTPUT_SUFFIX = "_out"


def is_bundle_key(key: str) -> bool:
    return key.startswith(BUNDLE_PREFIX)


def split_bundle_key(key: str) -> tuple[str, str]:
    """`bundle_emb.<placeholder>.<encoder>` → (placeholder, encoder); kohya's form reads as `clip_l`."""
    rest = key[len(BUNDLE_PREFIX) :]
    if rest.endswith(_KOHYA_SUFFIX):
        placeholder, encoder = rest[: -len(_KOHYA_SUFFIX)], "clip_l"
    else:
        placeholder, _, encoder = rest.rpartition(".")
    if not placeholder or not encoder:
        raise EmbeddingError(f"Bundled embedding key {key!r} is not `bundle_emb.<placeholder>.<encoder>`.")
    if len(placeholder) > MAX_PLACEHOLDER_CHARS or any(char.isspace() or not char.isprintable() for char in placeholder):
        raise EmbeddingError(
            f"Bundled embedding key {key[:120]!r} has no usable trigger word: a placeholder is one word of at most "
            f"{MAX_PLACEHOLDER_CHARS} printable characters, without spaces."
        )
    return placeholder, encoder


def check_bundle_shape(placeholder: str, encoder: str, shape) -> None:
    """A bundled embedding is `[n_vectors, width]` (or `[width]`, one vector) with no empty axis;
    `shape` from the tensor or from the file's header."""
    shape = tuple(shape)
    if not shape or any(not isinstance(size, int) or size < 1 for size in shape):
        raise EmbeddingError(
            f"bundles an embedding for {placeholder!r} ({encoder}) of shape {list(shape)}; an embedding is "
            "[vectors, width] (or [width] for one vector). The file is damaged: export it again, or use a copy "
            "without `bundle_emb.*` tensors."
        )


def bundled_embeddings(state_dict: Mapping[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """placeholder → {encoder key: `[n_vectors, width]`} from a LoRA file's tensors (empty if none)."""
    found: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state_dict.items():
        if not is_bundle_key(key):
            continue
        placeholder, encoder = split_bundle_key(key)
        check_bundle_shape(placeholder, encoder, value.shape)
        vectors = value if value.ndim == 2 else value.reshape(-1, value.shape[-1])
        found.setdefault(placeholder, {})[encoder] = vectors
    return found


@dataclass
class InstalledEmbeddings:
    """What `install` changed, so that `uninstall` can put it back."""

    #: (tokenizer, text encoder, token) of tokens added to a tokenizer.
    added: list[tuple[object, torch.nn.Module, str]] = field(default_factory=list)
    #: (text encoder, token id, the row it had) of rows replaced in place.
    replaced: list[tuple[torch.nn.Module, int, torch.Tensor]] = field(default_factory=list)
    #: "placeholder/encoder" pairs, for the manifest.
    names: list[str] = field(default_factory=list)


def check_embeddings(
    embeddings: dict[str, dict[str, torch.Tensor]],
    slots: Mapping[str, tuple[str, str]],
    pipeline,
    source: str,
    taken: Mapping[str, str] = {},
) -> None:
    """Everything `install` needs, checked before any weights change.

    Args:
        embeddings: `bundled_embeddings` of the file.
        slots: encoder key → (tokenizer attribute, text encoder attribute) of this architecture.
        source: the file's name, for messages.
        taken: placeholder → who already set that word's embedding ("LoRA 'alice'").
    """
    for placeholder, per_encoder in embeddings.items():
        if placeholder in taken:
            raise EmbeddingError(
                f"{source} bundles an embedding for {placeholder!r}, and {taken[placeholder]} already set that "
                "word's embedding; two LoRAs cannot both define one word. Remove the other LoRA first."
            )
        for encoder, vectors in per_encoder.items():
            if encoder.endswith(_OUTPUT_SUFFIX):
                raise EmbeddingError(
                    f"{source} bundles an output embedding {encoder!r} for {placeholder!r}; FreeFuse reads input "
                    "embeddings only. Re-save the LoRA without it (or without `bundle_additional_embeddings`)."
                )
            if encoder not in slots:
                raise EmbeddingError(
                    f"{source} bundles an embedding for text encoder {encoder!r}, which this model does not have "
                    f"(it has {sorted(slots)}); the LoRA was made for another model."
                )
            if vectors.shape[0] != 1:
                raise EmbeddingError(
                    f"{source} bundles {vectors.shape[0]} vectors for {placeholder!r} ({encoder}); FreeFuse reads "
                    "one-vector embeddings (one token per trigger word). Re-train with one token per embedding."
                )
            encoder_module = getattr(pipeline, slots[encoder][1], None)
            if encoder_module is None:
                raise EmbeddingError(
                    f"{source} bundles an embedding for {encoder!r}, but this pipeline has no {slots[encoder][1]}."
                )
            width = encoder_module.get_input_embeddings().weight.shape[1]
            if vectors.shape[1] != width:
                raise EmbeddingError(
                    f"{source} bundles a {vectors.shape[1]}-wide embedding for {placeholder!r} ({encoder}), but the "
                    f"model's {slots[encoder][1]} embeds tokens in {width}; the LoRA was made for another model."
                )


def install(
    embeddings: dict[str, dict[str, torch.Tensor]], slots: Mapping[str, tuple[str, str]], pipeline
) -> InstalledEmbeddings:
    """Put each embedding into its text encoder (call `check_embeddings` first). On error, nothing stays changed."""
    import torch

    installed = InstalledEmbeddings()
    try:
        for placeholder, per_encoder in embeddings.items():
            for encoder, vectors in per_encoder.items():
                tokenizer = getattr(pipeline, slots[encoder][0])
                text_encoder = getattr(pipeline, slots[encoder][1])
                table = text_encoder.get_input_embeddings().weight
                ids = tokenizer(placeholder, add_special_tokens=False)["input_ids"]
                if len(ids) == 1 and tokenizer.convert_ids_to_tokens(ids[0]) != tokenizer.unk_token:
                    # Already one token (a ShapesWorld subject word, a rare word): its row is replaced.
                    installed.replaced.append((text_encoder, ids[0], table[ids[0]].detach().clone()))
                    with torch.no_grad():
                        table[ids[0]] = vectors[0].to(table.dtype)
                else:
                    pipeline.load_textual_inversion(
                        vectors.to(table.dtype),
                        token=placeholder,
                        tokenizer=tokenizer,
                        text_encoder=text_encoder,
                    )
                    installed.added.append((tokenizer, text_encoder, placeholder))
                installed.names.append(f"{placeholder}/{encoder}")
    except BaseException:
        uninstall(installed, pipeline)
        raise
    return installed


def uninstall(installed: InstalledEmbeddings, pipeline) -> None:
    """Every replaced row and added token back as before `install`."""
    import torch

    for text_encoder, token_id, row in reversed(installed.replaced):
        with torch.no_grad():
            text_encoder.get_input_embeddings().weight[token_id] = row
    for tokenizer, text_encoder, token in reversed(installed.added):
        pipeline.unload_textual_inversion(tokens=[token], tokenizer=tokenizer, text_encoder=text_encoder)
    installed.replaced.clear()
    installed.added.clear()
