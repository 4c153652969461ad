"""Task data (``data.task``) through the pipeline: JSONL records → checked, tokenized
examples → WebDataset shards with the task's members (see ``shard_format.py``).

The phase items here run on the same executor as pretraining data, resumable the same
way (a ``done/`` marker per item): ``chunk_labels`` (classify without configured labels:
the distinct labels of a read chunk), ``encode_examples`` (read, check, clean, split and
encode a read chunk's records; on the encoder actors) and ``write_task_shard`` (one
shard). Between encode and write, ``plan_task_shards`` packs the examples into samples
and samples into shards, in record order, so the shards never depend on how the input
was chunked or how many workers ran.

Bad records are counted with file and line (``BadInputLog``), beside the reader's kinds
(invalid UTF-8, malformed JSON, ...): ``missing_field``, ``field_not_a_string``,
``empty_field``, ``unknown_label`` and ``longer_than_seq_len``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lmforge.pipeline.config import CleanConfig, DataConfig, DatasetSpec, TaskDataConfig
from lmforge.pipeline.contract.dataset_manifest import ShardInfo
from lmforge.pipeline.contract.shard_format import (
    DOC_STARTS_MEMBER,
    LABEL_MEMBER,
    LOSS_MASK_MEMBER,
    TARGET_MEMBER,
    TASK_DATASET,
    TOKENS_MEMBER,
    sample_key,
    shard_file_name,
)
from lmforge.pipeline.prepare.phases import (
    SPLITS,
    WorkContext,
    is_val,
    resumable,
    save_npy,
    write_shard_once,
)
from lmforge.pipeline.prepare.readers import BadInputLog, read_json_records
from lmforge.pipeline.prepare.results import BadInput, ChunkLabels, ExampleSplit, ExamplesResult
from lmforge.pipeline.prepare.shards import ShardWriter
from lmforge.pipeline.prepare.sources import ReadChunk, ReadPiece, SourceFile, discover_files
from lmforge.pipeline.prepare.steps import build_clean_steps
from lmforge.pipeline.prepare.tokenizer import DocumentEncoder

_CLEAN_STEPS = ("normalize", "strip_control")  # the cleaning steps that apply to task fields


@dataclass
class TaskContext(WorkContext):
    """`WorkContext` plus what task items need; small and picklable."""

    labels: list[str] = field(default_factory=list)
    """classify: the class names in id order."""
    token_dtype: str = "uint16"


def task_specs(task: TaskDataConfig) -> list[DatasetSpec]:
    """The task's files as datasets named by the split they come from (``train``, ``val``),
    read as JSON lines, for `discover_files` and `plan_read_chunks`."""
    return [DatasetSpec(name=split, paths=list(paths), format="jsonl")
            for split, paths in (("train", task.train), ("val", task.val)) if paths]


def discover_task_files(task: TaskDataConfig) -> list[SourceFile]:
    """Every train and val file of the task, checked: each pattern matches and no file is
    in both.

    Raises:
        ValueError: ``task.train: no files match ...`` and the like.
    """
    files = []
    for spec in task_specs(task):
        try:
            files += discover_files(spec)
        except ValueError as err:
            message = str(err).removeprefix("paths: ").replace(f" (dataset {spec.name!r})", "")
            raise ValueError(f"task.{spec.name}: {message}") from err
    train = {f.url for f in files if f.dataset == "train"}
    both = sorted(f.url for f in files if f.dataset == "val" and f.url in train)
    if both:
        raise ValueError(f"task.val: {both} also matched by task.train; a file belongs to "
                         "one split only")
    return files


def example_limit(kind: str, seq_len: int) -> int:
    """Most tokens one example may have: a whole sample for sft (the last token is only a
    label), the ``seq_len`` inputs for classify and seq2seq (per sequence)."""
    return seq_len + 1 if kind == "sft" else seq_len


def _field_cleaner(clean: CleanConfig) -> Callable[[str], str]:
    steps = [s for s in build_clean_steps(clean) if s.name in _CLEAN_STEPS]

    def run(text: str) -> str:
        for step in steps:
            text = step.transform(text) or ""
        return text

    return run


class _Records:
    """A read chunk's records as checked field pairs, bad ones reported with file:line."""

    def __init__(self, spec: TaskDataConfig, data: DataConfig, log: BadInputLog) -> None:
        self.spec, self.data, self.log = spec, data, log
        self.names = spec.record_fields()
        self.clean = _field_cleaner(data.clean)
        self.read = 0

    def of(self, chunk: ReadChunk) -> Iterator[tuple[ReadPiece, int, str, str]]:
        """Yields ``(piece, line, first field, second field)`` of every usable record (a
        bad record is reported once, for its first bad field)."""
        for piece in chunk.pieces:
            for line, record in read_json_records(piece, self.data.max_record_bytes, self.log):
                self.read += 1
                first = self._field(record, self.names[0], piece, line)
                second = None if first is None else self._field(record, self.names[1], piece,
                                                                line)
                if second is not None:
                    yield piece, line, first, second

    def _field(self, record: dict, name: str, piece: ReadPiece, line: int) -> str | None:
        if name not in record:
            self.log.report("missing_field", piece, line, f"no field {name!r}")
            return None
        value = record[name]
        is_label = self.spec.kind == "classify" and name == self.spec.label_field
        if is_label and isinstance(value, int) and not isinstance(value, bool):
            value = str(value)
        if not isinstance(value, str):
            self.log.report("field_not_a_string", piece, line,
                            f"field {name!r} is {type(value).__name__}")
            return None
        value = self.clean(value)
        if not value.strip():
            self.log.report("empty_field", piece, line, f"field {name!r} is empty")
            return None
        return value


