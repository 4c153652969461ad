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
from lmforge.pipeline.prepare.steps import Document, Removed, Step, utf8_len
from lmforge.pipeline.prepare.text_arrays import (
    PUNCTUATION,
    TextBatch,
    chunks_by_size,
    ngram_hashes,
)

_BULLETS = ("•", "‣", "◦", "▪", "▫", "■", "□", "●", "○", "◆", "➢", "►", "-", "*", "–", "—")
_ELLIPSES = ("...", "…")
_PARAGRAPH_BREAK = re.compile(r"\n[ \t\r]*\n")
_DOC_MIX = np.uint64(0xD6E8FEB86659FD93)  # keeps equal n-grams of two documents apart


def words_of(text: str) -> list[str]:
    """Whitespace-separated tokens stripped of surrounding punctuation, empty ones dropped
    (the words the Gopher rules count; `TextBatch.words("tokens")` finds the same)."""
    return [w for w in (t.strip(PUNCTUATION) for t in text.split()) if w]


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


class BatchStep(Step):
    """A step that measures a whole batch at once (`verdicts`), in slices of at most
    `text_arrays.MAX_CHARS` characters; `transform` measures one text alone."""

    def process(self, docs: list[Document]) -> list[str | Removed | None]:
        texts = [doc.text for doc in docs]
        out: list[str | Removed | None] = []
        for part in chunks_by_size(texts):
            out.extend(self.verdicts(texts[part]))
        return out

    def transform(self, text: str) -> str | Removed | None:
        return self.verdicts([text])[0]

    def verdicts(self, texts: list[str]) -> list[str | Removed | None]:
        raise NotImplementedError


def per_doc(values: np.ndarray, doc: np.ndarray, n_docs: int) -> np.ndarray:
    """Sum of `values` per document."""
    return np.bincount(doc, weights=values, minlength=n_docs)


