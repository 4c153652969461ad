"""Each published quality rule on documents just inside and just outside its threshold.

The thresholds are the papers' defaults: Gopher (Rae et al. 2021, appendix A and table A1),
C4 (Raffel et al. 2020, section 2.2), FineWeb (Penedo et al. 2024, section 3.6). Each
document is built so that the measured value is known by hand (e.g. 50 words; 10 of 100
words four letters long are numbers), and other rules are kept out of the way where rules
overlap.
"""

from __future__ import annotations

import itertools
import random
from collections import Counter

import pytest

from lmforge.pipeline.config import (
    C4Config,
    FineWebConfig,
    GopherQualityConfig,
    GopherRepetitionConfig,
)
from lmforge.pipeline.prepare.quality import (
    C4Filter,
    FineWebFilter,
    GopherQuality,
    GopherRepetition,
    duplicate_ngram_char_fractions,
    top_ngram_char_fractions,
    words_of,
)
from lmforge.pipeline.prepare.steps import Document, Removed
from lmforge.pipeline.prepare.text_arrays import TextBatch

LETTERS = "bcdfghjklmnpqrstvwxz"  # no vowels: no generated word is a stop word


def unique_words(count: int, length: int = 4, offset: int = 0) -> list[str]:
    """`count` distinct lowercase words of `length` letters."""
    combos = itertools.islice(itertools.product(LETTERS, repeat=length), offset, offset + count)
    return ["".join(c) for c in combos]


def verdict(step, text: str) -> str:
    """"kept" or the rule that removed `text`."""
    result = step.transform(text)
    return result.rule if isinstance(result, Removed) else "kept"


def gopher_text(words: list[str], per_line: int = 10) -> str:
    return "\n".join(" ".join(words[i : i + per_line]) for i in range(0, len(words), per_line))


# -- Gopher quality ---------------------------------------------------------------------

GQ = GopherQuality(name="gopher_quality")


def with_stops(n: int, length: int = 4) -> list[str]:
    """`n` words: two stop words ("the", "and") and `n - 2` distinct others."""
    return ["the", "and", *unique_words(n - 2, length)]


@pytest.mark.parametrize(("n", "expected"), [(50, "kept"), (49, "word_count"),
                                             (100_000, "kept"), (100_001, "word_count")])
