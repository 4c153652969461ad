"""The work of each prepare phase, one item at a time, resumable.

Phases: clean (read + clean/filter + hash, per read chunk) → dedup (per hash partition) →
near dedup (near_dedup.py, when on) → tokenizer text (per chunk: the text the tokenizer
trains on) → encode (per chunk) → write (per shard). Without dedup and with a given
tokenizer, clean and encode run as one pass per chunk instead. Each item writes its
outputs atomically under the work folder and then a `done/` marker holding its result
(results.py), so a rerun after a crash returns finished items from their markers and only
does the rest. The functions know nothing about who runs
them (in-process or Ray).
"""

from __future__ import annotations

import hashlib
import io
import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

import numpy as np

from lmforge.pipeline.config import DataConfig
from lmforge.pipeline.contract.dataset_manifest import ShardInfo
from lmforge.pipeline.contract.shard_format import sample_key, shard_file_name
from lmforge.pipeline.durable import disk_space_errors, read_marker, write_atomic, write_json
from lmforge.pipeline.prepare.chain import build_chain, removed_samples
from lmforge.pipeline.prepare.readers import BadInputLog, read_piece
from lmforge.pipeline.prepare.results import (
    BadInput,
    CleanResult,
    DedupResult,
    DocCounts,
    EncodeResult,
    SplitTokens,
)
from lmforge.pipeline.prepare.shards import ShardWriter, pack_windows
from lmforge.pipeline.prepare.sources import ReadChunk
from lmforge.pipeline.prepare.steps import Document, run_steps
from lmforge.pipeline.prepare.tokenizer import DocumentEncoder

HASH_ROW = np.dtype([("hi", "<u8"), ("lo", "<u8"), ("doc", "<u4"), ("nbytes", "<u4")])
REMOVED_ROW = np.dtype([("chunk", "<u4"), ("doc", "<u4")])
SPLITS = ("train", "val")
_STEP_BATCH = 1024
_ENCODE_BATCH = 2048
_WRITE_BLOCK_WINDOWS = 2048  # windows packed and written at a time
log = logging.getLogger(__name__)


@dataclass
class WorkContext:
    """What every phase item needs; small and picklable (Ray workers unpickle it)."""

    work_dir: str
    output_dir: str
    data: DataConfig
    num_partitions: int
    tokenizer_model: str = ""
    tokenizer_text_threshold: float = 0.0  # the share of documents the tokenizer trains on
    pad_id: int = 0  # the padding id (`shard_format.padding_id`), not always a piece
    near_partitions: int = 0  # set once near-dedup is done: its `near_dedup/` files

    def path(self, *parts: str) -> Path:
        return Path(self.work_dir).joinpath(*parts)


def save_npy(path: Path, array: np.ndarray) -> None:
    """Write an .npy durably (see `durable.write_atomic`): the item's `done/` marker, written
    after it, vouches for it."""
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    write_atomic(path, buffer.getvalue())


class _Result(Protocol):
    def to_dict(self) -> dict[str, Any]: ...


R = TypeVar("R", bound=_Result)


def read_result(marker: Path, kind: Callable[[dict[str, Any]], R]) -> R | None:
    """The result stored in `marker` (`kind` is its `from_dict`), or None when there is
    none or it does not parse as one (an older layout, a damaged file): not done."""
    done = read_marker(marker)
    if done is None:
        return None
    try:
        return kind(done)
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        log.warning("prepare: ignoring the resume marker %s, not a result of this version "
                    "(%r); redoing that item", marker, err)
        marker.unlink(missing_ok=True)
        return None


def resumable(ctx: WorkContext, phase: str, key: str, work: Callable[[], R],
              kind: Callable[[dict[str, Any]], R]) -> R:
    """Return the stored result of a finished item, or run `work` and store its result.

    Args:
        ctx: Work context.
        phase: The marker folder (``done/<phase>/``).
        key: The item's marker name.
        work: Does the item; returns its result.
        kind: The result's `from_dict`, to read a stored marker back.
    """
    marker = ctx.path("done", phase, f"{key}.json")
    done = read_result(marker, kind)
    if done is not None:
        return done
    with disk_space_errors(ctx.work_dir):
        result = work()
        write_json(marker, result.to_dict())
    return result


