"""The loader's global sample order: a pure function of position, cheap to seek.

Position ``p`` of a split's global stream maps to one sample, independently of ranks and
DataLoader workers:

1. **Mixture** (infinite loaders): positions come in chunks of ``MIXTURE_CHUNK``; each
   chunk holds a fixed count per dataset (largest remainder of its weight), in an order
   permuted by ``(seed, chunk)``. Position ``p`` is thus the ``j``-th sample of dataset
   ``d``, where ``j`` follows from ``p`` by arithmetic alone.
2. **Dataset stream**: index ``i`` of dataset ``d`` lies in dataset epoch ``e = i // N``.
   Epoch ``e`` lists the shards in an order permuted by ``(seed, d, e)``, cuts the
   concatenated samples into windows of ``shuffle_buffer`` samples, and permutes each
   window by ``(seed, d, e, window)``. The manifest's per-shard sample counts turn the
   result into ``(shard, sample)`` with a binary search, so a seek decodes nothing.

A finite loader (validation) visits every sample once: datasets one after another in
manifest order, each in its epoch-0 order; positions past the end are padding.
"""

from __future__ import annotations

import json
import zlib
from dataclasses import dataclass

import numpy as np

from lmforge.pipeline.contract.dataset_manifest import DatasetManifest

MIXTURE_CHUNK = 4096
"""Positions per mixture chunk: dataset proportions are exact over every chunk."""


@dataclass(frozen=True)
class ShardEntry:
    """One shard of the manifest."""

    url: str
    path: str
    samples: int
    sha256: str | None


