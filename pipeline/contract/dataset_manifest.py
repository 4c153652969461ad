"""The dataset contract: `DatasetManifest`, the typed form of a dataset's manifest.json.

This is the only code that opens a manifest.json. `DatasetManifest.read` checks the
version and the type of every key and names the file and the key of the first problem;
`write` produces exactly the JSON `prepare` always wrote (same keys, same order, two-space
indent), so a manifest read and written again keeps its bytes. The shard format the
manifest describes is in `shard_format.py`.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from lmforge.pipeline.contract.dataset_tokenizer import DatasetTokenizer
from lmforge.pipeline.contract.shard_format import (
    MANIFEST_FILE,
    MANIFEST_VERSION,
    TASK_MEMBERS,
    TOKEN_DTYPES,
    padding_id,
)
from lmforge.pipeline.contract.shard_tar import is_url, local_path, read_bytes
from lmforge.pipeline.durable import write_atomic

_AGAIN = "run `lmforge prepare` again"


class ManifestError(ValueError):
    """A manifest.json that is missing, unreadable or breaks the contract.

    The message names the file (and the key) and says what to do.
    """


@dataclass(frozen=True)
class SpecialToken:
    """A special piece of the tokenizer and its id."""

    piece: str
    id: int


@dataclass(frozen=True)
class TokenizerInfo:
    """The manifest's `tokenizer` section: the tokenizer the tokens come from (a sentencepiece
    model, or a Hugging Face tokenizer: see `dataset_tokenizer.py`)."""

    file: str
    """The main file, relative to the dataset folder (`tokenizer.model`, `tokenizer.json`)."""
    sha256: str
    """Hex sha256 of the main file."""
    vocab_size: int
    """Pieces in the vocabulary, special and byte-fallback pieces included."""
    type: str
    """sentencepiece model type (`bpe`, `unigram`, ...)."""
    pad_id: int
    """The pad piece (-1 if the model has none; `padding_id` is what pads)."""
    unk_id: int
    bos_id: int
    eos_id: int
    """Ends every document of the token stream (-1: the model has none; documents are then
    only marked by the shards' ``doc_starts``)."""
    special_tokens: dict[str, SpecialToken]
    """Special pieces by role (pad, unk, bos, eos, mask, sep; those the model has)."""
    extra_special_tokens: list[SpecialToken]
    """User-defined special pieces beyond the roles (the JSON's `special_tokens.extra`)."""
    byte_fallback: bool
    """Unknown characters are encoded as byte pieces."""
    kind: str = "sentencepiece"
    """`sentencepiece` or `hf`; the JSON has `kind` and `files` only for `hf`, so
    sentencepiece manifests keep their bytes."""
    files: dict[str, str] = field(default_factory=dict)
    """hf: every file of the tokenizer in the dataset folder → its sha256 (`file` included)."""

    def file_sha256s(self) -> dict[str, str]:
        """Every file of the tokenizer (relative to the dataset folder) → its sha256, the main
        file first: what "the same tokenizer" means (`dataset_tokenizer.tokenizer_mismatches`)."""
        return {self.file: self.sha256, **self.files}

    @property
    def padding_id(self) -> int:
        """What pads the last window of a split: the pad piece, or `vocab_size` without one
        (see `shard_format.padding_id`)."""
        return padding_id(self.pad_id, self.vocab_size)

    @property
    def mask_id(self) -> int | None:
        """Id of the mask piece, None when the tokenizer has none."""
        mask = self.special_tokens.get("mask")
        return None if mask is None else mask.id

    def special_ids(self) -> tuple[int, ...]:
        """Every special id (pad, unk, bos, eos, each role, the extras) that exists, sorted."""
        ids = {self.pad_id, self.unk_id, self.bos_id, self.eos_id}
        ids |= {t.id for t in self.special_tokens.values()}
        ids |= {t.id for t in self.extra_special_tokens}
        return tuple(sorted(i for i in ids if i >= 0))

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> TokenizerInfo:
        """Build from the JSON form (e.g. `describe_tokenizer`'s, plus `file`), checked.

        Raises:
            ManifestError: A key is missing or of the wrong type.
        """
        return _tokenizer(_Object(raw, "tokenizer description", "tokenizer"))

    def to_dict(self) -> dict[str, Any]:
        """The JSON form (the extras go under `special_tokens.extra`)."""
        special: dict[str, Any] = {role: asdict(t) for role, t in self.special_tokens.items()}
        special["extra"] = [asdict(t) for t in self.extra_special_tokens]
        return {
            "file": self.file,
            "sha256": self.sha256,
            "vocab_size": self.vocab_size,
            "type": self.type,
            "pad_id": self.pad_id,
            "unk_id": self.unk_id,
            "bos_id": self.bos_id,
            "eos_id": self.eos_id,
            "special_tokens": special,
            "byte_fallback": self.byte_fallback,
            **({"kind": self.kind, "files": dict(self.files)} if self.kind != "sentencepiece"
               else {}),
        }


@dataclass(frozen=True)
class ShardInfo:
    """One shard tar: the manifest's per-shard entry."""

    path: str
    """Relative to the dataset folder: `<dataset>/<split>-NNNNNN.tar`."""
    samples: int
    tokens: int
    """Tokens that are not padding."""
    bytes: int
    sha256: str


@dataclass(frozen=True)
class SplitInfo:
    """One split (`train`, `val`) of a dataset."""

    samples: int
    tokens: int
    """Tokens that are not padding."""
    padding_tokens: int
    shards: list[ShardInfo]

    def to_dict(self) -> dict[str, Any]:
        """The JSON form."""
        return {
            "samples": self.samples,
            "tokens": self.tokens,
            "padding_tokens": self.padding_tokens,
            "shards": [asdict(s) for s in self.shards],
        }


@dataclass(frozen=True)
class DatasetInfo:
    """One named dataset of the manifest."""

    weight: float
    """Mixture weight (as configured; the loader may override it)."""
    sources: list[str]
    """The input files it was prepared from."""
    splits: dict[str, SplitInfo]

    def to_dict(self) -> dict[str, Any]:
        """The JSON form."""
        splits = {name: split.to_dict() for name, split in self.splits.items()}
        return {"weight": self.weight, "sources": list(self.sources), "splits": splits}


@dataclass(frozen=True)
class TaskSplitInfo:
    """One split of a task data set."""

    examples: int
    """Examples (records that passed the checks) in the split."""
    label_counts: dict[str, int]
    """classify: examples per label name (every label, zeros included); empty otherwise."""


@dataclass(frozen=True)
class TaskInfo:
    """The manifest's `task` entry: what kind of task data the shards hold (see the task
    members in `shard_format.py`)."""

    kind: str
    """`sft`, `classify` or `seq2seq`."""
    labels: list[str]
    """classify: the class names; a sample's `label.npy` is an index into this list."""
    splits: dict[str, TaskSplitInfo]

    @property
    def num_labels(self) -> int:
        """Number of classes (0 for kinds other than classify)."""
        return len(self.labels)

    def to_dict(self) -> dict[str, Any]:
        """The JSON form."""
        return {
            "kind": self.kind,
            "labels": list(self.labels),
            "splits": {
                name: {"examples": s.examples, "label_counts": dict(s.label_counts)}
                for name, s in self.splits.items()
            },
        }


@dataclass
class DatasetManifest:
    """A prepared dataset: token format, tokenizer, and every shard of every split."""

    seq_len: int
    """Training sequence length; each sample holds seq_len + 1 tokens."""
    token_dtype: str
    """`uint16` or `uint32` (see `shard_format.token_dtype`)."""
    tokenizer: TokenizerInfo
    datasets: dict[str, DatasetInfo]
    fingerprint: str
    """Hash of the inputs and config that decide the shards (an unchanged rerun is skipped)."""
    stats: dict[str, Any]
    """Short prepare statistics (the full ones are in stats.json)."""
    task: TaskInfo | None = None
    """Set for task data (`data.task`): the kind, labels and example counts. The JSON has
    a `task` key only then, so pretraining manifests keep their bytes."""
    version: int = MANIFEST_VERSION
    location: str = ""
    """The manifest.json path or URL this was read from or written to (not in the JSON)."""
    _tokenizer_checked: bool = field(default=False, init=False, repr=False, compare=False)

    @classmethod
    def read(cls, path: str | Path) -> DatasetManifest:
        """Read and check a manifest.

        Args:
            path: manifest.json, its folder, or an fsspec URL of either.

        Raises:
            ManifestError: Missing, not JSON, another version, or a key missing or of the
                wrong type (the message names the file and the key).
        """
        location = _manifest_location(path)
        try:
            raw = json.loads(read_bytes(location))
        except FileNotFoundError as err:
            raise ManifestError(f"{location}: no manifest here; run `lmforge prepare` first") \
                from err
        except OSError as err:
            raise ManifestError(
                f"{location}: cannot read the manifest ({err}); check the path and access"
            ) from err
        except ValueError as err:  # JSONDecodeError, or bytes that are not UTF-8
            raise ManifestError(f"{location}: not valid JSON ({err}); {_AGAIN}") from err
        return cls.from_dict(raw, location)

    @classmethod
    def from_dict(cls, raw: Any, location: str = "") -> DatasetManifest:
        """Build from parsed manifest JSON, checking it as `read` does."""
        top = _Object(raw, location or "manifest", "")
        version = raw.get("version")
        if version != MANIFEST_VERSION or isinstance(version, bool):
            raise ManifestError(
                f"{top.location}: manifest version {version!r}, this lmforge reads "
                f"{MANIFEST_VERSION}; {_AGAIN}"
            )
        dtype = top.text("token_dtype")
        if dtype not in TOKEN_DTYPES:
            raise ManifestError(
                f"{top.location}: key 'token_dtype' is {dtype!r}, expected one of "
                f"{', '.join(TOKEN_DTYPES)}; {_AGAIN}"
            )
        return cls(
            seq_len=top.integer("seq_len"),
            token_dtype=dtype,
            tokenizer=_tokenizer(top.obj("tokenizer")),
            datasets={name: _dataset(entry) for name, entry in top.obj("datasets").objects()},
            fingerprint=top.text("fingerprint"),
            stats=top.obj("stats").raw,
            task=_task(top.obj("task")) if "task" in top.raw else None,
            version=version,
            location=location,
        )

    @staticmethod
    def path_in(folder: str | Path) -> Path:
        """The manifest path of a dataset folder."""
        return Path(folder) / MANIFEST_FILE

    def write(self, path: str | Path) -> None:
        """Write durably (`durable.write_atomic`); remember `path` as `location`.

        Args:
            path: The manifest.json to write (a local path), or an existing folder.
        """
        if is_url(str(path)):
            raise ValueError(f"{path}: manifests are written locally; copy the folder after")
        path = Path(local_path(str(path)))
        if path.is_dir():
            path = self.path_in(path)
        write_atomic(path, json.dumps(self.to_dict(), indent=2) + "\n")
        self.location = str(path)

    def to_dict(self) -> dict[str, Any]:
        """The JSON layout, key order included."""
        layout: dict[str, Any] = {
            "version": self.version,
            "seq_len": self.seq_len,
            "token_dtype": self.token_dtype,
            "tokenizer": self.tokenizer.to_dict(),
            "datasets": {name: d.to_dict() for name, d in self.datasets.items()},
        }
        if self.task is not None:
            layout["task"] = self.task.to_dict()
        layout["fingerprint"] = self.fingerprint
        layout["stats"] = self.stats
        return layout

    @property
    def folder(self) -> str:
        """The dataset folder: where `location` is (a path, or a URL for remote ones)."""
        if is_url(self.location):
            return self.location.rsplit("/", 1)[0]
        return os.path.dirname(local_path(self.location)) or "."

    @property
    def tokenizer_path(self) -> str:
        """The tokenizer's main file (a path, or a URL for remote datasets)."""
        return f"{self.folder}/{self.tokenizer.file}"

    def check_tokenizer_file(self) -> None:
        """Check that the dataset's tokenizer file is the one the data was encoded with
        (its sha256 against the manifest's); done once per manifest object.

        Raises:
            ManifestError: The file is missing, unreadable or another one (names it and
                says to prepare again).
        """
        if self._tokenizer_checked:
            return
        for name, want in self.tokenizer.file_sha256s().items():
            path = f"{self.folder}/{name}"
            try:
                digest = hashlib.sha256(read_bytes(path)).hexdigest()
            except OSError as err:
                raise ManifestError(f"{path}: cannot read the dataset's tokenizer ({err}); "
                                    f"{_AGAIN}") from err
            if digest != want:
                raise ManifestError(
                    f"{path}: sha256 {digest[:12]}… is not the {want[:12]}… "
                    f"{self.location or 'the manifest'} records: the tokenizer was replaced "
                    f"after the data was encoded; {_AGAIN}")
        self._tokenizer_checked = True

    @functools.cached_property
    def tokenizer_model(self) -> DatasetTokenizer:
        """The tokenizer the data was encoded with, as one handle whose sentencepiece
        processor is opened once (on first use) for everything that reads this manifest."""
        return DatasetTokenizer(self.tokenizer, self.tokenizer_path)


def _manifest_location(path: str | Path) -> str:
    """`path` itself if it names a .json (or an existing file), else `path/manifest.json`."""
    text = str(path)
    if text.endswith(".json") or (not is_url(text) and Path(local_path(text)).is_file()):
        return text
    return text.rstrip("/") + "/" + MANIFEST_FILE


# -- reading, key by key ------------------------------------------------------------------


class _Object:
    """One JSON object of a manifest: typed look-ups whose errors name the file and key."""

    def __init__(self, raw: Any, location: str, key: str) -> None:
        self.raw, self.location, self.key = raw, location, key
        if not isinstance(raw, dict):
            where = f"key '{key}'" if key else "the top level"
            raise ManifestError(f"{location}: {where} should be an object; {_AGAIN}")

    def _key(self, name: str) -> str:
        return f"{self.key}.{name}" if self.key else name

    def get(self, name: str, types: tuple[type, ...], what: str) -> Any:
        if name not in self.raw:
            raise ManifestError(f"{self.location}: key '{self._key(name)}' is missing; {_AGAIN}")
        value = self.raw[name]
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            shown = repr(value) if len(repr(value)) <= 40 else type(value).__name__
            raise ManifestError(
                f"{self.location}: key '{self._key(name)}' should be {what}, got {shown}; "
                f"{_AGAIN}"
            )
        return value

    def integer(self, name: str) -> int:
        return self.get(name, (int,), "an integer")

    def number(self, name: str) -> float:
        return self.get(name, (int, float), "a number")

    def text(self, name: str) -> str:
        return self.get(name, (str,), "a string")

    def checksum(self, name: str) -> str:
        """A sha256 that must be there: an empty one would turn verification off."""
        value = self.text(name)
        if not value.strip():
            raise ManifestError(f"{self.location}: key '{self._key(name)}' is empty; every "
                                f"file needs its sha256: {_AGAIN}")
        return value

    def flag(self, name: str) -> bool:
        return self.get(name, (bool,), "true or false")

    def obj(self, name: str) -> _Object:
        return _Object(self.get(name, (dict,), "an object"), self.location, self._key(name))

    def objects(self) -> list[tuple[str, _Object]]:
        """Every value of this object, each as an object."""
        return [(k, _Object(v, self.location, self._key(k))) for k, v in self.raw.items()]

    def array(self, name: str) -> list[_Object]:
        """A list of objects."""
        items = self.get(name, (list,), "a list")
        key = self._key(name)
        return [_Object(item, self.location, f"{key}[{i}]") for i, item in enumerate(items)]


def _special(entry: _Object) -> SpecialToken:
    return SpecialToken(entry.text("piece"), entry.integer("id"))


def _tokenizer(t: _Object) -> TokenizerInfo:
    special = t.obj("special_tokens")
    # `prepare` always writes `extra`; manifests edited by hand may leave it out.
    extras = special.array("extra") if "extra" in special.raw else []
    return TokenizerInfo(
        file=t.text("file"),
        sha256=t.checksum("sha256"),
        vocab_size=t.integer("vocab_size"),
        type=t.text("type"),
        pad_id=t.integer("pad_id"),
        unk_id=t.integer("unk_id"),
        bos_id=t.integer("bos_id"),
        eos_id=t.integer("eos_id"),
        special_tokens={
            role: _special(special.obj(role)) for role in special.raw if role != "extra"
        },
        extra_special_tokens=[_special(e) for e in extras],
        byte_fallback=t.flag("byte_fallback"),
        kind=_tokenizer_kind(t),
        files={name: f.checksum(name) for name in f.raw} if (f := _files(t)) else {},
    )


def _tokenizer_kind(t: _Object) -> str:
    kind = t.text("kind") if "kind" in t.raw else "sentencepiece"
    if kind not in ("sentencepiece", "hf"):
        raise ManifestError(f"{t.location}: key 'tokenizer.kind' is {kind!r}, expected "
                            f"sentencepiece or hf; {_AGAIN}")
    return kind


def _files(t: _Object) -> _Object | None:
    return t.obj("files") if "files" in t.raw else None


def _dataset(d: _Object) -> DatasetInfo:
    sources = d.get("sources", (list,), "a list")
    for i, source in enumerate(sources):
        if not isinstance(source, str):
            raise ManifestError(
                f"{d.location}: key '{d.key}.sources[{i}]' should be a string; {_AGAIN}"
            )
    return DatasetInfo(
        weight=d.number("weight"),
        sources=list(sources),
        splits={name: _split(s) for name, s in d.obj("splits").objects()},
    )


def _split(s: _Object) -> SplitInfo:
    shards = [
        ShardInfo(e.text("path"), e.integer("samples"), e.integer("tokens"),
                  e.integer("bytes"), e.checksum("sha256"))
        for e in s.array("shards")
    ]
    return SplitInfo(s.integer("samples"), s.integer("tokens"), s.integer("padding_tokens"),
                     shards)


def _task(t: _Object) -> TaskInfo:
    kind = t.text("kind")
    if kind not in TASK_MEMBERS:
        raise ManifestError(
            f"{t.location}: key 'task.kind' is {kind!r}, expected one of "
            f"{', '.join(TASK_MEMBERS)}; {_AGAIN}"
        )
    labels = t.get("labels", (list,), "a list")
    if any(not isinstance(label, str) for label in labels):
        raise ManifestError(f"{t.location}: key 'task.labels' should be strings; {_AGAIN}")
    if kind == "classify" and len(labels) < 2:
        raise ManifestError(
            f"{t.location}: key 'task.labels' lists {len(labels)} classes, classify needs "
            f"at least 2; {_AGAIN}"
        )
    splits = {}
    for name, s in t.obj("splits").objects():
        counts = s.obj("label_counts")
        unknown = sorted(set(counts.raw) - set(labels))
        if unknown:
            raise ManifestError(
                f"{t.location}: key '{counts.key}' counts labels {unknown} that are not in "
                f"task.labels; {_AGAIN}"
            )
        splits[name] = TaskSplitInfo(
            s.integer("examples"), {label: counts.integer(label) for label in counts.raw}
        )
    return TaskInfo(kind=kind, labels=list(labels), splits=splits)