def _digests(blobs: list[bytes]) -> np.ndarray:
    """(n, 3) uint64: words 0-1 are the dedup key, word 2 decides split and sampling."""
    joined = b"".join(hashlib.blake2b(b, digest_size=24).digest() for b in blobs)
    return np.frombuffer(joined, dtype="<u8").reshape(-1, 3)


def is_val(digests: np.ndarray, val_fraction: float) -> np.ndarray:
    """Boolean mask of documents that belong to the val split (high bits of word 2)."""
    return (digests[:, 2] >> np.uint64(11)).astype(np.float64) / 2.0**53 < val_fraction


def in_tokenizer_text(digests: np.ndarray, threshold: float) -> np.ndarray:
    """Boolean mask of documents the tokenizer trains on (low 32 bits of word 2)."""
    return (digests[:, 2] & np.uint64(0xFFFFFFFF)).astype(np.float64) / 2.0**32 < threshold


def clean_chunk(chunk: ReadChunk, ctx: WorkContext) -> CleanResult:
    """Read a chunk's pieces, clean and filter them, store the texts and their hashes."""
    return resumable(ctx, "clean", f"{chunk.index:06d}", lambda: _clean(chunk, ctx),
                     CleanResult.from_dict)


def _read_and_clean(chunk: ReadChunk, ctx: WorkContext) -> tuple[list[Document], CleanResult]:
    """A chunk's documents that pass the cleaning chain, and the clean result (counts)."""
    spec = next(d for d in ctx.data.datasets if d.name == chunk.dataset)
    log = BadInputLog(strict=ctx.data.strict)
    steps = build_chain(ctx.data)
    read_docs = read_bytes = 0
    kept: list[Document] = []
    for piece in chunk.pieces:
        batch: list[Document] = []
        for doc in read_piece(piece, spec.txt_unit, spec.text_field,
                              ctx.data.max_record_bytes, log):
            read_docs += 1
            read_bytes += doc.size()
            batch.append(doc)
            if len(batch) == _STEP_BATCH:
                kept.extend(run_steps(steps, batch))
                batch = []
        kept.extend(run_steps(steps, batch))
    return kept, CleanResult(
        chunk=chunk.index,
        dataset=chunk.dataset,
        read=DocCounts(read_docs, read_bytes),
        steps={s.name: asdict(s.stats) for s in steps},
        kept=DocCounts(len(kept), sum(d.size() for d in kept)),
        bad_input=BadInput(log.counts, log.examples),
        removed_samples=removed_samples(steps),
    )


def _clean(chunk: ReadChunk, ctx: WorkContext) -> CleanResult:
    kept, result = _read_and_clean(chunk, ctx)
    blobs = [d.text.encode("utf-8", "surrogatepass") for d in kept]
    lengths = np.fromiter(map(len, blobs), np.int64, count=len(blobs))
    digests = _digests(blobs) if blobs else np.zeros((0, 3), "<u8")
    name = f"{chunk.index:06d}"
    save_npy(ctx.path("clean", f"{name}.text.npy"), np.frombuffer(b"".join(blobs), np.uint8))
    save_npy(ctx.path("clean", f"{name}.offsets.npy"), np.concatenate([[0], np.cumsum(lengths)]))
    save_npy(ctx.path("clean", f"{name}.digests.npy"), digests)
    # Hash rows sorted by partition so a dedup item reads only its slice of each file.
    partition = digests[:, 0] % np.uint64(ctx.num_partitions)
    order = np.argsort(partition, kind="stable")
    rows = np.zeros(len(blobs), HASH_ROW)
    rows["hi"], rows["lo"] = digests[order, 0], digests[order, 1]
    rows["doc"], rows["nbytes"] = order, lengths[order]
    save_npy(ctx.path("hash", f"{name}.npy"), rows)
    bounds = np.searchsorted(partition[order], np.arange(ctx.num_partitions + 1))
    result.partition_bounds = bounds.tolist()
    return result


