"""A batch of documents as one array of code points, for rules that look at every word.

Python's per-word strings cost ~100 ns each (a split alone reads ~20 MB/s); here the words of
a whole batch are found, measured and hashed with a few numpy passes instead, so the Gopher
rules and decontamination read tens of MB/s. Two kinds of word:

- ``tokens``: whitespace-separated tokens with surrounding punctuation (`PUNCTUATION`) stripped,
  tokens of punctuation alone dropped (the Gopher rules);
- ``alnum``: runs of letters, digits and `_` (Python's ``\\w``; decontamination).

A word's hash is a 64-bit polynomial hash of its code points (lowercased on request), the
same for the same word in any document and any process.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import numpy as np

PUNCTUATION = "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~«»‘’‚“”„…–—·¡¿•‣◦▪▫■□●○◆➢►"
"""Stripped from both ends of a token (bullets included: a bullet alone is not a word)."""
_BASE = np.uint64(0x100000001B3)  # odd: invertible modulo 2**64
_BASE_INV = np.uint64(pow(0x100000001B3, -1, 2**64))
_MIX = np.uint64(0x9E3779B97F4A7C15)
MAX_CHARS = 1_000_000  # code points per batch: bounds the memory of one pass (~50 MB)


@cache
def _tables() -> dict[str, np.ndarray]:
    """Per code point of the Basic Multilingual Plane: space, punctuation, letter, word
    character, lowercase (built once per process, ~50 ms)."""
    chars = [chr(c) for c in range(0x10000)]
    punct = np.zeros(0x10000, bool)
    punct[[ord(c) for c in PUNCTUATION]] = True
    lower = np.arange(0x10000, dtype=np.uint32)
    for c, ch in enumerate(chars):
        low = ch.lower()
        if len(low) == 1:
            lower[c] = ord(low)
    return {
        "space": np.array([ch.isspace() for ch in chars]),
        "punct": punct,
        "alpha": np.array([ch.isalpha() for ch in chars]),
        "word": np.array([ch.isalnum() or ch == "_" for ch in chars]),
        "lower": lower,
    }


def _classify(codes: np.ndarray, name: str) -> np.ndarray:
    """The table `name` applied to `codes`; code points beyond the BMP asked one by one."""
    table = _tables()[name]
    out = table[np.minimum(codes, 0xFFFF)]
    astral = codes > 0xFFFF
    if astral.any():
        distinct = np.unique(codes[astral])
        probe = {"space": str.isspace, "punct": lambda c: c in PUNCTUATION,
                 "alpha": str.isalpha, "word": lambda c: c.isalnum() or c == "_",
                 "lower": lambda c: ord(c.lower()) if len(c.lower()) == 1 else ord(c)}[name]
        values = np.array([probe(chr(c)) for c in distinct], dtype=out.dtype)
        out[astral] = values[np.searchsorted(distinct, codes[astral])]
    return out


@dataclass
class Words:
    """The words of a batch: spans [first, last] in `TextBatch.codes`, in order."""

    first: np.ndarray  # int64 position of each word's first code point
    last: np.ndarray  # int64 position of its last
    doc: np.ndarray  # int64 index of its document in the batch

    @property
    def lengths(self) -> np.ndarray:
        return self.last - self.first + 1


class TextBatch:
    """Documents joined into one uint32 array of code points (`starts[i]` is where document
    i begins; `starts[-1]` is the total)."""

    def __init__(self, texts: list[str]) -> None:
        self.texts = texts
        joined = "".join(texts).encode("utf-32-le", "surrogatepass")
        self.codes = np.frombuffer(joined, np.uint32)
        self.starts = np.concatenate([[0], np.cumsum([len(t) for t in texts])]).astype(np.int64)
        self._prefix: dict[bool, np.ndarray] = {}

    def _runs(self, inside: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """First and last positions of the maximal runs of `inside`, cut at documents."""
        begins_doc = np.zeros(len(inside) + 1, bool)
        begins_doc[self.starts] = True
        before = np.concatenate([[False], inside[:-1]]) & ~begins_doc[:-1]
        after = np.concatenate([inside[1:], [False]]) & ~begins_doc[1:]
        return np.flatnonzero(inside & ~before), np.flatnonzero(inside & ~after)

    def words(self, kind: str) -> Words:
        """The batch's words of `kind` (``tokens`` or ``alnum``, see the module docstring)."""
        if kind == "alnum":
            first, last = self._runs(_classify(self.codes, "word"))
        else:
            space = _classify(self.codes, "space")
            token_first, token_last = self._runs(~space)
            core = np.flatnonzero(~space & ~_classify(self.codes, "punct"))
            lo = np.searchsorted(core, token_first)
            hi = np.searchsorted(core, token_last, side="right") - 1
            has_core = lo <= hi  # the token is not punctuation alone
            first, last = core[lo[has_core]], core[hi[has_core]]
        doc = np.searchsorted(self.starts, first, side="right") - 1
        return Words(first.astype(np.int64), last.astype(np.int64), doc.astype(np.int64))

    def alpha_words(self, words: Words) -> np.ndarray:
        """Whether each word has a letter (letters are never punctuation or space)."""
        letters = np.concatenate([[0], np.cumsum(_classify(self.codes, "alpha"))])
        return letters[words.last + 1] - letters[words.first] > 0

    def word_hashes(self, words: Words, lower: bool = False) -> np.ndarray:
        """uint64 hash of each word's code points (lowercased when `lower`)."""
        n = len(self.codes)
        powers, inverse_powers = _power_tables(n)
        if lower not in self._prefix:
            codes = _classify(self.codes, "lower") if lower else self.codes
            # prefix[i] = sum over k < i of (code_k + 1) * BASE**-k (mod 2**64), so a span's
            # sum times BASE**first is the same wherever the span is
            self._prefix[lower] = np.concatenate(  # (a [0] list would promote to float64)
                [np.zeros(1, np.uint64),
                 np.cumsum((codes.astype(np.uint64) + np.uint64(1)) * inverse_powers[:n])])
        prefix = self._prefix[lower]
        span = (prefix[words.last + 1] - prefix[words.first]) * powers[words.first]
        return span * _MIX + words.lengths.astype(np.uint64)