class DatasetSplit:
    """The shards of one dataset's split and the shuffled order of its samples."""

    def __init__(self, name: str, shards: list[ShardEntry], seed: int, shuffle: bool,
                 window: int) -> None:
        self.name = name
        self.shards = shards
        self.counts = np.array([s.samples for s in shards], dtype=np.int64)
        self.samples = int(self.counts.sum())
        self.seed = seed
        self.shuffle = shuffle
        self.window = window
        # Stable per name, so adding a dataset leaves the others' orders unchanged.
        self.tag = zlib.crc32(name.encode())
        self._orders: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._perms: dict[tuple[int, int], np.ndarray] = {}

    def shards_per_window(self) -> int:
        """Most shards one shuffle window (plus the step into the next) can touch."""
        if not self.shuffle:
            return 2
        return min(len(self.shards), -(-self.window // int(self.counts.min())) + 2)

    def locate(self, index: int) -> tuple[int, int]:
        """``(shard, sample within shard)`` of the ``index``-th sample of the stream."""
        shards, samples = self.locate_many(np.array([index]))
        return int(shards[0]), int(samples[0])

    def epoch_order(self, index: int) -> np.ndarray:
        """The shard order of the epoch that stream index ``index`` falls in."""
        return _cached(self._orders, index // self.samples, self._shard_order, 4)[0]

    def locate_many(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``locate`` for an array of stream indices (a batch's worth at once)."""
        epochs, within = np.divmod(indices, self.samples)
        shards = np.empty_like(indices)
        samples = np.empty_like(indices)
        for epoch in set(epochs.tolist()):
            mask = epochs == epoch
            i = within[mask]
            order, ends = _cached(self._orders, epoch, self._shard_order, 4)
            if self.shuffle:
                windows, offsets = np.divmod(i, self.window)
                for window in set(windows.tolist()):
                    w = windows == window
                    perm = _cached(self._perms, (epoch, window), self._window_perm, 16)
                    i[w] = window * self.window + perm[offsets[w]]
            k = np.searchsorted(ends, i, side="right")
            shards[mask] = order[k]
            samples[mask] = i - np.concatenate([[0], ends])[k]
        return shards, samples

    def _shard_order(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        order = np.arange(len(self.shards))
        if self.shuffle:
            order = np.random.default_rng([self.seed, self.tag, epoch]).permutation(order)
        return order, np.cumsum(self.counts[order])

    def _window_perm(self, key: tuple[int, int]) -> np.ndarray:
        epoch, window = key
        size = min(self.window, self.samples - window * self.window)
        rng = np.random.default_rng([self.seed, self.tag, epoch, window, 1])
        return rng.permutation(size)


class Mixture:
    """Deterministic interleaving of datasets by weight, seekable by arithmetic.

    Args:
        weights: Weight per dataset, in dataset order (zero leaves a dataset out).
        seed: Run seed.
        generation: Bumped whenever weights change mid-run, so chunks get fresh orders.
        segment: Index of the stretch of a capped mixture (``mix.CappedMixture``) this
            mixture serves; 0 keeps the uncapped orders.
    """

    def __init__(self, weights: list[float], seed: int, generation: int,
                 segment: int = 0) -> None:
        w = np.asarray(weights, dtype=np.float64)
        exact = MIXTURE_CHUNK * w / w.sum()
        counts = np.floor(exact).astype(np.int64)
        # Largest remainder: hand the leftover slots to the biggest fractional parts.
        for d in np.argsort(-(exact - counts), kind="stable")[: MIXTURE_CHUNK - counts.sum()]:
            counts[d] += 1
        self.counts = counts
        self.seed = seed
        self.generation = generation
        self.segment = segment
        self._chunks: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def locate_many(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(dataset, j)`` per position: it is the ``j``-th sample mixed in from ``dataset``."""
        if len(self.counts) == 1:
            return np.zeros_like(positions), positions
        chunks, offsets = np.divmod(positions, MIXTURE_CHUNK)
        datasets = np.empty_like(positions)
        j = np.empty_like(positions)
        for k in set(chunks.tolist()):
            mask = chunks == k
            labels, ranks = _cached(self._chunks, k, self._chunk, 4)
            datasets[mask] = labels[offsets[mask]]
            j[mask] = k * self.counts[datasets[mask]] + ranks[offsets[mask]]
        return datasets, j

    def consumed(self, position: int) -> np.ndarray:
        """Samples taken from each dataset by the first ``position`` positions."""
        k, offset = divmod(position, MIXTURE_CHUNK)
        labels, _ = _cached(self._chunks, k, self._chunk, 4)
        head = np.bincount(labels[:offset], minlength=len(self.counts))
        return k * self.counts + head

    def _chunk(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        labels = np.repeat(np.arange(len(self.counts)), self.counts)
        key = [self.seed, self.generation, k, 2] + ([self.segment] if self.segment else [])
        rng = np.random.default_rng(key)
        labels = rng.permutation(labels)
        ranks = np.empty(MIXTURE_CHUNK, dtype=np.int64)
        for d in range(len(self.counts)):
            where = labels == d
            ranks[where] = np.arange(int(where.sum()))
        return labels, ranks


class Manifest:
    """The parts of a `DatasetManifest` the loader needs, for one split.

    Args:
        path: The dataset's `DatasetManifest` (already read), or ``manifest.json``, its
            folder, or an fsspec URL of either.
        split: ``train`` or ``val``.

    Raises:
        ManifestError: The manifest is missing or breaks the contract.
        ValueError: No dataset has samples in ``split``.
    """

    def __init__(self, path: DatasetManifest | str, split: str) -> None:
        manifest = path if isinstance(path, DatasetManifest) else DatasetManifest.read(path)
        self.path = manifest.location
        self.seq_len = manifest.seq_len
        self.token_dtype = manifest.token_dtype
        self.pad_id = manifest.tokenizer.padding_id
        self.vocab_size = manifest.tokenizer.vocab_size
        self.task_kind = manifest.task.kind if manifest.task is not None else None
        """The task kind of task data (its samples carry `TASK_MEMBERS`); None for text."""
        self.names: list[str] = []
        self.weights: list[float] = []
        self.shards: list[list[ShardEntry]] = []
        self.caps: list[int | None] = []
        """Most samples the run may draw from each dataset (``data.mix`` max_epochs)."""
        for name, dataset in manifest.datasets.items():
            if split not in dataset.splits:
                continue
            shards = [
                ShardEntry(f"{manifest.folder}/{s.path}", s.path, s.samples, s.sha256)
                for s in dataset.splits[split].shards
                if s.samples > 0
            ]
            if shards:
                self.names.append(name)
                self.weights.append(float(dataset.weight))
                self.shards.append(shards)
                self.caps.append(None)
        if not self.names:
            raise ValueError(
                f"{self.path}: no dataset has samples in split '{split}' "
                f"(datasets: {', '.join(manifest.datasets) or 'none'})"
            )

    def fingerprint(self) -> str:
        """Changes whenever the set of shards or their sample counts change."""
        text = json.dumps([[s.path, s.samples] for shards in self.shards for s in shards])
        return f"{zlib.crc32(text.encode()):08x}"


def _cached(cache: dict, key, make, size: int):
    # A tiny FIFO cache that pickles (DataLoader workers may be spawned, not forked).
    value = cache.get(key)
    if value is None:
        if len(cache) >= size:
            del cache[next(iter(cache))]
        value = cache[key] = make(key)
    return value
