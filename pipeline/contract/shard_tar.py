"""Bytes-level helpers of the loader: opening shards, walking tar headers, ``.npy`` headers.

Plain ``tarfile`` and ``numpy.load`` cost tens of µs a member; these touch only the
header fields the loader needs, so a shard of 65k samples is indexed in a fraction of
a second. ``ShardError`` is the one error a user sees for a bad shard.
"""

from __future__ import annotations

import ast
import mmap
import os
from typing import Any

import numpy as np

from lmforge.pipeline.contract.shard_format import BLOCK

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
    """Reads a whole small file (a manifest) from disk or an fsspec URL."""
    if is_url(path):
        import fsspec

        with fsspec.open(path, "rb") as f:
            return f.read()
    with open(local_path(path), "rb") as f:
        return f.read()


def open_shard(url: str) -> Any:
    """The bytes of a shard: a read-only mmap of a local file, or a URL's whole content."""
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


def walk_tar(buf: Any, url: str):
    """Yields ``(name bytes, data offset, size, header offset)`` per regular file of a tar.

    The hot loop touches three header fields only; rare header kinds (GNU long names,
    pax records, the ustar prefix) take the slow branch.
    """
    end = len(buf)
    pos = 0
    long_name: bytes | None = None
    pax: dict[str, str] = {}
    while pos + BLOCK <= end:
        if buf[pos] == 0:  # the two zero blocks that end a tar
            return
        field = buf[pos + 124 : pos + 136]
        try:
            size = tar_number(field)
        except ValueError as err:
            raise ShardError(f"shard {url}: corrupt tar header at byte {pos}") from err
        kind = buf[pos + 156]
        if pax and "size" in pax:
            try:
                size = int(pax["size"])
            except ValueError:
                size = -1
        if size < 0:  # the walk would step backwards and never end
            raise ShardError(f"shard {url}: corrupt tar header at byte {pos} (member size "
                             f"{size}); the shard is damaged: prepare the dataset again")
        data = pos + BLOCK
        if data + size > end:
            raise ShardError(
                f"shard {url}: truncated (a member needs byte {data + size}, the file has {end})"
            )
        if kind == 48 or kind == 0:  # b"0" / b"\0": a regular file
            if long_name is None and not pax and buf[pos + 345] == 0:
                yield buf[pos : pos + 100].split(b"\0", 1)[0], data, size, pos
            else:
                yield _full_name(buf, pos, long_name, pax), data, size, pos
                long_name, pax = None, {}
        elif kind == 76:  # b"L": GNU long name of the next member
            long_name = bytes(buf[data : data + size]).split(b"\0", 1)[0]
        elif kind == 120:  # b"x": pax extended header of the next member
            try:
                pax = _pax_records(bytes(buf[data : data + size]))
            except ValueError as err:
                raise ShardError(f"shard {url}: corrupt pax header at byte {pos}") from err
        elif kind != 103:  # b"g" (global pax) is ignored; anything else resets
            long_name, pax = None, {}
        pos = data + ((size + BLOCK - 1) & -BLOCK)
    if pos != end:
        raise ShardError(f"shard {url}: truncated (ends inside a tar header)")


def _full_name(buf: Any, pos: int, long_name: bytes | None, pax: dict[str, str]) -> bytes:
    if long_name is not None:
        return long_name
    if "path" in pax:
        return pax["path"].encode()
    name = buf[pos : pos + 100].split(b"\0", 1)[0]
    if buf[pos + 257 : pos + 262] == b"ustar":
        prefix = buf[pos + 345 : pos + 500].split(b"\0", 1)[0]
        return prefix + b"/" + name if prefix else name
    return name


def tar_number(field: bytes) -> int:
    if field[0] & 0x80:  # GNU base-256 for sizes of 8 GiB and more
        return int.from_bytes(field[1:], "big")
    text = field.split(b"\0", 1)[0]
    return int(text, 8) if text.strip() else 0


def _pax_records(data: bytes) -> dict[str, str]:
    """The ``length key=value\n`` records of a pax header.

    Raises:
        ValueError: A record whose length is not a number, does not cover its own
            ``length `` prefix (a zero length would never advance), or runs past the header.
    """
    records = {}
    while data:
        length, _, rest = data.partition(b" ")
        n = int(length)  # ValueError for anything but digits
        if n <= len(length) + 1 or n > len(data):
            raise ValueError(f"pax record length {n}")
        key, _, value = rest[: n - len(length) - 2].partition(b"=")
        records[key.decode()] = value.decode()
        data = data[n:]
    return records


_HEADER_CACHE: dict[bytes, tuple[np.dtype, tuple[int, ...]]] = {}


def npy_header(buf: Any, offset: int, size: int) -> tuple[np.dtype, tuple[int, ...], int]:
    """Parses the ``.npy`` member at ``offset``: ``(dtype, shape, payload offset)``.

    Raises:
        ValueError: Not a readable ``.npy`` (the message says why).
    """
    head = buf[offset : offset + 12]
    if size < 12 or head[:6] != _NPY_MAGIC:
        raise ValueError("a member is not .npy")
    if head[6] == 1:
        length, start = head[8] | head[9] << 8, offset + 10
    else:
        length, start = int.from_bytes(head[8:12], "little"), offset + 12
    if start + length > offset + size:
        raise ValueError(".npy header is truncated")
    text = buf[start : start + length]
    parsed = _HEADER_CACHE.get(text)
    if parsed is None:
        try:
            meta = ast.literal_eval(text.decode("latin1"))
            parsed = (np.dtype(meta["descr"]), tuple(meta["shape"]))
            if meta.get("fortran_order"):
                raise ValueError("fortran order")
        except (ValueError, SyntaxError, KeyError, TypeError) as err:
            raise ValueError("corrupt .npy header") from err
        if len(_HEADER_CACHE) < 4096:
            _HEADER_CACHE[text] = parsed
    return parsed[0], parsed[1], start + length