_powers: list[tuple[np.ndarray, np.ndarray]] = []  # the largest tables made so far


def _power_tables(n: int) -> tuple[np.ndarray, np.ndarray]:
    """BASE**k and BASE**-k (mod 2**64) for k < n at least; made once per process for the
    usual batch size (a cumulative product of a million numbers takes ~20 ms)."""
    if not _powers or len(_powers[0][0]) < n:
        size = max(n, MAX_CHARS)
        _powers[:] = [(np.cumprod(np.full(size, _BASE, np.uint64)) * _BASE_INV,
                       np.cumprod(np.full(size, _BASE_INV, np.uint64)) * _BASE)]
    return _powers[0]


def ngram_hashes(word_hashes: np.ndarray, doc: np.ndarray, n: int) -> tuple[np.ndarray,
                                                                             np.ndarray]:
    """Hashes of every window of `n` consecutive words inside one document, and the index
    of each window's first word."""
    m = len(word_hashes) - n + 1
    if m <= 0:
        return np.zeros(0, np.uint64), np.zeros(0, np.int64)
    h = word_hashes[:m].copy()
    for k in range(1, n):
        h = h * _MIX + word_hashes[k : k + m]  # wraps modulo 2**64
    start = np.flatnonzero(doc[:m] == doc[n - 1 :])
    return h[start], start


def chunks_by_size(texts: list[str], limit: int = MAX_CHARS) -> list[slice]:
    """Consecutive slices of `texts` of at most `limit` characters (a longer text alone)."""
    slices, begin, size = [], 0, 0
    for i, text in enumerate(texts):
        if size and size + len(text) > limit:
            slices.append(slice(begin, i))
            begin, size = i, 0
        size += len(text)
    if begin < len(texts):
        slices.append(slice(begin, len(texts)))
    return slices