def chunk_labels(chunk: ReadChunk, ctx: TaskContext) -> ChunkLabels:
    """The distinct labels of a read chunk's records (bad records are reported by encode)."""
    def work() -> ChunkLabels:
        records = _Records(ctx.data.task, ctx.data, BadInputLog(strict=False))
        return ChunkLabels(sorted({label for _, _, _, label in records.of(chunk)}))

    return resumable(ctx, "labels", f"{chunk.index:06d}", work, ChunkLabels.from_dict)


class _SplitExamples:
    """One split's encoded examples of a read chunk, as flat arrays."""

    def __init__(self) -> None:
        self.ids: list[np.ndarray] = []
        self.aux: list[int] = []  # sft: prompt length; classify: label id; seq2seq: target length
        self.targets: list[np.ndarray] = []

    def add(self, ids: list[int], aux: int, target: list[int] | None) -> None:
        self.ids.append(np.asarray(ids, np.int64))
        self.aux.append(aux)
        if target is not None:
            self.targets.append(np.asarray(target, np.int64))

    def save(self, ctx: TaskContext, stem: str, label_counts: dict[str, int]) -> ExampleSplit:
        dtype = np.dtype(ctx.token_dtype)
        ids = np.concatenate(self.ids).astype(dtype) if self.ids else np.zeros(0, dtype)
        lengths = np.array([len(x) for x in self.ids], np.int64)
        save_npy(ctx.path("tokens", f"{stem}.ids.npy"), ids)
        save_npy(ctx.path("tokens", f"{stem}.lengths.npy"), lengths)
        save_npy(ctx.path("tokens", f"{stem}.aux.npy"), np.array(self.aux, np.int64))
        if ctx.data.task.kind == "seq2seq":
            targets = np.concatenate(self.targets).astype(dtype) if self.targets \
                else np.zeros(0, dtype)
            save_npy(ctx.path("tokens", f"{stem}.targets.npy"), targets)
        return ExampleSplit(len(self.ids), int(lengths.sum()),
                            int(sum(self.aux)) if self.targets else 0, label_counts)


def encode_examples(chunk: ReadChunk, ctx: TaskContext,
                    encoder: DocumentEncoder) -> ExamplesResult:
    """Read, check, split and encode a read chunk's records (on an encoder actor)."""
    return resumable(ctx, "encode", f"{chunk.index:06d}", lambda: _encode(chunk, ctx, encoder),
                     ExamplesResult.from_dict)


class _Encoder:
    """Turns a record's two fields into an example: ``(ids, aux, target ids or None)``,
    `aux` being the prompt length (sft), the label id (classify) or the target length."""

    def __init__(self, kind: str, encoder: DocumentEncoder, labels: list[str]) -> None:
        self.kind, self.text = kind, encoder.text
        self.eos = [encoder.eos_id] if encoder.eos_id >= 0 else []
        self.bos = [self.text.bos_id] if kind == "classify" and self.text.bos_id >= 0 else []
        self.label_ids = {label: i for i, label in enumerate(labels)}

    def __call__(self, first: str, second: str) -> tuple[list[int], int, list[int] | None]:
        def encode(text: str) -> list[int]:  # the text's ids alone; bos/eos added here
            return self.text.encode(text, special_tokens=False)
        if self.kind == "classify":
            return self.bos + encode(first) + self.eos, self.label_ids[second], None
        if self.kind == "sft":
            prompt = encode(first)
            return prompt + encode(second) + self.eos, len(prompt), None
        target = encode(second) + self.eos
        return encode(first) + self.eos, len(target), target


