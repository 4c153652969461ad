"""The dataset manifest as `prepare` makes it: fingerprint, shard plan, the manifest itself.

`manifest.json` is written last and atomically; its presence means "dataset complete".
Its `fingerprint` covers the config (minus how it is run: workers, Ray address) and every
input file's URL, size and mtime, so an unchanged rerun is skipped. The typed manifest
(`DatasetManifest` and its parts, the only reader and writer of manifest.json) lives in
`dataset_manifest.py` and is re-exported here.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from lmforge.pipeline.config import DataConfig, TokenizerConfig
from lmforge.pipeline.contract.dataset_manifest import (
    DatasetInfo,
    DatasetManifest,
    ManifestError,
    ShardInfo,
    SpecialToken,
    SplitInfo,
    TokenizerInfo,
)
from lmforge.pipeline.contract.dataset_tokenizer import tokenizer_source
from lmforge.pipeline.contract.shard_format import (
    MANIFEST_VERSION,
    TOKENIZER_FILE,
    samples_per_shard,
    token_dtype,
)
from lmforge.pipeline.prepare.decontaminate import eval_digest
from lmforge.pipeline.prepare.phases import SPLITS, ShardPlan
from lmforge.pipeline.prepare.results import EncodeResult
from lmforge.pipeline.prepare.sources import SourceFile

__all__ = [
    "MANIFEST_VERSION",
    "DatasetInfo",
    "DatasetManifest",
    "ManifestError",
    "ShardInfo",
    "ShardPlanner",
    "SpecialToken",
    "SplitInfo",
    "TokenizerInfo",
    "build_manifest",
    "fingerprint",
    "is_complete",
]

FORMAT_REVISION = 1  # bump when the shard bytes for the same inputs would change
# How the job runs (and how input is cut into read chunks), and the loader's settings, do
# not change the shards.
_NOT_FINGERPRINTED = (
    "output_dir", "num_workers", "ray_address", "keep_work", "read_chunk_bytes", "loader"
)


def fingerprint(data: DataConfig, tokenizer: TokenizerConfig, files: list[SourceFile]) -> str:
    """Hex sha256 over what decides the shard contents."""
    data_part = {k: v for k, v in asdict(data).items() if k not in _NOT_FINGERPRINTED}
    tok_part = asdict(tokenizer)
    if tokenizer.model_path:
        tok_part["model_path"] = tokenizer_source(tokenizer.model_path).digest()
    payload = {
        "revision": FORMAT_REVISION,
        "data": data_part,
        "tokenizer": tok_part,
        "files": [[f.dataset, f.url, f.size, f.mtime] for f in files],
    }
    if data.decontaminate.eval_files:  # their n-grams, not only their names, decide removals
        payload["eval_ngrams"] = eval_digest(data.decontaminate)
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def is_complete(path: Path, fp: str) -> bool:
    """True if `path` is a manifest for fingerprint `fp` whose shards all exist, sized right."""
    try:
        manifest = DatasetManifest.read(path)
    except ManifestError:
        return False
    if manifest.fingerprint != fp:
        return False
    for dataset in manifest.datasets.values():
        for split in dataset.splits.values():
            for shard in split.shards:
                shard_path = path.parent / shard.path
                if not shard_path.exists() or shard_path.stat().st_size != shard.bytes:
                    return False
    return True


class ShardPlanner:
    """Plans shards while encode results stream in, so writing overlaps encoding.

    A shard is planned as soon as every token it holds is known: all read chunks before its
    end (in chunk order) are encoded. Each dataset/split stream is cut into windows of
    seq_len + 1 tokens, `samples_per_shard` windows per shard; the last window is padded.

    Args:
        data: The `data` section.
        itemsize: Bytes per token (2 or 4).
        chunk_datasets: Per read chunk (in chunk order), its dataset name.
    """

    def __init__(self, data: DataConfig, itemsize: int, chunk_datasets: list[str]) -> None:
        self.window = data.seq_len + 1
        self.per_shard = samples_per_shard(data.shard_target_bytes, data.seq_len, itemsize)
        self.chunk_datasets = chunk_datasets
        self.last_chunk = {name: i for i, name in enumerate(chunk_datasets)}
        self.streams = {(d.name, split): _Stream() for d in data.datasets for split in SPLITS}
        self.waiting: dict[int, EncodeResult] = {}
        self.next_chunk = 0
        self.plans: list[ShardPlan] = []

    def add(self, result: EncodeResult) -> list[ShardPlan]:
        """Take one chunk's encode result (any order); return the shards now plannable."""
        self.waiting[result.chunk] = result
        new: list[ShardPlan] = []
        while self.next_chunk in self.waiting:
            chunk = self.next_chunk
            result = self.waiting.pop(chunk)
            dataset = self.chunk_datasets[chunk]
            for split in SPLITS:
                stream = self.streams[(dataset, split)]
                tokens = result.splits[split].tokens
                if tokens:
                    stream.bases.append((chunk, stream.position))
                    stream.position += tokens
                final = self.last_chunk[dataset] == chunk
                new += self._emit(dataset, split, stream, final)
            self.next_chunk += 1
        return new

    def check_complete(self) -> None:
        """Raise if some chunk's encode result never arrived."""
        if self.waiting or self.next_chunk != len(self.chunk_datasets):
            raise RuntimeError(
                f"encode results missing from read chunk {self.next_chunk} on; rerun prepare"
            )

    def _emit(self, dataset: str, split: str, stream: _Stream, final: bool) -> list[ShardPlan]:
        windows_known = stream.position // self.window
        if final:
            windows_known = -(-stream.position // self.window)
        new = []
        while True:
            first = stream.next_shard * self.per_shard
            count = min(self.per_shard, windows_known - first)
            if count <= 0 or (count < self.per_shard and not final):
                return new
            lo, hi = first * self.window, (first + count) * self.window
            bases = stream.bases
            # Chunks whose tokens overlap [lo, hi); a document that started in an earlier
            # chunk needs no entry: window position 0 always counts as a document start.
            overlapping = [
                (chunk, base) for i, (chunk, base) in enumerate(bases)
                if base < hi and (bases[i + 1][1] if i + 1 < len(bases) else stream.position) > lo
            ]
            plan = ShardPlan(dataset, split, stream.next_shard, first, count, overlapping)
            self.plans.append(plan)
            new.append(plan)
            stream.next_shard += 1


class _Stream:
    def __init__(self) -> None:
        self.bases: list[tuple[int, int]] = []
        self.position = 0
        self.next_shard = 0


def build_manifest(
    data: DataConfig,
    tokenizer_info: dict[str, Any],
    fp: str,
    files: list[SourceFile],
    shard_results: list[ShardInfo],
    plans: list[ShardPlan],
    summary: dict[str, Any],
) -> DatasetManifest:
    """Assemble the manifest (shard paths relative to the output folder).

    Args:
        data: The `data` section.
        tokenizer_info: `describe_tokenizer`'s description of the model.
        fp: The `fingerprint`.
        files: Every input file.
        shard_results: The written shards' entries, in the order of `plans`.
        plans: The shard plans, sorted by dataset (config order), split and index.
        summary: The short stats (`stats.summary_for_manifest`).
    """
    window = data.seq_len + 1
    datasets: dict[str, DatasetInfo] = {}
    for spec in data.datasets:
        splits = {}
        for split in SPLITS:
            shards = [
                r for r, p in zip(shard_results, plans, strict=True)
                if p.dataset == spec.name and p.split == split
            ]
            samples = sum(s.samples for s in shards)
            tokens = sum(s.tokens for s in shards)
            splits[split] = SplitInfo(samples, tokens, samples * window - tokens, shards)
        datasets[spec.name] = DatasetInfo(
            weight=spec.weight,
            sources=[f.url for f in files if f.dataset == spec.name],
            splits=splits,
        )
    tokenizer = TokenizerInfo.from_dict({"file": TOKENIZER_FILE, **tokenizer_info})
    return DatasetManifest(
        seq_len=data.seq_len,
        token_dtype=token_dtype(tokenizer.vocab_size, tokenizer.pad_id),
        tokenizer=tokenizer,
        datasets=datasets,
        fingerprint=fp,
        stats=summary,
    )
