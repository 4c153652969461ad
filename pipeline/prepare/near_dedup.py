"""Near-duplicate removal (`data.near_dedup`): MinHash + LSH, verified pairs, distributed
connected components, one document kept per cluster.

Runs after exact dedup, on the documents it kept, as five resumable phases whose work
items exchange *partitioned files* as exact dedup does (an item writes its rows sorted by
destination partition and returns the bounds; the next phase's item ``p`` reads slice
``p`` of every file):

1. ``near_sign`` per read chunk: MinHash signatures (`minhash.py`) → one row
   ``(band key, document)`` per band, partitioned by key.
2. ``near_pairs`` per partition: documents sharing a band key are candidate pairs (every
   pair in a bucket of up to 8; in a bigger one, each document with the bucket's first and
   with its neighbour) → rows ``(smaller, larger)`` partitioned by the smaller.
3. ``near_verify`` per partition: each distinct candidate pair is verified with the *exact*
   Jaccard of the two shingle sets (recomputed from the cleaned text), kept if it is at
   least the threshold. Exact rather than estimated from the 112 MinHash values: that
   estimate's standard error at J = 0.8 is sqrt(0.8·0.2/112) ≈ 0.038, so a pair at 0.85
   would be dropped ~1 time in 10 and a pair at 0.75 kept ~1 time in 10; only candidates
   are re-shingled, a small share of the corpus.
4. ``near_cc`` rounds per partition: connected components of the verified pairs, with
   alternating large-star / small-star rounds (`components.py`) until two rounds in a row
   change nothing. No step sees more than one partition's edges.
5. ``near_removed`` per partition: every document with a smaller neighbour in the final
   stars is removed; the smallest document id of each cluster is kept. Document ids are
   global ordinals of the cleaned corpus in input order (dataset, file, offset), so the kept
   document is the same whatever the number of workers, read chunks or partitions.

Memory per work item is bounded by its partition, not by the corpus: there are
``ceil(documents × bands / NEAR_ROWS_PER_PARTITION)`` partitions, so a ``near_pairs`` item
holds at most ~4 M bucket rows (64 MB, ~200 MB while sorting); ``near_verify`` handles its
pairs in blocks of 16,384 (their texts and shingles: ~100 MB for 1 KB documents); a
``near_cc`` item holds the edges of its partition's nodes (16 bytes per edge end);
``near_sign`` one read chunk's text plus ~40 MB of temporaries per MiB of text hashed at a
time.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import numpy as np

from lmforge.pipeline.config import NearDedupConfig
from lmforge.pipeline.prepare import components, minhash
from lmforge.pipeline.prepare.phases import (
    REMOVED_ROW,
    WorkContext,
    documents_text,
    kept_mask,
    load_clean,
    resumable,
    save_npy,
)
from lmforge.pipeline.prepare.results import CleanResult

NEAR_ROWS_PER_PARTITION = 4 * 2**20  # band-key rows per partition: bounds item memory
BUCKET_ROW = np.dtype([("key", "<u8"), ("doc", "<u8")])
PAIR_ROW = np.dtype([("lo", "<u8"), ("hi", "<u8")])
MAX_ROUNDS = 200
EXAMPLES_PER_PARTITION = 3
EXAMPLES_PER_DATASET = 5
EXAMPLE_CHARS = 300
_ALL_PAIRS_BUCKET = 8  # buckets up to this size: every pair is a candidate
_VERIFY_BLOCK = 16_384  # candidate pairs verified at a time: ~100 MB for 1 KB documents


class Executor(Protocol):
    """What the near-dedup phases need of `run.executor`'s executors."""

    def map(self, fn: Callable[..., Any], items: list[Any], desc: str,
            *args: Any) -> list[Any]: ...