def dedup_partition(partition: int, ctx: WorkContext, bounds: list[list[int]]) -> DedupResult:
    """Find exact duplicates among the hashes of one partition; keep the first occurrence.

    Args:
        partition: Partition index.
        ctx: Work context.
        bounds: Per chunk, the `partition_bounds` from its clean result.
    """
    return resumable(ctx, "dedup", f"{partition:05d}",
                     lambda: _dedup(partition, ctx, bounds), DedupResult.from_dict)


def _dedup(partition: int, ctx: WorkContext, bounds: list[list[int]]) -> DedupResult:
    parts, chunks = [], []
    for chunk, chunk_bounds in enumerate(bounds):
        lo, hi = chunk_bounds[partition], chunk_bounds[partition + 1]
        if hi > lo:
            rows = np.load(ctx.path("hash", f"{chunk:06d}.npy"), mmap_mode="r")[lo:hi]
            parts.append(np.array(rows))
            chunks.append(np.full(hi - lo, chunk, np.uint32))
    removed = np.zeros(0, REMOVED_ROW)
    removed_bytes = 0
    bytes_per_chunk = np.zeros(len(bounds), np.int64)
    if parts:
        rows, chunk_ids = np.concatenate(parts), np.concatenate(chunks)
        # Sort by key, then by document order: the first of each key group is kept.
        order = np.lexsort((rows["doc"], chunk_ids, rows["lo"], rows["hi"]))
        rows, chunk_ids = rows[order], chunk_ids[order]
        dup = np.zeros(len(rows), bool)
        dup[1:] = (rows["hi"][1:] == rows["hi"][:-1]) & (rows["lo"][1:] == rows["lo"][:-1])
        removed = np.zeros(int(dup.sum()), REMOVED_ROW)
        removed["chunk"], removed["doc"] = chunk_ids[dup], rows["doc"][dup]
        removed = np.sort(removed, order=["chunk", "doc"])
        removed_bytes = int(rows["nbytes"][dup].sum())
        np.add.at(bytes_per_chunk, chunk_ids[dup], rows["nbytes"][dup])
    save_npy(ctx.path("dedup", f"{partition:05d}.npy"), removed)
    per_chunk = np.bincount(removed["chunk"], minlength=len(bounds)) if len(removed) else []
    return DedupResult(partition, len(removed), removed_bytes,
                       {str(c): int(n) for c, n in enumerate(per_chunk) if n},
                       {str(c): int(n) for c, n in enumerate(bytes_per_chunk) if n})


def load_clean(chunk: int, ctx: WorkContext) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A read chunk's cleaned text (UTF-8 bytes, memory-mapped), document offsets and
    digests, as the clean phase wrote them."""
    name = f"{chunk:06d}"
    text = np.load(ctx.path("clean", f"{name}.text.npy"), mmap_mode="r")
    offsets = np.load(ctx.path("clean", f"{name}.offsets.npy"))
    digests = np.load(ctx.path("clean", f"{name}.digests.npy"))
    return text, offsets, digests


def kept_mask(chunk: int, n_docs: int, ctx: WorkContext) -> np.ndarray:
    """Which of a chunk's ``n_docs`` cleaned documents survive exact and near dedup."""
    keep = np.ones(n_docs, bool)
    exact = ctx.num_partitions if ctx.data.dedup else 0
    for folder, partitions in (("dedup", exact), ("near_dedup", ctx.near_partitions)):
        for partition in range(partitions):
            removed = np.load(ctx.path(folder, f"{partition:05d}.npy"), mmap_mode="r")
            lo, hi = np.searchsorted(removed["chunk"], [chunk, chunk + 1])
            keep[np.asarray(removed["doc"][lo:hi], np.int64)] = False
    return keep


