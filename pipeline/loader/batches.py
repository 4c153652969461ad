"""Building one rank's micro-batches: positions → samples → token tensors.

Runs inside DataLoader workers (or the training process when ``num_workers`` is 0).
Worker ``w`` of ``W`` builds the rank's micro-batches ``w, w + W, …`` from the start
position; the DataLoader hands them back in that order. Task data (a manifest with a
``task``) takes the same road; its samples' extra members travel beside the token rows
and ``collate`` turns them into the task's batch (see ``collate_task``).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from lmforge.pipeline.config import LoaderConfig
from lmforge.pipeline.contract.shard_format import (
    LABEL_MEMBER,
    LOSS_MASK_MEMBER,
    TARGET_MEMBER,
    TASK_MEMBERS,
)
from lmforge.pipeline.contract.shard_tar import ShardError
from lmforge.pipeline.loader.order import DatasetSplit, Mixture
from lmforge.pipeline.loader.shard import ReaderCache

IGNORE_INDEX = -100


@dataclass
class Plan:
    """Everything a worker needs to build any micro-batch; small and picklable."""

    datasets: list[DatasetSplit]
    mixture: Mixture | None  # None: a finite pass over datasets one after another
    offsets: list[int]
    ends: list[int]
    seq_len: int
    token_dtype: str
    pad_id: int
    config: LoaderConfig
    rank: int
    micro_batch_size: int
    global_batch: int
    cache_capacity: int
    task_kind: str | None = None  # task data: its samples carry TASK_MEMBERS[task_kind]

    @property
    def extras(self) -> tuple[str, ...]:
        """The task members each sample carries beyond tokens and doc_starts."""
        return TASK_MEMBERS[self.task_kind] if self.task_kind else ()


class BatchStream(IterableDataset):
    """Yields ``((rows, doc starts, docs per row, task members), report)`` per micro-batch
    from ``start``."""

    def __init__(self, plan: Plan, start: int, steps: int | None) -> None:
        self.plan = plan
        self.start = start
        self.steps = steps
        self.cache: ReaderCache | None = None
        self.reported: set[str] = set()
        self.new_bad: dict[str, str] = {}  # bad shards first seen while building a batch

    def __iter__(self) -> Iterator[tuple[tuple[np.ndarray, ...] | None, dict[str, Any]]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        plan = self.plan
        if self.cache is None:
            self.cache = ReaderCache(plan.cache_capacity, plan.config.verify_checksums,
                                     plan.extras)
        j = worker
        while self.steps is None or j < self.steps:
            first = self.start + j * plan.global_batch + plan.rank * plan.micro_batch_size
            try:
                yield self._batch(first)
            except ShardError as err:
                # Handed over as data, not raised: a worker that raises leaves the
                # DataLoader waiting 5 s per worker on shutdown; the caller raises it.
                yield None, {"error": str(err)}
                return
            j += workers

    def _batch(self, first: int) -> tuple[tuple[np.ndarray, ...], dict[str, Any]]:
        plan = self.plan
        size = plan.micro_batch_size
        rows = np.full((size, plan.seq_len + 1), plan.pad_id, plan.token_dtype)
        docs: list[list[int]] = [_ONE_DOC] * size
        keys = [""] * size
        extras = _empty_members(plan.extras, size, plan.seq_len + 1, plan.token_dtype,
                                plan.pad_id)
        self.new_bad = {}
        substituted = 0
        dataset_ids, indices = self._locate(np.arange(first, first + size))
        for d in sorted(set(dataset_ids.tolist()) - {-1}):
            dataset = plan.datasets[d]
            where = np.flatnonzero(dataset_ids == d)
            shard_ids, samples = dataset.locate_many(indices[where])
            for b, shard, sample, index in zip(
                where.tolist(), shard_ids.tolist(), samples.tolist(), indices[where].tolist(),
                strict=True,
            ):
                try:
                    found = self._read(dataset, shard, sample)
                except ShardError as err:
                    self._bad(dataset, shard, err)
                    substituted += 1
                    found = self._substitute(dataset, index)
                    if found is None:
                        continue  # a finite pass must not visit any sample twice: mask it
                rows[b], docs[b], keys[b], members = found
                for name, value in members.items():
                    extras[name][b] = value
        report = {"bad": self.new_bad, "substituted": substituted}
        if plan.config.return_keys:
            report["keys"] = keys
        # Token rows cross from a worker as they are on disk (2-4 bytes a token, one
        # pickle); widening to int64 tensors happens in the caller's process.
        counts = np.array([len(d) for d in docs], dtype=np.int64)
        starts = np.fromiter(itertools.chain.from_iterable(docs), np.int64, int(counts.sum()))
        return (rows, starts, counts, extras), report

    def _read(self, dataset: DatasetSplit, shard: int, sample: int):
        """``(tokens, doc starts, key, task members)`` of one sample; ShardError when
        unreadable."""
        plan = self.plan
        entry = dataset.shards[shard]
        reader = self.cache.get(entry, plan.seq_len, plan.token_dtype)
        if reader is None:
            raise ShardError(self.cache.bad[entry.url])
        tokens, starts, members = reader.read(sample)
        return tokens, starts, reader.key(sample) if plan.config.return_keys else "", members

    def _bad(self, dataset: DatasetSplit, shard: int, err: ShardError) -> None:
        if self.plan.config.strict:
            raise ShardError(
                f"{err}; fix or re-create it (`lmforge prepare` skips finished shards), "
                "or set data.loader.strict=false to skip it"
            ) from err
        url = dataset.shards[shard].url
        if url not in self.reported:
            self.reported.add(url)
            self.new_bad[url] = str(err)

    def _locate(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Dataset (-1 for padding) and index in its stream, for global positions."""
        plan = self.plan
        if plan.mixture is None:
            ends = np.asarray(plan.ends)
            dataset_ids = np.searchsorted(ends, positions, side="right")
            starts = np.concatenate([[0], ends])[np.minimum(dataset_ids, len(ends) - 1)]
            dataset_ids[dataset_ids == len(ends)] = -1
            return dataset_ids, positions - starts
        dataset_ids, j = plan.mixture.locate_many(positions)
        return dataset_ids, np.asarray(plan.offsets)[dataset_ids] + j

    def _substitute(self, dataset: DatasetSplit, index: int):
        """A deterministic stand-in for an unreadable sample; None in a finite pass.

        A bad sample of a readable shard is replaced by the next readable one of the same
        shard; a sample of a bad shard by the sample at the same offset of the next
        readable shard in the epoch's shard order. Both depend only on the position, so
        resumes and every rank agree, and whole bad shards cost one step per shard.
        """
        if self.plan.mixture is None:
            return None
        shard, sample = dataset.locate(index)
        count = int(dataset.counts[shard])
        if dataset.shards[shard].url not in self.cache.bad:
            for step in range(1, count):
                try:
                    return self._read(dataset, shard, (sample + step) % count)
                except ShardError as err:
                    self._bad(dataset, shard, err)
        order = dataset.epoch_order(index).tolist()
        at = order.index(shard)
        for step in range(1, len(order)):
            other = order[(at + step) % len(order)]
            try:
                return self._read(dataset, other, sample % int(dataset.counts[other]))
            except ShardError as err:
                self._bad(dataset, other, err)
        raise ShardError(f"dataset '{dataset.name}': no sample of the split can be read")