def _encode(chunk: ReadChunk, ctx: TaskContext, encoder: DocumentEncoder) -> ExamplesResult:
    spec: TaskDataConfig = ctx.data.task
    log = BadInputLog(strict=ctx.data.strict)
    records = _Records(spec, ctx.data, log)
    make = _Encoder(spec.kind, encoder, ctx.labels)
    limit = example_limit(spec.kind, ctx.data.seq_len)
    splits = {split: _SplitExamples() for split in SPLITS}
    label_counts = {split: dict.fromkeys(ctx.labels, 0) for split in SPLITS}
    hashed_val = not spec.val and ctx.data.val_fraction > 0
    for piece, line, first, second in records.of(chunk):
        if spec.kind == "classify" and second not in make.label_ids:
            shown = ", ".join(ctx.labels[:8]) + (", ..." if len(ctx.labels) > 8 else "")
            log.report("unknown_label", piece, line, f"{second!r} is not one of {shown}")
            continue
        ids, aux, target = make(first, second)
        longest = max(len(ids), len(target or ()))
        if longest > limit:
            log.report("longer_than_seq_len", piece, line,
                       f"{longest} tokens; a {spec.kind} example holds at most {limit} "
                       f"(data.seq_len {ctx.data.seq_len})")
            continue
        split = "val" if chunk.dataset == "val" else "train"
        if hashed_val and is_val(_record_digest(first, second), ctx.data.val_fraction)[0]:
            split = "val"
        splits[split].add(ids, aux, target)
        if spec.kind == "classify":
            label_counts[split][second] += 1
    saved = {split: examples.save(ctx, f"{chunk.index:06d}.{split}", label_counts[split])
             for split, examples in splits.items()}
    return ExamplesResult(chunk.index, records.read, saved, BadInput(log.counts, log.examples))


def _record_digest(first: str, second: str) -> np.ndarray:
    """(1, 3) uint64 digest of a record's fields, laid out as `phases.is_val` reads it."""
    blob = f"{first}\0{second}".encode("utf-8", "surrogatepass")
    return np.frombuffer(hashlib.blake2b(blob, digest_size=24).digest(), "<u8").reshape(1, 3)


# -- packing and writing ------------------------------------------------------------------


def pack_examples(lengths: np.ndarray, window: int) -> np.ndarray:
    """Greedy in-order packing: the sample index of each example.

    An example goes into the current sample if it fits in what is left of the ``window``
    tokens, else it starts the next sample; it is never split. Each sample's packing
    depends only on the examples from its first one on, so a shard starting at a sample
    boundary repacks its own examples to the same samples.
    """
    samples = np.empty(len(lengths), np.int64)
    sample, used = -1, window
    for i, length in enumerate(lengths.tolist()):
        if used + length > window:
            sample, used = sample + 1, 0
        samples[i] = sample
        used += length
    return samples


@dataclass
class TaskShardPlan:
    """One task shard to write: ``n_samples`` samples made of the examples in ``ranges``."""

    split: str
    index: int
    n_samples: int
    ranges: list[tuple[int, int, int]]  # (read chunk, first example, end example) in order


def plan_task_shards(
    kind: str, split: str, chunk_lengths: list[tuple[int, np.ndarray]], window: int,
    per_shard: int,
) -> list[TaskShardPlan]:
    """Pack a split's examples (one lengths array per read chunk, in chunk order) into
    samples, and cut the samples into shards of ``per_shard``."""
    lengths = np.concatenate([x for _, x in chunk_lengths]) if chunk_lengths else np.zeros(0)
    if not len(lengths):
        return []
    if kind == "sft":
        sample_of = pack_examples(lengths.astype(np.int64), window)
    else:
        sample_of = np.arange(len(lengths))
    n_samples = int(sample_of[-1]) + 1
    chunk_starts = np.cumsum([0] + [len(x) for _, x in chunk_lengths])
    plans = []
    for index, first in enumerate(range(0, n_samples, per_shard)):
        stop = min(first + per_shard, n_samples)
        lo, hi = np.searchsorted(sample_of, [first, stop])
        ranges = []
        for (chunk, _), start, end in zip(chunk_lengths, chunk_starts[:-1], chunk_starts[1:],
                                          strict=True):
            a, b = max(lo, start), min(hi, end)
            if a < b:
                ranges.append((chunk, int(a - start), int(b - start)))
        plans.append(TaskShardPlan(split, index, stop - first, ranges))
    return plans


