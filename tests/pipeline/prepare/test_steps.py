"""Cleaning/filter steps: what they keep, change and remove, and the counts they report."""

from __future__ import annotations

import random
from collections import Counter

import numpy as np

from lmforge.pipeline.config import CleanConfig
from lmforge.pipeline.prepare.steps import (
    Document,
    LengthFilter,
    Normalize,
    RepetitionFilter,
    StripControl,
    build_clean_steps,
    run_steps,
    top_char_fraction,
    top_char_fractions,
)


def docs(*texts: str) -> list[Document]:
    return [Document(t, "mem", i + 1) for i, t in enumerate(texts)]


def test_normalize_composes_and_counts_modified_bytes() -> None:
    step = Normalize(name="normalize", form="NFC")
    out = step(docs("cafe\u0301", "plain"))
    assert [d.text for d in out] == ["caf\u00e9", "plain"]
    assert step.stats.kept_docs == 2 and step.stats.modified_docs == 1
    assert step.stats.removed_bytes == 1  # e + U+0301 (3 bytes) became é (2 bytes)
    assert step.stats.kept_bytes == len("café".encode()) + 5


def test_strip_control_keeps_tab_newline_cr() -> None:
    step = StripControl(name="strip_control")
    (doc,) = step(docs("a\x00b\x07c\td\ne\rf\x7fg\x85h"))
    assert doc.text == "abc\td\ne\rfgh"
    assert step.stats.removed_docs == 0 and step.stats.removed_bytes == 5


def test_length_filter_removes_outside_range() -> None:
    step = LengthFilter(name="length", min_chars=3, max_chars=5)
    out = step(docs("ab", "abc", "abcde", "abcdef"))
    assert [d.text for d in out] == ["abc", "abcde"]
    assert (step.stats.kept_docs, step.stats.removed_docs, step.stats.removed_bytes) == (2, 2, 8)


def test_repetition_filter_catches_repeated_lines_and_char_spam() -> None:
    step = RepetitionFilter(name="repetition", max_duplicate_line_fraction=0.3,
                            max_top_char_fraction=0.5)
    repeated = "buy now\nbuy now\nbuy now\nbuy now\nreal text"
    spam = "!" * 40 + " ok"
    fine = "First Citizen:\nBefore we proceed any further, hear me speak."
    out = step(docs(repeated, spam, fine))
    assert [d.text for d in out] == [fine]
    assert step.stats.removed_docs == 2
    assert top_char_fraction("aaa b b") == 0.6 and top_char_fraction("日日本 \n") == 2 / 3


def test_chain_follows_config_order_and_is_fresh_each_build() -> None:
    config = CleanConfig(steps=["strip_control", "length"], min_chars=2)
    steps = build_clean_steps(config)
    assert [s.name for s in steps] == ["strip_control", "length"]
    out = run_steps(steps, docs("\x00a", "ok"))  # "\x00a" becomes "a", then too short
    assert [d.text for d in out] == ["ok"]
    assert steps[1].stats.removed_docs == 1
    assert build_clean_steps(config)[1].stats.removed_docs == 0


def test_top_char_fractions_equal_a_plain_count_for_every_length_and_script() -> None:
    # Long ASCII texts, short ASCII texts and non-ASCII texts take three different paths.
    rng = random.Random(0)
    texts = []
    for _ in range(300):
        n = rng.choice([0, 1, 5, 40, 511, 512, 513, 3000])
        alphabet = rng.choice(["ab \n", "abcdefgh!!!!!!!!  ", "é€a b", "xyz\t\r"])
        texts.append("".join(rng.choice(alphabet) for _ in range(n)))

    def plain(text: str) -> float:
        counts = Counter(ch for ch in text if ch not in " \t\n\r")
        return max(counts.values()) / sum(counts.values()) if counts else 0.0

    assert np.allclose(top_char_fractions(texts), [plain(t) for t in texts], rtol=0, atol=1e-12)
