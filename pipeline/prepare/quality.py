"""The published quality heuristics as steps: Gopher quality and Gopher repetition (Rae et al.
2021, appendix A), C4 (Raffel et al. 2020, section 2.2) and FineWeb's line statistics (Penedo
et al. 2024, section 3.6).

Each step removes a document with `Removed(<rule>)` naming the first rule it fails, so the
counts say which rule removed what; C4's line rules drop lines instead and count them. The
thresholds and their defaults are the `data.clean.<step>` settings (curation_config.py).
Written from the papers; datatrove's documentation was read to compare defaults.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lmforge.pipeline.config import (
    C4Config,
    FineWebConfig,
    GopherQualityConfig,
    GopherRepetitionConfig,
)
from lmforge.pipeline.prepare.steps import Removed, Step, utf8_len

# Stripped from both ends of a whitespace token; a token of these alone is not a word.
_PUNCT = "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~«»‘’‚“”„…–—·¡¿•‣◦▪▫■□●○◆➢►"
_ALPHA = re.compile(r"[^\W\d_]")
_BULLETS = ("•", "‣", "◦", "▪", "▫", "■", "□", "●", "○", "◆", "➢", "►", "-", "*", "–", "—")
_ELLIPSES = ("...", "…")
_PARAGRAPH_BREAK = re.compile(r"\n[ \t\r]*\n")
_HASH_BASE = np.uint64(0x9E3779B97F4A7C15)  # odd 64-bit multiplier of the n-gram hash


def words_of(text: str) -> list[str]:
    """Whitespace-separated tokens stripped of surrounding punctuation, empty ones dropped."""
    return [w for w in (t.strip(_PUNCT) for t in text.split()) if w]


def nonempty_lines(text: str) -> list[str]:
    """The lines of `text`, stripped, without the empty ones."""
    return [line for line in (raw.strip() for raw in text.split("\n")) if line]


def duplicate_fractions(items: list[str]) -> tuple[float, float]:
    """(share of items equal to an earlier one, share of characters in those repeats)."""
    seen: set[str] = set()
    repeats = repeat_chars = total_chars = 0
    for item in items:
        total_chars += len(item)
        if item in seen:
            repeats += 1
            repeat_chars += len(item)
        else:
            seen.add(item)
    if not items:
        return 0.0, 0.0
    return repeats / len(items), repeat_chars / max(total_chars, 1)


@dataclass
class GopherQuality(Step):
    """Gopher's quality filter: word count, mean word length, symbol-to-word ratio, bullet
    and ellipsis lines, words with letters, stop words."""

    config: GopherQualityConfig = field(default_factory=GopherQualityConfig)

    def __post_init__(self) -> None:
        self._stop_words = {w.lower() for w in self.config.stop_words}

    def transform(self, text: str) -> str | Removed:
        c = self.config
        words = words_of(text)
        n = len(words)
        if not c.min_words <= n <= c.max_words:
            return Removed("word_count")
        if n == 0:
            return text  # min_words 0: nothing more to measure
        mean_length = sum(map(len, words)) / n
        if not c.min_mean_word_length <= mean_length <= c.max_mean_word_length:
            return Removed("mean_word_length")
        symbols = text.count("#") + text.count("...") + text.count("…")
        if symbols / n > c.max_symbol_word_ratio:
            return Removed("symbol_ratio")
        lines = nonempty_lines(text)
        if lines:
            bullets = sum(1 for line in lines if line.startswith(_BULLETS))
            if bullets / len(lines) > c.max_bullet_line_fraction:
                return Removed("bullet_lines")
            ellipses = sum(1 for line in lines if line.endswith(_ELLIPSES))
            if ellipses / len(lines) > c.max_ellipsis_line_fraction:
                return Removed("ellipsis_lines")
        with_letters = sum(1 for w in words if _ALPHA.search(w))
        if with_letters / n < c.min_alpha_word_fraction:
            return Removed("alpha_words")
        if len(self._stop_words.intersection(w.lower() for w in words)) < c.min_stop_words:
            return Removed("stop_words")
        return text


def ngram_hashes_of_ids(ids: np.ndarray, n: int) -> np.ndarray:
    """A 64-bit polynomial hash of every window of `n` uint64 word ids or word hashes
    (collisions: about m²/2⁶⁴ for m windows)."""
    m = len(ids) - n + 1
    h = ids[:m].copy()
    for k in range(1, n):
        h = h * _HASH_BASE + ids[k : k + m]  # wraps modulo 2**64
    return h


def top_ngram_char_fraction(ids: np.ndarray, lengths: np.ndarray, n: int) -> float:
    """Share of word characters in the most frequent `n`-gram (0 when none occurs twice);
    among equally frequent ones, the longest."""
    if len(ids) < n:
        return 0.0
    hashes = ngram_hashes_of_ids(ids, n)
    _, first, counts = np.unique(hashes, return_index=True, return_counts=True)
    top = counts.max()
    if top < 2:
        return 0.0
    ends = np.concatenate([[0], np.cumsum(lengths)])
    chars = (ends[first + n] - ends[first])[counts == top].max()
    return float(top * chars / ends[-1])


def duplicate_ngram_char_fraction(ids: np.ndarray, lengths: np.ndarray, n: int) -> float:
    """Share of word characters inside `n`-grams that occur more than once, each word
    counted once however many such n-grams overlap it."""
    if len(ids) < n:
        return 0.0
    _, inverse, counts = np.unique(ngram_hashes_of_ids(ids, n), return_inverse=True,
                                   return_counts=True)
    repeated = (counts[inverse] > 1).astype(np.int64)
    covered = np.convolve(repeated, np.ones(n, np.int64))[: len(ids)] > 0
    return float(lengths[covered].sum() / lengths.sum())


@dataclass
class GopherRepetition(Step):
    """Gopher's repetition filter: repeated lines and paragraphs (count and characters), the
    top 2-4-gram and the repeated 5-10-grams (characters)."""

    config: GopherRepetitionConfig = field(default_factory=GopherRepetitionConfig)

    def __post_init__(self) -> None:
        c = self.config
        self._top = sorted((int(n), v) for n, v in c.max_top_ngram_char_fraction.items())
        self._dup = sorted((int(n), v) for n, v in c.max_duplicate_ngram_char_fraction.items())

    def transform(self, text: str) -> str | Removed:
        c = self.config
        for unit, items in (("line", nonempty_lines(text)),
                            ("paragraph", [p.strip() for p in _PARAGRAPH_BREAK.split(text)
                                           if p.strip()])):
            share, char_share = duplicate_fractions(items)
            if share > getattr(c, f"max_duplicate_{unit}_fraction"):
                return Removed(f"duplicate_{unit}s")
            if char_share > getattr(c, f"max_duplicate_{unit}_char_fraction"):
                return Removed(f"duplicate_{unit}_chars")
        words = words_of(text)
        if not words:
            return text
        vocab: dict[str, int] = {}
        ids = np.array([vocab.setdefault(w, len(vocab)) for w in words], np.uint64)
        lengths = np.fromiter(map(len, words), np.int64, len(words))
        for n, limit in self._top:
            if top_ngram_char_fraction(ids, lengths, n) > limit:
                return Removed(f"top_{n}gram")
        return self._duplicate_ngrams(ids, lengths) or text

    def _duplicate_ngrams(self, ids: np.ndarray, lengths: np.ndarray) -> Removed | None:
        # Words covered by repeated (n+1)-grams are covered by repeated n-grams, so the
        # smallest n's fraction bounds every larger n's: below every limit, all pass.
        if not self._dup:
            return None
        first_n = self._dup[0][0]
        first = duplicate_ngram_char_fraction(ids, lengths, first_n)
        if first <= min(limit for _, limit in self._dup):
            return None
        for n, limit in self._dup:
            share = first if n == first_n else duplicate_ngram_char_fraction(ids, lengths, n)
            if share > limit:
                return Removed(f"duplicate_{n}grams")
        return None


_C4_END_MARKS = (".", "!", "?", '"', "”")
_C4_POLICY = ("terms of use", "privacy policy", "cookie policy", "uses cookies",
              "use of cookies", "use cookies")
_SENTENCE_END = re.compile(r"[.!?]+[\"'”’)\]]*(?=\s|$)")


def count_sentences(text: str) -> int:
    """Sentences in `text`: runs of `.`, `!`, `?` (closing quotes or brackets may follow)
    before whitespace or the end (C4's code used NLTK's punkt, not a dependency here)."""
    return len(_SENTENCE_END.findall(text))


def read_word_list(path: str) -> re.Pattern[str] | None:
    """A case-insensitive whole-word pattern of the words and phrases in `path` (one a line;
    blank lines and `#` comments skipped); None for an empty list."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"c4.bad_words_file: cannot read {path} ({err}); fix the path") \
            from err
    words = sorted({w.strip().lower() for w in lines if w.strip() and not w.startswith("#")})
    if not words:
        return None
    return re.compile(r"(?<!\w)(?:" + "|".join(map(re.escape, words)) + r")(?!\w)")


