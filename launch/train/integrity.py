"""What a checkpoint's ``COMPLETE`` marker vouches for: every file fsynced, with its size and
an xxh3-64 hash of its bytes.

Each rank seals the files it writes itself: DeepSpeed's files through :class:`SealingEngine`
(hashed while ``torch.save`` writes them, then fsynced), its RNG file through
:func:`write_sealed`; rank 0 seals what DeepSpeed copies in without its checkpoint engine
(``zero_to_fp32.py``) with :func:`seal_existing`. A resume hashes the files again, split
across ranks and threads (:func:`verify_files`), so a file that a crash left zero-filled or
short, or that changed on disk, is found before anything loads it.

Files are opened without following symbolic links and without blocking, and must be
regular files: a FIFO or a link planted in a checkpoint folder is reported, never waited on.
"""

from __future__ import annotations

import errno
import json
import mmap
import os
import stat
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, BinaryIO

import torch
import xxhash

from lmforge.pipeline.durable import fsync_dir

COMPLETE = "COMPLETE"
HASH = "xxh3_64"
_OVERLAP_BYTES = 1 << 22  # buffers this large are hashed in a thread while they are written
_MAX_SMALL_READ = 1 << 20


def open_regular(path: Path) -> int:
    """A read-only descriptor of ``path``, which must be a regular file (not a link, FIFO or
    device); opening never blocks. Raises OSError naming what it is otherwise."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW)
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise OSError(errno.ELOOP, f"{path} is a symbolic link") from None
        raise
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise OSError(f"{path} is not a regular file")
    return fd


def read_small(path: Path, limit: int = _MAX_SMALL_READ) -> bytes:
    """The bytes of a small regular file (``latest``, ``COMPLETE``), at most ``limit``."""
    fd = open_regular(path)
    try:
        data = os.read(fd, limit + 1)
    finally:
        os.close(fd)
    if len(data) > limit:
        raise OSError(f"{path} is larger than {limit} bytes")
    return data


def file_hash(path: Path) -> tuple[int, str]:
    """The size and xxh3-64 hash (hex) of a regular file, read through a memory map (the page
    cache without a copy)."""
    fd = open_regular(path)
    try:
        size = os.fstat(fd).st_size
        digest = xxhash.xxh3_64()
        if size:
            with mmap.mmap(fd, size, access=mmap.ACCESS_READ) as mapped:
                mapped.madvise(mmap.MADV_SEQUENTIAL)
                digest.update(mapped)
        return size, digest.hexdigest()
    finally:
        os.close(fd)


class _HashingFile:
    """A write-only file object for ``torch.save`` that hashes the bytes it writes (large
    buffers in a thread, beside the copy into the page cache)."""

    def __init__(self, raw: BinaryIO, hasher: ThreadPoolExecutor) -> None:
        self.raw, self.hasher = raw, hasher
        self.digest = xxhash.xxh3_64()
        self.size = 0

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        if view.nbytes >= _OVERLAP_BYTES:  # the buffer is valid until we return: join first
            hashed = self.hasher.submit(self.digest.update, view)
            self.raw.write(view)
            hashed.result()
        else:
            self.digest.update(view)
            self.raw.write(view)
        self.size += view.nbytes
        return view.nbytes

    def flush(self) -> None:
        self.raw.flush()


def write_sealed(path: Path, save: Callable[[Any], None]) -> dict[str, Any]:
    """Writes ``path`` with ``save(file)``, hashing the bytes as they go, and fsyncs it.

    (Starting the writeback early with background ``fdatasync`` calls made saves slower
    here: a page under writeback stalls the next write into it.)

    Returns:
        The file's ``COMPLETE`` entry: ``{"size": ..., "xxh3_64": ...}``.
    """
    with open(path, "wb") as raw, ThreadPoolExecutor(1) as hasher:
        out = _HashingFile(raw, hasher)
        save(out)
        raw.flush()
        os.fsync(raw.fileno())
    return {"size": out.size, HASH: out.digest.hexdigest()}


def fsync_file(path: Path) -> None:
    """Fsyncs a regular file (without following a link or blocking on a FIFO)."""
    fd = open_regular(path)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def seal_existing(path: Path) -> dict[str, Any]:
    """Fsyncs a file this process wrote by other means and returns its ``COMPLETE`` entry."""
    fsync_file(path)
    size, digest = file_hash(path)
    return {"size": size, HASH: digest}


def fsync_tree(folder: Path) -> None:
    """Fsyncs every regular file under ``folder`` and every folder (a finished conversion
    about to be renamed into place)."""
    for parent, _, names in os.walk(folder):
        for name in names:
            fsync_file(Path(parent) / name)
        fsync_dir(Path(parent))


class SealingEngine:
    """DeepSpeed's checkpoint engine with every ``save`` hashed while writing and fsynced;
    ``sealed`` maps each path this rank wrote to its ``COMPLETE`` entry. Everything else is
    the wrapped engine's (``engine.checkpoint_engine`` is DeepSpeed's extension point)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.sealed: dict[str, dict[str, Any]] = {}

    def save(self, state_dict: Any, path: str) -> None:
        from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import (
            TorchCheckpointEngine,
        )

        if type(self.inner) is TorchCheckpointEngine:  # noqa: E721 - subclasses save otherwise
            zipfile = getattr(self.inner, "zipfile_serialization", True)
            self.sealed[path] = write_sealed(Path(path), lambda f: torch.save(
                state_dict, f, _use_new_zipfile_serialization=zipfile))
        else:  # another engine writes its own way: seal what it left
            self.inner.save(state_dict, path)
            self.sealed[path] = seal_existing(Path(path))

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def read_marker(folder: Path) -> tuple[dict[str, Any] | None, str | None]:
    """A checkpoint's ``COMPLETE`` marker, or (None, what is wrong with it): it must be a
    regular file holding a JSON object whose ``files`` lists at least one file, each a
    relative path inside the folder with a size (and, since integrity checks, a hash)."""
    try:
        marker = json.loads(read_small(folder / COMPLETE, limit=16 << 20).decode("utf-8"))
    except FileNotFoundError:
        return None, f"no {COMPLETE} marker (its save did not finish)"
    except OSError as err:
        return None, f"its {COMPLETE} marker cannot be read ({err.strerror or err})"
    except (UnicodeDecodeError, ValueError):
        return None, f"its {COMPLETE} marker is unreadable"
    files = marker.get("files") if isinstance(marker, dict) else None
    if not isinstance(files, dict) or not files:
        return None, f"its {COMPLETE} marker lists no files"
    for name, entry in files.items():
        parts = Path(name).parts
        if not parts or Path(name).is_absolute() or ".." in parts:
            return None, f"its {COMPLETE} marker lists {name[:80]!r}, outside the folder"
        size = entry.get("size") if isinstance(entry, dict) else entry
        if not isinstance(size, int) or isinstance(size, bool) or size < 0 or (
                isinstance(entry, dict) and not isinstance(entry.get(HASH), str)):
            return None, f"its {COMPLETE} marker has no size and hash for {name[:80]!r}"
    return marker, None


