"""Decontamination: documents sharing a word n-gram with an evaluation file are removed.

Words are lowercased runs of letters and digits (`\\w+`), so punctuation, case and line
breaks do not hide a copy. Each evaluation file becomes a sorted array of 64-bit n-gram
hashes (text_arrays: a hash per word, combined per window), built once per process and
kept; a document is removed by the first file (in config order) it shares an n-gram with,
and counted under that file's name.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import PurePosixPath

import fsspec
import numpy as np

from lmforge.pipeline.config import DecontaminateConfig
from lmforge.pipeline.prepare.steps import Document, Removed, Step
from lmforge.pipeline.prepare.text_arrays import TextBatch, chunks_by_size, ngram_hashes

_JSON_SUFFIXES = (".jsonl", ".json", ".ndjson")
_indexes: dict[tuple, list[EvalIndex]] = {}  # built once per process and config


def batch_ngrams(texts: list[str], n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The word n-grams of `texts` (lowercased `\\w+` runs): their uint64 hashes, the index
    of the text each belongs to, and the number of words of each text."""
    batch = TextBatch(texts)
    words = batch.words("alnum")
    grams, start = ngram_hashes(batch.word_hashes(words, lower=True), words.doc, n)
    return grams, words.doc[start], np.bincount(words.doc, minlength=len(texts))


@dataclass
class EvalIndex:
    """One evaluation file's n-grams: a sorted array of distinct hashes."""

    name: str  # the rule name: the file's name without suffixes (made unique)
    path: str
    hashes: np.ndarray
    texts: int  # texts read (JSON string values, or the whole plain-text file)
    short_texts: int  # texts with fewer words than n, which cannot match

    def contains(self, grams: np.ndarray) -> np.ndarray:
        """Whether each n-gram hash is one of this file's."""
        if not len(self.hashes):
            return np.zeros(len(grams), bool)
        at = np.minimum(np.searchsorted(self.hashes, grams), len(self.hashes) - 1)
        return self.hashes[at] == grams


def _strings(value: object) -> list[str]:
    """Every string inside a JSON value (objects and lists walked), in order."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for v in value.values() for s in _strings(v)]
    if isinstance(value, list):
        return [s for v in value for s in _strings(v)]
    return []


def read_eval_texts(path: str) -> list[str]:
    """The texts of an evaluation file: every string value of each JSON-lines record
    (.jsonl/.json/.ndjson, optionally compressed), or the whole file for other suffixes.

    Raises:
        ValueError: Unreadable file or malformed JSON (naming the file and line).
    """
    name = PurePosixPath(path.split("?", 1)[0]).name.lower()
    for suffix in (".gz", ".zst", ".bz2", ".xz"):
        name = name.removesuffix(suffix)
    try:
        with fsspec.open(path, "rt", compression="infer", encoding="utf-8") as f:
            if not name.endswith(_JSON_SUFFIXES):
                return [f.read()]
            texts: list[str] = []
            for number, line in enumerate(f, 1):
                if line.strip():
                    try:
                        texts.extend(_strings(json.loads(line)))
                    except json.JSONDecodeError as err:
                        raise ValueError(f"data.decontaminate.eval_files: {path}, line {number}: "
                                         f"not JSON ({err.msg}); fix the line") from err
            return texts
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"data.decontaminate.eval_files: cannot read {path} ({err}); fix the path "
                         "or remove it") from err


def _names(paths: list[str]) -> list[str]:
    """A rule name per file: its name without suffixes, numbered where two are the same."""
    stems = []
    for path in paths:
        stem = PurePosixPath(path.split("?", 1)[0]).name.split(".")[0] or "eval"
        stems.append(re.sub(r"[^\w-]", "_", stem))
    return [s if stems.count(s) == 1 else f"{s}_{i}" for i, s in enumerate(stems)]


def build_indexes(config: DecontaminateConfig) -> list[EvalIndex]:
    """The n-gram index of every evaluation file (cached for this process)."""
    key = (tuple(config.eval_files), config.ngram)
    if key not in _indexes:
        indexes = []
        for name, path in zip(_names(config.eval_files), config.eval_files, strict=True):
            texts = read_eval_texts(path)
            parts, short = [np.zeros(0, np.uint64)], 0
            for part in chunks_by_size(texts):
                grams, _, counts = batch_ngrams(texts[part], config.ngram)
                parts.append(grams)
                short += int((counts < config.ngram).sum())
            hashes = np.unique(np.concatenate(parts))
            indexes.append(EvalIndex(name, path, hashes, len(texts), short))
        _indexes[key] = indexes
    return _indexes[key]


def eval_digest(config: DecontaminateConfig) -> str:
    """sha256 over the evaluation files' n-gram indexes: what decides the removals (part of
    the dataset's fingerprint, so a changed evaluation file re-prepares)."""
    digest = hashlib.sha256()
    for index in build_indexes(config):
        digest.update(index.name.encode())
        digest.update(index.hashes.tobytes())
    return digest.hexdigest()


@dataclass
class Decontaminate(Step):
    """Removes documents sharing an n-gram with an evaluation file (rule: the file's name)."""

    config: DecontaminateConfig = field(default_factory=DecontaminateConfig)

    def __post_init__(self) -> None:
        self._indexes = build_indexes(self.config)

    def process(self, docs: list[Document]) -> list[str | Removed | None]:
        texts = [doc.text for doc in docs]
        out: list[str | Removed | None] = list(texts)
        for part in chunks_by_size(texts):
            grams, owner, _ = batch_ngrams(texts[part], self.config.ngram)
            for index in self._indexes:
                for i in np.unique(owner[index.contains(grams)]):
                    if not isinstance(out[part.start + i], Removed):
                        out[part.start + i] = Removed(index.name)
        return out

    def transform(self, text: str) -> str | Removed | None:
        return self.process([Document(text)])[0]
