"""Document cleaning and filtering steps with one contract (datatrove's model).

A step takes a list of `Document`s and returns the ones it keeps (possibly with changed
text), counting what it kept and removed, per rule where a step has several (`Removed`),
and keeping the first few removed documents of each rule as samples. Steps know nothing
about who runs them: the same chain runs in-process in unit tests and on the Ray phase
workers in `prepare`. The curation rules (quality.py, language.py, pii.py,
decontaminate.py) and user steps follow the same contract; chain.py builds the whole chain.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from lmforge.pipeline.config import CleanConfig


@dataclass(slots=True)
class Document:
    """One document flowing through the pipeline."""

    text: str
    """The document text."""
    source: str = ""
    """File (or URL) the document came from."""
    line: int = 0
    """1-based line (txt/jsonl) or row (parquet) where it starts, relative to `offset`."""
    offset: int = 0
    """Byte offset of the read range the line number counts from (0 for whole files)."""
    nbytes: int = -1
    """UTF-8 size of `text` (-1 = not computed yet); steps keep it current."""

    def size(self) -> int:
        """UTF-8 bytes of the text, computed once."""
        if self.nbytes < 0:
            self.nbytes = utf8_len(self.text)
        return self.nbytes


@dataclass
class StepStats:
    """What one step kept and removed (bytes are UTF-8 bytes of the text)."""

    kept_docs: int = 0
    kept_bytes: int = 0
    removed_docs: int = 0
    removed_bytes: int = 0
    modified_docs: int = 0
    rules: dict[str, dict[str, int]] = field(default_factory=dict)
    """Counts per rule of a step with several (`Removed.rule`; a plain None removal counts
    only in the step's totals): removed_docs and removed_bytes, and what modifying rules
    count (modified_docs, removed_bytes of dropped lines, replaced items)."""

    def count(self, rule: str, **counts: int) -> None:
        """Add `counts` (e.g. removed_docs=1, removed_bytes=120) to `rule`'s entry."""
        entry = self.rules.setdefault(rule, {})
        for key, value in counts.items():
            entry[key] = entry.get(key, 0) + value

    def add(self, other: StepStats) -> None:
        """Accumulate another step's counts into this one."""
        for name, value in asdict(other).items():
            if name == "rules":
                for rule, counts in value.items():
                    self.count(rule, **counts)
            else:
                setattr(self, name, getattr(self, name) + value)


@dataclass(frozen=True, slots=True)
class Removed:
    """What `Step.process` returns for a document one of the step's rules removes."""

    rule: str
    """The rule's name within the step (e.g. `word_count` of `gopher_quality`)."""


def utf8_len(text: str) -> int:
    """Number of UTF-8 bytes of `text` (fast path for ASCII)."""
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))


MAX_SAMPLES_PER_RULE = 3  # removed documents a step keeps per rule (per read chunk)
SAMPLE_CHARS = 400  # characters of a removed document a sample keeps


@dataclass
class Step:
    """Base of all steps: `__call__(docs) -> kept docs`, with counts in `stats` and the first
    removed documents of each rule in `samples` (rule -> [{source, line, text}], text not yet
    redacted: see `chain.removed_samples`). A sample's rule is the step's name, or
    `<step>.<rule>` for a `Removed(rule)`."""

    name: str = "step"
    stats: StepStats = field(default_factory=StepStats)
    samples: dict[str, list[dict[str, Any]]] = field(default_factory=dict)

    def __call__(self, docs: list[Document]) -> list[Document]:
        kept: list[Document] = []
        stats = self.stats
        for doc, new_text in zip(docs, self.process(docs), strict=True):
            before = doc.size()
            if new_text is None or isinstance(new_text, Removed):
                stats.removed_docs += 1
                stats.removed_bytes += before
                if new_text is None:
                    self._sample(self.name, doc)
                else:
                    stats.count(new_text.rule, removed_docs=1, removed_bytes=before)
                    self._sample(f"{self.name}.{new_text.rule}", doc)
                continue
            if new_text is not doc.text:  # steps return the same object when unchanged
                doc.text, doc.nbytes = new_text, -1
                stats.modified_docs += 1
                stats.removed_bytes += before - doc.size()
            stats.kept_docs += 1
            stats.kept_bytes += doc.nbytes
            kept.append(doc)
        return kept

    def _sample(self, rule: str, doc: Document) -> None:
        found = self.samples.setdefault(rule, [])
        if len(found) < MAX_SAMPLES_PER_RULE:
            found.append({"source": doc.source, "line": doc.line, "offset": doc.offset,
                          "text": doc.text[:SAMPLE_CHARS]})

    def process(self, docs: list[Document]) -> list[str | Removed | None]:
        """New text per document (the same object if unchanged), or None (or `Removed(rule)`
        naming the rule) to remove it.

        Steps that can work on the whole batch at once (numpy) override this.
        """
        return [self.transform(doc.text) for doc in docs]

    def transform(self, text: str) -> str | Removed | None:
        """Return the (possibly changed) text, or None / `Removed(rule)` to remove the
        document."""
        raise NotImplementedError


@dataclass
class Normalize(Step):
    """Unicode normalization (NFC by default)."""

    form: str = "NFC"

    def transform(self, text: str) -> str | None:
        # is_normalized is a fast check; most text is already normalized.
        if text.isascii() or unicodedata.is_normalized(self.form, text):
            return text
        return unicodedata.normalize(self.form, text)


