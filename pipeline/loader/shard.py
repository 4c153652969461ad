"""Random access to the samples of one WebDataset shard (an uncompressed tar).

The loader's global order visits the samples of a shuffle window in permuted order, so
it needs random access rather than WebDataset's sequential stream. A local shard is
memory-mapped; a shard behind an fsspec URL is streamed once into memory.

Locating sample ``k`` costs O(1) when the shard is *regular*: every sample takes the
same bytes (true of packed samples unless one has unusually many documents), which the
file size confirms at open. Sample ``k`` then starts at ``k × stride`` and its key, which
the contract numbers ``…-{k:08d}``, is checked there. Otherwise, or where that check
fails, one walk over all tar headers indexes the shard. Resuming on a cold page cache
thus reads only the pages of the samples it needs.

Verdicts depend only on the bytes, so every rank and worker reaches the same one: a
shard that cannot be opened or indexed (missing, truncated, wrong sample count) is bad
as a whole; a sample whose members cannot be found or parsed is bad alone.

Task shards (see ``shard_format.py``) carry one more member per sample; a reader made
with ``extras`` finds and checks those too (``read``).
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from typing import Any

import numpy as np

from lmforge.pipeline.contract.shard_format import (
    BLOCK,
    DOC_STARTS_MEMBER,
    LABEL_MEMBER,
    LOSS_MASK_MEMBER,
    RECORD,
    TARGET_MEMBER,
    TOKENS_MEMBER,
)
from lmforge.pipeline.contract.shard_tar import ShardError, npy_header, open_shard, walk_tar

TOKENS = f".{TOKENS_MEMBER}".encode()
DOC_STARTS = f".{DOC_STARTS_MEMBER}".encode()
_TOKENS_TAIL = TOKENS[1:] + b"\0"  # the name field after "<key>."
_DOC_TAIL = DOC_STARTS[1:] + b"\0"
_DOC_HEADS: dict[bytes, tuple[np.dtype, int, int]] = {}  # .npy header → dtype, count, length


class ShardReader:
    """Reads samples of one shard by index.

    Args:
        url: Local path or fsspec URL of the tar.
        samples: Sample count the manifest promises.
        seq_len: Tokens per sample minus one (the manifest's ``seq_len``).
        token_dtype: ``uint16`` or ``uint32``.
        sha256: The manifest's checksum, checked only when ``verify`` is set.
        verify: Hash the whole shard on open (reads every byte).
        extras: Task members every sample must also have (``shard_format.TASK_MEMBERS``).

    Raises:
        ShardError: The shard cannot be opened or indexed; the message names it.
    """

    def __init__(
        self,
        url: str,
        samples: int,
        seq_len: int,
        token_dtype: str,
        sha256: str | None = None,
        verify: bool = False,
        extras: tuple[str, ...] = (),
    ) -> None:
        self.extras = tuple(extras)
        self._extra_suffixes = tuple(f".{m}".encode() for m in extras)
        self._extra_tails = tuple(m.encode() + b"\0" for m in extras)
        self._suffixes = (TOKENS, DOC_STARTS, *self._extra_suffixes)
        self._width = 4 + 2 * len(extras)  # walk index entries per sample
        self.url = url
        self.samples = samples
        self.seq_len = seq_len
        self.token_dtype = np.dtype(token_dtype)
        try:
            self.buf = open_shard(url)
        except (OSError, ValueError) as err:
            raise ShardError(f"shard {url}: cannot open: {err}") from err
        if verify and not sha256:  # no checksum must not mean "do not check"
            raise ShardError(f"shard {url}: the manifest records no sha256 for it; "
                             "run `lmforge prepare` again")
        if verify and hashlib.sha256(self.buf).hexdigest() != sha256:
            raise ShardError(f"shard {url}: sha256 does not match the manifest")
        self._token_head, self._token_size = b"", 0
        # Walk index, flat per sample: tokens offset and size, doc_starts offset and size,
        # key. Built only for irregular shards or when a sample is not where expected.
        self._walked: array | None = None
        self._keys: list[bytes] = []
        self._walk_error = ""
        self._prefix, self._stride = self._regular_layout()
        if not self._stride:
            self._walk(tolerant=False)
            if len(self._keys) != samples:
                raise ShardError(
                    f"shard {url}: holds {len(self._keys)} complete samples, the manifest "
                    f"says {samples}"
                )

    def key(self, index: int) -> str:
        """The ``__key__`` of sample ``index``."""
        if self._walked is not None and index < len(self._keys):
            raw = self._keys[index]
        else:
            raw = self._prefix + b"%08d" % index
        return raw.decode().rsplit("/", 1)[-1]

    def sample(self, index: int) -> tuple[np.ndarray, list[int]]:
        """Tokens (a read-only view of ``seq_len + 1`` ids) and the document starts.

        Raises:
            ShardError: The sample cannot be found or its ``.npy`` members are malformed.
        """
        tokens, starts, _ = self.read(index)
        return tokens, starts

    def read(self, index: int) -> tuple[np.ndarray, list[int], dict[str, np.ndarray]]:
        """``sample`` plus the ``extras`` members, by member name (read-only views).

        Raises:
            ShardError: The sample cannot be found or its ``.npy`` members are malformed.
        """
        tok, tok_size, doc, doc_size, *extra = self._locate(index)
        # Every tokens.npy of a shard carries the same header: compare bytes, parse once.
        head = self._token_head
        if head and tok_size == self._token_size and self.buf[tok : tok + len(head)] == head:
            start = tok + len(head)
        else:
            start = self._check_tokens(index, tok, tok_size)
        tokens = np.frombuffer(self.buf, self.token_dtype, self.seq_len + 1, start)
        members = {
            name: self._extra(index, name, extra[2 * j], extra[2 * j + 1])
            for j, name in enumerate(self.extras)
        }
        return tokens, self._doc_starts(index, doc, doc_size), members

    # -- finding a sample's members --------------------------------------------------

    def _regular_layout(self) -> tuple[bytes, int]:
        """``(key prefix, stride)`` when sample ``k`` starts at ``k × stride``, else 0."""
        firsts: list[tuple[bytes, int]] = []  # (key, header offset) of the first members
        try:
            for name, _, _, header in walk_tar(self.buf, self.url):
                key = self._key_of(name)
                if key is not None and (not firsts or key != firsts[-1][0]):
                    firsts.append((key, header))
                    if len(firsts) == 2:
                        break
        except ShardError:
            return b"", 0
        if not firsts or firsts[0][1] != 0 or not firsts[0][0].endswith(b"0" * 8):
            return b"", 0
        if len(firsts) == 1:  # one sample sits at 0 whatever the stride
            return (firsts[0][0][:-8], BLOCK) if self.samples == 1 else (b"", 0)
        stride = firsts[1][1]
        expected = -(-(self.samples * stride + 2 * BLOCK) // RECORD) * RECORD
        if len(self.buf) != expected:
            return b"", 0
        return firsts[0][0][:-8], stride

    def _key_of(self, name: bytes) -> bytes | None:
        for suffix in self._suffixes:
            if name.endswith(suffix):
                return name[: -len(suffix)]
        return None

    def _locate(self, index: int) -> tuple[int, ...]:
        if not 0 <= index < self.samples:
            raise ShardError(f"shard {self.url}: no sample {index}")
        if self._stride:
            found = self._members_at(index)
            if found is not None:
                return found
        if self._walked is None:
            self._walk(tolerant=True)
        if index < len(self._keys):
            at = self._width * index
            return tuple(self._walked[at : at + self._width])
        reason = self._walk_error or "the shard ends before it"
        raise ShardError(f"shard {self.url}: sample {index} cannot be found: {reason}")

    def _members_at(self, index: int) -> tuple[int, ...] | None:
        """Members of sample ``index`` at its regular place, if its key is there."""
        buf, end = self.buf, len(self.buf)
        key = self._prefix + b"%08d." % index
        n = len(key)
        pos = index * self._stride
        tokens = starts = None
        extras: list[tuple[int, int] | None] = [None] * len(self.extras)
        # Inlined header parsing: this runs for every sample read.
        while pos + BLOCK <= end and buf[pos : pos + n] == key and buf[pos + 156] in (48, 0):
            try:
                size = int(buf[pos + 124 : pos + 136].split(b"\0", 1)[0], 8)
            except ValueError:
                return None
            data = pos + BLOCK
            if data + size > end:
                return None
            if buf[pos + n : pos + n + len(_TOKENS_TAIL)] == _TOKENS_TAIL:
                tokens = (data, size)
            elif buf[pos + n : pos + n + len(_DOC_TAIL)] == _DOC_TAIL:
                starts = (data, size)
            else:
                for j, tail in enumerate(self._extra_tails):
                    if buf[pos + n : pos + n + len(tail)] == tail:
                        extras[j] = (data, size)
            pos = data + (size + BLOCK - 1) // BLOCK * BLOCK
        if tokens is None or starts is None or None in extras:
            return None
        return (*tokens, *starts, *(x for member in extras for x in member))

    def _walk(self, tolerant: bool) -> None:
        """Indexes every sample by walking all tar headers (consecutive members by key)."""
        self._walked = array("q")
        self._keys = []
        current, fields = None, {}
        try:
            for name, data, size, _ in walk_tar(self.buf, self.url):
                key = self._key_of(name)
                if key is None:
                    continue  # members besides tokens and doc_starts are not ours to read
                if key != current:
                    self._add(current, fields)
                    current, fields = key, {}
                fields[name[len(key) :]] = (data, size)
            self._add(current, fields)
        except ShardError as err:
            if not tolerant:
                raise
            self._walk_error = str(err)

    def _add(self, key: bytes | None, fields: dict[bytes, tuple[int, int]]) -> None:
        if key is None:
            return
        for suffix in self._suffixes:
            if suffix not in fields:
                raise ShardError(
                    f"shard {self.url}: sample {key.decode()} has no {suffix[1:].decode()}"
                )
        self._walked.extend(x for suffix in self._suffixes for x in fields[suffix])
        self._keys.append(key)

    # -- parsing a sample ------------------------------------------------------------

    def _error(self, index: int, what: str) -> ShardError:
        return ShardError(f"shard {self.url}: sample {self.key(index)} {what}")

    def _check_tokens(self, index: int, offset: int, size: int) -> int:
        try:
            dtype, shape, start = npy_header(self.buf, offset, size)
        except ValueError as err:
            raise self._error(index, f"tokens.npy: {err}") from err
        if dtype != self.token_dtype or shape != (self.seq_len + 1,):
            raise self._error(
                index, f"tokens are {dtype}{list(shape)}, expected {self.token_dtype}"
                f"[{self.seq_len + 1}] (manifest seq_len + 1)"
            )
        if size - (start - offset) != (self.seq_len + 1) * dtype.itemsize:
            raise self._error(index, "tokens.npy is truncated")
        self._token_head, self._token_size = bytes(self.buf[offset:start]), size
        return start

    def _doc_starts(self, index: int, offset: int, size: int) -> list[int]:
        buf = self.buf
        known = None
        if size >= 12 and buf[offset + 6] == 1:  # .npy 1.0, as small arrays are written
            end = offset + 10 + (buf[offset + 8] | buf[offset + 9] << 8)
            known = _DOC_HEADS.get(buf[offset:end])
        if known is None:
            known = self._check_doc_header(index, offset, size)
        dtype, count, head = known
        if size - head != count * dtype.itemsize:
            raise self._error(index, "doc_starts.npy is malformed")
        starts = np.frombuffer(buf, dtype, count, offset + head).tolist()
        if starts[0] != 0 or starts[-1] > self.seq_len or any(
            b <= a for a, b in zip(starts, starts[1:], strict=False)
        ):
            raise self._error(
                index, f"doc_starts must ascend from 0 within seq_len + 1 = "
                f"{self.seq_len + 1}, got {starts[:8]}"
            )
        return starts

    def _check_doc_header(self, index: int, offset: int, size: int) -> tuple[np.dtype, int, int]:
        try:
            dtype, shape, start = npy_header(self.buf, offset, size)
        except ValueError as err:
            raise self._error(index, f"doc_starts.npy: {err}") from err
        if dtype.kind not in "iu" or len(shape) != 1 or shape[0] < 1:
            raise self._error(index, "doc_starts.npy is malformed")
        known = (dtype, shape[0], start - offset)
        if len(_DOC_HEADS) < 4096:
            _DOC_HEADS[bytes(self.buf[offset:start])] = known
        return known


    def _extra(self, index: int, name: str, offset: int, size: int) -> np.ndarray:
        """A task member, checked against the contract (dtype and shape)."""
        window = self.seq_len + 1
        expected = {
            LOSS_MASK_MEMBER: (np.dtype(np.uint8), (window,)),
            TARGET_MEMBER: (self.token_dtype, (window,)),
            LABEL_MEMBER: (np.dtype("<i8"), ()),
        }[name]
        try:
            dtype, shape, start = npy_header(self.buf, offset, size)
        except ValueError as err:
            raise self._error(index, f"{name}: {err}") from err
        if (dtype, shape) != expected:
            raise self._error(index, f"{name} is {dtype}{list(shape)}, expected "
                                     f"{expected[0]}{list(expected[1])}")
        count = int(np.prod(shape))
        if size - (start - offset) != count * dtype.itemsize:
            raise self._error(index, f"{name} is truncated")
        return np.frombuffer(self.buf, dtype, count, start).reshape(shape)


class ReaderCache:
    """Open shards of one process, least recently used evicted; bad shards remembered.

    Args:
        capacity: Shards kept open (mmaps are cheap; streamed shards cost their size).
        verify: Check each shard's sha256 the first time this process opens it (a shard
            reopened after eviction is not hashed again).
        extras: Task members every sample has (see `ShardReader`).
    """

    def __init__(self, capacity: int, verify: bool = False, extras: tuple[str, ...] = ()) -> None:
        self.capacity = capacity
        self.verify = verify
        self.extras = tuple(extras)
        self._open: OrderedDict[str, ShardReader] = OrderedDict()
        self.bad: dict[str, str] = {}
        self.verified: set[str] = set()

    def get(self, shard: Any, seq_len: int, token_dtype: str) -> ShardReader | None:
        """The reader of ``shard`` (a manifest entry), or None when it is bad."""
        reader = self._open.get(shard.url)
        if reader is not None:
            self._open.move_to_end(shard.url)
            return reader
        if shard.url in self.bad:
            return None
        try:
            verify = self.verify and shard.url not in self.verified
            reader = ShardReader(
                shard.url, shard.samples, seq_len, token_dtype, shard.sha256, verify, self.extras
            )
        except ShardError as err:
            self.bad[shard.url] = str(err)
            return None
        if verify:
            self.verified.add(shard.url)
        self._open[shard.url] = reader
        if len(self._open) > self.capacity:
            self._open.popitem(last=False)
        return reader
