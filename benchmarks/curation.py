"""Near-duplicate removal: lmforge's near-dedup against datatrove's CPU MinHash pipeline.

Both run on the same synthetic JSON-lines corpus (~1 KB documents of random words, four
paragraphs each) with planted near-duplicates of known Jaccard: copies with 1-6 words
edited, a few words inserted, or paragraphs swapped (Jaccard ~0.75-0.97), and far copies
(~0.5) that must stay. The truth is computed here with Python sets of 5-word tuples. Both
tools use the same settings: 5-word n-grams, 14 bands × 8 rows (112 hashes), and 2 workers.

- datatrove (`pip install datatrove` into the venv; a benchmark competitor only, NOT a
  dependency of lmforge: it is in neither pyproject.toml nor constraints.txt): its own four
  stages — MinhashDedupSignature, MinhashDedupBuckets, MinhashDedupCluster (one task),
  MinhashDedupFilter writing the kept and the removed documents — on LocalPipelineExecutor
  with 2 workers. Its word tokenizers all need spaCy (even WhitespaceTokenizer splits with
  spaCy's "xx" model); it is given a `str.split` tokenizer instead (the corpus has no
  punctuation, so the shingles are the same), which can only make datatrove faster.
- lmforge: read + near-dedup phases (sign, pairs, verify, components, remove) on a fresh
  local Ray with 2 phase workers (Ray start and stop included), no cleaning steps and no
  exact dedup, as datatrove's pipeline has neither. The kept mask is where lmforge's
  near-dedup ends (encoding applies it); datatrove's filter also writes the kept text.

BENCH lines:
- near_dedup_vs_datatrove@SIZE: datatrove's seconds ÷ lmforge's, each end to end (goal ≥ 2).
- near_dedup_precision / near_dedup_recall: lmforge's, against the planted pairs with
  Jaccard ≥ 0.8 (a pair is found when exactly one of its two documents is removed;
  precision is the share of removed documents that belong to such a pair). datatrove's
  figures are in the detail.

Run: .venv/bin/python benchmarks/curation.py [--quick] [--size 230] [--keep]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

FILES = 4  # input files: datatrove's signature and filter stages run one task per file
WORKERS = 2


def bench(metric: str, value: float, goal: float, **detail: object) -> None:
    print("BENCH " + json.dumps({"metric": metric, "value": round(value, 4), "goal": goal,
                                 "detail": detail}), flush=True)


def ngrams(words: list[str], n: int = 5) -> set[tuple[str, ...]]:
    return {tuple(words[i:i + n]) for i in range(len(words) - n + 1)}


def make_corpus(folder: Path, megabytes: float, seed: int = 0) -> list[tuple[int, int, float]]:
    """Write the corpus as FILES JSON-lines files (`id` = line number over all files);
    returns the planted pairs (source id, copy id, their Jaccard)."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(2, 10, 50_000)
    letters = rng.integers(ord("a"), ord("z") + 1, (50_000, 9), dtype=np.uint8)
    vocab = [letters[i, :n].tobytes().decode() for i, n in enumerate(lengths)]
    weights = 1.0 / np.arange(1, len(vocab) + 1) ** 0.8  # Zipf-like word frequencies
    weights /= weights.sum()
    docs: list[list[list[str]]] = []
    pairs: list[tuple[int, int, float]] = []
    size, target = 0, megabytes * 1e6

    cdf = np.cumsum(weights)
    pool: list[str] = []
    at = 0

    def words(n: int) -> list[str]:
        nonlocal pool, at
        if at + n > len(pool):  # drawn in bulk: one draw per call is ~100x slower
            draws = np.minimum(np.searchsorted(cdf, rng.random(1 << 20)), len(vocab) - 1)
            pool, at = [vocab[i] for i in draws], 0
        at += n
        return pool[at - n : at]

    while size < target:
        base = [words(int(rng.integers(35, 50))) for _ in range(4)]
        docs.append(base)
        size += sum(len(" ".join(p)) + 2 for p in base)
        roll = rng.random()
        if roll < 0.10:  # word edits
            copy = [list(p) for p in base]
            for _ in range(int(rng.integers(1, 7))):
                p = int(rng.integers(4))
                copy[p][int(rng.integers(len(copy[p])))] = words(1)[0]
        elif roll < 0.15:  # an inserted passage
            copy = [list(p) for p in base]
            p, where = int(rng.integers(4)), int(rng.integers(30))
            copy[p][where:where] = words(int(rng.integers(2, 10)))
        elif roll < 0.20:  # paragraphs swapped
            copy = [base[1], base[0], base[3], base[2]]
        elif roll < 0.23:  # far: a different document for dedup purposes
            copy = [list(p) for p in base]
            for _ in range(18):
                p = int(rng.integers(4))
                copy[p][int(rng.integers(len(copy[p])))] = words(1)[0]
        else:
            continue
        a, b = sum(base, []), sum(copy, [])
        x, y = ngrams(a), ngrams(b)
        pairs.append((len(docs) - 1, len(docs), len(x & y) / len(x | y)))
        docs.append(copy)
        size += sum(len(" ".join(p)) + 2 for p in copy)
    # Copies go right after their source: both tools keep the first document of a cluster.
    per_file = -(-len(docs) // FILES)
    for f in range(FILES):
        with open(folder / f"part-{f}.jsonl", "w") as out:
            for i in range(f * per_file, min(len(docs), (f + 1) * per_file)):
                text = "\n\n".join(" ".join(p) for p in docs[i])
                out.write(json.dumps({"id": str(i), "text": text}) + "\n")
    return pairs


def score(removed: set[int], pairs: list[tuple[int, int, float]]) -> dict[str, float]:
    """Precision and recall of `removed` against the planted pairs with Jaccard ≥ 0.8."""
    positive = [(a, b) for a, b, j in pairs if j >= 0.8]
    in_positive = {d for pair in positive for d in pair}
    found = sum((a in removed) != (b in removed) for a, b in positive)
    return {"precision": len(removed & in_positive) / max(len(removed), 1),
            "recall": found / max(len(positive), 1), "removed": len(removed),
            "planted_positive": len(positive)}


def run_datatrove(corpus: Path, work: Path) -> tuple[float, set[int]]:
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.dedup.minhash import (
        MinhashConfig,
        MinhashDedupBuckets,
        MinhashDedupCluster,
        MinhashDedupFilter,
        MinhashDedupSignature,
    )
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.writers import JsonlWriter
    from datatrove.utils.hashing import HashConfig
    from datatrove.utils.word_tokenizers import WordTokenizer

    class SplitTokenizer(WordTokenizer):  # what spaCy's "xx" tokenizer does on this corpus
        def word_tokenize(self, text: str) -> list[str]:
            return text.split()

        def sent_tokenize(self, text: str) -> list[str]:
            return text.split("\n\n")

        def span_tokenize(self, text: str) -> list[tuple[int, int]]:
            raise NotImplementedError

    import datatrove.utils.hashes.xxhash as dt_xxhash
    import xxhash

    # datatrove 0.10.1 hashes each n-gram as a str; xxhash 4 (lmforge's pinned version)
    # wants bytes. Its 64-bit xxhash, given the UTF-8 bytes, as xxhash < 4 did by itself
    # (the executor forks: its workers see the patch).
    dt_xxhash.xxhash64 = lambda text: xxhash.xxh64_intdigest(text.encode("utf-8"))
    config = MinhashConfig(n_grams=5, num_buckets=14, hashes_per_bucket=8,
                           hash_config=HashConfig(precision=64, hash_fc="xxhash"))
    t0 = time.perf_counter()
    stages = [
        ([JsonlReader(str(corpus)), MinhashDedupSignature(
            output_folder=str(work / "sigs"), config=config,
            language=SplitTokenizer())], FILES),
        ([MinhashDedupBuckets(input_folder=str(work / "sigs"), output_folder=str(work / "buckets"),
                              config=config)], config.num_buckets),
        ([MinhashDedupCluster(input_folder=str(work / "buckets"),
                              output_folder=str(work / "remove_ids"), config=config)], 1),
        ([JsonlReader(str(corpus)), MinhashDedupFilter(
            input_folder=str(work / "remove_ids"),
            exclusion_writer=JsonlWriter(str(work / "removed"), compression=None)),
          JsonlWriter(str(work / "kept"), compression=None)], FILES),
    ]
    for i, (pipeline, tasks) in enumerate(stages):
        LocalPipelineExecutor(pipeline=pipeline, tasks=tasks, workers=min(WORKERS, tasks),
                              logging_dir=str(work / f"logs{i}")).run()
    seconds = time.perf_counter() - t0
    removed = set()
    for path in (work / "removed").glob("*.jsonl"):
        removed |= {int(json.loads(line)["id"]) for line in path.open()}
    return seconds, removed


def run_lmforge(corpus: Path, work: Path) -> tuple[float, set[int], dict]:
    from lmforge.pipeline.config import CleanConfig, DataConfig, DatasetSpec, TokenizerConfig
    from lmforge.pipeline.prepare.manifest_writer import fingerprint
    from lmforge.pipeline.prepare.near_dedup import run_near_dedup
    from lmforge.pipeline.prepare.phases import WorkContext, clean_chunk
    from lmforge.pipeline.prepare.publish import Workspace
    from lmforge.pipeline.prepare.sources import discover_files, plan_read_chunks
    from lmforge.pipeline.run.executor import RayExecutor
    from lmforge.pipeline.run.local_ray import ray_session

    data = DataConfig(datasets=[DatasetSpec(name="bench", paths=[str(corpus / "*.jsonl")])],
                      output_dir=str(work), dedup=False, near_dedup=True,
                      clean=CleanConfig(steps=[]), num_workers=WORKERS, val_fraction=0.0)
    t0 = time.perf_counter()
    with ray_session(None):
        ex = RayExecutor(WORKERS, progress=False)
        files = discover_files(data.datasets[0])
        space = Workspace.of(data, [f.size for f in files],
                             fingerprint(data, TokenizerConfig(), files), ex.workers)
        ctx = WorkContext(work_dir=str(space.work), output_dir=str(space.staging), data=data,
                          num_partitions=1)
        t1 = time.perf_counter()
        clean = ex.map(clean_chunk, plan_read_chunks(data.datasets, space.chunk_bytes, files),
                       "read", ctx)
        t2 = time.perf_counter()
        outcome = run_near_dedup(ctx, ex, clean)
        t3 = time.perf_counter()
        ex.close()
    seconds = time.perf_counter() - t0
    starts = np.concatenate([[0], np.cumsum([r.kept.docs for r in clean])])
    removed = set()
    for p in range(outcome.partitions):
        rows = np.load(space.work / "near_dedup" / f"{p:05d}.npy")
        removed |= set((starts[rows["chunk"]] + rows["doc"]).tolist())
    phases = {"ray_start": t1 - t0, "read": t2 - t1, "near_dedup": t3 - t2,
              "ray_stop": seconds - (t3 - t0)}
    return seconds, removed, {"phases_s": {k: round(v, 2) for k, v in phases.items()},
                              **{k: v for k, v in outcome.stats.items() if k != "examples"}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a 10 MB corpus (~1-2 min)")
    parser.add_argument("--size", type=float, default=230.0, help="corpus size in MB")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = parser.parse_args()
    size = 10.0 if args.quick else args.size
    root = Path(tempfile.mkdtemp(prefix="lmforge-curation-"))
    try:
        (root / "corpus").mkdir()
        t0 = time.perf_counter()
        pairs = make_corpus(root / "corpus", size)
        print(f"corpus: {size:g} MB, {len(pairs)} planted pairs "
              f"({time.perf_counter() - t0:.1f} s to make)", flush=True)
        lm_s, lm_removed, lm_detail = run_lmforge(root / "corpus", root / "lmforge")
        dt_s, dt_removed = run_datatrove(root / "corpus", root / "datatrove")
        lm, dt = score(lm_removed, pairs), score(dt_removed, pairs)
        print(f"lmforge {lm_s:.1f} s {lm}\ndatatrove {dt_s:.1f} s {dt}", flush=True)
        label = f"{size:g}MB"
        bench(f"near_dedup_vs_datatrove@{label}", dt_s / lm_s, 2.0, lmforge_s=round(lm_s, 2),
              datatrove_s=round(dt_s, 2), workers=WORKERS, lmforge=lm_detail)
        bench("near_dedup_precision", lm["precision"], 0.99, datatrove=dt["precision"],
              size=label, removed=lm["removed"])
        bench("near_dedup_recall", lm["recall"], 0.95, datatrove=dt["recall"], size=label,
              planted_positive=lm["planted_positive"])
    finally:
        if args.keep:
            print(f"kept {root}", file=sys.stderr)
        else:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