def incomplete_reason(folder: Path) -> str | None:
    """Why ``folder`` is not a whole checkpoint, or None when it is a real folder (not a
    symbolic link) whose COMPLETE marker is sound and every file it lists is a regular file
    of the listed size. Hashes are checked by :func:`resume_point`."""
    if folder.is_symlink():
        return "it is a symbolic link (lmforge resumes only from real checkpoint folders)"
    marker, problem = read_marker(folder)
    if marker is None:
        return problem
    for name, entry in marker["files"].items():
        size = entry["size"] if isinstance(entry, dict) else entry
        try:
            info = (folder / name).lstat()
        except OSError:
            return f"{name} is missing"
        if not stat.S_ISREG(info.st_mode):
            return f"{name} is not a regular file"
        if info.st_size != size:
            return f"{name} has {info.st_size} bytes, {COMPLETE} lists {size}"
    return None


def verify_files(folder: Path, files: dict[str, Any], rank: int = 0, world: int = 1,
                 threads: int = 4) -> list[str]:
    """Checks this rank's share of a checkpoint's files against their ``COMPLETE`` entries.

    Args:
        folder: The checkpoint folder.
        files: The marker's ``files``: name → ``{"size", "xxh3_64"}`` (or a bare size, as
            markers of older versions hold: then the size and a zero-filled start are checked).
        rank, world: The share: files are dealt out by size, largest first, to the rank with
            the fewest bytes so far (the same on every rank), so ranks hash in parallel.
        threads: Files of the share hashed at once (the hash releases the GIL).

    Returns:
        One line per damaged file, naming it; empty when the share is intact.
    """
    load = [0] * world
    mine = []
    for name, entry in sorted(files.items(), key=lambda kv: (-_size(kv[1]), kv[0])):
        owner = load.index(min(load))
        load[owner] += _size(entry)
        if owner == rank:
            mine.append((name, entry))
    if not mine:
        return []
    with ThreadPoolExecutor(max(1, min(threads, len(mine)))) as pool:
        found = pool.map(lambda item: _check(folder, *item), mine)
        return [problem for problem in found if problem]


def _size(entry: Any) -> int:
    return entry["size"] if isinstance(entry, dict) else entry


def _check(folder: Path, name: str, entry: Any) -> str | None:
    path = folder / name
    try:
        if not isinstance(entry, dict):  # an older marker: sizes only
            fd = open_regular(path)
            try:
                head = os.read(fd, 4096)
            finally:
                os.close(fd)
            return f"{path} starts with zero bytes (not a checkpoint file)" \
                if head and not head.strip(b"\0") else None
        size, digest = file_hash(path)
    except OSError as err:
        return f"{path} cannot be read ({err.strerror or err})"
    if size != entry["size"]:
        return f"{path} has {size} bytes, {folder.name}/COMPLETE lists {entry['size']}"
    if digest != entry.get(HASH):
        return (f"{path} does not match its hash in {folder.name}/COMPLETE (its bytes changed "
                "after the save: a crash before they reached the disk, or a damaged copy)")
    return None
