"""The manifest and stats.json of a prepared task data set (``data.task``).

The manifest is the usual `DatasetManifest` with one dataset, ``task``, and a typed
`TaskInfo` (kind, labels, examples and label counts per split). stats.json keeps the keys
`launch/` reads from a pretraining dataset's (``datasets``, ``tokens``, ``bad_input``,
``throughput``, ``files``) and adds ``task``.
"""

from __future__ import annotations

from typing import Any

from lmforge.pipeline.config import DataConfig
from lmforge.pipeline.contract.dataset_manifest import (
    DatasetInfo,
    DatasetManifest,
    ShardInfo,
    SplitInfo,
    TaskInfo,
    TaskSplitInfo,
    TokenizerInfo,
)
from lmforge.pipeline.contract.shard_format import TASK_DATASET, TOKENIZER_FILE, token_dtype
from lmforge.pipeline.prepare.phases import SPLITS
from lmforge.pipeline.prepare.results import ExamplesResult
from lmforge.pipeline.prepare.sources import SourceFile
from lmforge.pipeline.prepare.stats import merge_bad_input
from lmforge.pipeline.prepare.tasks import TaskShardPlan


def _split_totals(encoded: list[ExamplesResult], split: str, key: str) -> int:
    return sum(getattr(r.splits[split], key) for r in encoded)


def task_info(data: DataConfig, labels: list[str], encoded: list[ExamplesResult]) -> TaskInfo:
    """The manifest's `task` entry from the encode results."""
    splits = {}
    for split in SPLITS:
        counts = dict.fromkeys(labels, 0)
        for r in encoded:
            for label, n in r.splits[split].label_counts.items():
                counts[label] += n
        splits[split] = TaskSplitInfo(_split_totals(encoded, split, "examples"), counts)
    return TaskInfo(kind=data.task.kind, labels=list(labels), splits=splits)


def build_task_manifest(
    data: DataConfig,
    tokenizer_info: dict[str, Any],
    fp: str,
    files: list[SourceFile],
    shard_results: list[ShardInfo],
    plans: list[TaskShardPlan],
    task: TaskInfo,
) -> DatasetManifest:
    """Assemble the manifest of a task data set (shards in the order of `plans`)."""
    window = data.seq_len + 1
    splits = {}
    for split in SPLITS:
        shards = [r for r, p in zip(shard_results, plans, strict=True) if p.split == split]
        samples = sum(s.samples for s in shards)
        tokens = sum(s.tokens for s in shards)
        splits[split] = SplitInfo(samples, tokens, samples * window - tokens, shards)
    tokenizer = TokenizerInfo.from_dict({"file": TOKENIZER_FILE, **tokenizer_info})
    return DatasetManifest(
        seq_len=data.seq_len,
        token_dtype=token_dtype(tokenizer.vocab_size, tokenizer.pad_id),
        tokenizer=tokenizer,
        datasets={TASK_DATASET: DatasetInfo(1.0, [f.url for f in files], splits)},
        fingerprint=fp,
        stats={},
        task=task,
    )


def task_stats(
    encoded: list[ExamplesResult],
    manifest: DatasetManifest,
    read_bytes: int,
    empty_files: list[str],
    seconds: dict[str, float],
) -> dict[str, Any]:
    """stats.json of a task data set: records read, examples kept, bad input, tokens."""
    task = manifest.task
    splits = manifest.datasets[TASK_DATASET].splits
    tokens = {split: s.tokens for split, s in splits.items()}
    wall = sum(seconds.values())
    return {
        "task": {
            **task.to_dict(),
            "target_tokens": {split: _split_totals(encoded, split, "target_tokens")
                              for split in SPLITS},
        },
        "datasets": {TASK_DATASET: {
            "read_docs": sum(r.read for r in encoded), "read_bytes": read_bytes,
            "clean_docs": sum(s.examples for s in task.splits.values()),
        }},
        "bad_input": merge_bad_input([r.bad_input for r in encoded], empty_files),
        "tokens": {TASK_DATASET: tokens},
        "padding_tokens": {TASK_DATASET: {split: s.padding_tokens for split, s in splits.items()}},
        "seconds": seconds,
        "throughput": {
            "tokens_per_s": sum(tokens.values()) / wall if wall else 0.0,
            "input_bytes_per_s": read_bytes / wall if wall else 0.0,
        },
        "files": {"stats": "stats.json", "plots": []},
    }


def task_summary(stats: dict[str, Any]) -> dict[str, Any]:
    """The short form of the task stats stored in manifest.json."""
    return {
        "examples": {split: s["examples"] for split, s in stats["task"]["splits"].items()},
        "bad_input": stats["bad_input"]["counts"],
        "tokens": stats["tokens"],
        "files": stats["files"],
    }