@dataclass
class NearItem:
    """A near-dedup work item's result: its counts and where its rows go."""

    item: int
    count: int = 0  # sign: documents signed; pairs: candidates; verify: duplicates; cc: changes
    other: int = 0  # verify: distinct candidates checked
    bounds: list[int] = field(default_factory=list)  # rows per destination partition

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> NearItem:
        return cls(int(raw["item"]), int(raw["count"]), int(raw["other"]),
                   [int(b) for b in raw["bounds"]])


@dataclass
class NearRemoved:
    """One partition's removed documents: counts per chunk and a few examples."""

    partition: int
    removed_docs: int
    removed_bytes: int
    per_chunk: dict[str, list[int]]  # chunk index -> [documents, bytes] removed
    examples: list[dict[str, Any]]  # removed/kept pairs: ids, Jaccard, the start of each text

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> NearRemoved:
        return cls(int(raw["partition"]), int(raw["removed_docs"]), int(raw["removed_bytes"]),
                   {str(k): [int(v[0]), int(v[1])] for k, v in raw["per_chunk"].items()},
                   list(raw["examples"]))


@dataclass
class NearDedupOutcome:
    """What the driver needs back: partitions (for the kept masks) and the stats."""

    partitions: int
    removed: list[NearRemoved]
    stats: dict[str, Any]


def near_partitions(clean: list[CleanResult], settings: NearDedupConfig) -> int:
    """Partitions of the near-dedup phases for these cleaned chunks (worker-independent)."""
    rows = sum(r.kept.docs for r in clean) * settings.bands
    return max(1, math.ceil(rows / NEAR_ROWS_PER_PARTITION))


def run_near_dedup(ctx: WorkContext, ex: Executor, clean: list[CleanResult]) -> NearDedupOutcome:
    """Run the five near-dedup phases over the cleaned (and exactly deduplicated) chunks.

    Args:
        ctx: Work context (`ctx.data.near_dedup` holds the settings).
        ex: The executor running the items.
        clean: Every chunk's clean result, in chunk order.
    """
    settings = ctx.data.near_dedup
    assert isinstance(settings, NearDedupConfig)
    parts = near_partitions(clean, settings)
    starts = np.concatenate([[0], np.cumsum([r.kept.docs for r in clean])]).tolist()
    chunks = [r.chunk for r in clean]
    signed = ex.map(near_sign, chunks, "near-dedup sign", ctx, parts, starts)
    pairs = ex.map(near_pairs, list(range(parts)), "near-dedup pairs", ctx, parts,
                   [r.bounds for r in signed])
    verified = ex.map(near_verify, list(range(parts)), "near-dedup verify", ctx, parts,
                      [r.bounds for r in pairs], starts)
    previous, rounds, quiet = verified, 0, 0
    while quiet < 2:  # two rounds in a row without a change: stars (components.py)
        rounds += 1
        if rounds > MAX_ROUNDS:
            raise RuntimeError(f"near_dedup: components did not converge in {MAX_ROUNDS} "
                               "rounds; this is a bug, please report it")
        previous = ex.map(near_cc, list(range(parts)), f"near-dedup components {rounds}",
                          ctx, parts, rounds, [r.bounds for r in previous])
        quiet = quiet + 1 if sum(r.count for r in previous) == 0 else 0
    removed = ex.map(near_removed, list(range(parts)), "near-dedup remove", ctx, rounds,
                     [r.bounds for r in previous], starts)
    datasets = {r.chunk: r.dataset for r in clean}
    stats = near_dedup_stats(settings, signed, verified, removed, rounds, datasets)
    return NearDedupOutcome(parts, removed, stats)


def _slices(paths: list[str], bounds: list[list[int]], part: int, dtype: np.dtype,
            ctx: WorkContext) -> np.ndarray:
    """Slice `part` of every partitioned file (`paths[i]` with `bounds[i]`), concatenated."""
    got = []
    for path, b in zip(paths, bounds, strict=True):
        if b[part + 1] > b[part]:
            got.append(np.array(np.load(ctx.path(path), mmap_mode="r")[b[part]:b[part + 1]]))
    return np.concatenate(got) if got else np.zeros(0, dtype)


