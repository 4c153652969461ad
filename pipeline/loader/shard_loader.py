"""Streaming loader: shards of a manifest → micro-batches of token tensors for one rank.

The order of samples is a function of the global position alone (see ``loader_order``):
global micro-step ``k`` owns positions ``[p0 + k·G, p0 + (k+1)·G)`` with
``G = micro_batch_size · world_size``, and rank ``r`` takes the ``r``-th run of
``micro_batch_size`` positions in it. DataLoader worker ``w`` of ``W`` builds the rank's
micro-batches ``w, w + W, …``; the DataLoader hands them back in order. So ranks never
overlap, all yield the same number of batches, and the position (samples consumed by the
whole job, counted when a batch reaches the caller) is all a checkpoint needs.

What a resume preserves: the global stream is fixed by the manifest's shards, ``seed``,
``shuffle``, ``shuffle_buffer`` and the weights; ``state_dict()`` stores the position in
it. A resume continues that stream exactly, whatever ``num_workers`` is and whatever
``micro_batch_size × world_size`` is: with the same product every rank sees exactly what
it would have; with another product each optimizer step still receives the same samples
as long as ``micro_batch_size × world_size × grad_accum_steps`` is unchanged.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import DataLoader

from lmforge.pipeline.config import LoaderConfig
from lmforge.pipeline.contract.dataset_manifest import DatasetManifest
from lmforge.pipeline.contract.shard_format import TASK_MEMBERS
from lmforge.pipeline.contract.shard_tar import ShardError, is_url
from lmforge.pipeline.loader.batches import BatchStream, Plan, collate, keep
from lmforge.pipeline.loader.mix import Mix, make_mixture
from lmforge.pipeline.loader.order import MIXTURE_CHUNK, DatasetSplit, Manifest
from lmforge.pipeline.loader.shard import ReaderCache

__all__ = ["LoaderConfig", "ShardError", "ShardLoader"]

log = logging.getLogger(__name__)

STATE_VERSION = 1


class ShardLoader:
    """Iterates one rank's micro-batches of a manifest's split.

    Each batch is a dict of CPU tensors: ``input_ids`` and ``labels`` (B, T) int64, with
    padding labelled -100; with ``document_masking`` also ``segment_ids`` (document index
    within the row) and ``position_ids`` (restarting at 0 at each document start).

    A task manifest (``data.task``) gives the task's batches instead, in the same order
    with the same resume and rank semantics (see ``loader_batches.collate_task``): sft
    ``input_ids``, ``labels`` (response tokens only), ``segment_ids``, ``position_ids``;
    classify ``input_ids``, ``attention_mask``, ``labels`` (B,); seq2seq ``input_ids``,
    ``attention_mask``, ``target_ids``.

    Args:
        manifest: The dataset's `DatasetManifest` (a trainer hands over the one it read), or
            ``manifest.json``, its folder, or an fsspec URL of either; or a `mix.Mix`
            (``data.mix``: several prepared datasets, datasets named ``<source>/<name>``).
        split: ``train`` or ``val``.
        micro_batch_size: Rows per batch on this rank.
        rank: This rank.
        world_size: Number of ranks.
        seed: Seeds the shuffle and the mixture (with the epoch).
        config: The ``data.loader`` section; defaults when None.
        infinite: Cycle through epochs for ever (training); False makes one unshuffled
            pass over every sample (validation), the last batches padded so that every
            rank yields ``len(loader)`` batches.

    Raises:
        ValueError: Bad arguments, or a manifest that is missing or has no such split;
            with ``config.verify_checksums``, a tokenizer file that is not the one the
            manifest records (`ManifestError`, naming it).
    """

    def __init__(
        self,
        manifest: DatasetManifest | Mix | str | Path,
        split: str,
        micro_batch_size: int,
        *,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        config: LoaderConfig | None = None,
        infinite: bool = True,
    ) -> None:
        if micro_batch_size < 1:
            raise ValueError(f"micro_batch_size: must be >= 1, got {micro_batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank: must be in [0, world_size={world_size}), got {rank}")
        if seed < 0:
            raise ValueError(f"seed: must be >= 0, got {seed}")
        self.config = config or LoaderConfig()
        if not isinstance(manifest, (DatasetManifest, Mix)):
            manifest = DatasetManifest.read(str(manifest))
        if isinstance(manifest, Mix):
            if self.config.verify_checksums:
                manifest.check_tokenizer_files()
            self.manifest = manifest.manifest(split)
        else:
            if self.config.verify_checksums:  # the tokens must come from the recorded tokenizer
                manifest.check_tokenizer_file()
            self.manifest = Manifest(manifest, split)
        self.task_kind = self.manifest.task_kind
        """The manifest's task kind (``sft``, ``classify``, ``seq2seq``), None for text."""
        self.split = split
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.micro_batch_size = micro_batch_size
        self.infinite = infinite
        self.shuffle = self.config.shuffle and infinite
        self.datasets = [
            DatasetSplit(name, shards, seed, self.shuffle, self.config.shuffle_buffer)
            for name, shards in zip(self.manifest.names, self.manifest.shards, strict=True)
        ]
        self.weights = self._weights()
        self.skipped_samples = 0
        """Rows this rank received in place of samples from unreadable shards."""
        self.bad_shards: dict[str, str] = {}
        """Unreadable shards seen by this rank (lenient mode), with the reason."""
        self._position = 0
        self._samples_seen = 0
        self._generation = 0
        self._offsets = [0] * len(self.datasets)
        self._readers: ReaderCache | None = None  # open shards, kept when num_workers is 0

    # -- sizes -----------------------------------------------------------------------

    @property
    def global_batch(self) -> int:
        """Samples per micro-step over all ranks: ``micro_batch_size × world_size``."""
        return self.micro_batch_size * self.world_size

    @property
    def samples_per_epoch(self) -> int:
        """Samples in the split (over all its datasets)."""
        return sum(d.samples for d in self.datasets)

    @property
    def tokens_per_epoch(self) -> int:
        """Input positions per epoch: ``samples_per_epoch × seq_len``."""
        return self.samples_per_epoch * self.manifest.seq_len

    @property
    def epoch(self) -> int:
        """Whole epochs consumed by the job so far (samples seen ÷ samples per epoch)."""
        return self._samples_seen // self.samples_per_epoch

    def __len__(self) -> int:
        """Batches per rank in one pass of a finite loader."""
        if self.infinite:
            raise TypeError("an infinite ShardLoader has no length")
        return math.ceil(self.samples_per_epoch / self.global_batch)

    # -- iteration -------------------------------------------------------------------

    def __iter__(self) -> Iterator[dict[str, Any]]:
        """Yields micro-batches from the current position; state advances per batch."""
        steps = None
        if not self.infinite:
            if self._position >= len(self) * self.global_batch:
                self._position = 0
            steps = math.ceil((self.samples_per_epoch - self._position) / self.global_batch)
        stream = BatchStream(self._plan(), self._position, steps)
        workers = self.config.num_workers
        if workers == 0:
            if self._readers is None:
                self._readers = ReaderCache(
                    self._cache_capacity(), self.config.verify_checksums,
                    TASK_MEMBERS[self.task_kind] if self.task_kind else (),
                )
            stream.cache = self._readers
            source = iter(stream)
        else:
            source = iter(
                DataLoader(
                    stream,
                    batch_size=None,
                    num_workers=workers,
                    prefetch_factor=self.config.prefetch_factor,
                    collate_fn=keep,
                )
            )
        pad_id, masking = self.manifest.pad_id, self.config.document_masking
        for raw, report in source:
            if raw is None:
                raise ShardError(report["error"])
            batch: dict[str, Any] = collate(*raw, pad_id, masking, self.task_kind)
            if "keys" in report:
                batch["keys"] = report["keys"]
            self._position += self.global_batch
            self._samples_seen += self.global_batch
            self._note(report)
            yield batch
        if not self.infinite:
            self._position = 0  # the pass is complete; the next iter() starts another

    def _cache_capacity(self) -> int:
        # A shuffle window reads its shards in random order, so all of them stay open.
        # Streamed URL shards are held in memory: keep no more than that. Local shards
        # are memory-mapped, which costs address space only.
        needed = 1 + sum(d.shards_per_window() for d in self.datasets)
        return needed if is_url(self.manifest.path) else max(16, needed)

    def _plan(self) -> Plan:
        ends = np.cumsum([d.samples for d in self.datasets]).tolist()
        mixture = self._mixture(self.weights, self.manifest.caps, self._offsets,
                                self._generation) if self.infinite else None
        return Plan(
            self.datasets, mixture, list(self._offsets), ends, self.manifest.seq_len,
            self.manifest.token_dtype, self.manifest.pad_id, self.config, self.rank,
            self.micro_batch_size, self.global_batch, self._cache_capacity(), self.task_kind,
        )

    def _mixture(self, weights, caps, offsets, generation):
        return make_mixture(weights, list(caps), list(offsets), self.seed, generation)

    def _note(self, report: dict[str, Any]) -> None:
        self.skipped_samples += report["substituted"]
        for url, reason in report["bad"].items():
            if url not in self.bad_shards:
                self.bad_shards[url] = reason
                log.warning("skipping unreadable shard (data.loader.strict=false): %s", reason)

    def _weights(self) -> list[float]:
        names = self.manifest.names
        given = self.config.weights
        if given is None:
            weights = list(self.manifest.weights)
        else:
            unknown = sorted(set(given) - set(names))
            if unknown:
                raise ValueError(
                    f"weights: no dataset {unknown} in split '{self.split}' of "
                    f"{self.manifest.path}; datasets: {', '.join(names)}"
                )
            weights = [float(given.get(n, 0.0)) for n in names]
        if sum(weights) <= 0:
            raise ValueError(f"weights: all zero for split '{self.split}'; give one a weight")
        total = sum(weights)
        for name, w in zip(names, weights, strict=True):
            if 0 < w < total / MIXTURE_CHUNK:
                raise ValueError(
                    f"weights: '{name}' has {w}, below 1/{MIXTURE_CHUNK} of the total {total}; "
                    "raise it or set it to 0"
                )
        return weights

    # -- what the job draws -----------------------------------------------------------

    def drawn(self, ahead: int = 0) -> list[int]:
        """Samples the job has taken from each dataset (``manifest.names`` order), plus the
        next ``ahead`` samples: earlier stages' offsets and this mixture's position, by
        arithmetic (nothing is read). Past the point where every dataset is at its cap the
        counts stop growing (training would stop there: ``samples_left``)."""
        taken = self._mixture(self.weights, self.manifest.caps, self._offsets,
                              self._generation).consumed(self._position + ahead)
        return [o + int(t) for o, t in zip(self._offsets, taken, strict=True)]

    def samples_left(self) -> int | None:
        """Samples the job can still draw before every dataset is at its ``max_epochs`` cap;
        None when that never happens."""
        end = getattr(self._mixture(self.weights, self.manifest.caps, self._offsets,
                                    self._generation), "end", None)
        return None if end is None else max(0, end - self._position)

    def advance(self, samples: int) -> None:
        """Moves the position on by ``samples`` without reading them (a plan of a run)."""
        self._position += samples
        self._samples_seen += samples

    # -- checkpointing ---------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The position after the last batch handed to the caller (JSON-serialisable)."""
        return {
            "version": STATE_VERSION,
            "split": self.split,
            "seed": self.seed,
            "infinite": self.infinite,
            "shuffle": self.shuffle,
            "shuffle_buffer": self.config.shuffle_buffer,
            "fingerprint": self.manifest.fingerprint(),
            "position": self._position,
            "samples_seen": self._samples_seen,
            "generation": self._generation,
            "weights": dict(zip(self.manifest.names, self.weights, strict=True)),
            "offsets": dict(zip(self.manifest.names, self._offsets, strict=True)),
            "caps": dict(zip(self.manifest.names, self.manifest.caps, strict=True)),
            "global_batch": self.global_batch,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continues from a ``state_dict()``, also one saved with other workers or ranks.

        Changed weights (a new stage) start a fresh mixture that continues every dataset
        where the saved run stopped.

        Raises:
            ValueError: The state belongs to another order (seed, shards, shuffle).
        """
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"loader state: version {state.get('version')!r} is not supported")
        mine = self.state_dict()
        for key in ("split", "seed", "infinite", "shuffle", "fingerprint"):
            if state[key] != mine[key]:
                raise ValueError(
                    f"loader state: saved with {key}={state[key]!r}, this loader has "
                    f"{mine[key]!r}; resume with the same setting (the sample order "
                    "depends on it)"
                )
        if self.shuffle and state["shuffle_buffer"] != self.config.shuffle_buffer:
            raise ValueError(
                f"loader state: saved with shuffle_buffer={state['shuffle_buffer']}, this "
                f"loader has {self.config.shuffle_buffer}; keep data.loader.shuffle_buffer "
                "to resume"
            )
        names = self.manifest.names
        offsets = [int(state["offsets"][n]) for n in names]
        position = int(state["position"])
        generation = int(state["generation"])
        saved_weights = [float(state["weights"][n]) for n in names]
        saved_caps = [state.get("caps", {}).get(n) for n in names]
        if self.infinite and (saved_weights != self.weights or saved_caps != self.manifest.caps):
            consumed = self._mixture(saved_weights, saved_caps, offsets, generation).consumed(
                position)
            offsets = [o + int(c) for o, c in zip(offsets, consumed, strict=True)]
            position, generation = 0, generation + 1
        self._offsets = offsets
        self._position = position
        self._generation = generation
        self._samples_seen = int(state["samples_seen"])
