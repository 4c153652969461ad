"""Files that a crash must not leave half-written, and full-disk errors that say where.

Resume markers (prepare's `done/` files) and other small JSON files are written as temp file,
fsync, rename, folder fsync; a marker that is still unreadable (written by an older version,
cut by a copy) counts as "not done". Shared by the prepare phases and `prepare` itself.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

log = logging.getLogger("lmforge.pipeline")


def write_atomic(path: Path, data: str | bytes, mode: int = 0o644) -> None:
    """The one durable write: temp file (PID-unique name), fsync, rename, fsync of the folder.

    A crash leaves the old file or the new one, never an empty or partial one, so a marker
    written this way can vouch for what was fsynced before it. ``mode`` is set on the temp
    file before any byte is written (0o600 for files that hold secrets).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    payload = data.encode("utf-8") if isinstance(data, str) else data
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.fchmod(fd, mode)  # the umask must not widen or narrow what the caller asked for
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    os.replace(tmp, path)
    fsync_dir(path.parent)


def write_json(path: Path, obj: Any, mode: int = 0o644) -> None:
    """Write JSON durably (see :func:`write_atomic`); markers are trusted on rerun."""
    write_atomic(path, json.dumps(obj, indent=2, sort_keys=False) + "\n", mode)


def fsync_dir(folder: Path) -> None:
    """Make a rename in `folder` durable (a no-op where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_marker(marker: Path) -> dict | None:
    """A finished item's stored result, or None when there is none or it is unreadable.

    A marker left empty or cut short (by a crash on a filesystem without ordered writes, or
    by a copy) only means "not done": it is removed with a warning and the item is redone.
    """
    if not marker.exists():
        return None
    try:
        result = json.loads(marker.read_text(encoding="utf-8"))
        if isinstance(result, dict):
            return result
        reason = "not a JSON object"
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        reason = str(err) or type(err).__name__
    log.warning("prepare: ignoring the unreadable resume marker %s (%s); redoing that item",
                marker, reason)
    with contextlib.suppress(OSError):
        marker.unlink()
    return None


@contextlib.contextmanager
def disk_space_errors(folder: str | Path, path: str | Path | None = None) -> Iterator[None]:
    """Turns "no space left on device" while writing `path` (default: something under
    `folder`) into a ValueError that names it and the free space (a ValueError reaches the
    driver as is)."""
    try:
        yield
    except OSError as err:
        if err.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        path = err.filename or path or folder
        try:
            usage = shutil.disk_usage(folder)
            space = f"{usage.free / 2**20:.1f} MiB free of {usage.total / 2**20:.1f} MiB"
        except OSError:
            space = "free space unknown"
        raise ValueError(
            f"{path}: no space left on device ({space} on the filesystem of {folder}); free "
            "space or point data.output_dir at a larger filesystem, then run prepare again "
            "(finished work is kept; the previous dataset there is untouched)"
        ) from err