def _save_partitioned(ctx: WorkContext, path: str, rows: np.ndarray, dest: np.ndarray,
                      parts: int) -> list[int]:
    """Save `rows` ordered by destination partition (stably); returns the bounds."""
    order = np.argsort(dest, kind="stable")
    save_npy(ctx.path(path), rows[order])
    return np.searchsorted(dest[order], np.arange(parts + 1)).tolist()


def near_sign(chunk: int, ctx: WorkContext, parts: int, starts: list[int]) -> NearItem:
    """MinHash one chunk's kept documents into band-key rows, partitioned by key."""
    return resumable(ctx, "near_sign", f"{chunk:06d}",
                     lambda: _sign(chunk, ctx, parts, starts), NearItem.from_dict)


def _sign(chunk: int, ctx: WorkContext, parts: int, starts: list[int]) -> NearItem:
    settings = ctx.data.near_dedup
    text, offsets, digests = load_clean(chunk, ctx)
    docs = np.flatnonzero(kept_mask(chunk, len(digests), ctx))  # exact dedup's survivors
    texts = documents_text(text, offsets, docs)
    hashes, shingle_offsets = minhash.ngram_hashes(texts, settings.ngram)
    has_words = np.diff(shingle_offsets) > 0
    a, b = minhash.hash_parameters(settings.bands * settings.rows, settings.seed)
    sig = minhash.signatures(hashes, shingle_offsets, a, b)[has_words]
    keys = minhash.band_keys(sig, settings.bands, settings.rows)  # (docs, bands)
    rows = np.zeros(keys.size, BUCKET_ROW)
    rows["key"] = keys.reshape(-1)
    rows["doc"] = np.repeat(starts[chunk] + docs[has_words], settings.bands)
    bounds = _save_partitioned(ctx, f"near/buckets/{chunk:06d}.npy", rows,
                               rows["key"] % np.uint64(parts), parts)
    return NearItem(chunk, int(has_words.sum()), 0, bounds)


def near_pairs(part: int, ctx: WorkContext, parts: int, bounds: list[list[int]]) -> NearItem:
    """Candidate pairs of the band-key buckets of one partition."""
    return resumable(ctx, "near_pairs", f"{part:05d}",
                     lambda: _pairs(part, ctx, parts, bounds), NearItem.from_dict)


def _pairs(part: int, ctx: WorkContext, parts: int, bounds: list[list[int]]) -> NearItem:
    paths = [f"near/buckets/{chunk:06d}.npy" for chunk in range(len(bounds))]
    rows = np.sort(_slices(paths, bounds, part, BUCKET_ROW, ctx), order=["key", "doc"])
    key, doc = rows["key"], rows["doc"]
    first = np.flatnonzero(np.concatenate([[True], key[1:] != key[:-1]]))
    size = np.diff(np.append(first, len(rows)))
    group = np.repeat(np.arange(len(first)), size)
    lo_parts = [doc[first][group]]  # each document with its bucket's first (smallest)
    hi_parts = [doc]
    small = size[group] <= _ALL_PAIRS_BUCKET
    for step in range(1, _ALL_PAIRS_BUCKET):  # every pair in small buckets, neighbours else
        at = np.flatnonzero(key[step:] == key[:-step] if step < len(key) else [])
        if step > 1:
            at = at[small[at]]
        lo_parts.append(doc[at])
        hi_parts.append(doc[at + step])
    pairs = np.zeros(sum(map(len, lo_parts)), PAIR_ROW)
    pairs["lo"], pairs["hi"] = np.concatenate(lo_parts), np.concatenate(hi_parts)
    pairs = np.unique(pairs[pairs["lo"] < pairs["hi"]])
    out = _save_partitioned(ctx, f"near/pairs/{part:05d}.npy", pairs,
                            pairs["lo"] % np.uint64(parts), parts)
    return NearItem(part, len(pairs), 0, out)


