"""Tokenization and the word map."""

from __future__ import annotations

import pytest

from captioner.vocab import END_ID, PAD_ID, SPECIAL_TOKENS, START_ID, UNK_ID, Vocabulary, tokenize
from tests.conftest import shared_dir


def test_tokenize_lowercases_and_drops_punctuation_like_the_karpathy_split() -> None:
    assert tokenize("A Dog, running!  Fast.") == ["a", "dog", "running", "fast"]
    assert tokenize("The man's hat -- isn't \"red\"") == ["the", "mans", "hat", "isnt", "red"]
    assert tokenize("  \t\n") == []


def test_build_keeps_frequent_words_most_frequent_first() -> None:
    captions = [["a", "dog"], ["a", "cat"], ["a", "dog", "runs"]]
    vocabulary = Vocabulary.build(captions, min_count=2)
    assert vocabulary.tokens == (*SPECIAL_TOKENS, "a", "dog")
    assert (vocabulary.pad_id, vocabulary.start_id, vocabulary.end_id, vocabulary.unk_id) == (
        PAD_ID,
        START_ID,
        END_ID,
        UNK_ID,
    )
    assert "cat" not in vocabulary and "dog" in vocabulary


def test_encode_decode_round_trip_with_unknown_words_and_cutting() -> None:
    vocabulary = Vocabulary.build([["a", "dog", "runs"]], min_count=1)
    ids = vocabulary.encode(["a", "zebra", "runs"])
    assert ids[0] == START_ID and ids[-1] == END_ID and ids[2] == UNK_ID
    assert vocabulary.decode(ids) == ["a", "<unk>", "runs"]
    assert vocabulary.encode(["a", "dog", "runs"], max_length=2) == [
        START_ID,
        vocabulary.id("a"),
        vocabulary.id("dog"),
        END_ID,
    ]
    assert vocabulary.decode([START_ID, vocabulary.id("dog"), END_ID, vocabulary.id("a")]) == ["dog"]
    assert Vocabulary.from_json(vocabulary.to_json()) == vocabulary


def test_malformed_vocabularies_are_refused() -> None:
    with pytest.raises(ValueError, match="start with"):
        Vocabulary(("a", "b"))
    with pytest.raises(ValueError, match="repeat"):
        Vocabulary((*SPECIAL_TOKENS, "a", "a"))


def test_vocabulary_of_the_real_flickr8k_captions() -> None:
    shared = shared_dir()
    if shared is None or not (shared / "data/flickr8k/Flickr8k.token.txt").is_file():
        pytest.skip("../shared/data/flickr8k is absent (it exists only beside the project's own checkout)")
    lines = (shared / "data/flickr8k/Flickr8k.token.txt").read_text(encoding="utf-8").splitlines()
    captions = [tokenize(line.split("\t", 1)[1]) for line in lines if "\t" in line]
    assert len(captions) == 40460
    vocabulary = Vocabulary.build(captions, min_count=5)
    # Words of a real caption corpus: common ones kept, no punctuation or capitals survive.
    assert {"dog", "man", "running", "beach"} <= set(vocabulary.tokens)
    assert all(token.islower() or token in SPECIAL_TOKENS or token.isdigit() for token in vocabulary.tokens)
    assert 2000 < len(vocabulary) < 4000
    unknown = sum(token == UNK_ID for c in captions for token in vocabulary.encode(c))
    assert unknown / sum(len(c) for c in captions) < 0.03  # rare words fall to <unk>: about 2%
