"""Word n-gram shingles, MinHash signatures, LSH band keys and exact Jaccard, in numpy.

The arithmetic of near-duplicate removal (`near_dedup.py` runs it as phases):

- A document's *words* are the maximal runs of letters, digits and ``_`` of its lowercased
  text (Unicode punctuation, symbols and separators split words like ASCII ones do). Its
  *shingles* are the hashes (64-bit) of its word n-grams; a document with fewer than n words
  has one shingle, all its words. Jaccard similarity is that of the shingle sets.
- Words are hashed all at once per batch of texts: a polynomial hash over the UTF-8 bytes
  (prefix sums times inverse powers of an odd base, wrapping mod 2**64), finished with
  splitmix64; an n-gram is a polynomial of its word hashes, finished the same way. No
  Python loop runs per word, and no per-process salt (Python's `hash`) is involved, so every
  worker computes the same values.
- The MinHash signature of a document is, for each of ``bands × rows`` hash functions
  ``g_i(x) = a_i·x + b_i (mod 2**64)`` (odd ``a_i``, from `seed`), the minimum over its
  shingles, kept as the high 32 bits. A band key hashes the ``rows`` values of one band with
  the band's index: documents sharing any band key are candidate pairs.
"""

from __future__ import annotations

import sys
import unicodedata

import numpy as np

_MASK = np.uint64(0xFFFFFFFFFFFFFFFF)
_BASE = np.uint64(0x100000001B3)  # odd: invertible mod 2**64 (FNV's prime)
_BASE_INV = np.uint64(pow(0x100000001B3, -1, 2**64))
_NGRAM_BASE = np.uint64(0x9E3779B97F4A7C15)
_BAND_BASE = np.uint64(0xC2B2AE3D27D4EB4F)
_TEXT_BATCH = 1 << 20  # bytes of text hashed at a time: ~40 MB of temporaries
_SIGN_COLUMNS = 1 << 12  # shingles hashed at a time: a (functions, 4096) uint64 block

# Word bytes: ASCII letters, digits, '_' and every byte of a multi-byte UTF-8 character
# (non-ASCII punctuation was turned into spaces before encoding, see `_unicode_spaces`).
_WORD_BYTE = np.zeros(256, bool)
for _c in b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_":
    _WORD_BYTE[_c] = True
_WORD_BYTE[0x80:] = True
_SPACES: dict[int, int] | None = None


def _unicode_spaces() -> dict[int, int]:
    """A `str.translate` table sending non-ASCII punctuation, symbols, separators and
    controls to a space (built once per process, ~0.3 s)."""
    global _SPACES
    if _SPACES is None:
        _SPACES = {cp: 32 for cp in range(0x80, sys.maxunicode + 1)
                   if unicodedata.category(chr(cp))[0] in "PSZ"
                   or unicodedata.category(chr(cp)) in ("Cc", "Cf")}
    return _SPACES