@dataclass
class GopherQuality(BatchStep):
    """Gopher's quality filter: word count, mean word length, symbol-to-word ratio, bullet
    and ellipsis lines, words with letters, stop words."""

    config: GopherQualityConfig = field(default_factory=GopherQualityConfig)

    def __post_init__(self) -> None:
        stop = TextBatch([" ".join(self.config.stop_words)])
        self._stop_hashes = np.unique(stop.word_hashes(stop.words("tokens"), lower=True))

    def verdicts(self, texts: list[str]) -> list[str | Removed | None]:
        batch = TextBatch(texts)
        words = batch.words("tokens")
        n_docs = len(texts)
        counts = np.bincount(words.doc, minlength=n_docs)
        chars = per_doc(words.lengths, words.doc, n_docs)
        alpha = per_doc(batch.alpha_words(words), words.doc, n_docs)
        hashes = batch.word_hashes(words, lower=True)
        is_stop = np.isin(hashes, self._stop_hashes)
        pairs = np.unique(words.doc[is_stop] * len(self._stop_hashes)
                          + np.searchsorted(self._stop_hashes, hashes[is_stop]))
        stops = np.bincount(pairs // max(len(self._stop_hashes), 1), minlength=n_docs)
        return [self._verdict(text, int(counts[i]), chars[i], alpha[i], int(stops[i]))
                for i, text in enumerate(texts)]

    def _verdict(self, text: str, n: int, chars: float, alpha: float,
                 stops: int) -> str | Removed:
        c = self.config
        if not c.min_words <= n <= c.max_words:
            return Removed("word_count")
        if n == 0:
            return text  # min_words 0: nothing more to measure
        if not c.min_mean_word_length <= chars / n <= c.max_mean_word_length:
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
        if alpha / n < c.min_alpha_word_fraction:
            return Removed("alpha_words")
        if stops < c.min_stop_words:
            return Removed("stop_words")
        return text


def _ngram_keys(hashes: np.ndarray, doc: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """A key per n-gram inside one document (equal n-grams of two documents differ), and
    the index of its first word."""
    grams, start = ngram_hashes(hashes, doc, n)
    return grams + doc[start].astype(np.uint64) * _DOC_MIX, start


def _repeated_groups(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The keys that occur more than once, grouped: for each group the index of one of its
    keys and its size, and the indexes of all their keys. Most n-grams occur once, so only
    keys whose hash bucket is shared (every repeat, and a few others) are sorted."""
    buckets = (keys % np.uint64(4 * len(keys) + 1)).astype(np.intp)
    candidates = np.flatnonzero(np.bincount(buckets)[buckets] > 1)
    if not len(candidates):
        return candidates, candidates, candidates
    order = candidates[np.argsort(keys[candidates])]
    ordered = keys[order]
    starts = np.concatenate([[0], np.flatnonzero(ordered[1:] != ordered[:-1]) + 1])
    sizes = np.diff(np.append(starts, len(order)))
    repeated = sizes > 1
    return order[starts[repeated]], sizes[repeated], order[np.repeat(repeated, sizes)]


def top_ngram_char_fractions(hashes: np.ndarray, lengths: np.ndarray, doc: np.ndarray,
                             n: int, n_docs: int) -> np.ndarray:
    """Per document: share of word characters in its most frequent `n`-gram (0 when none
    occurs twice); among equally frequent ones, the longest."""
    keys, start = _ngram_keys(hashes, doc, n)
    if not len(keys):
        return np.zeros(n_docs)
    first, counts, _ = _repeated_groups(keys)
    window = start[first]
    ends = np.concatenate([[0], np.cumsum(lengths)])
    chars = np.minimum(ends[window + n] - ends[window], 2**20 - 1)  # capped for the ranking
    best = np.zeros(n_docs, np.int64)  # most frequent first, then longest: one number
    np.maximum.at(best, doc[window], np.minimum(counts, 2**40) * 2**20 + chars)
    top_count, top_chars = best >> 20, best & (2**20 - 1)
    total = per_doc(lengths, doc, n_docs)
    return np.where(top_count >= 2, top_count * top_chars / np.maximum(total, 1), 0.0)


def duplicate_ngram_char_fractions(hashes: np.ndarray, lengths: np.ndarray, doc: np.ndarray,
                                   n: int, n_docs: int) -> np.ndarray:
    """Per document: share of word characters inside `n`-grams that occur more than once in
    it, each word counted once however many such n-grams overlap it."""
    keys, start = _ngram_keys(hashes, doc, n)
    if not len(keys):
        return np.zeros(n_docs)
    repeated = start[_repeated_groups(keys)[2]]  # every window of a repeated n-gram
    size = len(hashes) + 1
    depth = np.cumsum(np.bincount(repeated, minlength=size)
                      - np.bincount(repeated + n, minlength=size))[:-1]
    covered = depth > 0
    total = per_doc(lengths, doc, n_docs)
    return per_doc(lengths[covered], doc[covered], n_docs) / np.maximum(total, 1)


@dataclass
class GopherRepetition(BatchStep):
    """Gopher's repetition filter: repeated lines and paragraphs (count and characters), the
    top 2-4-gram and the repeated 5-10-grams (characters)."""

    config: GopherRepetitionConfig = field(default_factory=GopherRepetitionConfig)

    def __post_init__(self) -> None:
        c = self.config
        self._top = sorted((int(n), v) for n, v in c.max_top_ngram_char_fraction.items())
        self._dup = sorted((int(n), v) for n, v in c.max_duplicate_ngram_char_fraction.items())

    def verdicts(self, texts: list[str]) -> list[str | Removed | None]:
        out: list[str | Removed | None] = [self._unit_rule(t) or t for t in texts]
        batch = TextBatch(texts)
        words = batch.words("tokens")
        hashes, lengths, n_docs = batch.word_hashes(words), words.lengths, len(texts)
        for n, limit in self._top:
            fractions = top_ngram_char_fractions(hashes, lengths, words.doc, n, n_docs)
            self._mark(out, fractions > limit, f"top_{n}gram")
        if not self._dup:
            return out
        # Words covered by repeated (n+1)-grams are covered by repeated n-grams: the
        # smallest n's fraction bounds every larger n's, so below every limit all pass.
        first_n = self._dup[0][0]
        first = duplicate_ngram_char_fractions(hashes, lengths, words.doc, first_n, n_docs)
        suspects = np.flatnonzero(first > min(limit for _, limit in self._dup))
        if not len(suspects):
            return out
        # The other sizes only for those documents (their words, renumbered).
        keep = np.isin(words.doc, suspects)
        sub = (hashes[keep], lengths[keep], np.searchsorted(suspects, words.doc[keep]))
        for n, limit in self._dup:
            fractions = first[suspects] if n == first_n else duplicate_ngram_char_fractions(
                *sub, n, len(suspects))
            self._mark(out, suspects[fractions > limit], f"duplicate_{n}grams")
        return out

    @staticmethod
    def _mark(out: list[str | Removed | None], fails: np.ndarray, rule: str) -> None:
        """Remove the documents `fails` names (a mask, or indexes) by `rule`."""
        for i in (np.flatnonzero(fails) if fails.dtype == bool else fails):
            if not isinstance(out[i], Removed):  # the first rule failed names the removal
                out[i] = Removed(rule)

    def _unit_rule(self, text: str) -> Removed | None:
        """The first line or paragraph rule `text` fails, or None."""
        c = self.config
        for unit, items in (("line", nonempty_lines(text)),
                            ("paragraph", [p.strip() for p in _PARAGRAPH_BREAK.split(text)
                                           if p.strip()])):
            share, char_share = duplicate_fractions(items)
            if share > getattr(c, f"max_duplicate_{unit}_fraction"):
                return Removed(f"duplicate_{unit}s")
            if char_share > getattr(c, f"max_duplicate_{unit}_char_fraction"):
                return Removed(f"duplicate_{unit}_chars")
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
        raise ValueError(f"data.clean.c4.bad_words_file: cannot read {path} ({err}); fix "
                         "the path") from err
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
        # Lines are only searched for what the whole text contains.
        javascript = c.drop_javascript_lines and "javascript" in lower
        policy = c.drop_policy_lines and any(p in lower for p in _C4_POLICY)
        for raw in text.split("\n"):
            line = raw.strip()
            if not line:
                continue
            rule = self._line_rule(line, javascript, policy)
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

    def _line_rule(self, line: str, javascript: bool, policy: bool) -> str | None:
        """The line rule that drops `line`, or None to keep it (`javascript`, `policy`: the
        document mentions one, so the line is searched)."""
        c = self.config
        words = line.split()
        if (c.max_word_length and len(line) > c.max_word_length
                and any(len(w) > c.max_word_length for w in words)):
            return "long_word"
        if c.drop_lines_without_terminal_punct and (
                not line.endswith(_C4_END_MARKS) or line.endswith("...")):
            return "no_terminal_punct"
        if len(words) < c.min_words_per_line:
            return "short_line"
        if javascript and "javascript" in line.lower():
            return "javascript"
        if policy and any(p in line.lower() for p in _C4_POLICY):
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