def near_verify(part: int, ctx: WorkContext, parts: int, bounds: list[list[int]],
                starts: list[int]) -> NearItem:
    """Keep the candidate pairs of one partition whose exact Jaccard reaches the threshold;
    write them as edges for the components."""
    return resumable(ctx, "near_verify", f"{part:05d}",
                     lambda: _verify(part, ctx, parts, bounds, starts), NearItem.from_dict)


def _verify(part: int, ctx: WorkContext, parts: int, bounds: list[list[int]],
            starts: list[int]) -> NearItem:
    settings = ctx.data.near_dedup
    paths = [f"near/pairs/{p:05d}.npy" for p in range(len(bounds))]
    pairs = np.unique(_slices(paths, bounds, part, PAIR_ROW, ctx))
    kept = []
    for lo in range(0, len(pairs), _VERIFY_BLOCK):
        block = pairs[lo : lo + _VERIFY_BLOCK]
        similarity = jaccard_of(block["lo"], block["hi"], ctx, starts, settings.ngram)
        kept.append(block[similarity >= settings.threshold])
    edges = np.concatenate(kept) if kept else np.zeros(0, PAIR_ROW)
    rows = components.edge_rows(edges["lo"], edges["hi"])
    out = _save_partitioned(ctx, f"near/edges/000/{part:05d}.npy", rows,
                            rows["node"] % np.uint64(parts), parts)
    return NearItem(part, len(edges), len(pairs), out)


def jaccard_of(left: np.ndarray, right: np.ndarray, ctx: WorkContext, starts: list[int],
               ngram: int) -> np.ndarray:
    """Exact Jaccard of the shingle sets of documents ``left[i]`` and ``right[i]``
    (global ids), from their cleaned text."""
    docs = np.unique(np.concatenate([left, right]))
    hashes, offsets = minhash.shingles(fetch_texts(docs, ctx, starts), ngram)
    return minhash.jaccard_pairs(hashes, offsets, np.searchsorted(docs, left),
                                 np.searchsorted(docs, right))


