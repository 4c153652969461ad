"""``data.mix``: several prepared datasets streamed as one, by weight or token budget, with
an optional repetition cap per source; nothing is prepared again.

The sources' datasets become the loader's datasets, named ``<source>/<dataset>``, so the
one-manifest mixture (``order.Mixture``) does the interleaving: a source's share is its
weight (or token budget) over the sum, split among its datasets by their manifest weights.
The sample order stays a pure function of the global position, so resume (also on another
world size) and a stage that only changes weights work as for one manifest.

A cap (``max_epochs``) is a fixed point in that order: ``CappedMixture`` cuts the stream
into segments; at the first position where a dataset has been drawn ``max_epochs ×
samples`` times it leaves the mixture and the next segment mixes the rest (a fresh chunk
order). Segment starts follow from the weights, caps and seed by arithmetic alone.
"""

from __future__ import annotations

import json
import math
import zlib

import numpy as np

from lmforge.pipeline.config import MixSourceConfig
from lmforge.pipeline.contract.dataset_manifest import DatasetManifest, ManifestError
from lmforge.pipeline.contract.shard_tar import ShardError, is_url
from lmforge.pipeline.loader.order import MIXTURE_CHUNK, Manifest, Mixture


class MixError(ValueError):
    """The ``data.mix`` sources cannot be mixed; the message names ``data.mix[i]``."""


class Mix:
    """The prepared datasets of a ``data.mix``, read and checked to fit together.

    Args:
        sources: The ``data.mix`` entries.
        manifests: Their manifests when already read (else read from ``path``).

    Raises:
        MixError: A manifest cannot be read, or the sources differ in tokenizer (sha256),
            seq_len, token dtype, or one holds task data; every mismatch is listed.
    """

    def __init__(self, sources: list[MixSourceConfig],
                 manifests: list[DatasetManifest] | None = None) -> None:
        if not sources:
            raise MixError("data.mix: empty; list at least one prepared dataset")
        self.sources = list(sources)
        if manifests is None:
            manifests = []
            for i, source in enumerate(sources):
                try:
                    manifests.append(DatasetManifest.read(source.path))
                except ManifestError as err:
                    raise MixError(f"data.mix[{i}]: {err}") from err
        self.manifests = list(manifests)
        self._check()

    @property
    def seq_len(self) -> int:
        """The sources' common seq_len."""
        return self.manifests[0].seq_len

    def _check(self) -> None:
        first = self.manifests[0]
        problems = []
        for i, m in enumerate(self.manifests):
            if m.task is not None:
                problems.append(f"data.mix[{i}] ({m.location}) holds task data "
                                f"({m.task.kind}); mix text datasets only")
            if i == 0:
                continue
            where = f"data.mix[{i}] ({m.location}) vs data.mix[0] ({first.location})"
            if m.tokenizer.sha256 != first.tokenizer.sha256:
                problems.append(f"{where}: tokenizer sha256 {m.tokenizer.sha256[:12]}… vs "
                                f"{first.tokenizer.sha256[:12]}…")
            if m.seq_len != first.seq_len:
                problems.append(f"{where}: seq_len {m.seq_len} vs {first.seq_len}")
            if m.token_dtype != first.token_dtype:
                problems.append(f"{where}: token_dtype {m.token_dtype} vs {first.token_dtype}")
        if problems:
            raise MixError(
                "data.mix: the sources do not fit together: " + "; ".join(problems)
                + "; mix only datasets prepared with the same tokenizer and data.seq_len"
            )

    def check_tokenizer_files(self) -> None:
        """Every source's tokenizer file against its manifest (`ManifestError` naming it)."""
        for m in self.manifests:
            m.check_tokenizer_file()

    def manifest(self, split: str) -> MixedManifest:
        """The loader's view of ``split`` over every source that has it."""
        return MixedManifest(self, split)


