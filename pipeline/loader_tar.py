"""Random access to the samples of one WebDataset shard (an uncompressed tar).

The loader's global order visits samples of a shuffle window in permuted order, so it
needs random access rather than WebDataset's sequential stream. A local shard is
memory-mapped and indexed by walking its tar headers (no payload is read), so seeking
costs one header walk per shard; a shard behind an fsspec URL is streamed once into
memory and indexed the same way. Every check that can fail happens when the shard is
opened, so a shard is either wholly readable or wholly bad, identically on every rank.
"""

from __future__ import annotations

import ast
import hashlib
import mmap
import os
from collections import OrderedDict
from typing import Any

import numpy as np

TOKENS = "tokens.npy"
DOC_STARTS = "doc_starts.npy"
_BLOCK = 512
_NPY_MAGIC = b"\x93NUMPY"


class ShardError(RuntimeError):
    """A shard is missing, truncated or does not follow the shard contract."""


def is_url(path: str) -> bool:
    """Whether ``path`` names an fsspec URL (``s3://…``) rather than a local file."""
    return "://" in path and not path.startswith("file://")


def local_path(path: str) -> str:
    """Strips a ``file://`` prefix."""
    return path[len("file://") :] if path.startswith("file://") else path


def read_bytes(path: str) -> bytes:
    """Reads a whole small file (the manifest) from disk or an fsspec URL."""
    if is_url(path):
        import fsspec

        with fsspec.open(path, "rb") as f:
            return f.read()
    with open(local_path(path), "rb") as f:
        return f.read()


class ShardReader:
    """Byte offsets of every sample's ``tokens.npy`` and ``doc_starts.npy`` in one shard.

    Args:
        url: Local path or fsspec URL of the tar.
        samples: Sample count the manifest promises.
        seq_len: Tokens per sample minus one (the manifest's ``seq_len``).
        token_dtype: ``uint16`` or ``uint32``.
        sha256: The manifest's checksum, checked only when ``verify`` is set.
        verify: Hash the whole shard on open (reads every byte).

    Raises:
        ShardError: The shard cannot be read or breaks the contract; the message names it.
    """

    def __init__(
        self,
        url: str,
        samples: int,
        seq_len: int,
        token_dtype: str,
        sha256: str | None = None,
        verify: bool = False,
    ) -> None:
        self.url = url
        self.seq_len = seq_len
        self.token_dtype = np.dtype(token_dtype)
        try:
            self.buf = _load(url)
        except (OSError, ValueError) as err:
            raise ShardError(f"shard {url}: cannot open: {err}") from err
        if verify and sha256 and hashlib.sha256(self.buf).hexdigest() != sha256:
            raise ShardError(f"shard {url}: sha256 does not match the manifest")
        self.keys: list[str] = []
        self.token_offsets: list[int] = []
        self.doc_starts: list[np.ndarray] = []
        self._index()
        if len(self.keys) != samples:
            raise ShardError(
                f"shard {url}: holds {len(self.keys)} complete samples, the manifest says "
                f"{samples}"
            )

    def tokens(self, index: int) -> np.ndarray:
        """The ``seq_len + 1`` token ids of sample ``index`` (a read-only view)."""
        return np.frombuffer(
            self.buf, self.token_dtype, self.seq_len + 1, self.token_offsets[index]
        )

    def _index(self) -> None:
        members: dict[str, dict[str, tuple[int, int]]] = OrderedDict()
        for name, offset, size in _walk_tar(self.buf, self.url):
            for field in (TOKENS, DOC_STARTS):
                if name.endswith("." + field):
                    key = name[: -len(field) - 1].rsplit("/", 1)[-1]
                    members.setdefault(key, {})[field] = (offset, size)
        tokens_bytes = (self.seq_len + 1) * self.token_dtype.itemsize
        for key, fields in members.items():
            if TOKENS not in fields or DOC_STARTS not in fields:
                missing = TOKENS if TOKENS not in fields else DOC_STARTS
                raise ShardError(f"shard {self.url}: sample {key} has no {missing}")
            offset, size = fields[TOKENS]
            dtype, shape, start = _npy_header(self.buf, offset, size, self.url, key)
            if dtype != self.token_dtype or shape != (self.seq_len + 1,):
                raise ShardError(
                    f"shard {self.url}: sample {key} tokens are {dtype}{list(shape)}, "
                    f"expected {self.token_dtype}[{self.seq_len + 1}] (manifest seq_len + 1)"
                )
            if size - (start - offset) != tokens_bytes:
                raise ShardError(f"shard {self.url}: sample {key} tokens.npy is truncated")
            self.keys.append(key)
            self.token_offsets.append(start)
            self.doc_starts.append(self._read_doc_starts(key, *fields[DOC_STARTS]))

    def _read_doc_starts(self, key: str, offset: int, size: int) -> np.ndarray:
        dtype, shape, start = _npy_header(self.buf, offset, size, self.url, key)
        count = shape[0] if len(shape) == 1 else -1
        if dtype.kind not in "iu" or count < 1 or size - (start - offset) != count * dtype.itemsize:
            raise ShardError(f"shard {self.url}: sample {key} doc_starts.npy is malformed")
        starts = np.frombuffer(self.buf, dtype, count, start).astype(np.int64)
        if starts[0] != 0 or starts[-1] > self.seq_len or np.any(np.diff(starts) <= 0):
            raise ShardError(
                f"shard {self.url}: sample {key} doc_starts must ascend from 0 within "
                f"seq_len + 1 = {self.seq_len + 1}, got {starts.tolist()[:8]}"
            )
        return starts


