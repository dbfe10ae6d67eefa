"""Activation words → T5 token positions (the positions the FLUX transformer sees)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from freefuse.testing import tiny_t5_tokenizer
from freefuse.tokens import WordNotFoundError, find_word, truncation_note, word_spans

TOKENIZER = tiny_t5_tokenizer()


def pipeline_ids(prompt: str, max_length: int = 64) -> list[int]:
    """Token ids exactly as FluxPipeline encodes the prompt for T5."""
    return TOKENIZER(prompt, padding="max_length", max_length=max_length, truncation=True)["input_ids"]


def spelled(prompt: str, positions) -> str:
    ids = pipeline_ids(prompt)
    return "".join(TOKENIZER.convert_ids_to_tokens([ids[i] for i in positions])).replace("▁", " ").strip()


def test_single_token_word() -> None:
    match = find_word(TOKENIZER, "Alice hugging Bob", "Bob")
    assert match.positions == (2,)
    assert spelled("Alice hugging Bob", match.positions) == "Bob"


def test_multi_token_word_covers_all_its_pieces() -> None:
    prompt = "a Zorblax hugging Bob"
    match = find_word(TOKENIZER, prompt, "Zorblax")
    assert len(match.positions) > 1
    assert match.positions == tuple(range(match.positions[0], match.positions[-1] + 1))
    assert spelled(prompt, match.positions) == "Zorblax"


def test_repeated_word_takes_every_occurrence() -> None:
    prompt = "Bob and Alice, then Bob again"
    match = find_word(TOKENIZER, prompt, "bob")
    assert len(match.spans) == 2
    assert spelled(prompt, match.positions[:1]) == "Bob"
    assert len(match.positions) == 2


def test_case_insensitive_and_punctuation_stays_out() -> None:
    prompt = "ALICE, alice. (Alice)!"
    match = find_word(TOKENIZER, prompt, "Alice")
    assert len(match.spans) == 3
    pieces = TOKENIZER.convert_ids_to_tokens([pipeline_ids(prompt)[i] for i in match.positions])
    assert not any(piece.strip("▁") in {",", ".", "(", ")", "!"} for piece in pieces)


def test_phrase_of_several_words() -> None:
    prompt = "the red fox and a dog"
    match = find_word(TOKENIZER, prompt, "red  fox")
    assert spelled(prompt, match.positions) == "red fox"


def test_word_inside_another_word_is_not_a_match() -> None:
    with pytest.raises(WordNotFoundError, match="only inside other words"):
        find_word(TOKENIZER, "Always smiling", "Al")
    assert word_spans("Al's hat, Always", "Al") == [(0, 2)]


def test_missing_word_lists_the_prompt_tokens() -> None:
    with pytest.raises(WordNotFoundError, match=r"not in the prompt.*'▁Alice' '▁hugging'"):
        find_word(TOKENIZER, "Alice hugging", "Bob")


def test_word_past_the_token_limit_is_cut_off() -> None:
    prompt = "Alice hugging Bob in the snow with Carol"
    with pytest.raises(WordNotFoundError, match="6-token limit"):
        find_word(TOKENIZER, prompt, "Carol", max_length=6)
    assert find_word(TOKENIZER, prompt, "Bob", max_length=6).positions == (2,)
    note = truncation_note(TOKENIZER, prompt, 6)
    assert note is not None and "snow with Carol" in note
    assert truncation_note(TOKENIZER, "Alice", 6) is None


def test_empty_word_is_an_error() -> None:
    with pytest.raises(WordNotFoundError, match="empty"):
        find_word(TOKENIZER, "Alice", "  ")


WORDS = st.sampled_from(["Alice", "bob", "Zorblax", "red fox", "Al", "snow"])
FILLER = st.lists(
    st.sampled_from(["hugging", "the", "in", ",", ".", "Always", "and", "x", "Zorb"]), max_size=8
)


@settings(max_examples=200, deadline=None)
@given(word=WORDS, before=FILLER, after=FILLER, upper=st.booleans())
def test_found_positions_spell_the_word(word: str, before: list[str], after: list[str], upper: bool) -> None:
    written = word.upper() if upper else word
    prompt = " ".join([*before, written, *after])
    match = find_word(TOKENIZER, prompt, word)
    assert match.positions, prompt
    ids = pipeline_ids(prompt, max_length=128)
    text = TOKENIZER.decode([ids[i] for i in match.positions]).replace(" ", "").lower()
    assert word.replace(" ", "").lower() in text


def test_words_in_scripts_without_spaces_match_inside_the_text() -> None:
    from freefuse.tokens import shared_word

    assert word_spans("爱丽丝拥抱鲍勃", "鲍勃") == [(5, 7)]
    assert word_spans("アリスとボブ", "アリス") == [(0, 3)]
    assert word_spans("Alice hugging", "Al") == []  # spaced scripts keep the whole-word rule
    assert shared_word({"a": ["爱丽丝"], "b": ["爱丽丝的猫"]}) == ("a", "b", "爱丽丝", "爱丽丝的猫")