@dataclass
class C4Filter(Step):
    """C4's rules: documents with "lorem ipsum", a curly brace or a listed bad word are
    removed; lines without terminal punctuation, with too few words, a too long word,
    "javascript" or a policy notice are dropped; then documents with too few sentences left
    are removed."""

    config: C4Config = field(default_factory=C4Config)

    def __post_init__(self) -> None:
        path = self.config.bad_words_file
        self._bad_words = read_word_list(path) if path else None

    def transform(self, text: str) -> str | Removed:
        c = self.config
        lower = text.lower()
        if c.remove_lorem_ipsum and "lorem ipsum" in lower:
            return Removed("lorem_ipsum")
        if c.remove_curly_brace and "{" in text:
            return Removed("curly_brace")
        if self._bad_words is not None and self._bad_words.search(lower):
            return Removed("bad_words")
        kept: list[str] = []
        dropped: Counter[str] = Counter()
        dropped_bytes: Counter[str] = Counter()
        for raw in text.split("\n"):
            line = raw.strip()
            if not line:
                continue
            rule = self._line_rule(line)
            if rule is None:
                kept.append(line)
            else:
                dropped[rule] += 1
                dropped_bytes[rule] += utf8_len(raw) + 1  # the line and its newline
        if count_sentences("\n".join(kept)) < c.min_sentences:
            return Removed("too_few_sentences")
        for rule, lines in dropped.items():
            self.stats.count(rule, modified_docs=1, removed_lines=lines,
                             removed_bytes=dropped_bytes[rule])
        new = "\n".join(kept)
        return text if new == text else new

    def _line_rule(self, line: str) -> str | None:
        """The line rule that drops `line`, or None to keep it."""
        c = self.config
        words = line.split()
        if c.max_word_length and any(len(w) > c.max_word_length for w in words):
            return "long_word"
        if c.drop_lines_without_terminal_punct and (
                not line.endswith(_C4_END_MARKS) or line.endswith("...")):
            return "no_terminal_punct"
        if len(words) < c.min_words_per_line:
            return "short_line"
        lower = line.lower()
        if c.drop_javascript_lines and "javascript" in lower:
            return "javascript"
        if c.drop_policy_lines and any(p in lower for p in _C4_POLICY):
            return "policy"
        return None


# Terminal punctuation for FineWeb's line rule: sentence ends (Latin, CJK) and closing quotes.
_LINE_END_PUNCT = (".", "!", "?", '"', "'", "”", "’", "…", "。", "！", "？")


@dataclass
class FineWebFilter(Step):
    """FineWeb's line statistics: lines ending in punctuation, characters in repeated lines,
    short lines (in the paper's order)."""

    config: FineWebConfig = field(default_factory=FineWebConfig)

    def transform(self, text: str) -> str | Removed:
        c = self.config
        lines = nonempty_lines(text)
        if not lines:
            return Removed("empty")
        ending = sum(1 for line in lines if line.endswith(_LINE_END_PUNCT))
        if ending / len(lines) <= c.min_punct_line_fraction:
            return Removed("line_punct")
        if duplicate_fractions(lines)[1] >= c.max_duplicate_line_char_fraction:
            return Removed("duplicate_line_chars")
        short = sum(1 for line in lines if len(line) < c.short_line_chars)
        if short / len(lines) >= c.max_short_line_fraction:
            return Removed("short_lines")
        return text
