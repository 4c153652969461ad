"""Make the bundled eval tasks from the demo corpus (stdlib only, no downloads).

    python configs/eval/make_eval_tasks.py           # rewrites configs/eval/eval_*.jsonl
    python configs/eval/make_eval_tasks.py OUT_DIR   # writes them to OUT_DIR instead

Deterministic: examples and distractors are chosen by sha256, never by Python's ``hash`` or
the process's random state, so running it again gives the same bytes. Both tasks are cut from
configs/corpora/tinyshakespeare.txt, the corpus configs/tiny.yaml trains on: they measure how
well a model learnt this text, not generalisation.

- eval_next_line.jsonl, multiple choice (200): which of four lines follows a passage. The
  passage is two consecutive lines of one speech joined by a space; the choices are the line
  that follows them and three other lines of the corpus with about as many words (±2), so
  the length of a choice gives nothing away. The right answer is at each of the four
  positions equally often (50 each). CHANCE LEVEL: acc = acc_norm = 0.25.
- eval_word_order.jsonl, multiple choice (200): the same passages; the choices are the line
  that follows and three orders of its own words (so only word order tells them apart; the
  right answer equally often at each position). Easier: a model that has learnt which word
  follows which passes it long before it can tell the next line. CHANCE LEVEL: 0.25.
- eval_last_word.jsonl, cloze (200): the last word of a line, given the line before it and
  the line up to that word (``target`` is the word without its punctuation, at least 4
  letters). CHANCE LEVEL: about 0 (the greedy continuation must be the word's exact tokens
  out of the whole vocabulary); a random-weight model scores 0.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
CORPUS = HERE.parent / "corpora" / "tinyshakespeare.txt"
SIZE = 200
CHOICES = 4
_LAST_WORD = re.compile(r"^(?P<context>.*\S)\s+(?P<word>[A-Za-z]{4,})[.,;:!?]*$")


def speeches() -> list[list[str]]:
    """Each speech of the corpus: its lines (whitespace collapsed), without the speaker."""
    blocks: list[list[str]] = []
    for block in CORPUS.read_text(encoding="utf-8").split("\n\n"):
        lines = [" ".join(line.split()) for line in block.splitlines() if line.strip()]
        if len(lines) >= 2 and lines[0].endswith(":"):  # "First Citizen:" heads a speech
            blocks.append(lines[1:])
    return blocks


def digest(*parts: str) -> bytes:
    return hashlib.sha256("\n".join(parts).encode("utf-8")).digest()


def next_line_examples(blocks: list[list[str]]) -> list[dict]:
    """Passages (2 lines) and the line after them, from speeches of >= 3 lines."""
    candidates = [(block[i - 2], block[i - 1], block[i]) for block in blocks
                  for i in range(2, len(block))]
    pool = sorted({line for block in blocks for line in block if len(line.split()) >= 3})
    by_words: dict[int, list[str]] = {}
    for line in pool:
        by_words.setdefault(len(line.split()), []).append(line)
    candidates = sorted({c for c in candidates if len(c[2].split()) >= 3},
                        key=lambda c: digest("next", *c))
    examples: list[dict] = []
    used: set[str] = set()
    for first, second, follow in candidates:
        if follow in used:
            continue
        words = len(follow.split())
        near = [line for n in range(words - 2, words + 3) for line in by_words.get(n, [])]
        choices: list[str] = []
        for attempt in range(50):  # pseudo-random picks from the lines of about that length
            pick = near[int.from_bytes(digest("distractor", first, second, str(attempt)),
                                       "big") % len(near)]
            if pick not in (first, second, follow, *choices):
                choices.append(pick)
            if len(choices) == CHOICES - 1:
                break
        if len(choices) < CHOICES - 1:
            continue
        gold = len(examples) % CHOICES  # each position equally often
        choices.insert(gold, follow)
        examples.append({"context": f"{first} {second}", "choices": choices, "gold": gold})
        used.add(follow)
        if len(examples) == SIZE:
            return examples
    raise SystemExit(f"only {len(examples)} next-line examples, need {SIZE}")


def word_order_examples(next_line: list[dict]) -> list[dict]:
    """The next-line passages, with three orders of the right line's words as distractors."""
    examples = []
    for record in next_line:
        follow = record["choices"][record["gold"]]
        words = follow.split()
        seed = int.from_bytes(digest("order", follow)[:8], "big")  # an int: stable everywhere
        rng = random.Random(seed)
        shuffled: list[str] = []
        for _ in range(100):
            order = words[:]
            rng.shuffle(order)
            line = " ".join(order)
            if line != follow and line not in shuffled:
                shuffled.append(line)
            if len(shuffled) == CHOICES - 1:
                break
        if len(shuffled) < CHOICES - 1:
            continue
        gold = len(examples) % CHOICES
        shuffled.insert(gold, follow)
        examples.append({"context": record["context"], "choices": shuffled, "gold": gold})
    if len(examples) < SIZE:
        raise SystemExit(f"only {len(examples)} word-order examples, need {SIZE}")
    return examples[:SIZE]


def last_word_examples(blocks: list[list[str]]) -> list[dict]:
    """A line's last word (>= 4 letters) after the line before it and the rest of the line."""
    candidates = []
    for block in blocks:
        for before, line in zip(block, block[1:], strict=False):
            match = _LAST_WORD.match(line)
            if match and len(line.split()) >= 5:
                candidates.append((f"{before} {match['context']}", match["word"]))
    candidates = sorted(set(candidates), key=lambda c: digest("last", *c))
    if len(candidates) < SIZE:
        raise SystemExit(f"only {len(candidates)} last-word examples, need {SIZE}")
    return [{"context": context, "target": word} for context, word in candidates[:SIZE]]


def write_jsonl(path: Path, records: list[dict]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records),
                    encoding="utf-8")
    print(f"{path}: {len(records)} examples")


def main(out: Path = HERE) -> None:
    out.mkdir(parents=True, exist_ok=True)
    blocks = speeches()
    next_line = next_line_examples(blocks)
    golds = [r["gold"] for r in next_line]
    assert all(golds.count(k) == SIZE // CHOICES for k in range(CHOICES)), "positions balance"
    write_jsonl(out / "eval_next_line.jsonl", next_line)
    word_order = word_order_examples(next_line)
    assert all([r["gold"] for r in word_order].count(k) == SIZE // CHOICES
               for k in range(CHOICES)), "positions balance"
    write_jsonl(out / "eval_word_order.jsonl", word_order)
    write_jsonl(out / "eval_last_word.jsonl", last_word_examples(blocks))


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else HERE)
