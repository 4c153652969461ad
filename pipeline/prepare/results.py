"""What each prepare phase item returns: small dataclasses, stored as JSON `done/` markers.

A result travels from the worker that made it to the driver (pickled by Ray) and is kept
on disk as its item's marker (`to_dict`, read back with `from_dict`), so that a rerun
returns finished items without redoing them. A marker that does not parse as its result
(an older layout, a damaged file) only means "not done" (`phases.resumable`).

The read work item is a *chunk* (`sources.ReadChunk`): consecutive pieces of one
dataset's files, about `data.read_chunk_bytes`; results name it by its index.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class DocCounts:
    """Documents and their UTF-8 bytes."""

    docs: int = 0
    bytes: int = 0


@dataclass
class BadInput:
    """Bad records skipped: counts by kind, and the first examples (kind, file, line)."""

    counts: dict[str, int] = field(default_factory=dict)
    examples: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> BadInput:
        return cls(dict(raw["counts"]), list(raw["examples"]))


@dataclass
class CleanResult:
    """A chunk read and cleaned: what was read, each step's counters, what was kept."""

    chunk: int
    dataset: str
    read: DocCounts
    steps: dict[str, dict[str, int]]  # step name -> its StepStats as a dict
    kept: DocCounts
    bad_input: BadInput
    partition_bounds: list[int] = field(default_factory=list)  # hash rows per dedup partition
    removed_samples: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    """The first removed documents per rule (redacted; `chain.removed_samples`)."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> CleanResult:
        return cls(int(raw["chunk"]), str(raw["dataset"]), DocCounts(**raw["read"]),
                   {k: dict(v) for k, v in raw["steps"].items()}, DocCounts(**raw["kept"]),
                   BadInput.from_dict(raw["bad_input"]), list(raw["partition_bounds"]),
                   {k: list(v) for k, v in raw["removed_samples"].items()})


@dataclass
class DedupResult:
    """One hash partition deduplicated: documents removed, in all and per chunk."""

    partition: int
    removed_docs: int
    removed_bytes: int
    removed_per_chunk: dict[str, int]  # chunk index (a JSON key: str) -> documents removed
    removed_bytes_per_chunk: dict[str, int] = field(default_factory=dict)  # -> their bytes

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> DedupResult:
        return cls(int(raw["partition"]), int(raw["removed_docs"]), int(raw["removed_bytes"]),
                   {str(k): int(v) for k, v in raw["removed_per_chunk"].items()},
                   {str(k): int(v) for k, v in raw["removed_bytes_per_chunk"].items()})


@dataclass
class SplitTokens:
    """One split of a chunk's token stream: documents and tokens."""

    docs: int
    tokens: int


@dataclass
class EncodeResult:
    """A chunk encoded into per-split token streams on disk (`tokens/`)."""

    chunk: int
    splits: dict[str, SplitTokens]
    doc_tokens_log2_hist: list[int]
    clean: CleanResult | None = None  # read, clean and encode in one pass: its clean result
    node: str = ""  # the Ray node that encoded it (set by the executor; "" in-process)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> EncodeResult:
        clean = raw["clean"]
        return cls(int(raw["chunk"]),
                   {split: SplitTokens(**s) for split, s in raw["splits"].items()},
                   list(raw["doc_tokens_log2_hist"]),
                   None if clean is None else CleanResult.from_dict(clean), str(raw["node"]))


@dataclass
class ExampleSplit:
    """One split of a chunk's task examples (`data.task`)."""

    examples: int
    tokens: int
    target_tokens: int
    label_counts: dict[str, int]  # classify: examples per label; else empty


@dataclass
class ExamplesResult:
    """A chunk of task records read, checked, split and encoded (`tasks.encode_examples`)."""

    chunk: int
    read: int  # records read
    splits: dict[str, ExampleSplit]
    bad_input: BadInput
    node: str = ""  # as `EncodeResult.node`

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ExamplesResult:
        return cls(int(raw["chunk"]), int(raw["read"]),
                   {split: ExampleSplit(**s) for split, s in raw["splits"].items()},
                   BadInput.from_dict(raw["bad_input"]), str(raw["node"]))


@dataclass
class ChunkLabels:
    """The distinct labels of a chunk's task records (classify without `task.labels`)."""

    labels: list[str]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ChunkLabels:
        return cls([str(label) for label in raw["labels"]])