_ONE_DOC = [0]  # a padding row is one document


def _empty_members(
    names: tuple[str, ...], size: int, window: int, token_dtype: str, pad_id: int
) -> dict[str, np.ndarray]:
    """Task members of a padding row: no loss, label -100, an all-padding target."""
    empty = {
        LOSS_MASK_MEMBER: lambda: np.zeros((size, window), np.uint8),
        LABEL_MEMBER: lambda: np.full(size, IGNORE_INDEX, np.int64),
        TARGET_MEMBER: lambda: np.full((size, window), pad_id, token_dtype),
    }
    return {name: empty[name]() for name in names}


def collate(
    rows: np.ndarray,
    starts: np.ndarray,
    counts: np.ndarray,
    members: dict[str, np.ndarray],
    pad_id: int,
    masking: bool,
    task_kind: str | None = None,
) -> dict[str, torch.Tensor]:
    """Token rows (B, T+1) → ``input_ids``, ``labels`` (B, T) int64 [+ segment, position ids];
    for task data the task's batch (`collate_task`).

    Args:
        rows: Token ids, one packed sample per row.
        starts: Every row's ``doc_starts``, concatenated.
        counts: Documents per row (how ``starts`` splits into rows).
        members: The rows' task members by name (empty for text).
        pad_id: Labels equal to it become -100.
        masking: Also compute ``segment_ids`` and ``position_ids`` (always for sft).
        task_kind: The manifest's task kind; None for text.
    """
    if task_kind is not None:
        return collate_task(rows, starts, counts, members, pad_id, task_kind)
    return _collate_text(rows, starts, counts, pad_id, masking)


