"""`prepare` for a task data set (``data.task``): the driver of the task phase items.

labels (classify without configured labels) → encode (read, check, split, tokenize with
`tokenizer.model_path`, on the encoder actors) → pack and write the task shards (phase
workers) → stats.json and the manifest with its `task` entry, published as `prepare`
publishes a pretraining dataset. Every item is resumable (tasks.py).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from lmforge.pipeline.config import DataConfig, TokenizerConfig
from lmforge.pipeline.contract.dataset_manifest import DatasetManifest
from lmforge.pipeline.contract.dataset_tokenizer import tokenizer_source
from lmforge.pipeline.contract.shard_format import (
    padding_id,
    task_samples_per_shard,
    token_dtype,
)
from lmforge.pipeline.durable import disk_space_errors, write_json
from lmforge.pipeline.prepare.phases import SPLITS
from lmforge.pipeline.prepare.publish import Workspace, publish, remove_work, say
from lmforge.pipeline.prepare.sources import ReadChunk, SourceFile, plan_read_chunks
from lmforge.pipeline.prepare.stats import merge_bad_input
from lmforge.pipeline.prepare.task_manifest import (
    build_task_manifest,
    task_info,
    task_stats,
    task_summary,
)
from lmforge.pipeline.prepare.tasks import (
    TaskContext,
    chunk_labels,
    encode_examples,
    plan_task_shards,
    task_specs,
    write_task_shard,
)
from lmforge.pipeline.prepare.tokenizer import copy_tokenizer_files, describe_tokenizer
from lmforge.pipeline.run.executor import LocalExecutor, RayExecutor


def check_task_tokenizer(tokenizer: TokenizerConfig) -> None:
    """Task data needs an existing tokenizer (`tokenizer.model_path`): refuse without one."""
    if not tokenizer.model_path:
        raise ValueError(
            "tokenizer.model_path: not set; task data (data.task) is encoded with an existing "
            "tokenizer: set it to the pretraining dataset's tokenizer.model"
        )
    tokenizer_source(tokenizer.model_path)  # a sentencepiece model, tokenizer.json or HF folder


def run_task(
    data: DataConfig,
    tokenizer: TokenizerConfig,
    files: list[SourceFile],
    fp: str,
    ex: LocalExecutor | RayExecutor,
    progress: bool,
) -> Path:
    """Prepare the task data set: labels → encode → pack and write → stats and manifest."""
    spec = data.task
    space = Workspace.of(data, [f.size for f in files], fp, ex.workers)
    out, staging = space.out, space.staging
    model = Path(tokenizer.model_path)
    info = describe_tokenizer(model, tokenizer)
    dtype = token_dtype(info["vocab_size"], info["pad_id"])
    ctx = TaskContext(
        work_dir=str(space.work), output_dir=str(staging), data=data, num_partitions=1,
        tokenizer_model=str(model), pad_id=padding_id(info["pad_id"], info["vocab_size"]),
        token_dtype=dtype,
    )
    chunks = plan_read_chunks(task_specs(spec), space.chunk_bytes, files)
    say(f"{spec.kind} task: {len(files)} files, {space.input_bytes / 1e6:.1f} MB in "
        f"{len(chunks)} read chunks on {ex.workers} workers", progress)
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    if spec.kind == "classify":
        ctx.labels = list(spec.labels) or _train_labels(ex, chunks, ctx)
    encoded = sorted(ex.encode_stream(encode_examples, chunks, ctx), key=lambda r: r.chunk)
    seconds["encode"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    per_shard = task_samples_per_shard(data.shard_target_bytes, data.seq_len,
                                       np.dtype(dtype).itemsize, spec.kind)
    plans = []
    for split in SPLITS:
        lengths = [(r.chunk, np.load(ctx.path("tokens", f"{r.chunk:06d}.{split}.lengths.npy")))
                   for r in encoded]
        plans += plan_task_shards(spec.kind, split, lengths, data.seq_len + 1, per_shard)
    task = task_info(data, ctx.labels, encoded)
    if not task.splits["train"].examples:
        bad = merge_bad_input([r.bad_input for r in encoded], [])["counts"]
        raise ValueError(f"task.train: no usable training examples; check the files and "
                         f"the field names (bad input: {bad or 'none'})")
    shards = ex.collect([ex.submit(write_task_shard, plan, ctx) for plan in plans], "write")
    seconds["write"] = time.perf_counter() - t0

    with disk_space_errors(staging):
        staging.mkdir(parents=True, exist_ok=True)
        copy_tokenizer_files(model, staging)  # durable: the manifest vouches for them
        manifest = build_task_manifest(data, info, fp, files, shards, plans, task)
        empty = [f.url for f in files if f.size == 0]
        stats = task_stats(encoded, manifest, space.input_bytes, empty, seconds)
        write_json(staging / "stats.json", stats)
        manifest.stats = task_summary(stats)
        manifest.write(DatasetManifest.path_in(staging))
    manifest_path = publish(staging, out, {s.path for s in shards})
    if not data.keep_work:
        remove_work(space)
    say(f"wrote {len(shards)} {spec.kind} shards: "
        f"{', '.join(f'{n} {s.examples} examples' for n, s in task.splits.items())}; "
        f"bad input: {stats['bad_input']['counts'] or 'none'}; manifest {manifest_path}",
        progress)
    return manifest_path


def _train_labels(ex: LocalExecutor | RayExecutor, chunks: list[ReadChunk],
                  ctx: TaskContext) -> list[str]:
    """classify without `task.labels`: the sorted distinct labels of the training files."""
    found = ex.map(chunk_labels, [c for c in chunks if c.dataset == "train"], "labels", ctx)
    labels = sorted({label for r in found for label in r.labels})
    if len(labels) < 2:
        raise ValueError(
            f"task.labels: the training records have {len(labels)} distinct label(s) "
            f"{labels}; classify needs at least 2 (check task.label_field)"
        )
    return labels