class MixedManifest(Manifest):
    """`order.Manifest` over several sources: datasets ``<source>/<dataset>``, weights from
    ``data.mix``, caps from ``max_epochs``."""

    def __init__(self, mix: Mix, split: str) -> None:  # noqa: D107 (the class says it)
        first = mix.manifests[0]
        self.path = next((m.location for m in mix.manifests if is_url(m.location)),
                         first.location)
        self.seq_len = first.seq_len
        self.token_dtype = first.token_dtype
        self.pad_id = first.tokenizer.padding_id
        self.vocab_size = first.tokenizer.vocab_size
        self.task_kind = None
        self.names, self.weights, self.shards, self.caps = [], [], [], []
        self.source_of: list[int] = []
        """Index in ``data.mix`` of each dataset's source."""
        shares = [s.weight if s.weight is not None else float(s.tokens) for s in mix.sources]
        for i, (source, m) in enumerate(zip(mix.sources, mix.manifests, strict=True)):
            try:
                one = Manifest(m, split)
            except ValueError:
                continue  # this source has no such split (e.g. no val)
            total = sum(one.weights)
            for name, weight, shards in zip(one.names, one.weights, one.shards, strict=True):
                if weight <= 0:
                    continue
                self.names.append(f"{source.label}/{name}")
                self.weights.append(shares[i] * weight / total)
                self.shards.append(shards)
                samples = sum(s.samples for s in shards)
                cap = source.max_epochs
                self.caps.append(None if cap is None else math.floor(cap * samples))
                self.source_of.append(i)
        if not self.names:
            raise ValueError(f"data.mix: no source has samples in split '{split}'")

    def fingerprint(self) -> str:
        """Changes whenever the set of shards or their sample counts change (not when a
        source's folder moves: shards count by source name and path within it)."""
        text = json.dumps([[name, s.path, s.samples]
                           for name, shards in zip(self.names, self.shards, strict=True)
                           for s in shards])
        return f"{zlib.crc32(text.encode()):08x}"


class CappedMixture:
    """`Mixture` whose datasets leave it when they reach their cap.

    Args:
        weights: Weight per dataset.
        caps: Samples each dataset may still give (None: no cap).
        seed: Run seed.
        generation: As for `Mixture`.
    """

    def __init__(self, weights: list[float], caps: list[int | None], seed: int,
                 generation: int) -> None:
        w = np.asarray(weights, dtype=np.float64)
        capped = np.array([c is not None for c in caps])
        limit = np.array([c if c is not None else 0 for c in caps], dtype=np.int64)
        active = (w > 0) & ~(capped & (limit <= 0))
        base = np.zeros(len(w), dtype=np.int64)
        self.starts: list[int] = []
        self.mixtures: list[Mixture] = []
        self.bases: list[np.ndarray] = []
        self.end: int | None = None
        """First position no dataset can fill (all at their caps); None: never."""
        start = 0
        while True:
            if not active.any():
                self.end = start
                break
            mixture = Mixture(np.where(active, w, 0.0).tolist(), seed, generation,
                              len(self.mixtures))
            self.starts.append(start)
            self.mixtures.append(mixture)
            self.bases.append(base.copy())
            hits = [_reach(mixture, d, int(limit[d] - base[d]))
                    for d in np.flatnonzero(active & capped)]
            if not hits:
                break
            length = min(hits)
            base = base + mixture.consumed(length)
            start += length
            active &= ~(capped & (base >= limit))

    def locate_many(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(dataset, j)`` per position, as `Mixture.locate_many`.

        Raises:
            ShardError: A position past ``end`` (every dataset at its cap).
        """
        if self.end is not None and positions.size and int(positions.max()) >= self.end:
            raise ShardError(
                f"data.mix: every source reached its max_epochs cap after {self.end} samples "
                "of this stage; raise max_epochs or lower train.max_steps "
                "(`lmforge train --dry-run` shows each source's draws)"
            )
        segments = np.searchsorted(self.starts, positions, side="right") - 1
        datasets = np.empty_like(positions)
        j = np.empty_like(positions)
        for s in set(segments.tolist()):
            mask = segments == s
            d, local = self.mixtures[s].locate_many(positions[mask] - self.starts[s])
            datasets[mask] = d
            j[mask] = self.bases[s][d] + local
        return datasets, j

    def consumed(self, position: int) -> np.ndarray:
        """Samples taken from each dataset by the first ``position`` positions."""
        if self.end is not None:
            position = min(position, self.end)
        if not self.mixtures:
            return np.zeros(0, dtype=np.int64)
        s = int(np.searchsorted(self.starts, position, side="right")) - 1
        return self.bases[s] + self.mixtures[s].consumed(position - self.starts[s])


def _reach(mixture: Mixture, d: int, need: int) -> int:
    """Fewest positions after which ``mixture`` has taken ``need`` samples of ``d``."""
    if need <= 0:
        return 0
    per_chunk = int(mixture.counts[d])
    k, left = divmod(need - 1, per_chunk)
    labels, _ = mixture._chunk(k)  # noqa: SLF001 (same package: the chunk's labels)
    return k * MIXTURE_CHUNK + int(np.flatnonzero(labels == d)[left]) + 1


def make_mixture(weights: list[float], caps: list[int | None], offsets: list[int], seed: int,
                 generation: int) -> Mixture | CappedMixture:
    """The training mixture: a `CappedMixture` when a dataset has a cap (less what the
    ``offsets`` of earlier stages already drew), else a plain `Mixture`."""
    if all(c is None for c in caps):
        return Mixture(weights, seed, generation)
    left = [None if c is None else c - o for c, o in zip(caps, offsets, strict=True)]
    return CappedMixture(weights, left, seed, generation)
