"""Choosing the checkpoint a run resumes from, checked by hash, and loading it with a
fallback: under ``--resume auto`` a checkpoint with a damaged file (a crash left it zero-filled
or short, a copy changed it) or one that fails to load is passed over for the previous complete
one with a warning naming the file; an explicit ``--resume PATH`` is refused naming it.

Structure (marker, files, sizes) is :mod:`checkpoint`'s ``find_resume``; the hashes are
checked here, each rank hashing its share of the files (``integrity.verify_files``).
"""

from __future__ import annotations

import logging
from collections.abc import Collection
from pathlib import Path
from typing import Any

import torch.distributed as dist

from lmforge.launch.train.checkpoint import find_resume, load_checkpoint, needs_universal
from lmforge.launch.train.errors import CheckpointError, UnreadableCheckpointError
from lmforge.launch.train.integrity import COMPLETE, read_marker, verify_files

log = logging.getLogger("lmforge.train")


# Checkpoints already hashed by this process, keyed by the identity (inode, size, mtime) of the
# marker and every file, so the resume decision (build_trainer) and the load (Trainer.resume)
# hash a checkpoint once, and a file changed since is hashed again.
_verified: dict[tuple, list[str]] = {}


def damaged_files(folder: Path) -> list[str]:
    """Collective when the process group is up: the files of a complete checkpoint whose
    size or hash differs from its ``COMPLETE`` marker, one line each naming the file. Every
    rank hashes its share of the files; all ranks return the same list."""
    files = read_marker(folder)[0]["files"]
    key = (str(folder.resolve()), *(_identity(folder / name) for name in [COMPLETE, *files]))
    if key not in _verified:
        if dist.is_initialized() and dist.get_world_size() > 1:
            mine = verify_files(folder, files, dist.get_rank(), dist.get_world_size())
            every: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(every, mine)
            _verified[key] = sorted(line for part in every for line in part)
        else:
            _verified[key] = verify_files(folder, files)
    return _verified[key]


def _identity(path: Path) -> tuple[int, int, int]:
    info = path.lstat()
    return info.st_ino, info.st_size, info.st_mtime_ns


def resume_point(root: Path, resume: str | None, exclude: Collection[Path] = ()) -> Path | None:
    """:func:`find_resume` whose choice has passed its hash check (collective).

    Under ``auto`` a checkpoint with a damaged file is passed over for the previous complete
    one, with a warning naming the file; an explicit path with one is refused.

    Raises:
        CheckpointError: The named checkpoint is damaged, or no complete one is intact.
    """
    skip = set(exclude)
    while True:
        folder = find_resume(root, resume, skip)
        if folder is None:
            return None
        damaged = damaged_files(folder)
        if not damaged:
            return folder
        if resume != "auto":
            raise CheckpointError(f"--resume {resume}: {damaged[0]}. Resume from another "
                                  f"checkpoint, or use --resume auto to pick the newest intact "
                                  f"one under {root}")
        if not dist.is_initialized() or dist.get_rank() == 0:
            log.warning("%s: skipping this checkpoint: %s; trying the previous complete one",
                        folder.name, "; ".join(damaged))
        skip.add(folder)


def load_resume(engine: Any, root: Path, resume: str | None) -> tuple[Path | None, Any]:
    """Loads the checkpoint :func:`resume_point` picks; returns it and its client state.

    Under ``auto`` a checkpoint that fails to load on any rank (a file DeepSpeed or torch
    cannot read) is passed over for the previous complete one, with a warning naming the
    file; an explicit path is refused. Collective: every rank takes the same decision.

    Raises:
        CheckpointError: An explicit checkpoint does not load, none under ``root`` does, or
            the one to fall back to was written by another number of ranks than the engine
            was built for (rerun: the resume decision then sees the damage first).
    """
    failed: set[Path] = set()
    while True:
        folder = resume_point(root, resume, failed)
        if folder is None:
            return None, None
        universal = needs_universal(folder, dist.get_world_size(),
                                    engine.zero_optimization_stage())
        if failed and universal != bool(engine.load_universal_checkpoint()):
            raise CheckpointError(
                f"{root}: {', '.join(sorted(p.name for p in failed))} did not load and the "
                f"previous checkpoint {folder.name} was written by another number of ranks; "
                "run again with --resume auto to resume from it")
        try:
            client, problem = load_checkpoint(engine, folder), None
        except UnreadableCheckpointError as err:
            client, problem = None, str(err)
        problems: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(problems, problem)
        problem = next((p for p in problems if p), None)
        if problem is None:
            return folder, client
        if resume != "auto":
            raise CheckpointError(f"--resume {resume}: {problem}; resume from another "
                                  "checkpoint, or use --resume auto")
        if dist.get_rank() == 0:
            log.warning("%s: skipping this checkpoint: %s; trying the previous complete one",
                        folder.name, problem)
        failed.add(folder)
