"""The tokenizer a dataset was encoded with, as one handle: `DatasetTokenizer`.

Two kinds, one interface (`encode`, `decode`, `id_to_piece`, the special ids):

- ``sentencepiece``: a ``.model`` file (trained by `prepare`, or reused), kept in the dataset
  folder as ``tokenizer.model``;
- ``hf``: a Hugging Face ``tokenizer.json``, alone or in a folder with its
  ``tokenizer_config.json`` (see `hf_tokenizer.HFTokenizer`), kept in the dataset folder
  under the same names.

`tokenizer_source` says which kind ``tokenizer.model_path`` names and which files belong to it.
`DatasetManifest.tokenizer_model` gives the handle: its files are read once, on first use,
each checked against the manifest's sha256, and samplers, objectives and the export of a run
share it. `tokenizer_mismatches` compares a tokenizer on disk with the manifest's, file by
file: the dataset check before training and an import of an HF model folder use it.
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lmforge.pipeline.contract.hf_tokenizer import HF_TOKENIZER_FILES, HFTokenizer
from lmforge.pipeline.contract.shard_tar import read_bytes

if TYPE_CHECKING:
    import sentencepiece as spm

    from lmforge.pipeline.contract.dataset_manifest import TokenizerInfo

SENTENCEPIECE, HF = "sentencepiece", "hf"
"""The tokenizer kinds (the manifest's ``tokenizer.kind``)."""
SENTENCEPIECE_FILE = "tokenizer.model"
"""Name of a sentencepiece model inside a dataset folder."""
_AGAIN = "run `lmforge prepare` again"


def file_sha256(path: Path | str) -> str:
    """Hex sha256 of a file, read in blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class TokenizerSource:
    """What ``tokenizer.model_path`` names: the kind and its files, by the name each has in a
    dataset folder (the main file first: ``tokenizer.model`` or ``tokenizer.json``)."""

    kind: str
    files: dict[str, Path]

    def sha256s(self) -> dict[str, str]:
        """Each file's name in a dataset folder → its sha256."""
        return {name: file_sha256(path) for name, path in self.files.items()}

    def digest(self) -> str:
        """One hash of the tokenizer (a sentencepiece model's is its file's sha256)."""
        if self.kind == SENTENCEPIECE:
            return file_sha256(self.files[SENTENCEPIECE_FILE])
        return hashlib.sha256(json.dumps(self.sha256s(), sort_keys=True).encode()).hexdigest()


def tokenizer_source(model_path: str | Path, key: str = "tokenizer.model_path") -> TokenizerSource:
    """The tokenizer `model_path` names: a folder holding ``tokenizer.json`` (an HF model or
    tokenizer folder; its ``tokenizer_config.json`` and ``special_tokens_map.json`` too), a
    ``*.json`` file (a bare ``tokenizer.json``), or any other file (a sentencepiece model).

    Raises:
        ValueError: Nothing there, or a folder without ``tokenizer.json`` (names `key`).
    """
    path = Path(model_path)
    forms = ("name a sentencepiece .model, a tokenizer.json, or a folder holding "
             "tokenizer.json (and tokenizer_config.json)")
    if path.is_dir():
        if not (path / HF_TOKENIZER_FILES[0]).is_file():
            raise ValueError(f"{key}: {path} is a folder without tokenizer.json; {forms}")
        return TokenizerSource(HF, {name: path / name for name in HF_TOKENIZER_FILES
                                    if (path / name).is_file()})
    if not path.is_file():
        raise ValueError(f"{key}: {path} does not exist; {forms}")
    if path.suffix == ".json":
        return TokenizerSource(HF, {HF_TOKENIZER_FILES[0]: path})
    return TokenizerSource(SENTENCEPIECE, {SENTENCEPIECE_FILE: path})


def open_hf_tokenizer(files: dict[str, bytes], where: str) -> HFTokenizer:
    """An `HFTokenizer` from the bytes of its files (by name; ``tokenizer.json`` required).

    Raises:
        ValueError: A file is not what its name says (names `where`).
    """
    def parsed(name: str) -> dict[str, Any]:
        if name not in files:
            return {}
        try:
            value = json.loads(files[name])
        except ValueError as err:
            raise ValueError(f"{where}: {name} is not valid JSON ({err})") from err
        return value if isinstance(value, dict) else {}

    return HFTokenizer(files[HF_TOKENIZER_FILES[0]].decode("utf-8"), parsed(HF_TOKENIZER_FILES[1]),
                       parsed(HF_TOKENIZER_FILES[2]), where)


class SentencePieceTokenizer:
    """A sentencepiece processor behind the interface `HFTokenizer` has."""

    kind = SENTENCEPIECE

    def __init__(self, processor: spm.SentencePieceProcessor) -> None:
        self.processor = processor
        self.vocab_size = processor.vocab_size()
        self.bos_id, self.eos_id = processor.bos_id(), processor.eos_id()
        self.pad_id, self.unk_id = processor.pad_id(), processor.unk_id()
        self.adds_eos = False

    def encode(self, text: str, special_tokens: bool = True) -> list[int]:
        """The text's ids (sentencepiece adds no special tokens)."""
        return self.processor.encode(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """`encode` of each text."""
        return self.processor.encode(texts)

    def decode(self, ids: list[int]) -> str:
        """The text of `ids` (control pieces left out)."""
        return self.processor.decode(ids)

    def id_to_piece(self, token_id: int) -> str:
        """The piece of an id."""
        return self.processor.id_to_piece(token_id)


def open_sentencepiece(data: bytes, where: str) -> SentencePieceTokenizer:
    """A `SentencePieceTokenizer` from a model's bytes.

    Raises:
        ValueError: Not a sentencepiece model (names `where`).
    """
    import sentencepiece as spm

    processor = spm.SentencePieceProcessor()
    try:
        processor.LoadFromSerializedProto(data)
    except RuntimeError as err:
        raise ValueError(f"{where}: not a sentencepiece model ({err}); {_AGAIN}") from err
    return SentencePieceTokenizer(processor)


def open_tokenizer(source: TokenizerSource) -> SentencePieceTokenizer | HFTokenizer:
    """The tokenizer of a `TokenizerSource` (what `prepare` encodes with)."""
    where = str(next(iter(source.files.values())))
    if source.kind == SENTENCEPIECE:
        return open_sentencepiece(source.files[SENTENCEPIECE_FILE].read_bytes(), where)
    return open_hf_tokenizer({n: p.read_bytes() for n, p in source.files.items()},
                             str(source.files[HF_TOKENIZER_FILES[0]].parent))


def tokenizer_mismatches(model_path: str | Path, info: TokenizerInfo,
                         key: str = "tokenizer.model_path") -> list[str]:
    """How the tokenizer at `model_path` differs from a manifest's: its kind, and each file
    (by name) missing or with another sha256. Empty when it is the same tokenizer.

    Args:
        model_path: A sentencepiece model, a tokenizer.json, or an HF folder.
        info: The manifest's tokenizer section.
        key: The config key named in the messages.
    """
    try:
        source = tokenizer_source(model_path, key)
    except ValueError as err:
        return [str(err)]
    if source.kind != info.kind:
        return [f"{key}: {model_path} is a {source.kind} tokenizer, the data was encoded "
                f"with a {info.kind} one"]
    want, have = info.file_sha256s(), source.sha256s()
    problems = []
    for name, digest in want.items():
        if name not in have:
            problems.append(f"{key}: {model_path} has no {name}")
        elif have[name] != digest:
            problems.append(f"{key}: {name} of {model_path} (sha256 {have[name][:12]}…) is not "
                            f"the one the data was encoded with (sha256 {digest[:12]}…)")
    problems += [f"{key}: {model_path} has {name}, which the data was encoded without"
                 for name in have if name not in want]
    return problems


class DatasetTokenizer:
    """A dataset's tokenizer: its manifest entry, its files, and the opened tokenizer.

    Args:
        info: The manifest's ``tokenizer`` section (kind, files and sha256s, special ids).
        path: The main file (a path, or a URL for a remote dataset); the others are beside it.
    """

    def __init__(self, info: TokenizerInfo, path: str) -> None:
        self.info = info
        self.path = path

    @property
    def kind(self) -> str:
        """``sentencepiece`` or ``hf``."""
        return self.info.kind

    @property
    def folder(self) -> str:
        """Where the files are (the dataset folder)."""
        return self.path.rsplit("/", 1)[0] if "/" in self.path else "."

    def file_paths(self) -> dict[str, str]:
        """Each tokenizer file's name → its path (or URL)."""
        return {name: self.path if name == self.info.file else f"{self.folder}/{name}"
                for name in self.info.file_sha256s()}

    def read_files(self) -> dict[str, bytes]:
        """Each file's bytes, checked against the manifest's sha256.

        Raises:
            ValueError: A file is missing, unreadable or not the one the manifest records.
        """
        contents = {}
        paths = self.file_paths()
        for name, want in self.info.file_sha256s().items():
            path = paths[name]
            try:
                data = read_bytes(path)
            except OSError as err:
                raise ValueError(f"{path}: cannot read the dataset's tokenizer ({err}); "
                                 f"{_AGAIN}") from err
            digest = hashlib.sha256(data).hexdigest()
            if digest != want:
                raise ValueError(
                    f"{path}: sha256 {digest[:12]}… is not the {want[:12]}… the manifest "
                    "records: the tokenizer was replaced after the data was encoded; prepare "
                    "the dataset again")
            contents[name] = data
        return contents

    @functools.cached_property
    def tokenizer(self) -> SentencePieceTokenizer | HFTokenizer:
        """The opened tokenizer, on first use and then shared.

        Raises:
            ValueError: A file is missing, unreadable, not the one the manifest records
                (sha256), or not a tokenizer of its kind; the message names it.
        """
        files = self.read_files()
        if self.kind == SENTENCEPIECE:
            return open_sentencepiece(files[self.info.file], self.path)
        return open_hf_tokenizer(files, self.folder)

    @property
    def processor(self) -> spm.SentencePieceProcessor:
        """The sentencepiece processor (a sentencepiece dataset only; others use `encode`)."""
        if self.kind != SENTENCEPIECE:
            raise ValueError(f"{self.path}: the dataset's tokenizer is {self.kind}, not "
                             "sentencepiece")
        return self.tokenizer.processor

    def encode(self, text: str, special_tokens: bool = True) -> list[int]:
        """A text's ids as its documents were encoded, without the eos ending them (HF: as
        `AutoTokenizer.encode`; ``special_tokens=False``: the text's ids alone)."""
        return self.tokenizer.encode(text, special_tokens)

    def decode(self, ids: list[int]) -> str:
        """The text of `ids`, special tokens left out."""
        return self.tokenizer.decode(ids)

    def id_to_piece(self, token_id: int) -> str:
        """The token string of an id."""
        return self.tokenizer.id_to_piece(token_id)
