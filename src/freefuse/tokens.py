"""Activation words → token positions, from a fast tokenizer's character offsets.

A word matches whole words only, case-insensitively: "Al" matches "al" and "AL" but not the "Al"
of "Always". A word may be several words ("ohwx man") and may span several tokens; every
occurrence in the prompt counts.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import WordNotFoundError


@dataclass(frozen=True)
class WordMatch:
    """Where one activation word sits in a prompt: character spans and the token positions they cover."""

    word: str
    spans: tuple[tuple[int, int], ...]
    positions: tuple[int, ...]


# Scripts written without spaces between words (Chinese, Japanese, Thai, ...): a word there is
# matched wherever it stands, since there are no word boundaries to look for.
_UNSPACED = re.compile(r"[\u0e00-\u0e7f\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uac00-\ud7af]")


def word_spans(prompt: str, word: str) -> list[tuple[int, int]]:
    """Character spans of whole-word, case-insensitive occurrences of `word` in `prompt` (for a word
    in a script written without spaces, every occurrence)."""
    word = word.strip()
    if not word:
        return []
    body = r"\s+".join(re.escape(part) for part in word.split())
    pattern = body if _UNSPACED.search(word) else r"(?<!\w)" + body + r"(?!\w)"
    return [match.span() for match in re.finditer(pattern, prompt, flags=re.IGNORECASE)]


def describe_tokens(tokenizer, prompt: str, limit: int = 80) -> str:
    """The prompt's tokens as the model sees them, for error messages."""
    pieces = tokenizer.convert_ids_to_tokens(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    shown = " ".join(repr(piece) for piece in pieces[:limit])
    return shown + (f" … (+{len(pieces) - limit} more)" if len(pieces) > limit else "")


def find_word(tokenizer, prompt: str, word: str, max_length: int | None = None) -> WordMatch:
    """Token positions of every whole-word occurrence of `word` in `prompt`.

    Args:
        tokenizer: a fast tokenizer (it must return offset mappings).
        prompt: the text the model encodes.
        word: the activation word or phrase.
        max_length: the model's token limit; occurrences past it are cut off and do not count.

    Raises:
        WordNotFoundError: with the prompt's tokens, when the word is absent, occurs only inside
            other words, or every occurrence lies past `max_length`.
    """
    if not word or not word.strip():
        raise WordNotFoundError(
            "An activation word is empty; pass the LoRA's trigger word, e.g. `words=['ohwx']`."
        )
    if max_length is not None:
        word_tokens = len(tokenizer(word.strip(), add_special_tokens=False)["input_ids"])
        if word_tokens > max_length - 1:
            raise WordNotFoundError(
                f"Activation word {word[:40]!r}… is {word_tokens} tokens long, more than the text encoder's "
                f"{max_length}-token limit; use the LoRA's short trigger word."
            )
    spans = word_spans(prompt, word)
    if not spans:
        inside = [
            m.group(0) for m in re.finditer(r"\w*" + re.escape(word.strip()) + r"\w*", prompt, re.IGNORECASE)
        ]
        if inside:
            raise WordNotFoundError(
                f"Activation word {word!r} appears only inside other words ({', '.join(map(repr, inside[:3]))}); "
                f"it must stand as a whole word in the prompt {prompt!r}."
            )
        raise WordNotFoundError(
            f"Activation word {word!r} is not in the prompt {prompt!r}. Put it in the prompt, or fix the "
            f"LoRA's words. The prompt's tokens are: {describe_tokens(tokenizer, prompt)}"
        )
    encoding = tokenizer(prompt, return_offsets_mapping=True, add_special_tokens=True, truncation=False)
    offsets = encoding["offset_mapping"]
    # The last position before the limit holds the end-of-sequence token once the prompt is cut.
    usable = len(offsets) if max_length is None or len(offsets) <= max_length else max_length - 1
    positions: list[int] = []
    kept_spans: list[tuple[int, int]] = []
    for start, end in spans:
        covered = [i for i, (s, e) in enumerate(offsets) if e > s and s < end and e > start]
        inside_limit = [i for i in covered if i < usable]
        if covered and len(inside_limit) == len(covered):
            positions.extend(covered)
            kept_spans.append((start, end))
    if not positions:
        raise WordNotFoundError(
            f"Activation word {word!r} lies past the {max_length}-token limit of the text encoder and is cut "
            f"off; move it earlier in the prompt or shorten the prompt ({len(offsets)} tokens)."
        )
    return WordMatch(word=word, spans=tuple(kept_spans), positions=tuple(sorted(set(positions))))


def truncation_note(tokenizer, prompt: str, max_length: int) -> str | None:
    """A message saying what the token limit cuts from `prompt`, or None if it all fits."""
    encoding = tokenizer(prompt, return_offsets_mapping=True, add_special_tokens=True, truncation=False)
    offsets = encoding["offset_mapping"]
    if len(offsets) <= max_length:
        return None
    cut_from = offsets[max_length - 1][0]
    return (
        f"The prompt has {len(offsets)} tokens; the text encoder keeps {max_length}, so this part is cut: "
        f"{prompt[cut_from:]!r}"
    )


def shared_word(words_by_subject: dict[str, list[str]]) -> tuple[str, str, str, str] | None:
    """Two subjects whose activation words are the same or overlap ("Alice" in "Alice hugging"):
    `(subject, other subject, its word, the other's word)`, or None. FreeFuse tells subjects apart
    by their words, so such subjects cannot get masks of their own."""
    names = list(words_by_subject)
    for index, name in enumerate(names):
        for other in names[index + 1 :]:
            for word in words_by_subject[name]:
                for other_word in words_by_subject[other]:
                    if word_spans(other_word, word) or word_spans(word, other_word):
                        return name, other, word, other_word
    return None
