"""Activation words → token positions, from a fast tokenizer's character offsets.

A word matches whole words only, case-insensitively: "Al" matches "al" and "AL" but not the "Al"
of "Always". A word may be several words ("ohwx man") and may span several tokens; every
occurrence in the prompt counts.
"""

from __future__ import annotations

import bisect
import functools
import re
from collections import OrderedDict
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


class RememberingTokenizer:
    """A tokenizer that remembers its last `size` answers: the checks of a batch's jobs tokenize the
    same few prompts and words thousands of times. Everything else is the tokenizer's own."""

    def __init__(self, tokenizer, size: int = 4096) -> None:
        self.tokenizer, self.size = tokenizer, size
        self._answers: OrderedDict[tuple, object] = OrderedDict()

    def __call__(self, text, **options):
        if not isinstance(text, str):
            return self.tokenizer(text, **options)
        key = (text, tuple(sorted(options.items())))
        answer = self._answers.get(key)
        if answer is None:
            answer = self._answers[key] = self.tokenizer(text, **options)
            if len(self._answers) > self.size:
                self._answers.popitem(last=False)
        return answer

    def __getattr__(self, name: str):
        return getattr(self.tokenizer, name)


@dataclass(frozen=True)
class PromptTokens:
    """A prompt tokenized once (special tokens added, not truncated): its token ids and each token's
    character span. A check asks many questions of one prompt (each word of each subject, what the
    limit cuts, which tokens two subjects share); this answers them without tokenizing again."""

    prompt: str
    ids: tuple[int, ...]
    offsets: tuple[tuple[int, int], ...]

    @classmethod
    def of(cls, tokenizer, prompt: str) -> PromptTokens:
        encoding = tokenizer(prompt, return_offsets_mapping=True, add_special_tokens=True, truncation=False)
        offsets = tuple((int(start), int(end)) for start, end in encoding["offset_mapping"])
        return cls(prompt=prompt, ids=tuple(encoding["input_ids"]), offsets=offsets)

    def __len__(self) -> int:
        return len(self.offsets)

    @functools.cached_property
    def _sorted(self) -> tuple[list[int], list[int], list[int]] | None:
        """(token index, start, end) of the tokens that cover text, in order; None if their spans are
        not in text order (then `covering` scans)."""
        tokens = [(index, start, end) for index, (start, end) in enumerate(self.offsets) if end > start]
        starts = [start for _, start, _ in tokens]
        ends = [end for _, _, end in tokens]
        ordered = all(a <= b for a, b in zip(starts, starts[1:], strict=False)) and all(
            a <= b for a, b in zip(ends, ends[1:], strict=False)
        )
        return ([index for index, _, _ in tokens], starts, ends) if ordered else None

    def covering(self, start: int, end: int) -> list[int]:
        """Positions of the tokens whose text overlaps characters [start, end): a binary search and
        the tokens found, not a scan of the prompt."""
        if self._sorted is None:
            return [i for i, (s, e) in enumerate(self.offsets) if e > s and s < end and e > start]
        indices, starts, ends = self._sorted
        found = []
        for j in range(bisect.bisect_right(ends, start), len(indices)):
            if starts[j] >= end:
                break
            found.append(indices[j])
        return found


def describe_tokens(tokenizer, prompt: str, limit: int = 80, tokens: PromptTokens | None = None) -> str:
    """The prompt's tokens as the model sees them (special tokens left out), for error messages."""
    if tokens is None:
        ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    else:
        special = set(getattr(tokenizer, "all_special_ids", None) or ()) - {getattr(tokenizer, "unk_token_id", None)}
        ids = [token for token in tokens.ids if token not in special]  # the ones tokenizing added, not <unk>
    shown = " ".join(repr(piece) for piece in tokenizer.convert_ids_to_tokens(list(ids[:limit])))
    return shown + (f" … (+{len(ids) - limit} more)" if len(ids) > limit else "")


def _inside_words(prompt: str, word: str, limit: int = 3) -> list[str]:
    """Up to `limit` words of `prompt` that hold `word` inside them (for the message), each cut to
    a few dozen characters around it: bounded work however long the prompt."""
    found = []
    for match in re.finditer(re.escape(word), prompt, re.IGNORECASE):
        before = _WORD_END.search(prompt[max(0, match.start() - 40) : match.start()])
        after = _WORD_START.match(prompt, match.end(), min(len(prompt), match.end() + 40))
        found.append((before.group() if before else "") + match.group() + (after.group() if after else ""))
        if len(found) == limit:
            break
    return found


_WORD_END = re.compile(r"\w*\Z")
_WORD_START = re.compile(r"\w*")


def find_word(
    tokenizer, prompt: str, word: str, max_length: int | None = None, tokens: PromptTokens | None = None
) -> WordMatch:
    """Token positions of every whole-word occurrence of `word` in `prompt`.

    Args:
        tokenizer: a fast tokenizer (it must return offset mappings).
        prompt: the text the model encodes.
        word: the activation word or phrase.
        max_length: the model's token limit; occurrences past it are cut off and do not count.
        tokens: `PromptTokens.of(tokenizer, prompt)` when the caller has it already.

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
        inside = _inside_words(prompt, word.strip())
        if inside:
            raise WordNotFoundError(
                f"Activation word {word!r} appears only inside other words ({', '.join(map(repr, inside))}); "
                f"it must stand as a whole word in the prompt {prompt!r}."
            )
        raise WordNotFoundError(
            f"Activation word {word!r} is not in the prompt {prompt!r}. Put it in the prompt, or fix the "
            f"LoRA's words. The prompt's tokens are: {describe_tokens(tokenizer, prompt, tokens=tokens)}"
        )
    tokens = tokens if tokens is not None else PromptTokens.of(tokenizer, prompt)
    # The last position before the limit holds the end-of-sequence token once the prompt is cut.
    usable = len(tokens) if max_length is None or len(tokens) <= max_length else max_length - 1
    positions: list[int] = []
    kept_spans: list[tuple[int, int]] = []
    for start, end in spans:
        covered = tokens.covering(start, end)
        if covered and max(covered) < usable:
            positions.extend(covered)
            kept_spans.append((start, end))
    if not positions:
        raise WordNotFoundError(
            f"Activation word {word!r} lies past the {max_length}-token limit of the text encoder and is cut "
            f"off; move it earlier in the prompt or shorten the prompt ({len(tokens)} tokens)."
        )
    return WordMatch(word=word, spans=tuple(kept_spans), positions=tuple(sorted(set(positions))))


def truncation_note(tokenizer, prompt: str, max_length: int, tokens: PromptTokens | None = None) -> str | None:
    """A message saying what the token limit cuts from `prompt`, or None if it all fits."""
    tokens = tokens if tokens is not None else PromptTokens.of(tokenizer, prompt)
    if len(tokens) <= max_length:
        return None
    cut_from = tokens.offsets[max_length - 1][0]
    return (
        f"The prompt has {len(tokens)} tokens; the text encoder keeps {max_length}, so this part is cut: "
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
