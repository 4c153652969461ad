"""Make the bundled fine-tuning task sets from the demo corpus (stdlib only, no downloads).

    python configs/tasks/make_tasks.py           # rewrites configs/tasks/*.jsonl
    python configs/tasks/make_tasks.py OUT_DIR   # writes them to OUT_DIR instead

The output is deterministic: lines are chosen and ordered by sha256, never by Python's
`hash` or the process's random state, so running it again gives the same bytes.

Every set is cut from the lines of configs/corpora/tinyshakespeare.txt (speaker headings
such as "First Citizen:" and duplicate lines left out). Within a task, train and val use
disjoint lines. Each task uses its own ordering of the lines, so the tasks are independent.

- shakespeare_sft[_val].jsonl, prompt/response (1500 / 200): a line of >= 6 words cut in
  half at a word boundary; prompt "Continue: <first half>\\n", response "<second half>".
  A model pretrained on the corpus has seen the line; one trained from scratch has not.
- shakespeare_order[_val].jsonl, text/label (1500 / 300): "original" (a line as written)
  or "shuffled" (the same words in another order), lines of >= 6 words. CLASS BALANCE:
  exactly 50/50 in both splits (750/750 train, 150/150 val), so the majority-class rate is
  0.5. Each line appears once, in one form. A shuffled line keeps the cues a bag of words
  would use out of play: its first word is capitalised (and the original first word
  lower-cased, unless it is "I" or starts "I'"), and the line's final punctuation stays at
  the end; only word order tells the classes apart.
- shakespeare_reverse[_val].jsonl, source/target (800 / 100): a short line (3-6 words);
  the target is its words in reverse order.
"""

from __future__ import annotations

import hashlib
import json
import random
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
CORPUS = HERE.parent / "corpora" / "tinyshakespeare.txt"

SFT_SIZES = (1500, 200)
ORDER_SIZES = (1500, 300)
REVERSE_SIZES = (800, 100)
_END_PUNCTUATION = ".,;:!?'\"-"


def corpus_lines() -> list[str]:
    """Distinct speech lines of the corpus, in corpus order (no speaker headings)."""
    seen: set[str] = set()
    lines = []
    for raw in CORPUS.read_text(encoding="utf-8").splitlines():
        line = " ".join(raw.split())
        heading = line.endswith(":") and len(line.split()) <= 4
        if line and not heading and line not in seen:
            seen.add(line)
            lines.append(line)
    return lines


def ordered(lines: list[str], salt: str) -> list[str]:
    """The lines in a fixed pseudo-random order of their own (sha256 of salt + line)."""
    return sorted(lines, key=lambda line: hashlib.sha256(f"{salt}\n{line}".encode()).digest())


def rng_for(salt: str, line: str) -> random.Random:
    """A random generator seeded from the line (an int seed: stable across Python versions)."""
    digest = hashlib.sha256(f"{salt}\n{line}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def split(lines: list[str], sizes: tuple[int, int]) -> tuple[list[str], list[str]]:
    """The first sizes[0] lines for train, the next sizes[1] for val (disjoint)."""
    train, val = sizes
    if len(lines) < train + val:
        raise SystemExit(f"only {len(lines)} usable lines, need {train + val}")
    return lines[:train], lines[train : train + val]


def sft_record(line: str) -> dict[str, str]:
    words = line.split()
    half = len(words) // 2
    return {"prompt": f"Continue: {' '.join(words[:half])}\n", "response": " ".join(words[half:])}


def shuffle_words(line: str) -> str:
    """The line's words in another order, first letter and final punctuation kept in place."""
    words = line.split()
    stripped = words[-1].rstrip(_END_PUNCTUATION)
    tail = words[-1][len(stripped) :] if stripped else ""
    words[-1] = stripped or words[-1]
    first = words[0]
    if not (first == "I" or first.startswith("I'")):
        words[0] = first[:1].lower() + first[1:]
    rng = rng_for("order-shuffle", line)
    for _ in range(100):
        rng.shuffle(words)
        candidate = words[0][:1].upper() + words[0][1:] + " " + " ".join(words[1:]) + tail
        if candidate != line:
            return candidate
    raise SystemExit(f"cannot shuffle {line!r}")


def order_records(lines: list[str]) -> list[dict[str, str]]:
    """Half the lines as written, half shuffled (alternating in the sha256 order)."""
    records = [
        {"text": line, "label": "original"} if i % 2 == 0
        else {"text": shuffle_words(line), "label": "shuffled"}
        for i, line in enumerate(lines)
    ]
    return ordered_records(records, "order-records")


def ordered_records(records: list[dict[str, str]], salt: str) -> list[dict[str, str]]:
    return sorted(records, key=lambda r: hashlib.sha256(
        f"{salt}\n{json.dumps(r, sort_keys=True)}".encode()).digest())


def reverse_record(line: str) -> dict[str, str]:
    return {"source": line, "target": " ".join(reversed(line.split()))}


def write_jsonl(path: Path, records: list[dict[str, str]]) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    print(f"{path}: {len(records)} records, {path.stat().st_size / 1000:.0f} kB")


def main(out: Path = HERE) -> None:
    out.mkdir(parents=True, exist_ok=True)
    lines = corpus_lines()
    long_lines = [line for line in lines if len(line.split()) >= 6]
    short_lines = [line for line in lines if 3 <= len(line.split()) <= 6]

    train, val = split(ordered(long_lines, "sft"), SFT_SIZES)
    write_jsonl(out / "shakespeare_sft.jsonl", [sft_record(x) for x in train])
    write_jsonl(out / "shakespeare_sft_val.jsonl", [sft_record(x) for x in val])

    train, val = split(ordered(long_lines, "order"), ORDER_SIZES)
    train_records, val_records = order_records(train), order_records(val)
    for records in (train_records, val_records):
        labels = [r["label"] for r in records]
        assert labels.count("original") == labels.count("shuffled"), "classes must balance"
    write_jsonl(out / "shakespeare_order.jsonl", train_records)
    write_jsonl(out / "shakespeare_order_val.jsonl", val_records)

    train, val = split(ordered(short_lines, "reverse"), REVERSE_SIZES)
    write_jsonl(out / "shakespeare_reverse.jsonl", [reverse_record(x) for x in train])
    write_jsonl(out / "shakespeare_reverse_val.jsonl", [reverse_record(x) for x in val])


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else HERE)
