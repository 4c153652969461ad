"""Torch-free config sections of the data pipeline: datasets, the cleaning chain, tokenizer.

They live apart from `pipeline/config.py` (which also holds the loader's section) so that
Ray workers unpickling them import nothing heavy. Each field carries a docstring;
`__post_init__` raises `ValueError("<field>: what is wrong; what to do")`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

CLEAN_STEP_NAMES = ("normalize", "strip_control", "length", "repetition")
"""Cleaning steps `CleanConfig.steps` may name, in any order (see pipeline/steps.py)."""


@dataclass
class DatasetSpec:
    """One named source of documents with its mixture weight."""

    name: str
    """Dataset name: the shard folder, manifest key and `__key__` prefix (letters, digits, `_`, `-`;
    no `.`, which WebDataset reads as an extension separator)."""
    paths: list[str] = field(default_factory=list)
    """Files, globs or fsspec URLs (`corpus/*.jsonl.gz`, `s3://bucket/x/*.parquet`)."""
    weight: float = 1.0
    """Mixture weight, carried into the manifest for the loader to sample by."""
    format: Literal["auto", "txt", "jsonl", "parquet"] = "auto"
    """File format; `auto` decides from the extension (.txt, .jsonl/.json, .parquet, +.gz/.zst)."""
    text_field: str = "text"
    """Field holding the document text in JSON lines and Parquet rows."""
    txt_unit: Literal["file", "paragraph", "line"] = "paragraph"
    """How a .txt file splits into documents: whole file, blank-line separated, or per line."""

    def __post_init__(self) -> None:
        if not self.name or not all(c.isalnum() or c in "_-" for c in self.name):
            raise ValueError(
                f"name: {self.name!r} is not usable as a folder and sample-key prefix; "
                "use only letters, digits, '_' and '-'"
            )
        if not self.paths:
            raise ValueError("paths: empty; list at least one file, glob or URL")
        if not self.weight > 0:
            raise ValueError(f"weight: {self.weight} must be > 0; give a positive mixture weight")
        if not self.text_field:
            raise ValueError("text_field: empty; name the field that holds the text")


@dataclass
class CleanConfig:
    """The cleaning/filter chain applied to every document before dedup and encoding."""

    steps: list[str] = field(
        default_factory=lambda: ["normalize", "strip_control", "length", "repetition"]
    )
    """Steps in the order they run; any of normalize, strip_control, length, repetition."""
    normalization: Literal["NFC", "NFKC", "NFD", "NFKD"] = "NFC"
    """Unicode normalization form used by the `normalize` step."""
    min_chars: int = 1
    """`length` step: documents shorter than this (in characters) are removed."""
    max_chars: int = 10_000_000
    """`length` step: documents longer than this (in characters) are removed."""
    max_duplicate_line_fraction: float = 0.5
    """`repetition` step: remove a document if more than this fraction of its lines (>= 4
    lines) are repeats of an earlier line in the same document."""
    max_top_char_fraction: float = 0.5
    """`repetition` step: remove a document of >= 32 chars whose most frequent non-space
    character makes up more than this fraction of it (e.g. '!!!!!!' spam)."""

    def __post_init__(self) -> None:
        for name in self.steps:
            if name not in CLEAN_STEP_NAMES:
                raise ValueError(
                    f"steps: unknown step {name!r}; choose from {', '.join(CLEAN_STEP_NAMES)}"
                )
        if len(set(self.steps)) != len(self.steps):
            raise ValueError(f"steps: {self.steps} names a step twice; list each step once")
        if self.min_chars < 0:
            raise ValueError(f"min_chars: {self.min_chars} is negative; use 0 or more")
        if self.max_chars < max(1, self.min_chars):
            raise ValueError(
                f"max_chars: {self.max_chars} is below min_chars ({self.min_chars}); raise it"
            )
        for name in ("max_duplicate_line_fraction", "max_top_char_fraction"):
            value = getattr(self, name)
            if not 0.0 < value <= 1.0:
                raise ValueError(f"{name}: {value} must be in (0, 1]; 1.0 turns the check off")


@dataclass
class TokenizerConfig:
    """The sentencepiece tokenizer: trained on a sample of the cleaned corpus, or reused."""

    type: Literal["bpe", "unigram"] = "bpe"
    """sentencepiece model type."""
    vocab_size: int = 32000
    """Vocabulary size including special and byte-fallback pieces (needs >= 256 + specials)."""
    model_path: str | None = None
    """Reuse this existing sentencepiece .model instead of training one."""
    sample_bytes: int = 100 * 2**20
    """Size of the uniform document sample the tokenizer is trained on."""
    character_coverage: float = 0.9995
    """Fraction of characters covered by pieces; the rest fall back to bytes."""
    mask_token: str | None = "<mask>"
    """Mask special token (None for none)."""
    sep_token: str | None = "<sep>"
    """Separator special token (None for none)."""
    extra_special_tokens: list[str] = field(default_factory=list)
    """More user-defined special tokens, kept whole by the tokenizer."""
    seed: int = 0
    """Random seed of sentencepiece training (training is deterministic for a seed)."""

    def __post_init__(self) -> None:
        specials = self.special_pieces()
        if self.vocab_size < 256 + len(specials) + 4:
            raise ValueError(
                f"vocab_size: {self.vocab_size} is too small for 256 byte-fallback pieces and "
                f"{len(specials) + 4} special tokens; use at least {256 + len(specials) + 8}"
            )
        if self.vocab_size > 2**31 - 1:
            raise ValueError(f"vocab_size: {self.vocab_size} is too large; use at most 2**31 - 1")
        if self.sample_bytes < 1024:
            raise ValueError(f"sample_bytes: {self.sample_bytes} is below 1024; raise it")
        if not 0.9 <= self.character_coverage <= 1.0:
            raise ValueError(
                f"character_coverage: {self.character_coverage} must be in [0.9, 1]; "
                "use e.g. 0.9995"
            )
        if len(set(specials)) != len(specials):
            raise ValueError(
                f"extra_special_tokens: duplicate special tokens in {specials}; "
                "list each once"
            )
        reserved = {"<pad>", "<unk>", "<s>", "</s>"}
        for piece in specials:
            if not piece or piece in reserved:
                raise ValueError(
                    f"extra_special_tokens: {piece!r} is empty or reserved "
                    "(<pad>, <unk>, <s>, </s> are built in); remove it"
                )

    def special_pieces(self) -> list[str]:
        """User-defined special pieces in id order (after pad, unk, bos, eos)."""
        pieces = [p for p in (self.mask_token, self.sep_token) if p is not None]
        return pieces + list(self.extra_special_tokens)