def documents_text(text: np.ndarray, offsets: np.ndarray, docs: np.ndarray) -> list[str]:
    """The texts of documents ``docs`` of a chunk loaded with :func:`load_clean`."""
    raw = text.tobytes() if len(docs) else b""
    return [raw[offsets[i] : offsets[i + 1]].decode("utf-8", "surrogatepass") for i in docs]


def tokenizer_text_of_chunk(chunk: int, ctx: WorkContext) -> list[str]:
    """Texts of a chunk's (deduplicated) documents the tokenizer trains on."""
    text, offsets, digests = load_clean(chunk, ctx)
    chosen = (kept_mask(chunk, len(digests), ctx)
              & in_tokenizer_text(digests, ctx.tokenizer_text_threshold))
    return documents_text(text, offsets, np.flatnonzero(chosen))


def encode_chunk(chunk: int, ctx: WorkContext, encoder: DocumentEncoder) -> EncodeResult:
    """Encode a chunk's kept documents into per-split token streams (tokens + doc lengths)."""
    return resumable(ctx, "encode", f"{chunk:06d}", lambda: _encode(chunk, ctx, encoder),
                     EncodeResult.from_dict)


def _encode(chunk: int, ctx: WorkContext, encoder: DocumentEncoder) -> EncodeResult:
    text, offsets, digests = load_clean(chunk, ctx)
    keep = kept_mask(chunk, len(digests), ctx)
    val = is_val(digests, ctx.data.val_fraction)
    splits = {split: documents_text(text, offsets, np.flatnonzero(mask))
              for split, mask in (("train", keep & ~val), ("val", keep & val))}
    return _encode_splits(chunk, splits, ctx, encoder)


def clean_and_encode_chunk(chunk: ReadChunk, ctx: WorkContext,
                           encoder: DocumentEncoder) -> EncodeResult:
    """Read, clean and encode a chunk in one pass, when nothing global comes in between (no
    dedup, tokenizer given): no intermediate text files, no wait for the whole corpus.

    The result is `encode_chunk`'s with the chunk's clean result in `clean`; the shards
    are byte for byte those of the separate clean, dedup and encode phases.
    """
    return resumable(ctx, "encode", f"{chunk.index:06d}",
                     lambda: _clean_and_encode(chunk, ctx, encoder), EncodeResult.from_dict)


def _clean_and_encode(chunk: ReadChunk, ctx: WorkContext,
                      encoder: DocumentEncoder) -> EncodeResult:
    kept, clean = _read_and_clean(chunk, ctx)
    texts = [d.text for d in kept]
    if ctx.data.val_fraction > 0 and texts:  # the split is decided by the document hash
        val = is_val(_digests([t.encode("utf-8", "surrogatepass") for t in texts]),
                     ctx.data.val_fraction)
    else:
        val = np.zeros(len(texts), bool)
    splits = {"train": [t for t, v in zip(texts, val, strict=True) if not v],
              "val": [t for t, v in zip(texts, val, strict=True) if v]}
    result = _encode_splits(chunk.index, splits, ctx, encoder)
    result.clean = clean
    return result


def _encode_splits(
    chunk: int, splits: dict[str, list[str]], ctx: WorkContext, encoder: DocumentEncoder
) -> EncodeResult:
    """Encode each split's texts into a token stream (tokens + doc lengths) on disk."""
    counts: dict[str, SplitTokens] = {}
    hist = np.zeros(40, np.int64)
    for split, texts in splits.items():
        token_parts, length_parts = [], []
        for i in range(0, len(texts), _ENCODE_BATCH):
            tokens, lengths = encoder.encode(texts[i : i + _ENCODE_BATCH])
            token_parts.append(tokens)
            length_parts.append(lengths)
        tokens = np.concatenate(token_parts) if token_parts else np.zeros(0, encoder.dtype)
        lengths = np.concatenate(length_parts) if length_parts else np.zeros(0, np.int64)
        save_npy(ctx.path("tokens", f"{chunk:06d}.{split}.tokens.npy"), tokens)
        save_npy(ctx.path("tokens", f"{chunk:06d}.{split}.lengths.npy"), lengths)
        hist += np.bincount(np.log2(np.maximum(lengths, 1)).astype(np.int64), minlength=40)[:40]
        counts[split] = SplitTokens(len(texts), int(lengths.sum()))
    return EncodeResult(chunk, counts, hist.tolist())