def collate_task(
    rows: np.ndarray,
    starts: np.ndarray,
    counts: np.ndarray,
    members: dict[str, np.ndarray],
    pad_id: int,
    task_kind: str,
) -> dict[str, torch.Tensor]:
    """The batch of a task kind (T = seq_len, B rows), all int64:

    - sft: ``input_ids``, ``labels`` (B, T): the next token where it is a response token
      (its loss mask is 1), else -100; ``segment_ids``, ``position_ids`` (B, T) always,
      so packed examples never attend to each other.
    - classify: ``input_ids`` (B, T) padded with the padding id, ``attention_mask`` (B, T)
      1 at real tokens, ``labels`` (B,) (-100 for a padding row of a finite pass).
    - seq2seq: ``input_ids`` (B, T) source, ``attention_mask`` (B, T), ``target_ids``
      (B, T) target padded with the padding id.
    """
    if task_kind == "sft":
        batch = _collate_text(rows, starts, counts, pad_id, True)
        mask = members[LOSS_MASK_MEMBER][:, 1:]
        batch["labels"][torch.from_numpy(mask == 0)] = IGNORE_INDEX
        return batch
    inputs = rows[:, :-1].astype(np.int64)
    batch = {
        "input_ids": torch.from_numpy(inputs),
        "attention_mask": torch.from_numpy((inputs != pad_id).astype(np.int64)),
    }
    if task_kind == "classify":
        batch["labels"] = torch.from_numpy(members[LABEL_MEMBER].astype(np.int64))
    else:
        batch["target_ids"] = torch.from_numpy(members[TARGET_MEMBER][:, :-1].astype(np.int64))
    return batch


def _collate_text(
    rows: np.ndarray, starts: np.ndarray, counts: np.ndarray, pad_id: int, masking: bool
) -> dict[str, torch.Tensor]:
    size, length = rows.shape
    packed = np.empty((4 if masking else 2, size, length - 1), dtype=np.int64)
    packed[0] = rows[:, :-1]
    labels = packed[1]
    labels[...] = rows[:, 1:]
    labels[labels == pad_id] = IGNORE_INDEX
    if masking:
        # Per document: its start, its length and its index within the row; repeating
        # them over the document's positions gives segment and position ids at once.
        lengths = np.empty_like(starts)
        lengths[:-1] = starts[1:] - starts[:-1]
        last = np.cumsum(counts) - 1
        lengths[last] = length - starts[last]
        first = np.repeat(last - counts + 1, counts)
        segment = np.repeat(np.arange(len(starts)) - first, lengths).reshape(size, length)
        offset = np.repeat(starts, lengths).reshape(size, length)
        packed[2] = segment[:, :-1]
        packed[3] = (np.arange(length) - offset)[:, :-1]
    # One int64 block viewed as separate tensors: a single allocation per batch.
    tensors = torch.from_numpy(packed)
    names = ("input_ids", "labels", "segment_ids", "position_ids")
    return {name: tensors[i] for i, name in enumerate(names[: len(packed)])}


def keep(item: Any) -> Any:
    """DataLoader ``collate_fn`` that leaves worker output as numpy (no shared-memory tensors)."""
    return item
