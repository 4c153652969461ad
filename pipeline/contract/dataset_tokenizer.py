"""The tokenizer a dataset was encoded with, as one handle: `DatasetTokenizer`.

`DatasetManifest.tokenizer_model` gives it. The sentencepiece file is read once, on first
use, checked against the manifest's sha256, and the processor is kept: samplers, objectives
and the export check of a run share it instead of each opening the file again. The file's
hash (`file_sha256`) is part of the contract: prepare records it, training checks it.
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path
from typing import TYPE_CHECKING

from lmforge.pipeline.contract.shard_tar import read_bytes

if TYPE_CHECKING:
    import sentencepiece as spm

    from lmforge.pipeline.contract.dataset_manifest import TokenizerInfo


def file_sha256(path: Path | str) -> str:
    """Hex sha256 of a file, read in blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class DatasetTokenizer:
    """A dataset's sentencepiece model: its manifest entry, its file, and the processor.

    Args:
        info: The manifest's ``tokenizer`` section (special ids, vocabulary, sha256).
        path: The model file (a path, or a URL for a remote dataset).
    """

    def __init__(self, info: TokenizerInfo, path: str) -> None:
        self.info = info
        self.path = path

    @functools.cached_property
    def processor(self) -> spm.SentencePieceProcessor:
        """The sentencepiece processor, opened on first use and then shared.

        Raises:
            ValueError: The file is missing, unreadable, not the one the manifest records
                (sha256), or not a sentencepiece model; the message names it.
        """
        import sentencepiece as spm

        try:
            data = read_bytes(self.path)
        except OSError as err:
            raise ValueError(f"{self.path}: cannot read the dataset's tokenizer ({err}); "
                             "run `lmforge prepare` again") from err
        digest = hashlib.sha256(data).hexdigest()
        if digest != self.info.sha256:
            raise ValueError(
                f"{self.path}: sha256 {digest[:12]}… is not the {self.info.sha256[:12]}… the "
                "manifest records: the tokenizer was replaced after the data was encoded; "
                "prepare the dataset again")
        processor = spm.SentencePieceProcessor()
        try:
            processor.LoadFromSerializedProto(data)
        except RuntimeError as err:
            raise ValueError(f"{self.path}: not a sentencepiece model ({err}); run "
                             "`lmforge prepare` again") from err
        return processor
