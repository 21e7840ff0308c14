"""Tokenization and the word map, shared by training and inference.

Text is normalised the way the Karpathy split prepares COCO and Flickr captions: lowercase,
ASCII punctuation removed, split on whitespace. nltk's whitespace tokenizer needs no downloaded data.
"""

from __future__ import annotations

import string
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import cache

PAD, START, END, UNK = "<pad>", "<start>", "<end>", "<unk>"
SPECIAL_TOKENS = (PAD, START, END, UNK)
PAD_ID, START_ID, END_ID, UNK_ID = range(4)  # fixed: every vocabulary starts with SPECIAL_TOKENS

_PUNCTUATION = str.maketrans("", "", string.punctuation)


@cache
def _whitespace_tokenizer():  # noqa: ANN202 - nltk.tokenize.WhitespaceTokenizer
    # nltk takes seconds to import; inference never tokenizes, so only training and scoring pay for it.
    from nltk.tokenize import WhitespaceTokenizer

    return WhitespaceTokenizer()


def tokenize(text: str) -> list[str]:
    """Lowercase, drop punctuation and split: ``"A dog, running!"`` -> ``["a", "dog", "running"]``."""
    return _whitespace_tokenizer().tokenize(text.lower().translate(_PUNCTUATION))


@dataclass(frozen=True)
class Vocabulary:
    """An ordered word list; the four special tokens always come first (``<pad>`` is id 0)."""

    tokens: tuple[str, ...]

    def __post_init__(self) -> None:
        if tuple(self.tokens[: len(SPECIAL_TOKENS)]) != SPECIAL_TOKENS:
            raise ValueError(f"a vocabulary must start with {SPECIAL_TOKENS}")
        if len(set(self.tokens)) != len(self.tokens):
            raise ValueError("a vocabulary must not repeat a token")
        object.__setattr__(self, "_index", {token: i for i, token in enumerate(self.tokens)})

    @classmethod
    def build(cls, captions: Iterable[Sequence[str]], min_count: int = 5) -> Vocabulary:
        """Words seen at least ``min_count`` times in the tokenized captions, most frequent first."""
        counts = Counter(word for caption in captions for word in caption)
        kept = sorted(
            (w for w, n in counts.items() if n >= min_count and w not in SPECIAL_TOKENS),
            key=lambda w: (-counts[w], w),
        )
        return cls(SPECIAL_TOKENS + tuple(kept))

    def __len__(self) -> int:
        return len(self.tokens)

    def __contains__(self, word: str) -> bool:
        return word in self._index  # type: ignore[attr-defined]

    @property
    def pad_id(self) -> int:
        return PAD_ID

    @property
    def start_id(self) -> int:
        return START_ID

    @property
    def end_id(self) -> int:
        return END_ID

    @property
    def unk_id(self) -> int:
        return UNK_ID

    def id(self, word: str) -> int:
        return self._index.get(word, self.unk_id)  # type: ignore[attr-defined]

    def encode(self, words: Sequence[str], max_length: int | None = None) -> list[int]:
        """``<start> w1 .. wn <end>`` as ids; words beyond ``max_length`` are cut off."""
        if max_length is not None:
            words = words[:max_length]
        return [self.start_id, *(self.id(w) for w in words), self.end_id]

    def decode(self, ids: Iterable[int]) -> list[str]:
        """The words up to the first ``<end>``; ``<start>`` and ``<pad>`` are skipped."""
        words = []
        for i in ids:
            if i == self.end_id:
                break
            if i in (self.start_id, self.pad_id):
                continue
            words.append(self.tokens[i])
        return words

    def to_json(self) -> dict:
        return {"tokens": list(self.tokens)}

    @classmethod
    def from_json(cls, data: dict) -> Vocabulary:
        return cls(tuple(data["tokens"]))
