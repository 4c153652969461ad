"""`prepare`: raw text → cleaned, deduplicated, tokenized, packed WebDataset shards.

Phases (each item resumable, see phases.py): plan read chunks → clean → dedup → gather the
tokenizer's training text and train it (or reuse one) → encode (a pool of Ray actors) →
write shards → stats, plots, manifest.json (last, atomic). Without dedup and with a given
tokenizer nothing needs the whole corpus before encoding, so clean and encode run as one
pass in the encoders. Intermediate files live in `<output_dir>/_work/` (see
`publish.Workspace`) and are removed after success. The new dataset is built there too
(`dataset/`) and moved into `<output_dir>` only once complete, so a failed or interrupted
re-prepare (a full disk) leaves the previous dataset readable.

With `data.task` set, the task's JSONL records take the same road with their own phase
items (tasks.py): labels (classify without configured labels) → encode (read, check,
split, tokenize with `tokenizer.model_path`; on the encoder actors) → pack and write the
task shards → stats, manifest with its `task` entry.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import numpy as np

from lmforge.pipeline.config import DataConfig, DatasetSpec, TokenizerConfig
from lmforge.pipeline.contract.dataset_manifest import DatasetManifest, ShardInfo
from lmforge.pipeline.contract.dataset_tokenizer import tokenizer_source
from lmforge.pipeline.contract.shard_format import padding_id, token_dtype
from lmforge.pipeline.durable import disk_space_errors, fsync_dir, write_json
from lmforge.pipeline.folder_lock import folder_lock
from lmforge.pipeline.prepare.chain import build_chain
from lmforge.pipeline.prepare.manifest_writer import (
    ShardPlanner,
    build_manifest,
    fingerprint,
    is_complete,
)
from lmforge.pipeline.prepare.near_dedup import run_near_dedup
from lmforge.pipeline.prepare.phases import (
    SPLITS,
    ShardPlan,
    WorkContext,
    clean_and_encode_chunk,
    clean_chunk,
    dedup_partition,
    encode_chunk,
    tokenizer_text_of_chunk,
    write_shard,
)
from lmforge.pipeline.prepare.publish import Workspace, publish, remove_work, say
from lmforge.pipeline.prepare.results import CleanResult, DedupResult, EncodeResult
from lmforge.pipeline.prepare.sources import (
    ReadChunk,
    SourceFile,
    discover_files,
    plan_read_chunks,
)
from lmforge.pipeline.prepare.stats import draw_plot, plots_of, summarize, summary_for_manifest
from lmforge.pipeline.prepare.task_driver import check_task_tokenizer, run_task
from lmforge.pipeline.prepare.tasks import discover_task_files
from lmforge.pipeline.prepare.tokenizer import (
    copy_tokenizer_files,
    describe_tokenizer,
    train_tokenizer,
)
from lmforge.pipeline.run.executor import LocalExecutor, RayExecutor
from lmforge.pipeline.run.local_ray import ray_session

PARTITION_BYTES = 512 * 2**20  # input bytes per dedup partition: bounds its memory
# (encode results, shard plans, written shards) and, before them, clean results, dedup
# results, near-dedup stats (empty when off), the tokenizer model and its description.
_Written = tuple[list[EncodeResult], list[ShardPlan], list[ShardInfo]]
_Phases = tuple[list[CleanResult], list[DedupResult], dict, Path, dict, _Written]


def prepare(
    data: DataConfig,
    tokenizer: TokenizerConfig,
    *,
    progress: bool = True,
    executor: Literal["ray", "local"] = "ray",
) -> Path:
    """Turn the configured datasets (or the task data set) into shards, a tokenizer and a
    manifest.

    Args:
        data: The `data` section.
        tokenizer: The `tokenizer` section.
        progress: Show a progress bar per phase and say what is happening.
        executor: "ray" (local Ray, or the cluster at `data.ray_address`; a Ray already
            initialised in this process is used and left running) or "local" (all in this
            process; for tests and tiny corpora).

    Returns:
        Path of the written (or already complete) manifest.json.

    Raises:
        ValueError: A config or input problem (naming the key, or the file and line).
        FolderLocked: Another process (a prepare, or a training job reading the dataset)
            holds `data.output_dir`; the message names it.
    """
    # Held for the whole run: a second prepare on the folder is refused naming this one,
    # and no shard is swapped under a job that trains on it (it holds the lock shared).
    with folder_lock(data.output_dir, "lmforge prepare"):
        return _prepare_locked(data, tokenizer, progress, executor)


def _prepare_locked(
    data: DataConfig,
    tokenizer: TokenizerConfig,
    progress: bool,
    executor: Literal["ray", "local"],
) -> Path:
    out = Path(data.output_dir)
    manifest_path = DatasetManifest.path_in(out)
    if data.task is not None:
        check_task_tokenizer(tokenizer)
        files = discover_task_files(data.task)
    else:
        build_chain(data)  # a user step, word list or eval file that cannot load fails here
        files = [f for spec in data.datasets for f in _discover(spec, data)]
    fp = fingerprint(data, tokenizer, files)
    if is_complete(manifest_path, fp):
        say(f"{manifest_path} is complete for these inputs and config; skipping", progress)
        return manifest_path
    # A previous dataset in `out` stays readable: the new one is built beside it (under
    # _work/) and replaces it only once complete (see publish.py).
    run = _run if data.task is None else run_task
    if executor == "local":
        return run(data, tokenizer, files, fp, LocalExecutor(progress), progress)
    with ray_session(data.ray_address):
        ray_executor = RayExecutor(data.num_workers, progress)
        try:
            return run(data, tokenizer, files, fp, ray_executor, progress)
        finally:
            ray_executor.close()


def _discover(spec: DatasetSpec, data: DataConfig) -> list[SourceFile]:
    index = data.datasets.index(spec)
    try:
        return discover_files(spec)
    except ValueError as err:
        raise ValueError(f"datasets[{index}].{err}") from err


def _run(
    data: DataConfig,
    tokenizer: TokenizerConfig,
    files: list[SourceFile],
    fp: str,
    ex: LocalExecutor | RayExecutor,
    progress: bool,
) -> Path:
    space = Workspace.of(data, [f.size for f in files], fp, ex.workers)
    out, staging = space.out, space.staging
    ctx = WorkContext(
        work_dir=str(space.work),
        output_dir=str(staging),
        data=data,
        num_partitions=max(1, math.ceil(space.input_bytes / PARTITION_BYTES)),
    )
    seconds: dict[str, float] = {}

    chunks = plan_read_chunks(data.datasets, space.chunk_bytes, files)
    empty = [f.url for f in files if f.size == 0]
    say(f"{len(files)} files, {space.input_bytes / 1e6:.1f} MB in {len(chunks)} read chunks "
        f"on {ex.workers} workers", progress)
    clean, dedup, near, model, info, (encoded, plans, shards) = _phases(
        data, tokenizer, ctx, ex, chunks, seconds, progress
    )
    for spec in data.datasets:
        if data.val_fraction > 0 and not any(p.dataset == spec.name and p.split == "val"
                                             for p in plans):
            say(f"warning: dataset {spec.name!r} got no val documents; raise "
                "data.val_fraction or add data", progress)

    with disk_space_errors(staging):
        copy_tokenizer_files(model, staging)  # durable: the manifest vouches for them
        manifest = build_manifest(data, info, fp, files, shards, plans, {})
        stats = summarize(clean, dedup, encoded, manifest.datasets, empty, seconds,
                          near_dedup=near)
        # The phase workers draw the plots while this process writes the rest.
        plots = plots_of(stats)
        drawn = [ex.submit(draw_plot, plot, str(staging / "plots")) for plot in plots]
        stats["files"] = {"stats": "stats.json",
                          "plots": [f"plots/{plot.file}" for plot in plots]}
        write_json(staging / "stats.json", stats)
        manifest.stats = summary_for_manifest(stats)
        ex.collect(drawn, "plots")
        manifest.write(DatasetManifest.path_in(staging))
    manifest_path = publish(staging, out, {s.path for s in shards})
    if not data.keep_work:
        remove_work(space)
    total = sum(sum(v.values()) for v in stats["tokens"].values())
    say(f"wrote {len(shards)} shards, {total:,} tokens "
        f"({stats['throughput']['tokens_per_s']:,.0f} tokens/s); "
        f"bad input: {stats['bad_input']['counts'] or 'none'}; manifest {manifest_path}",
        progress)
    return manifest_path


def _phases(
    data: DataConfig,
    tokenizer: TokenizerConfig,
    ctx: WorkContext,
    ex: LocalExecutor | RayExecutor,
    chunks: list[ReadChunk],
    seconds: dict[str, float],
    progress: bool,
) -> _Phases:
    """Clean every chunk, dedup across the corpus (exact, then near), get the tokenizer,
    then encode; or, with no dedup and a given tokenizer, read, clean and encode each chunk
    in one pass."""
    one_pass = not data.dedup and not data.near_dedup and bool(tokenizer.model_path)
    clean: list[CleanResult] = []
    dedup: list[DedupResult] = []
    near: dict = {}
    if not one_pass:
        t0 = time.perf_counter()
        clean = ex.map(clean_chunk, chunks, "clean", ctx)
        seconds["clean"] = time.perf_counter() - t0
        _check_some_kept(clean)
        t0 = time.perf_counter()
        if data.dedup:
            bounds = [r.partition_bounds for r in clean]
            dedup = ex.map(dedup_partition, list(range(ctx.num_partitions)), "dedup", ctx,
                           bounds)
        seconds["dedup"] = time.perf_counter() - t0
        if data.near_dedup:
            t0 = time.perf_counter()
            outcome = run_near_dedup(ctx, ex, clean)
            ctx.near_partitions, near = outcome.partitions, outcome.stats
            seconds["near_dedup"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    model = _tokenizer_model(data, tokenizer, ctx, ex, clean,
                             sum(r.removed_bytes for r in dedup) + near.get("removed_bytes", 0),
                             progress)
    info = describe_tokenizer(model, tokenizer)
    ctx.tokenizer_model = str(model)
    ctx.pad_id = padding_id(info["pad_id"], info["vocab_size"])
    seconds["tokenizer"] = time.perf_counter() - t0

    if not one_pass:
        written = _encode_and_write(data, ctx, ex, chunks, encode_chunk,
                                    [c.index for c in chunks], info, seconds)
        return clean, dedup, near, model, info, written
    written = _encode_and_write(data, ctx, ex, chunks, clean_and_encode_chunk, chunks, info,
                                seconds, phase="clean+encode")
    clean = [r.clean for r in written[0]]
    _check_some_kept(clean)
    return clean, dedup, near, model, info, written


def _check_some_kept(clean: list[CleanResult]) -> None:
    if not sum(r.kept.docs for r in clean):
        raise ValueError(
            "datasets: no documents left after reading and cleaning; check the paths, "
            f"format and data.clean settings (bad input: {_bad_counts(clean)})"
        )


def _encode_and_write(
    data: DataConfig,
    ctx: WorkContext,
    ex: LocalExecutor | RayExecutor,
    chunks: list[ReadChunk],
    encode_fn: Callable[..., EncodeResult],
    items: list[Any],
    info: dict,
    seconds: dict[str, float],
    phase: str = "encode",
) -> _Written:
    """Encode every chunk (`encode_fn` over `items`, one per chunk) and write the shards;
    returns (encode results, plans, shards).

    Writing overlaps encoding: a shard is written as soon as all its tokens are encoded.
    """
    t0 = time.perf_counter()
    itemsize = np.dtype(token_dtype(info["vocab_size"], info["pad_id"])).itemsize
    planner = ShardPlanner(data, itemsize, [c.dataset for c in chunks])
    encoded, handles = [], []
    for result in ex.encode_stream(encode_fn, items, ctx):
        encoded.append(result)
        handles += [ex.submit(write_shard, plan, ctx) for plan in planner.add(result)]
    planner.check_complete()
    encoded.sort(key=lambda r: r.chunk)
    seconds[phase] = time.perf_counter() - t0
    t0 = time.perf_counter()
    written = ex.collect(handles, "write")
    seconds["write"] = time.perf_counter() - t0  # only what was left after encoding
    names = [d.name for d in data.datasets]
    order = sorted(
        range(len(planner.plans)),
        key=lambda i: (names.index(planner.plans[i].dataset),
                       SPLITS.index(planner.plans[i].split), planner.plans[i].index),
    )
    return encoded, [planner.plans[i] for i in order], [written[i] for i in order]


def _bad_counts(clean: list[CleanResult]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for r in clean:
        for kind, n in r.bad_input.counts.items():
            counts[kind] = counts.get(kind, 0) + n
    return counts


def _tokenizer_model(
    data: DataConfig,
    tokenizer: TokenizerConfig,
    ctx: WorkContext,
    ex: LocalExecutor | RayExecutor,
    clean: list[CleanResult],
    removed_bytes: int,
    progress: bool,
) -> Path:
    """Reuse `tokenizer.model_path`, or train one on a uniform share of the cleaned corpus
    (about `tokenizer.train_text_bytes` of text)."""
    if tokenizer.model_path:  # a sentencepiece model, a tokenizer.json or an HF folder
        tokenizer_source(tokenizer.model_path, "model_path")  # names the key if it is none
        return Path(tokenizer.model_path)
    model = ctx.path("tokenizer.model")
    if model.exists():  # trained by an interrupted run with the same fingerprint
        return model
    kept = sum(r.kept.bytes for r in clean) - removed_bytes  # after exact and near dedup
    ctx.tokenizer_text_threshold = min(1.0, tokenizer.train_text_bytes / max(kept, 1))
    texts = ex.map(tokenizer_text_of_chunk, [r.chunk for r in clean], "tokenizer text", ctx)
    text_file = ctx.path("tokenizer_text.txt")
    with open(text_file, "w", encoding="utf-8", errors="surrogatepass") as f:
        for chunk_texts in texts:
            for text in chunk_texts:
                f.write(text)
                f.write("\n")
    size = text_file.stat().st_size
    say(f"training a {tokenizer.type} tokenizer ({tokenizer.vocab_size} pieces) "
        f"on {size / 1e6:.1f} MB of its training text", progress)
    tmp = ctx.path("tokenizer.tmp.model")
    train_tokenizer(text_file, tokenizer, tmp)  # fsynced: its existence is the marker
    tmp.replace(model)
    fsync_dir(model.parent)
    text_file.unlink()
    return model