@dataclass
class ShardPlan:
    """One shard to write: windows [first_window, first_window + n_windows) of a split."""

    dataset: str
    split: str
    index: int
    first_window: int
    n_windows: int
    chunks: list[tuple[int, int]]  # (chunk, stream position of the chunk's first token)


def write_shard(plan: ShardPlan, ctx: WorkContext) -> ShardInfo:
    """Write one shard unless a finished copy is already there (see `write_shard_once`)."""
    key = f"{plan.dataset}-{plan.split}-{plan.index:06d}"
    path = Path(ctx.output_dir) / plan.dataset / shard_file_name(plan.split, plan.index)
    return write_shard_once(ctx, key, path, lambda writer: _write(plan, ctx, writer))


def write_shard_once(ctx: WorkContext, key: str, path: Path,
                     fill: Callable[[ShardWriter], None]) -> ShardInfo:
    """Write the shard at `path` with `fill(writer)` unless a finished copy is there.

    The marker (``done/write/<key>.json``) is written before the shard is moved into place,
    so a shard at its final path always has a marker and a rerun never rewrites it; a marker
    whose shard is missing or of another size is dropped and the shard written again.
    """
    marker = ctx.path("done", "write", f"{key}.json")
    done = read_result(marker, lambda raw: ShardInfo(**raw))
    if done is not None:
        shard = Path(ctx.output_dir) / done.path
        if shard.exists() and shard.stat().st_size == done.bytes:
            return done
        marker.unlink()
    with disk_space_errors(ctx.output_dir, path):
        writer = ShardWriter(path, Path(ctx.output_dir))
        try:
            fill(writer)
            result = writer.close(commit=False)
            write_json(marker, asdict(result))
        except BaseException:
            writer.discard()
            raise
        writer.commit()
    return result


def _write(plan: ShardPlan, ctx: WorkContext, writer: ShardWriter) -> None:
    """Pack and write a shard's samples into `writer` (not closed here)."""
    window = ctx.data.seq_len + 1
    start = plan.first_window * window
    stop = start + plan.n_windows * window
    sources, start_parts = [], []
    for chunk, base in plan.chunks:
        stem = f"{chunk:06d}.{plan.split}"
        tokens = np.load(ctx.path("tokens", f"{stem}.tokens.npy"), mmap_mode="r")
        lengths = np.load(ctx.path("tokens", f"{stem}.lengths.npy"))
        sources.append((base, tokens))
        start_parts.append(base + np.concatenate([[0], np.cumsum(lengths)[:-1]]))
    doc_starts = np.concatenate(start_parts) if start_parts else np.zeros(0, np.int64)
    # A block of windows at a time: memory does not grow with the shard size.
    for lo in range(start, stop, _WRITE_BLOCK_WINDOWS * window):
        hi = min(lo + _WRITE_BLOCK_WINDOWS * window, stop)
        parts = [np.asarray(t[max(lo - b, 0) : max(min(hi - b, len(t)), 0)]) for b, t in sources]
        tokens = np.concatenate(parts)
        samples, starts = pack_windows(tokens, doc_starts, lo, window, ctx.pad_id)
        first = (lo - start) // window
        keys = [sample_key(plan.dataset, plan.split, plan.index, first + i)
                for i in range(len(samples))]
        writer.write(keys, samples, starts, len(tokens))