def write_task_shard(plan: TaskShardPlan, ctx: TaskContext) -> ShardInfo:
    """Write one task shard unless a finished copy is already there (`write_shard_once`)."""
    path = Path(ctx.output_dir) / TASK_DATASET / shard_file_name(plan.split, plan.index)

    def fill(writer: ShardWriter) -> None:
        for k, (members, real) in enumerate(_samples(plan, ctx)):
            writer.write_sample(sample_key(TASK_DATASET, plan.split, plan.index, k),
                                members, real)
        if writer.samples != plan.n_samples:
            raise RuntimeError(f"task shard {path}: packed {writer.samples} samples, "
                               f"planned {plan.n_samples}; rerun prepare")

    return write_shard_once(ctx, f"{TASK_DATASET}-{plan.split}-{plan.index:06d}", path, fill)


def _load(ctx: TaskContext, plan: TaskShardPlan) -> dict[str, list[np.ndarray]]:
    """The plan's examples: ids (and targets) per example, and the per-example aux value."""
    out: dict[str, list] = {"ids": [], "aux": [], "targets": []}
    for chunk, lo, hi in plan.ranges:
        stem = f"{chunk:06d}.{plan.split}"
        ids = np.load(ctx.path("tokens", f"{stem}.ids.npy"), mmap_mode="r")
        lengths = np.load(ctx.path("tokens", f"{stem}.lengths.npy"))
        aux = np.load(ctx.path("tokens", f"{stem}.aux.npy"))
        ends = np.cumsum(lengths)
        out["ids"] += [np.asarray(ids[e - n : e]) for n, e in zip(lengths[lo:hi], ends[lo:hi],
                                                                    strict=True)]
        out["aux"] += aux[lo:hi].tolist()
        if ctx.data.task.kind == "seq2seq":
            targets = np.load(ctx.path("tokens", f"{stem}.targets.npy"), mmap_mode="r")
            tends = np.cumsum(aux)
            out["targets"] += [np.asarray(targets[e - n : e])
                               for n, e in zip(aux[lo:hi], tends[lo:hi], strict=True)]
    return out


def _samples(plan: TaskShardPlan, ctx: TaskContext):
    """Yields ``(members, real tokens)`` per sample of the shard."""
    kind, window, pad = ctx.data.task.kind, ctx.data.seq_len + 1, ctx.pad_id
    dtype = np.dtype(ctx.token_dtype)
    examples = _load(ctx, plan)
    ids, aux = examples["ids"], examples["aux"]
    if kind == "sft":
        sample_of = pack_examples(np.array([len(x) for x in ids], np.int64), window)
        bounds = np.searchsorted(sample_of, np.arange(sample_of[-1] + 2))
        for a, b in zip(bounds, bounds[1:], strict=False):
            tokens = np.full(window, pad, dtype)
            mask = np.zeros(window, np.uint8)
            starts, at = [], 0
            for example, prompt in zip(ids[a:b], aux[a:b], strict=True):
                tokens[at : at + len(example)] = example
                mask[at + prompt : at + len(example)] = 1
                starts.append(at)
                at += len(example)
            yield {DOC_STARTS_MEMBER: np.array(starts, np.int32), TOKENS_MEMBER: tokens,
                   LOSS_MASK_MEMBER: mask}, at
        return
    for i, example in enumerate(ids):
        tokens = np.full(window, pad, dtype)
        tokens[: len(example)] = example
        members = {DOC_STARTS_MEMBER: np.zeros(1, np.int32), TOKENS_MEMBER: tokens}
        if kind == "classify":
            members[LABEL_MEMBER] = np.array(aux[i], np.int64)
        else:
            target = np.full(window, pad, dtype)
            target[: len(examples["targets"][i])] = examples["targets"][i]
            members[TARGET_MEMBER] = target
        yield members, len(example)