def test_gopher_word_count_is_50_to_100000(n: int, expected: str) -> None:
    words = ["the", "and"] * (n // 2) + ["the"] * (n % 2)  # long runs: only the count matters
    assert verdict(GQ, " ".join(words)) == expected


def test_gopher_mean_word_length_is_3_to_10() -> None:
    three = with_stops(50, length=3)  # every word 3 letters: mean 3.0
    assert verdict(GQ, gopher_text(three)) == "kept"
    assert verdict(GQ, gopher_text([*three[:-1], "ab"])) == "mean_word_length"  # 2.98
    # 2 stop words (3) + 46 words of 10 + 2 of 17 letters: 500 / 50 = 10.0
    long = ["the", "and", *unique_words(46, 10), *unique_words(2, 17)]
    assert verdict(GQ, gopher_text(long)) == "kept"
    longer = [*long[:-1], unique_words(1, 18)[0]]  # 501 / 50 = 10.02
    assert verdict(GQ, gopher_text(longer)) == "mean_word_length"


def test_gopher_symbol_to_word_ratio_is_at_most_0_1() -> None:
    words = with_stops(50)
    five = gopher_text(words[:25]) + " # # # ... … " + gopher_text(words[25:])  # 5 / 50 words
    assert verdict(GQ, five) == "kept"
    assert verdict(GQ, five + " #") == "symbol_ratio"  # 6 / 50 = 0.12


def test_gopher_bullet_lines_at_most_90_percent() -> None:
    lines = gopher_text(with_stops(50), per_line=5).split("\n")  # 10 lines
    nine = "\n".join(["• " + line for line in lines[:9]] + lines[9:])
    assert verdict(GQ, nine) == "kept"
    assert verdict(GQ, "\n".join("- " + line for line in lines)) == "bullet_lines"


def test_gopher_ellipsis_lines_at_most_30_percent() -> None:
    lines = gopher_text(with_stops(50), per_line=5).split("\n")
    three = "\n".join([line + "..." for line in lines[:3]] + lines[3:])
    assert verdict(GQ, three) == "kept"
    four = "\n".join([line + "…" for line in lines[:4]] + lines[4:])
    assert verdict(GQ, four) == "ellipsis_lines"


def test_gopher_80_percent_of_words_have_a_letter() -> None:
    words = with_stops(50)
    assert verdict(GQ, gopher_text([*words[:40], *["1234"] * 10])) == "kept"  # 40 / 50
    assert verdict(GQ, gopher_text([*words[:39], *["1234"] * 11])) == "alpha_words"  # 0.78


def test_gopher_needs_two_of_the_eight_stop_words() -> None:
    others = unique_words(48)
    assert verdict(GQ, gopher_text(["The", "WITH", *others])) == "kept"  # case-insensitive
    assert verdict(GQ, gopher_text(["the", "the", *others])) == "stop_words"  # one distinct
    assert GopherQualityConfig().stop_words == ["the", "be", "to", "of", "and", "that",
                                                "have", "with"]


# -- Gopher repetition ------------------------------------------------------------------


def only(**limits) -> GopherRepetition:
    """A repetition filter with just the given limits (the others cannot fail)."""
    config = GopherRepetitionConfig(
        max_duplicate_line_fraction=1.0, max_duplicate_paragraph_fraction=1.0,
        max_duplicate_line_char_fraction=1.0, max_duplicate_paragraph_char_fraction=1.0,
        max_top_ngram_char_fraction={}, max_duplicate_ngram_char_fraction={})
    for key, value in limits.items():
        setattr(config, key, value)
    return GopherRepetition(name="gopher_repetition", config=config)


def lines_of(count: int, chars: int, offset: int = 0) -> list[str]:
    """`count` distinct lines of exactly `chars` characters (words of 4 letters)."""
    words = unique_words(count * chars, offset=offset)
    return [(" ".join(words[i * chars : (i + 1) * chars]))[:chars] for i in range(count)]


@pytest.mark.parametrize("unit", ["line", "paragraph"])
def test_gopher_duplicate_lines_and_paragraphs_at_most_30_percent(unit: str) -> None:
    sep = "\n" if unit == "line" else "\n\n"
    step = only(**{f"max_duplicate_{unit}_fraction": 0.30})
    unique, same = lines_of(6, 60), "the same words again"
    assert verdict(step, sep.join(unique + [same] * 4)) == "kept"  # 3 repeats of 10
    assert verdict(step, sep.join(unique + [same] * 5)) == f"duplicate_{unit}s"  # 4 of 11


@pytest.mark.parametrize("unit", ["line", "paragraph"])
def test_gopher_duplicate_line_and_paragraph_characters_at_most_20_percent(unit: str) -> None:
    sep = "\n" if unit == "line" else "\n\n"
    step = only(**{f"max_duplicate_{unit}_char_fraction": 0.20})
    unique = lines_of(3, 50)
    fifty, fifty_one = lines_of(2, 50, offset=500)[0], lines_of(1, 51, offset=900)[0]
    assert verdict(step, sep.join([*unique, fifty, fifty])) == "kept"  # 50 / 250
    assert verdict(step, sep.join([*unique, fifty_one, fifty_one])) == \
        f"duplicate_{unit}_chars"  # 51 / 252


@pytest.mark.parametrize(("n", "limit", "kept_times"), [(2, 0.20, 10), (3, 0.18, 6),
                                                        (4, 0.16, 4)])
def test_gopher_top_ngram_character_fractions(n: int, limit: float, kept_times: int) -> None:
    gram = unique_words(n, offset=5000)
    step = only(max_top_ngram_char_fraction={str(n): limit})

    def doc(times: int) -> str:  # 100 words of 4 letters: 400 characters
        fill = unique_words(100 - n * times)
        words = []
        for i in range(times):
            words += gram + fill[i * 2 : i * 2 + 2]
        return " ".join(words + fill[times * 2 :])

    assert limit == pytest.approx(kept_times * n * 4 / 400)
    assert verdict(step, doc(kept_times)) == "kept"
    assert verdict(step, doc(kept_times + 1)) == f"top_{n}gram"


@pytest.mark.parametrize(("n", "limit"), [(5, 0.15), (6, 0.14), (7, 0.13), (8, 0.12),
                                          (9, 0.11), (10, 0.10)])
def test_gopher_duplicate_ngram_character_fractions(n: int, limit: float) -> None:
    step = only(max_duplicate_ngram_char_fraction={str(n): limit})

    def doc(span: int) -> str:  # 200 words; a span of words twice covers 2*span of them
        repeated, fill = unique_words(span, offset=7000), unique_words(200 - 2 * span)
        half = len(fill) // 2
        return " ".join(fill[:half] + repeated + fill[half:] + repeated)

    kept_span = round(limit * 100)  # 2 * span / 200 = limit
    assert kept_span >= n
    assert verdict(step, doc(kept_span)) == "kept"
    assert verdict(step, doc(kept_span + 1)) == f"duplicate_{n}grams"


def test_gopher_repetition_defaults_remove_a_repeated_7_word_span_in_100_words() -> None:
    # 2 * 7 of 100 words: 0.14 <= 0.15 (5-grams), <= 0.14 (6-grams), > 0.13 (7-grams).
    def doc(span: int) -> str:
        repeated, fill = unique_words(span, offset=7000), unique_words(100 - 2 * span)
        return " ".join(fill[:40] + repeated + fill[40:] + repeated)

    step = GopherRepetition(name="gopher_repetition")
    assert verdict(step, doc(7)) == "duplicate_7grams"
    assert verdict(step, doc(6)) == "kept"  # 0.12: under every limit


def reference_fractions(words: list[str], n: int) -> tuple[float, float]:
    """The top n-gram and duplicate n-gram character fractions, counted plainly."""
    grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    total = sum(map(len, words))
    counts = Counter(grams)
    top = 0.0
    if grams and max(counts.values()) > 1:
        best = max(counts.values())
        top = max(best * sum(map(len, g)) for g, c in counts.items() if c == best) / total
    covered = set()
    for i, gram in enumerate(grams):
        if counts[gram] > 1:
            covered.update(range(i, i + n))
    return top, sum(len(words[i]) for i in covered) / total


def test_ngram_fractions_of_a_batch_equal_a_plain_count_per_document() -> None:
    rng = random.Random(0)
    vocab = ["a", "bb", "ccc", "dddd", "the", "of", "and", "x", "é", "(a)", "Bb"]
    texts = [" ".join(rng.choice(vocab) for _ in range(rng.randint(0, 60))) for _ in range(300)]
    batch = TextBatch(texts)
    words = batch.words("tokens")
    hashes, lengths = batch.word_hashes(words), words.lengths
    for n in range(1, 11):
        tops = top_ngram_char_fractions(hashes, lengths, words.doc, n, len(texts))
        dups = duplicate_ngram_char_fractions(hashes, lengths, words.doc, n, len(texts))
        for i, text in enumerate(texts):
            top, dup = reference_fractions(words_of(text), n) if words_of(text) else (0, 0)
            assert tops[i] == pytest.approx(top) and dups[i] == pytest.approx(dup), (n, text)


def test_words_are_whitespace_tokens_without_surrounding_punctuation() -> None:
    texts = ["Hello, world! -- it's (3.5) ...", "", " «Wait»\u00a0— 😀x😀 ", "a\tb\nc"]
    assert words_of(texts[0]) == ["Hello", "world", "it's", "3.5"]
    batch = TextBatch(texts)
    words = batch.words("tokens")
    found = [[] for _ in texts]
    for first, last, doc in zip(words.first, words.last, words.doc, strict=True):
        begin = batch.starts[doc]
        found[doc].append(texts[doc][first - begin : last - begin + 1])
    assert found == [words_of(t) for t in texts]


# -- C4 ---------------------------------------------------------------------------------

GOOD = ["The first line has enough words.", "A second line also ends well!",
        "Is the third one a question?"]


def test_c4_keeps_a_page_of_three_sentences_and_removes_one_of_two() -> None:
    step = C4Filter(name="c4")
    assert step.transform("\n".join(GOOD)) == "\n".join(GOOD)
    assert verdict(step, "\n".join(GOOD[:2])) == "too_few_sentences"


def test_c4_drops_lines_by_rule_and_counts_them() -> None:
    step = C4Filter(name="c4")
    page = "\n".join([
        GOOD[0],
        "No terminal punctuation on this line",
        "Four words only here.",  # 4 < 5 words
        "Five words are right here.",
        "Please enable JavaScript to view this page.",
        "Read our privacy policy before you go.",
        "And the story trails off here...",
        GOOD[1], GOOD[2],
    ])
    (doc,) = step([Document(page)])
    assert doc.text == "\n".join([GOOD[0], "Five words are right here.", GOOD[1], GOOD[2]])
    rules = step.stats.rules
    assert {rule: counts["removed_lines"] for rule, counts in rules.items()} == {
        "no_terminal_punct": 2, "short_line": 1, "javascript": 1, "policy": 1}
    assert rules["javascript"]["removed_bytes"] == len(
        "Please enable JavaScript to view this page.") + 1
    assert step.stats.modified_docs == 1 and step.stats.removed_docs == 0


def test_c4_removes_lorem_ipsum_and_curly_brace_pages() -> None:
    step = C4Filter(name="c4")
    assert verdict(step, "\n".join([*GOOD, "Lorem ipsum dolor sit amet, consectetur."])) == \
        "lorem_ipsum"
    assert verdict(step, "\n".join([*GOOD, "function f() { return 1; } is code here."])) == \
        "curly_brace"


def test_c4_bad_words_list_is_off_unless_a_file_is_given(tmp_path) -> None:
    page = "\n".join([*GOOD, "This line has a Darnword in it."])
    assert verdict(C4Filter(name="c4"), page) == "kept"
    words = tmp_path / "bad.txt"
    words.write_text("# a comment\ndarnword\nsome phrase\n")
    step = C4Filter(name="c4", config=C4Config(bad_words_file=str(words)))
    assert verdict(step, page) == "bad_words"
    assert verdict(step, page.replace("Darnword", "Darnwords")) == "kept"  # whole words only
    with pytest.raises(ValueError, match="c4.bad_words_file: cannot read"):
        C4Filter(name="c4", config=C4Config(bad_words_file=str(tmp_path / "missing.txt")))


# -- FineWeb ----------------------------------------------------------------------------

FW = FineWebFilter(name="fineweb")


def test_fineweb_removes_at_most_12_percent_of_lines_ending_in_punctuation() -> None:
    lines = lines_of(100, 40)
    thirteen = [line + ("." if i < 13 else "") for i, line in enumerate(lines)]
    twelve = [line + ("." if i < 12 else "") for i, line in enumerate(lines)]
    assert verdict(FW, "\n".join(thirteen)) == "kept"
    assert verdict(FW, "\n".join(twelve)) == "line_punct"  # 0.12 <= 0.12


def test_fineweb_removes_10_percent_of_characters_in_duplicated_lines() -> None:
    lines = [line + "." for line in lines_of(19, 39)]  # 40 characters each
    assert verdict(FW, "\n".join([*lines, lines[0]])) == "kept"  # 40 / 800 = 0.05
    assert verdict(FW, "\n".join([*lines[:9], lines[0]])) == "duplicate_line_chars"  # 0.1


def test_fineweb_removes_67_percent_of_lines_shorter_than_30_characters() -> None:
    long, short = lines_of(34, 39, offset=10_000), lines_of(67, 28)
    long, short = [x + "." for x in long], [x + "." for x in short]  # 40 and 29 characters
    assert verdict(FW, "\n".join(short[:66] + long)) == "kept"  # 66 / 100
    assert verdict(FW, "\n".join(short + long[:33])) == "short_lines"  # 67 / 100
    thirty = [x + "." for x in lines_of(67, 29, offset=20_000)]  # 30 characters: not short
    assert verdict(FW, "\n".join(thirty + long[:33])) == "kept"
    assert FineWebConfig().max_duplicate_line_char_fraction == 0.1  # the paper, not 0.01
