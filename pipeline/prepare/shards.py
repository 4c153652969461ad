"""Packing token streams into fixed windows and writing them as reproducible WebDataset tars.

A split's documents (each ending in EOS, if the tokenizer has one) form one stream that is
cut into consecutive windows of `seq_len + 1` tokens; the last window is padded with the
padding id (`shard_format.padding_id`). A shard holds a range of windows, in the byte
format of `shard_format.py` (fixed member metadata, sorted member names), so rewriting a
shard gives the same bytes.
"""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
from pathlib import Path

import numpy as np

from lmforge.pipeline.contract.dataset_manifest import ShardInfo
from lmforge.pipeline.contract.shard_format import (
    BLOCK,
    DOC_STARTS_MEMBER,
    MEMBER_MODE,
    MEMBER_MTIME,
    RECORD,
    TOKENS_MEMBER,
)
from lmforge.pipeline.durable import fsync_dir


def pack_windows(
    tokens: np.ndarray, doc_starts: np.ndarray, first_position: int, window: int, pad_id: int
) -> tuple[np.ndarray, list[np.ndarray]]:
    """Cut a token stretch into windows and find where documents start in each.

    Args:
        tokens: Tokens from stream position `first_position` on (the last window may be
            short; it is padded).
        doc_starts: Stream positions where documents start (ascending, any range).
        first_position: Stream position of `tokens[0]`; a multiple of `window`.
        window: seq_len + 1.
        pad_id: Fills the tail of the last window.

    Returns:
        (samples, starts): samples is (n_windows, window); starts[i] holds the offsets
        within window i where a document starts, always beginning with 0 (int32).
    """
    n_windows = -(-len(tokens) // window)
    samples = np.full((n_windows, window), pad_id, dtype=tokens.dtype)
    samples.reshape(-1)[: len(tokens)] = tokens
    lo = np.searchsorted(doc_starts, first_position)
    hi = np.searchsorted(doc_starts, first_position + len(tokens))
    rel = doc_starts[lo:hi] - first_position  # starts inside this stretch
    which = rel // window
    bounds = np.searchsorted(which, np.arange(n_windows + 1))
    starts = []
    for i in range(n_windows):
        offsets = (rel[bounds[i] : bounds[i + 1]] - i * window).astype(np.int32)
        if len(offsets) == 0 or offsets[0] != 0:
            offsets = np.concatenate([np.zeros(1, np.int32), offsets])
        starts.append(offsets)
    return samples, starts


_NPY_HEADERS: dict[tuple[str, int], bytes] = {}


def npy_bytes(array: np.ndarray) -> bytes:
    """`.npy` file bytes of a 1-D (or 0-d) array (headers cached per dtype and shape)."""
    key = (array.dtype.str, array.shape)
    header = _NPY_HEADERS.get(key)
    if header is None:
        buf = io.BytesIO()
        np.lib.format.write_array(buf, np.zeros(array.shape, array.dtype), allow_pickle=False)
        header = buf.getvalue()[: -array.nbytes or None]
        if len(_NPY_HEADERS) < 4096:
            _NPY_HEADERS[key] = header
    return header + np.ascontiguousarray(array).tobytes()


def _tarinfo_header(name: str, size: int) -> bytes:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, MEMBER_MTIME, MEMBER_MODE
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info.tobuf(tarfile.GNU_FORMAT, "utf-8", "strict")


# Per member size: (header of an empty name, checksum of that header). A member header of
# a short ASCII name differs from it only in the name field and the checksum, so patching
# those is ~15x faster than building a TarInfo per member (two members per sample).
_HEADER_TEMPLATES: dict[int, tuple[bytes, int]] = {}
_NAME_FIELD, _CHKSUM_AT = 100, 148


def member_header(name: str, size: int) -> bytes:
    """The GNU tar header block(s) of a member: byte for byte what `tarfile` writes."""
    raw = name.encode("utf-8")
    if len(raw) >= _NAME_FIELD or not name.isascii():
        return _tarinfo_header(name, size)  # long names take a GNU longname block
    cached = _HEADER_TEMPLATES.get(size)
    if cached is None:
        template = _tarinfo_header("", size)
        blank = template[:_CHKSUM_AT] + b" " * 8 + template[_CHKSUM_AT + 8 :]
        cached = (template, sum(blank))
        if len(_HEADER_TEMPLATES) < 4096:
            _HEADER_TEMPLATES[size] = cached
    template, base = cached
    checksum = b"%06o\0 " % (base + sum(raw))
    return (raw.ljust(_NAME_FIELD, b"\0") + template[_NAME_FIELD:_CHKSUM_AT] + checksum
            + template[_CHKSUM_AT + 8 :])


def _member(name: str, data: bytes) -> bytes:
    return member_header(name, len(data)) + data + b"\0" * (-len(data) % BLOCK)


class ShardWriter:
    """Writes one shard in pieces (memory stays one block of samples, whatever the shard
    size), atomically (temp file, then rename), hashing it on the way.

    Args:
        path: Final shard path.
        relative_to: Folder the manifest path is relative to.
    """

    def __init__(self, path: Path, relative_to: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path, self.relative_to = path, relative_to
        self.tmp = path.with_name(path.name + f".tmp{os.getpid()}")
        self.file = open(self.tmp, "wb")  # noqa: SIM115 - closed in close()
        self.digest = hashlib.sha256()
        self.size = self.samples = self.tokens = 0

    def write(
        self, keys: list[str], samples: np.ndarray, starts: list[np.ndarray], real_tokens: int
    ) -> None:
        """Append samples: `__key__`s, (n, seq_len + 1) windows, document-start offsets, and
        how many of their tokens are not padding."""
        for key, tokens, offsets in zip(keys, samples, starts, strict=True):
            # Member names sort as doc_starts < tokens, within a sample.
            self._put(_member(f"{key}.{DOC_STARTS_MEMBER}", npy_bytes(offsets))
                      + _member(f"{key}.{TOKENS_MEMBER}", npy_bytes(tokens)))
        self.samples += len(keys)
        self.tokens += real_tokens

    def write_sample(self, key: str, members: dict[str, np.ndarray], real_tokens: int) -> None:
        """Append one sample with any members (suffix → array; 1-D or a 0-d scalar), written
        in name order as the contract wants (task samples, see `shard_format.py`)."""
        self._put(b"".join(_member(f"{key}.{suffix}", npy_bytes(members[suffix]))
                           for suffix in sorted(members)))
        self.samples += 1
        self.tokens += real_tokens

    def _put(self, data: bytes) -> None:
        self.file.write(data)
        self.digest.update(data)
        self.size += len(data)

    def close(self, commit: bool = True) -> ShardInfo:
        """Finish the archive and return its manifest entry; `commit` moves it into place
        (else call `commit()` later, e.g. after recording the result)."""
        end = b"\0" * (2 * BLOCK)
        self._put(end + b"\0" * (-(self.size + len(end)) % RECORD))
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        if commit:
            self.commit()
        return ShardInfo(str(self.path.relative_to(self.relative_to)), self.samples,
                         self.tokens, self.size, self.digest.hexdigest())

    def commit(self) -> None:
        """Move the finished (fsynced) temp file to the shard path, durably."""
        os.replace(self.tmp, self.path)
        fsync_dir(self.path.parent)

    def discard(self) -> None:
        """Close and delete the temp file (after a failed write: a full disk stays full
        otherwise)."""
        try:
            self.file.close()  # flushing what is buffered can fail again on a full disk
        except OSError:
            pass
        self.tmp.unlink(missing_ok=True)


def write_shard(
    path: Path,
    keys: list[str],
    samples: np.ndarray,
    starts: list[np.ndarray],
    real_tokens: int,
    relative_to: Path,
) -> ShardInfo:
    """Write one shard from in-memory samples (see `ShardWriter` for the arguments)."""
    writer = ShardWriter(path, relative_to)
    writer.write(keys, samples, starts, real_tokens)
    return writer.close()