def splitmix64(x: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser, elementwise on uint64 (a new array)."""
    x = x ^ (x >> np.uint64(30))
    x *= np.uint64(0xBF58476D1CE4E5B9)
    x ^= x >> np.uint64(27)
    x *= np.uint64(0x94D049BB133111EB)
    x ^= x >> np.uint64(31)
    return x


_POWERS = np.ones(1, np.uint64)
_INV_POWERS = np.ones(1, np.uint64)


def _powers(n: int) -> tuple[np.ndarray, np.ndarray]:
    """BASE**i and BASE**-i mod 2**64 for i < n (cached, grown on demand)."""
    global _POWERS, _INV_POWERS
    if len(_POWERS) < n:
        size = max(n, 2 * len(_POWERS))
        _POWERS = np.cumprod(np.full(size, _BASE, np.uint64)) * _BASE_INV
        _INV_POWERS = np.cumprod(np.full(size, _BASE_INV, np.uint64)) * _BASE
    return _POWERS[:n], _INV_POWERS[:n]


def _word_hashes(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Hashes of every word of `texts` in order, and each text's number of words."""
    table = None
    parts = []
    for text in texts:
        text = text.lower()
        if not text.isascii():
            table = table or _unicode_spaces()
            text = text.translate(table)
        parts.append(text)
    raw = np.frombuffer(" ".join(parts).encode("utf-8", "surrogatepass") + b" ", np.uint8)
    is_word = _WORD_BYTE[raw]
    edges = np.flatnonzero(is_word[1:] != is_word[:-1]) + 1
    if is_word[0]:
        edges = np.concatenate([[0], edges])
    starts, ends = edges[0::2], edges[1::2]  # the buffer ends with a space: pairs complete
    powers, inv_powers = _powers(len(raw) + 1)
    prefix = np.zeros(len(raw) + 1, np.uint64)
    np.cumsum(raw.astype(np.uint64) * powers[: len(raw)], out=prefix[1:])
    words = (prefix[ends] - prefix[starts]) * inv_powers[starts]  # Σ b_j·BASE**(j-start)
    words = splitmix64(words ^ (ends - starts).astype(np.uint64))
    # Text i spans buffer bytes [sep[i], sep[i+1]): count the words starting there.
    sep = np.cumsum([0] + [len(p.encode("utf-8", "surrogatepass")) + 1 for p in parts])
    counts = np.diff(np.searchsorted(starts, sep))
    return words, counts


def ngram_hashes(texts: list[str], ngram: int) -> tuple[np.ndarray, np.ndarray]:
    """The shingle hashes of each text, in text order, repeats included (what MinHash
    needs: a minimum does not care about repeats).

    Args:
        texts: Document texts.
        ngram: Words per shingle.

    Returns:
        (hashes, offsets): text i's shingles are ``hashes[offsets[i]:offsets[i + 1]]``
        (uint64); a text without words has none.
    """
    hash_parts, count_parts = [], []
    for lo, hi in _batches(texts):
        hashes, counts = _ngram_hashes(texts[lo:hi], ngram)
        hash_parts.append(hashes)
        count_parts.append(counts)
    hashes = np.concatenate(hash_parts) if hash_parts else np.zeros(0, np.uint64)
    counts = np.concatenate(count_parts) if count_parts else np.zeros(0, np.int64)
    return hashes, np.concatenate([[0], np.cumsum(counts)])


def shingles(texts: list[str], ngram: int) -> tuple[np.ndarray, np.ndarray]:
    """The shingle *sets* of each text: as `ngram_hashes`, each text's hashes sorted and
    distinct (what an exact Jaccard needs)."""
    hashes, offsets = ngram_hashes(texts, ngram)
    docs = np.repeat(np.arange(len(texts)), np.diff(offsets))
    order = np.lexsort((hashes, docs))
    hashes, docs = hashes[order], docs[order]
    distinct = np.ones(len(hashes), bool)
    distinct[1:] = (hashes[1:] != hashes[:-1]) | (docs[1:] != docs[:-1])
    hashes, docs = hashes[distinct], docs[distinct]
    return hashes, np.searchsorted(docs, np.arange(len(texts) + 1))


def _batches(texts: list[str]) -> list[tuple[int, int]]:
    """Index ranges of consecutive texts of about `_TEXT_BATCH` characters (at least one)."""
    ranges, lo, size = [], 0, 0
    for i, text in enumerate(texts):
        if size >= _TEXT_BATCH:
            ranges.append((lo, i))
            lo, size = i, 0
        size += len(text)
    if lo < len(texts):
        ranges.append((lo, len(texts)))
    return ranges


def _ngram_hashes(texts: list[str], ngram: int) -> tuple[np.ndarray, np.ndarray]:
    """Every n-gram hash of `texts` (with repeats, in order) and each text's count."""
    words, counts = _word_hashes(texts)
    first = np.cumsum(counts) - counts
    # acc[k] = Σ_j words[k + j]·B**j over the next n words, across text ends; only starts
    # with n - 1 words after them in their own text are used.
    acc = words.copy()
    factor = np.uint64(1)
    for j in range(1, ngram):
        factor = np.uint64((int(factor) * int(_NGRAM_BASE)) & 0xFFFFFFFFFFFFFFFF)
        if j < len(words):
            acc[:-j] += words[j:] * factor
    end = np.repeat(first + counts, counts)
    full = np.flatnonzero(np.arange(len(words)) + ngram <= end)
    per_text = np.maximum(counts - ngram + 1, 0)
    short = np.flatnonzero((counts > 0) & (counts < ngram))
    if len(short):  # a text shorter than n words: one shingle of all its words
        short_acc = np.zeros(len(short), np.uint64)
        factor = np.uint64(1)
        for j in range(ngram - 1):
            inside = j < counts[short]
            short_acc[inside] += words[first[short][inside] + j] * factor
            factor = np.uint64((int(factor) * int(_NGRAM_BASE)) & 0xFFFFFFFFFFFFFFFF)
        per_text[short] = 1
        # Put each short text's shingle where its text's shingles go (text order).
        at = np.searchsorted(full, first[short])
        values = np.insert(acc[full], at, short_acc)
    else:
        values = acc[full]
    return splitmix64(values), per_text


def hash_parameters(count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The (a, b) of `count` MinHash functions for `seed`; every ``a`` is odd."""
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 2**63, count, dtype=np.uint64) * np.uint64(2) + np.uint64(1)
    b = rng.integers(0, 2**63, count, dtype=np.uint64) * np.uint64(2)
    return a, b


def signatures(hashes: np.ndarray, offsets: np.ndarray, a: np.ndarray,
               b: np.ndarray) -> np.ndarray:
    """MinHash signatures, (n_docs, len(a)) uint32; a document without shingles gets
    all-ones (the caller leaves it out)."""
    n_docs = len(offsets) - 1
    sig = np.full((len(a), n_docs), _MASK, np.uint64)  # (functions, docs)
    owner = np.repeat(np.arange(n_docs), np.diff(offsets))
    a, b = a[:, None], b[:, None]
    for lo in range(0, len(hashes), _SIGN_COLUMNS):
        docs = owner[lo : lo + _SIGN_COLUMNS]
        # (functions, shingles): each function's values contiguous, for reduceat (3x faster
        # than the transposed layout).
        values = np.multiply(a, hashes[None, lo : lo + _SIGN_COLUMNS])  # wraps mod 2**64
        values += b
        firsts = np.flatnonzero(np.concatenate([[True], docs[1:] != docs[:-1]]))
        mins = np.minimum.reduceat(values, firsts, axis=1)
        cols = docs[firsts]
        sig[:, cols] = np.minimum(sig[:, cols], mins)
    return np.ascontiguousarray((sig >> np.uint64(32)).astype(np.uint32).T)


def band_keys(sig: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """(n_docs, bands) uint64: a hash of each band's `rows` values and the band's index."""
    values = sig.astype(np.uint64).reshape(len(sig), bands, rows)
    acc = np.zeros((len(sig), bands), np.uint64)
    for j in range(rows):
        acc = acc * _BAND_BASE + values[:, :, j]
    return splitmix64(acc ^ np.arange(1, bands + 1, dtype=np.uint64) * _NGRAM_BASE)


def _ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Concatenation of ``arange(s, s + n)`` for each (s, n)."""
    owner = np.repeat(np.arange(len(lengths)), lengths)
    first = np.cumsum(lengths) - lengths  # where each range begins in the result
    return (starts - first)[owner] + np.arange(len(owner))


def jaccard_pairs(hashes: np.ndarray, offsets: np.ndarray, left: np.ndarray,
                  right: np.ndarray) -> np.ndarray:
    """Exact Jaccard of the shingle sets of documents ``left[k]`` and ``right[k]``.

    Args:
        hashes, offsets: `shingles` of the documents.
        left, right: Document indices into `offsets`, one pair per position.
    """
    la, lb = np.diff(offsets)[left], np.diff(offsets)[right]
    values = np.concatenate([hashes[_ranges(offsets[left], la)],
                             hashes[_ranges(offsets[right], lb)]])
    pair = np.concatenate([np.repeat(np.arange(len(left)), la),
                           np.repeat(np.arange(len(left)), lb)])
    order = np.lexsort((values, pair))
    values, pair = values[order], pair[order]
    # Each set is distinct: a value seen twice within a pair is in both.
    both = (values[1:] == values[:-1]) & (pair[1:] == pair[:-1])
    common = np.bincount(pair[1:][both], minlength=len(left))
    union = la + lb - common
    return np.where(union > 0, common / np.maximum(union, 1), 0.0)


def candidate_probability(similarity: float, bands: int, rows: int) -> float:
    """Chance that two documents of this Jaccard share at least one band key:
    ``1 - (1 - s**rows)**bands`` (the LSH S-curve)."""
    return 1.0 - (1.0 - similarity**rows) ** bands