def locate(docs: np.ndarray, starts: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """(chunk, index in the chunk) of global document ids."""
    bounds = np.asarray(starts, np.int64)
    docs = docs.astype(np.int64)
    chunk = np.searchsorted(bounds, docs, side="right") - 1
    return chunk, docs - bounds[chunk]


def fetch_texts(docs: np.ndarray, ctx: WorkContext, starts: list[int]) -> list[str]:
    """The cleaned texts of global document ids, in the order given."""
    chunk, local = locate(docs, starts)
    texts: list[str] = [""] * len(docs)
    for c in np.unique(chunk):
        at = np.flatnonzero(chunk == c)
        text, offsets, _ = load_clean(int(c), ctx)
        for i, t in zip(at, documents_text(text, offsets, local[at]), strict=True):
            texts[i] = t
    return texts


def near_cc(part: int, ctx: WorkContext, parts: int, round_: int,
            bounds: list[list[int]]) -> NearItem:
    """One components round (odd: large-star, even: small-star) over a partition's edges."""
    return resumable(ctx, "near_cc", f"{round_:03d}-{part:05d}",
                     lambda: _cc(part, ctx, parts, round_, bounds), NearItem.from_dict)


def _cc(part: int, ctx: WorkContext, parts: int, round_: int,
        bounds: list[list[int]]) -> NearItem:
    paths = [f"near/edges/{round_ - 1:03d}/{p:05d}.npy" for p in range(len(bounds))]
    rows = components.distinct_rows([_slices(paths, bounds, part, components.EDGE_ROW, ctx)])
    step = components.large_star if round_ % 2 else components.small_star
    out, changed = step(rows)
    written = _save_partitioned(ctx, f"near/edges/{round_:03d}/{part:05d}.npy", out,
                                out["node"] % np.uint64(parts), parts)
    return NearItem(part, changed, 0, written)


def near_removed(part: int, ctx: WorkContext, rounds: int, bounds: list[list[int]],
                 starts: list[int]) -> NearRemoved:
    """The removed documents of one partition's nodes, as (chunk, doc) rows."""
    return resumable(ctx, "near_removed", f"{part:05d}",
                     lambda: _removed(part, ctx, rounds, bounds, starts), NearRemoved.from_dict)


def _removed(part: int, ctx: WorkContext, rounds: int, bounds: list[list[int]],
             starts: list[int]) -> NearRemoved:
    paths = [f"near/edges/{rounds:03d}/{p:05d}.npy" for p in range(len(bounds))]
    rows = components.distinct_rows([_slices(paths, bounds, part, components.EDGE_ROW, ctx)])
    leaves, kept = components.leaves(rows)  # sorted by leaf
    chunk, local = locate(leaves, starts)
    removed = np.zeros(len(leaves), REMOVED_ROW)
    removed["chunk"], removed["doc"] = chunk, local
    save_npy(ctx.path("near_dedup", f"{part:05d}.npy"), removed)  # sorted by (chunk, doc)
    per_chunk: dict[str, list[int]] = {}
    for c in np.unique(chunk):
        offsets = np.load(ctx.path("clean", f"{int(c):06d}.offsets.npy"))
        docs = local[chunk == c]
        per_chunk[str(int(c))] = [len(docs), int((offsets[docs + 1] - offsets[docs]).sum())]
    examples = []
    if len(leaves):
        some = slice(0, EXAMPLES_PER_PARTITION)
        similarity = jaccard_of(leaves[some], kept[some], ctx, starts, ctx.data.near_dedup.ngram)
        texts = fetch_texts(np.concatenate([leaves[some], kept[some]]), ctx, starts)
        n = len(similarity)
        examples = [{"removed_doc": int(leaves[i]), "kept_doc": int(kept[i]),
                     "chunk": int(chunk[i]),
                     "jaccard": round(float(similarity[i]), 4),
                     "removed": texts[i][:EXAMPLE_CHARS], "kept": texts[n + i][:EXAMPLE_CHARS]}
                    for i in range(n)]
    return NearRemoved(part, len(leaves), sum(v[1] for v in per_chunk.values()), per_chunk,
                       examples)


def near_dedup_stats(settings: NearDedupConfig, signed: list[NearItem],
                     verified: list[NearItem], removed: list[NearRemoved], rounds: int,
                     datasets: dict[int, str]) -> dict[str, Any]:
    """stats.json's ``near_dedup``: settings, counts per phase and per dataset, examples.

    Examples (per dataset) are the removed documents with the smallest ids, each with
    the document kept for its cluster (the cluster's smallest id) and their Jaccard.
    """
    per_dataset = {name: {"removed_docs": 0, "removed_bytes": 0}
                   for name in dict.fromkeys(datasets.values())}
    for r in removed:
        for chunk, (docs, nbytes) in r.per_chunk.items():
            counts = per_dataset[datasets[int(chunk)]]
            counts["removed_docs"] += docs
            counts["removed_bytes"] += nbytes
    examples: dict[str, list[dict[str, Any]]] = {name: [] for name in per_dataset}
    for example in sorted((e for r in removed for e in r.examples),
                          key=lambda e: e["removed_doc"]):
        name = datasets[example["chunk"]]
        if len(examples[name]) < EXAMPLES_PER_DATASET:
            examples[name].append({k: v for k, v in example.items() if k != "chunk"})
    return {
        "settings": asdict(settings),
        "signed_docs": sum(r.count for r in signed),
        "candidate_pairs": sum(r.other for r in verified),  # distinct pairs
        "verified_pairs": sum(r.count for r in verified),
        "component_rounds": rounds,
        "removed_docs": sum(r.removed_docs for r in removed),
        "removed_bytes": sum(r.removed_bytes for r in removed),
        "datasets": per_dataset,
        "examples": examples,
    }