# C0/C1 control characters except tab, newline and carriage return, plus DEL.
_CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")
_ASCII_CONTROL = bytes([*range(0x00, 0x09), 0x0B, 0x0C, *range(0x0E, 0x20), 0x7F])


@dataclass
class StripControl(Step):
    """Remove control characters (keeps tab, newline, carriage return)."""

    def transform(self, text: str) -> str | None:
        if text.isascii():  # bytes.translate is ~10x faster than a regex search
            raw = text.encode("ascii")
            stripped = raw.translate(None, _ASCII_CONTROL)
            return text if len(stripped) == len(raw) else stripped.decode("ascii")
        return _CONTROL.sub("", text) if _CONTROL.search(text) else text


@dataclass
class LengthFilter(Step):
    """Remove documents outside [min_chars, max_chars] characters."""

    min_chars: int = 1
    max_chars: int = 10_000_000

    def transform(self, text: str) -> str | None:
        return text if self.min_chars <= len(text) <= self.max_chars else None


@dataclass
class RepetitionFilter(Step):
    """Remove documents dominated by repeated lines or by a single character."""

    max_duplicate_line_fraction: float = 0.5
    max_top_char_fraction: float = 0.5

    def process(self, docs: list[Document]) -> list[str | None]:
        texts = [doc.text for doc in docs]
        removed = [self._repeated_lines(t) for t in texts]
        if self.max_top_char_fraction < 1.0:
            fractions = top_char_fractions(texts)
            for i, (text, fraction) in enumerate(zip(texts, fractions, strict=True)):
                if len(text) >= 32 and fraction > self.max_top_char_fraction:
                    removed[i] = True
        return [None if r else t for t, r in zip(texts, removed, strict=True)]

    def _repeated_lines(self, text: str) -> bool:
        """More than the allowed fraction of the non-empty lines (>= 4) are repeats."""
        if self.max_duplicate_line_fraction >= 1.0 or text.count("\n") < 3:
            return False
        lines = text.split("\n")
        empty = lines.count("")
        if len(lines) - empty < 4:
            return False
        distinct = len(set(lines)) - (1 if empty else 0)
        repeated = len(lines) - empty - distinct
        return repeated / (len(lines) - empty) > self.max_duplicate_line_fraction


_SPACE_CODES = np.array([ord(c) for c in " \t\n\r"])


def top_char_fraction(text: str) -> float:
    """Share of the most frequent non-whitespace character among non-whitespace ones."""
    return float(top_char_fractions([text])[0])


_PER_DOC_CHARS = 512  # ASCII texts this long are counted one by one (cache-sized arrays)


def top_char_fractions(texts: list[str]) -> np.ndarray:
    """`top_char_fraction` of every text.

    ASCII texts are counted with numpy: long ones one at a time (the byte counts stay in
    cache, 3x faster than one pass over a concatenation), short ones together in one pass
    (which saves the per-call overhead); other texts by code point.
    """
    result = np.zeros(len(texts))
    short = []
    for i, text in enumerate(texts):
        if not text.isascii():
            codes = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), np.uint32)
            codes = codes[~np.isin(codes, _SPACE_CODES)]
            if len(codes):
                result[i] = np.unique(codes, return_counts=True)[1].max() / len(codes)
        elif len(text) >= _PER_DOC_CHARS:
            counts = np.bincount(np.frombuffer(text.encode("ascii"), np.uint8), minlength=128)
            counts[_SPACE_CODES] = 0
            result[i] = counts.max() / max(int(counts.sum()), 1)
        else:
            short.append(i)
    if short:
        blob = np.frombuffer("".join(texts[i] for i in short).encode("ascii"), np.uint8)
        lengths = np.fromiter((len(texts[i]) for i in short), np.int64, len(short))
        owner = np.repeat(np.arange(len(short)), lengths)
        counts = np.bincount(owner * 128 + blob, minlength=len(short) * 128)
        counts = counts.reshape(len(short), 128)
        counts[:, _SPACE_CODES] = 0
        result[short] = counts.max(axis=1) / np.maximum(counts.sum(axis=1), 1)
    return result


def basic_step(name: str, config: CleanConfig) -> Step | None:
    """A fresh basic cleaning step (normalize, strip_control, length, repetition) named
    `name`, or None for any other step name (curation rules, user steps: chain.py)."""
    builders = {
        "normalize": lambda: Normalize(name="normalize", form=config.normalization),
        "strip_control": lambda: StripControl(name="strip_control"),
        "length": lambda: LengthFilter(
            name="length", min_chars=config.min_chars, max_chars=config.max_chars
        ),
        "repetition": lambda: RepetitionFilter(
            name="repetition",
            max_duplicate_line_fraction=config.max_duplicate_line_fraction,
            max_top_char_fraction=config.max_top_char_fraction,
        ),
    }
    return builders[name]() if name in builders else None


def build_clean_steps(config: CleanConfig) -> list[Step]:
    """The basic cleaning steps of `config.steps`, in order (what task data runs); the whole
    chain with the curation rules and user steps is `chain.build_chain`.

    Args:
        config: The `data.clean` section.

    Returns:
        Fresh step objects (with zeroed stats) in `config.steps` order.
    """
    steps = [basic_step(name, config) for name in config.steps]
    return [step for step in steps if step is not None]


def run_steps(steps: list[Step], docs: list[Document]) -> list[Document]:
    """Run `docs` through `steps` in order and return the survivors."""
    for step in steps:
        if not docs:
            break
        docs = step(docs)
    return docs