def _load(url: str) -> Any:
    if is_url(url):
        import fsspec

        # One sequential read per shard: object stores serve that far faster than many
        # small ranged reads, and only the shards of the current window are held.
        with fsspec.open(url, "rb", block_size=8 << 20) as f:
            return f.read()
    fd = os.open(local_path(url), os.O_RDONLY)
    try:
        return mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
    finally:
        os.close(fd)


def _walk_tar(buf: Any, url: str):
    """Yields ``(name, data_offset, size)`` for every regular file in an uncompressed tar."""
    end = len(buf)
    pos = 0
    long_name: str | None = None
    pax: dict[str, str] = {}
    while pos + _BLOCK <= end:
        header = bytes(buf[pos : pos + _BLOCK])
        if header[0] == 0:  # the two zero blocks that end a tar
            return
        try:
            size = _tar_number(header[124:136])
            name = header[:100].split(b"\0", 1)[0].decode()
            ustar = header[257:262] == b"ustar"
            prefix = header[345:500].split(b"\0", 1)[0].decode() if ustar else ""
        except (ValueError, UnicodeDecodeError) as err:
            raise ShardError(f"shard {url}: corrupt tar header at byte {pos}") from err
        kind = header[156:157]
        size = int(pax.get("size", size))
        data = pos + _BLOCK
        if data + size > end:
            raise ShardError(
                f"shard {url}: truncated (a member needs byte {data + size}, the file has {end})"
            )
        pos = data + (size + _BLOCK - 1) // _BLOCK * _BLOCK
        if kind == b"L":  # GNU long name for the next member
            long_name = bytes(buf[data : data + size]).split(b"\0", 1)[0].decode()
        elif kind == b"x":  # pax extended header for the next member
            pax = _pax_records(bytes(buf[data : data + size]))
        elif kind in (b"0", b"\0"):
            full = long_name or pax.get("path") or (f"{prefix}/{name}" if prefix else name)
            yield full, data, size
            long_name, pax = None, {}
        elif kind != b"g":
            long_name, pax = None, {}
    if pos != end:
        raise ShardError(f"shard {url}: truncated (ends inside a tar header)")


def _tar_number(field: bytes) -> int:
    if field[0] & 0x80:  # GNU base-256 for sizes of 8 GiB and more
        return int.from_bytes(field[1:], "big")
    text = field.split(b"\0", 1)[0].strip()
    return int(text, 8) if text else 0


def _pax_records(data: bytes) -> dict[str, str]:
    records = {}
    while data:
        length, _, rest = data.partition(b" ")
        n = int(length)
        key, _, value = rest[: n - len(length) - 2].partition(b"=")
        records[key.decode()] = value.decode()
        data = data[n:]
    return records


_HEADER_CACHE: dict[bytes, tuple[np.dtype, tuple[int, ...]]] = {}


def _npy_header(buf: Any, offset: int, size: int, url: str, key: str):
    """Parses a ``.npy`` header; returns ``(dtype, shape, payload_offset)``."""
    head = bytes(buf[offset : offset + min(size, 16)])
    if size < 10 or head[:6] != _NPY_MAGIC:
        raise ShardError(f"shard {url}: sample {key} holds a member that is not .npy")
    if head[6] == 1:
        length, start = int.from_bytes(head[8:10], "little"), offset + 10
    else:
        length, start = int.from_bytes(head[8:12], "little"), offset + 12
    text = bytes(buf[start : start + length])
    parsed = _HEADER_CACHE.get(text)
    if parsed is None:
        try:
            meta = ast.literal_eval(text.decode("latin1"))
            parsed = (np.dtype(meta["descr"]), tuple(meta["shape"]))
            if meta.get("fortran_order"):
                raise ValueError("fortran order")
        except (ValueError, SyntaxError, KeyError, TypeError) as err:
            raise ShardError(f"shard {url}: sample {key} has a corrupt .npy header") from err
        if len(_HEADER_CACHE) < 4096:
            _HEADER_CACHE[text] = parsed
    return parsed[0], parsed[1], start + length


class ReaderCache:
    """Open shards of one process, least recently used evicted; bad shards remembered.

    Args:
        capacity: Shards kept open (mmaps are cheap; streamed shards cost their size).
        verify: Check each shard's sha256 when it is opened.
    """

    def __init__(self, capacity: int, verify: bool = False) -> None:
        self.capacity = capacity
        self.verify = verify
        self._open: OrderedDict[str, ShardReader] = OrderedDict()
        self.bad: dict[str, str] = {}

    def get(self, shard: Any, seq_len: int, token_dtype: str) -> ShardReader | None:
        """The reader of ``shard`` (a manifest entry), or None when it is bad."""
        reader = self._open.get(shard.url)
        if reader is not None:
            self._open.move_to_end(shard.url)
            return reader
        if shard.url in self.bad:
            return None
        try:
            reader = ShardReader(
                shard.url, shard.samples, seq_len, token_dtype, shard.sha256, self.verify
            )
        except ShardError as err:
            self.bad[shard.url] = str(err)
            return None
        self._open[shard.url] = reader
        if len(self._open) > self.capacity:
            self._open.popitem(last=False)
        return reader
