"""Advisory locks on the folders lmforge writes: a run directory, a prepared dataset.

``fcntl.flock`` on ``<folder>/.lmforge.lock``: the kernel releases it when the holder exits,
however it exits (a SIGKILL or a node reboot leaves no stale lock to clean up). The holder
writes its PID, host and command into the file so that the next one can say who has it.

- exclusive: the process that changes the folder (``lmforge run``/``train`` on a run
  directory, ``prepare`` on a dataset folder);
- shared: a process that only needs the folder to stay as it is (training reads a dataset:
  any number of jobs may train on it, but no prepare may swap its shards meanwhile).

Locks are re-entrant within a process (the runner holds the run directory and calls the
training command, which asks again) and never inherited by child processes.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

LOCK_FILE = ".lmforge.lock"

log = logging.getLogger("lmforge")

# folder -> (open file, mode, depth) of the locks this process holds
_HELD: dict[Path, tuple[int, str, int]] = {}


class FolderLocked(RuntimeError):
    """Another process holds the lock; the message names it and says what to do."""


@contextlib.contextmanager
def folder_lock(folder: str | Path, purpose: str, shared: bool = False) -> Iterator[None]:
    """Holds ``folder``'s lock for the life of the block (creating the folder if needed).

    Args:
        folder: The run directory or dataset folder.
        purpose: What this process does there, for the other side's error
            (``"lmforge train"``).
        shared: Take a shared lock (readers) instead of an exclusive one (writers).

    Raises:
        FolderLocked: Another process holds a conflicting lock (names its PID, host and
            command).
    """
    folder = Path(folder).resolve()
    mode = "shared" if shared else "exclusive"
    if folder in _HELD:  # re-entrant: an exclusive holder may also read
        fd, held_mode, depth = _HELD[folder]
        if held_mode == "shared" and not shared:
            raise FolderLocked(f"{folder}: this process holds it shared and now asks to write "
                               "to it; release the reader first")
        _HELD[folder] = (fd, held_mode, depth + 1)
        try:
            yield
        finally:
            fd, held_mode, depth = _HELD[folder]
            _HELD[folder] = (fd, held_mode, depth - 1)
        return
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except BlockingIOError:
            raise FolderLocked(_busy_message(folder, path, purpose, mode)) from None
        except OSError as err:  # a filesystem without flock (some parallel filesystems)
            log.warning("%s: this filesystem cannot lock files (%s); %s runs without the lock, "
                        "so make sure no other lmforge process uses the folder", folder, err,
                        purpose)
        if not shared:  # a reader must not overwrite the writer's line (there is none now)
            os.ftruncate(fd, 0)
            os.pwrite(fd, _holder_line(purpose).encode(), 0)
        else:
            _append_reader(fd, purpose)
        _HELD[folder] = (fd, mode, 1)
        try:
            yield
        finally:
            _HELD.pop(folder, None)
    finally:
        os.close(fd)  # releases the flock


def holds(folder: str | Path) -> bool:
    """Whether this process holds ``folder``'s lock (shared or exclusive)."""
    return Path(folder).resolve() in _HELD


def _holder_line(purpose: str) -> str:
    command = " ".join(os.path.basename(a) if i == 0 else a for i, a in enumerate(sys.argv))
    return f"pid={os.getpid()} host={socket.gethostname()} purpose={purpose} cmd={command[:200]}\n"


def _append_reader(fd: int, purpose: str) -> None:
    # Readers share the file: each adds its line (the newest few are enough to name someone).
    lines = os.pread(fd, 4096, 0).decode(errors="replace").splitlines()[-7:]
    text = "\n".join([*lines, _holder_line(purpose).rstrip("\n")]) + "\n"
    os.ftruncate(fd, 0)
    os.pwrite(fd, text.encode(), 0)


def _busy_message(folder: Path, path: Path, purpose: str, mode: str) -> str:
    try:
        holders = [line for line in path.read_text(errors="replace").splitlines() if line]
    except OSError:
        holders = []
    who = "; ".join(holders[-3:]) if holders else "another process (it wrote no details)"
    return (f"{folder} is in use ({who}), so {purpose} cannot take it ({mode}): wait for that "
            "process to finish, or stop it, or use another folder")
