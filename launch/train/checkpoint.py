"""DeepSpeed checkpoints that are never half-visible, plus the state DeepSpeed does not keep.

Layout under ``<run_dir>/checkpoints``::

    step_00000300/            DeepSpeed's files (model/optimizer shards, client state)
    step_00000300/rank00000.pt  per-rank state: RNG streams (python, numpy, torch)
    step_00000300/COMPLETE    written by rank 0 once every rank has finished writing
    latest                    the tag of the newest COMPLETE checkpoint (DeepSpeed's format)

``latest`` is replaced atomically after ``COMPLETE`` exists, so a crash at any point
leaves it pointing at a whole checkpoint; ``--resume auto`` reads it.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

COMPLETE = "COMPLETE"
LATEST = "latest"


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def rng_state() -> dict[str, Any]:
    """This process's random streams."""
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    engine: Any, root: Path, step: int, client_state: dict[str, Any], keep: int
) -> Path:
    """Saves a checkpoint collectively (every rank calls this) and publishes it.

    Args:
        engine: The DeepSpeed engine.
        root: The checkpoints folder.
        step: The optimizer step just completed.
        client_state: Training state DeepSpeed does not track (loader position, tokens seen).
        keep: How many complete checkpoints to keep.

    Returns:
        The checkpoint folder.
    """
    tag = tag_for(step)
    folder = root / tag
    rank = dist.get_rank()
    if rank == 0 and folder.exists():  # a partial leftover from a crash at this step
        shutil.rmtree(folder)
    dist.barrier()
    engine.save_checkpoint(str(root), tag=tag, client_state=client_state, save_latest=False)
    torch.save(rng_state(), folder / f"rank{rank:05d}.pt")
    dist.barrier()
    if rank == 0:
        marker = {"step": step, "time": time.time(), "world_size": dist.get_world_size()}
        (folder / COMPLETE).write_text(json.dumps(marker))
        _atomic_write(root / LATEST, tag)
        _prune(root, keep, current=tag)
    dist.barrier()
    return folder


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoint folders, oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and (p / COMPLETE).exists()]
    return sorted(found, key=lambda p: p.name)


def _prune(root: Path, keep: int, current: str) -> None:
    complete = complete_checkpoints(root)
    for old in complete[:-keep]:
        if old.name != current:
            shutil.rmtree(old, ignore_errors=True)
    for leftover in root.iterdir():  # partial folders older than the newest complete one
        if leftover.is_dir() and not (leftover / COMPLETE).exists() and leftover.name < current:
            shutil.rmtree(leftover, ignore_errors=True)


def find_resume(root: Path, resume: str | None) -> Path | None:
    """The checkpoint to resume from.

    Args:
        root: The run's checkpoints folder.
        resume: None or "none" (start fresh), "auto" (the newest complete checkpoint, or
            start fresh if there is none), or a path to a checkpoint folder.

    Raises:
        FileNotFoundError: A named checkpoint is missing or incomplete.
    """
    if resume in (None, "none"):
        return None
    if resume == "auto":
        latest = root / LATEST
        if latest.is_file():
            folder = root / latest.read_text().strip()
            if (folder / COMPLETE).exists():
                return folder
        complete = complete_checkpoints(root)
        return complete[-1] if complete else None
    folder = Path(resume)
    if not (folder / COMPLETE).exists():
        raise FileNotFoundError(
            f"--resume {resume}: not a complete lmforge checkpoint (no {COMPLETE} marker); "
            f"use --resume auto to pick the newest complete one under {root}"
        )
    return folder


def load_checkpoint(engine: Any, folder: Path) -> dict[str, Any]:
    """Loads a checkpoint into the engine and this rank's RNG; returns the client state."""
    _, client_state = engine.load_checkpoint(
        str(folder.parent), tag=folder.name, load_optimizer_states=True,
        load_lr_scheduler_states=True,
    )
    if client_state is None:
        raise RuntimeError(f"{folder}: DeepSpeed could not load this checkpoint")
    rng_file = folder / f"rank{dist.get_rank():05d}.pt"
    if rng_file.exists():  # absent when resuming on more ranks than were saved
        set_rng_state(torch.load(rng_file, weights_only=False))
    return client_state
