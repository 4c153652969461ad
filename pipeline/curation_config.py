"""Settings of the quality, language, PII and decontamination steps (`data.clean.<rule>` and
`data.decontaminate`), with the published defaults of the paper that defines each rule.

Plain dataclasses like the rest of `config.py` (which composes them into `CleanConfig` and
`DataConfig`); `__post_init__` raises `ValueError("<field>: what is wrong; what to do")`.
What each rule computes: pipeline/prepare/quality.py, language.py, pii.py, decontaminate.py.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

__all__ = [
    "C4Config",
    "DecontaminateConfig",
    "FineWebConfig",
    "GopherQualityConfig",
    "GopherRepetitionConfig",
    "LanguageConfig",
    "PiiConfig",
    "QUALITY_STEP_NAMES",
    "is_import_path",
]

QUALITY_STEP_NAMES = ("gopher_quality", "gopher_repetition", "c4", "fineweb", "language", "pii")
"""Curation steps `data.clean.steps` may name besides the basic cleaning steps."""
_IMPORT_PATH = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*$")


def is_import_path(name: str) -> bool:
    """True for a user step named by import path, ``package.module:Attribute``."""
    return bool(_IMPORT_PATH.match(name))


def _fraction(owner: object, *names: str) -> None:
    for name in names:
        value = getattr(owner, name)
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{name}: {value} must be a fraction in [0, 1]")


def _ngram_table(name: str, table: dict[str, float]) -> dict[str, float]:
    """An n-gram size → fraction table with its keys as digit strings (YAML and JSON keys)."""
    clean: dict[str, float] = {}
    for key, value in table.items():
        if not str(key).isdigit() or int(key) < 1:
            raise ValueError(f"{name}: key {key!r} is not an n-gram size (a whole number >= 1)")
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{name}: {value} for {key}-grams must be a fraction in [0, 1]")
        clean[str(int(key))] = float(value)
    return clean


@dataclass
class GopherQualityConfig:
    """`gopher_quality`: the quality filter of Rae et al. 2021 (Gopher, appendix A). A document
    is removed by the first rule it fails; words are whitespace-separated tokens stripped of
    surrounding punctuation (tokens of punctuation alone are not words)."""

    min_words: int = 50
    """Fewer words than this: removed (rule `word_count`)."""
    max_words: int = 100_000
    """More words than this: removed (rule `word_count`)."""
    min_mean_word_length: float = 3.0
    """Mean word length (characters) below this: removed (rule `mean_word_length`)."""
    max_mean_word_length: float = 10.0
    """Mean word length above this: removed (rule `mean_word_length`)."""
    max_symbol_word_ratio: float = 0.1
    """Hash symbols (`#`) plus ellipses (`...`, `…`) per word above this: removed (rule
    `symbol_ratio`)."""
    max_bullet_line_fraction: float = 0.9
    """Share of non-empty lines starting with a bullet (•, -, *, ...) above this: removed (rule
    `bullet_lines`)."""
    max_ellipsis_line_fraction: float = 0.3
    """Share of non-empty lines ending with an ellipsis above this: removed (rule
    `ellipsis_lines`)."""
    min_alpha_word_fraction: float = 0.8
    """Share of words with at least one alphabetic character below this: removed (rule
    `alpha_words`)."""
    min_stop_words: int = 2
    """Fewer distinct `stop_words` (case-insensitive) than this: removed (rule `stop_words`)."""
    stop_words: list[str] = field(
        default_factory=lambda: ["the", "be", "to", "of", "and", "that", "have", "with"])
    """The stop words counted by `min_stop_words` (Gopher's eight English words)."""

    def __post_init__(self) -> None:
        if not 0 <= self.min_words <= self.max_words:
            raise ValueError(f"max_words: {self.max_words} is below min_words "
                             f"({self.min_words}); use 0 <= min_words <= max_words")
        if not 0 <= self.min_mean_word_length <= self.max_mean_word_length:
            raise ValueError(f"max_mean_word_length: {self.max_mean_word_length} is below "
                             f"min_mean_word_length ({self.min_mean_word_length})")
        if self.max_symbol_word_ratio < 0:
            raise ValueError(f"max_symbol_word_ratio: {self.max_symbol_word_ratio} is "
                             "negative; use e.g. 0.1")
        _fraction(self, "max_bullet_line_fraction", "max_ellipsis_line_fraction",
                  "min_alpha_word_fraction")
        if self.min_stop_words < 0 or self.min_stop_words > len(set(self.stop_words)):
            raise ValueError(f"min_stop_words: {self.min_stop_words} must be between 0 and "
                             f"the {len(set(self.stop_words))} distinct stop_words")


@dataclass
class GopherRepetitionConfig:
    """`gopher_repetition`: the repetition filter of Rae et al. 2021 (table A1). Lines split on
    newlines, paragraphs on blank lines, both stripped (their characters count); n-grams are
    of words as `gopher_quality` finds them (their characters count, whitespace left out). A
    document over any threshold is removed, naming the first rule it fails."""

    max_duplicate_line_fraction: float = 0.30
    """Share of non-empty lines that repeat an earlier line (rule `duplicate_lines`)."""
    max_duplicate_paragraph_fraction: float = 0.30
    """Share of paragraphs that repeat an earlier paragraph (rule `duplicate_paragraphs`)."""
    max_duplicate_line_char_fraction: float = 0.20
    """Share of characters in repeated lines (rule `duplicate_line_chars`)."""
    max_duplicate_paragraph_char_fraction: float = 0.20
    """Share of characters in repeated paragraphs (rule `duplicate_paragraph_chars`)."""
    max_top_ngram_char_fraction: dict[str, float] = field(
        default_factory=lambda: {"2": 0.20, "3": 0.18, "4": 0.16})
    """Per n: share of characters in the most frequent word n-gram, when it occurs more than
    once (rule `top_<n>gram`)."""
    max_duplicate_ngram_char_fraction: dict[str, float] = field(
        default_factory=lambda: {"5": 0.15, "6": 0.14, "7": 0.13, "8": 0.12, "9": 0.11,
                                 "10": 0.10})
    """Per n: share of characters covered by word n-grams that occur more than once, each
    character counted once (rule `duplicate_<n>grams`)."""

    def __post_init__(self) -> None:
        _fraction(self, "max_duplicate_line_fraction", "max_duplicate_paragraph_fraction",
                  "max_duplicate_line_char_fraction", "max_duplicate_paragraph_char_fraction")
        self.max_top_ngram_char_fraction = _ngram_table(
            "max_top_ngram_char_fraction", self.max_top_ngram_char_fraction)
        self.max_duplicate_ngram_char_fraction = _ngram_table(
            "max_duplicate_ngram_char_fraction", self.max_duplicate_ngram_char_fraction)


@dataclass
class C4Config:
    """`c4`: the C4 heuristics of Raffel et al. 2020 (section 2.2). Line rules drop lines (the
    document is kept, shorter); page rules remove the document. Values are the paper's and those
    of the code that built C4 (TFDS `c4_utils`); datatrove's defaults swap the two counts (5
    sentences, 3 words per line)."""

    min_words_per_line: int = 5
    """Lines with fewer words are dropped (rule `short_line`)."""
    min_sentences: int = 3
    """Documents with fewer sentences left after the line rules are removed (rule
    `too_few_sentences`)."""
    drop_lines_without_terminal_punct: bool = True
    """Drop lines not ending in `.`, `!`, `?` or `"` (or ending in an ellipsis) (rule
    `no_terminal_punct`)."""
    drop_javascript_lines: bool = True
    """Drop lines mentioning "javascript" (rule `javascript`)."""
    drop_policy_lines: bool = True
    """Drop lines with "terms of use", "privacy policy", "cookie policy", "uses cookies", "use
    of cookies" or "use cookies" (rule `policy`)."""
    max_word_length: int = 1000
    """Drop lines with a word longer than this (rule `long_word`; 0 turns it off)."""
    remove_lorem_ipsum: bool = True
    """Remove documents containing "lorem ipsum" (rule `lorem_ipsum`)."""
    remove_curly_brace: bool = True
    """Remove documents containing `{` (rule `curly_brace`)."""
    bad_words_file: str | None = None
    """A word list (one word or phrase a line, e.g. the LDNOOBW list C4 used): documents
    containing one are removed (rule `bad_words`). None (default): off."""

    def __post_init__(self) -> None:
        for name in ("min_words_per_line", "min_sentences", "max_word_length"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}: {getattr(self, name)} is negative; use 0 or more")
        if self.bad_words_file is not None and not self.bad_words_file:
            raise ValueError("bad_words_file: empty; give a word list file or null")


@dataclass
class FineWebConfig:
    """`fineweb`: the three line statistics FineWeb added (Penedo et al. 2024, section 3.6),
    over non-empty lines. datatrove's `FineWebQualityFilter` defaults its duplicate-character
    ratio to 0.01; the paper's value is 0.1."""

    min_punct_line_fraction: float = 0.12
    """Documents whose share of lines ending in punctuation is at most this are removed (rule
    `line_punct`)."""
    max_short_line_fraction: float = 0.67
    """Documents whose share of lines shorter than `short_line_chars` is at least this are
    removed (rule `short_lines`)."""
    short_line_chars: int = 30
    """A line with fewer characters than this is short."""
    max_duplicate_line_char_fraction: float = 0.1
    """Documents whose share of characters in repeated lines is at least this are removed
    (rule `duplicate_line_chars`)."""

    def __post_init__(self) -> None:
        _fraction(self, "min_punct_line_fraction", "max_short_line_fraction",
                  "max_duplicate_line_char_fraction")
        if self.short_line_chars < 1:
            raise ValueError(f"short_line_chars: {self.short_line_chars} must be >= 1")


@dataclass
class LanguageConfig:
    """`language`: keeps documents in the listed languages, identified by CLD2 (Google's
    Compact Language Detector 2, whose model is compiled into the `pycld2` package)."""

    keep_languages: list[str] = field(default_factory=lambda: ["en"])
    """ISO 639-1 codes (CLD2's, e.g. en, de, fr, zh) of the languages to keep."""
    min_score: float = 0.65
    """Least share of the text in the detected language (CLD2's percent / 100) to keep a
    document; FineWeb keeps fastText scores >= 0.65, here applied to CLD2's share."""

    def __post_init__(self) -> None:
        if not self.keep_languages:
            raise ValueError("keep_languages: empty; list the languages to keep, e.g. [en]")
        for code in self.keep_languages:
            if not re.fullmatch(r"[a-z]{2,3}(-[A-Za-z]{2,4})?", str(code)):
                raise ValueError(f"keep_languages: {code!r} is not a language code; use "
                                 "ISO 639-1 codes such as en, de, zh-Hant")
        _fraction(self, "min_score")


@dataclass
class PiiConfig:
    """`pii`: replaces e-mail addresses and IP addresses with placeholders (counted)."""

    email_placeholder: str = "<EMAIL>"
    """What an e-mail address is replaced with."""
    ip_placeholder: str = "<IP>"
    """What an IP address (v4, or v6) is replaced with."""
    public_ips_only: bool = True
    """Replace only globally routable IP addresses (not 127.0.0.1, 10.x, 192.168.x, ...), as
    FineWeb does."""


@dataclass
class DecontaminateConfig:
    """`data.decontaminate`: documents sharing a word n-gram with an evaluation file are
    removed, counted per file. Words are lowercased runs of letters and digits."""

    eval_files: list[str] = field(default_factory=list)
    """JSON-lines files (every string value of a record is a text: lmforge's eval tasks, or
    any other) or plain-text files (the whole file is a text). Empty: off."""
    ngram: int = 13
    """Words per n-gram (GPT-3's 13)."""

    def __post_init__(self) -> None:
        if self.ngram < 1:
            raise ValueError(f"ngram: {self.ngram} must be >= 1; use e.g. 13")
        if any(not p for p in self.eval_files):
            raise ValueError("eval_files: contains an empty path; remove it")
        if len(set(self.eval_files)) != len(self.eval_files):
            raise ValueError(f"eval_files: {self.eval_files} lists a file twice")
