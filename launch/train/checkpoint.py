"""DeepSpeed checkpoints that are never half-visible, plus the state DeepSpeed does not keep.

Layout under ``<run_dir>/checkpoints``::

    step_00000300/            DeepSpeed's files (model/optimizer shards, client state)
    step_00000300/rank00000.pt  per-rank state: RNG streams (python, numpy, torch)
    step_00000300/COMPLETE    written by rank 0 once every rank has written and fsynced its
                              files; lists every file with its size and xxh3-64 hash, checked
                              before a resume trusts it (``integrity.py``)
    step_00000300/universal/  DeepSpeed's universal form of it, made on the first resume on
                              another data-parallel world size (kept for retries)
    latest                    the tag of the newest COMPLETE checkpoint (DeepSpeed's format)

``latest`` is replaced atomically after ``COMPLETE`` exists (both written as temp file,
fsync, rename, folder fsync), so a crash at any point leaves it pointing at a whole
checkpoint; ``--resume auto`` reads it, and falls back to the newest complete checkpoint
with a warning when it is unreadable, dangling, outside ``checkpoints/`` or points at an
incomplete one. A resume also hashes every file (split across ranks): under ``--resume
auto`` a checkpoint with a damaged file, or one that fails to load, is skipped for the previous
complete one with a warning naming the file; an explicit ``--resume PATH`` is refused. Every
file is loaded weights-only (``safe_load.py``). ``latest``, ``COMPLETE`` and the files are
opened without following links or blocking: a FIFO or a symlinked ``step_*`` is never used.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
import time
from collections.abc import Collection
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from lmforge.launch.train.errors import CheckpointError
from lmforge.launch.train.integrity import (
    COMPLETE,
    SealingEngine,
    fsync_tree,
    incomplete_reason,
    read_small,
    seal_existing,
    write_sealed,
)
from lmforge.launch.train.safe_load import load_weights_only, weights_only_loads
from lmforge.pipeline.durable import fsync_dir, write_atomic

log = logging.getLogger("lmforge.train")

LATEST = "latest"
UNIVERSAL = "universal"
_TAG = re.compile(r"step_\d{8}")
SEALS_PREFIX = "seals-rank"  # seals-rank00001.json: a rank's COMPLETE entries


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def rng_state() -> dict[str, Any]:
    """This process's random streams, as tensors and plain data (loadable weights-only)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached": float(cached)},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"],
                         n["has_gauss"], n["cached"]))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    engine: Any, root: Path, step: int, client_state: dict[str, Any], keep: int,
    integrity: bool = True,
) -> Path:
    """Saves a checkpoint collectively (every rank calls this) and publishes it.

    Every rank hashes the files it writes while writing them and fsyncs them and the folder;
    rank 0 writes ``COMPLETE`` (sizes and hashes) and ``latest`` once all ranks are through.

    Args:
        engine: The DeepSpeed engine.
        root: The checkpoints folder.
        step: The optimizer step just completed.
        client_state: Training state DeepSpeed does not track (loader position, tokens seen).
        keep: How many complete checkpoints to keep.
        integrity: False skips the fsyncs and hashes (sizes only): the baseline
            ``benchmarks/checkpoint.py`` measures their cost against; never for training.

    Returns:
        The checkpoint folder.
    """
    tag = tag_for(step)
    folder = root / tag
    rank = dist.get_rank()
    if folder.is_symlink():  # every rank: all raise, none waits at the barrier below
        raise CheckpointError(f"{folder} is a symbolic link; lmforge writes checkpoints "
                              "into real folders only and will not write through it or "
                              "delete it: remove the link (or move it out of the folder)")
    if rank == 0 and folder.exists():  # a partial leftover from a crash at this step
        shutil.rmtree(folder)
    dist.barrier()
    try:
        sealed = _write_rank_files(engine, root, folder, tag, client_state, integrity)
    except (OSError, RuntimeError) as err:  # torch.save reports a full disk as RuntimeError
        raise CheckpointError(_save_failure(folder, root, rank, err)) from err
    # Each rank's entries go beside its files (rank 0 reads them from the shared folder), so
    # the barrier before COMPLETE is a plain barrier, not an object collective on the host.
    if integrity:
        write_atomic(folder / f"{SEALS_PREFIX}{rank:05d}.json", json.dumps(sealed))
    dist.barrier()  # every rank's files and folder entries are on disk by now
    if rank == 0:
        try:
            gathered = [json.loads((folder / f"{SEALS_PREFIX}{r:05d}.json").read_text())
                        for r in range(dist.get_world_size())] if integrity else []
            files = _marker_files(folder, gathered, integrity)
            marker = {"step": step, "time": time.time(), "world_size": dist.get_world_size(),
                      "hash": "xxh3_64" if integrity else None, "files": files}
            write_atomic(folder / COMPLETE, json.dumps(marker))
            write_atomic(root / LATEST, tag)
        except OSError as err:
            raise CheckpointError(_save_failure(folder, root, rank, err)) from err
        _prune(root, keep, current=tag)
    dist.barrier()
    return folder


def _write_rank_files(engine: Any, root: Path, folder: Path, tag: str,
                      client_state: dict[str, Any], integrity: bool) -> dict[str, Any]:
    """This rank's part of a save: DeepSpeed's files and the RNG file, hashed while written
    and fsynced with the folder; returns name → ``COMPLETE`` entry for what it wrote."""
    rng_file = folder / f"rank{dist.get_rank():05d}.pt"
    if not integrity:
        engine.save_checkpoint(str(root), tag=tag, client_state=client_state, save_latest=False)
        torch.save(rng_state(), rng_file)
        return {}
    sealing = SealingEngine(engine.checkpoint_engine)
    engine.checkpoint_engine = sealing
    try:
        engine.save_checkpoint(str(root), tag=tag, client_state=client_state, save_latest=False)
    finally:
        engine.checkpoint_engine = sealing.inner
    state = rng_state()
    sealing.sealed[str(rng_file)] = write_sealed(rng_file, lambda f: torch.save(state, f))
    fsync_dir(folder)
    return {Path(os.path.relpath(path, folder)).as_posix(): entry
            for path, entry in sealing.sealed.items()}


def _marker_files(folder: Path, gathered: list[dict[str, Any]],
                  integrity: bool) -> dict[str, Any]:
    """Every file in ``folder`` with its ``COMPLETE`` entry: the ranks' own, or (a file
    DeepSpeed copied in without its checkpoint engine) sealed here by rank 0."""
    written = {name: entry for part in gathered for name, entry in part.items()}
    files = {}
    for path in sorted(folder.rglob("*")):
        if path.is_symlink() or not path.is_file():
            continue
        name = path.relative_to(folder).as_posix()
        if not integrity:
            files[name] = path.stat().st_size
        else:
            files[name] = written.get(name) or seal_existing(path)
    return files


def _save_failure(folder: Path, root: Path, rank: int, err: Exception) -> str:
    try:
        free = f"{shutil.disk_usage(root).free / 2**20:.1f} MiB free"
    except OSError:
        free = "free space unknown"
    previous = _read_latest(root)[0]
    kept = f"the previous checkpoint {previous.name} is intact" if previous else "none earlier"
    return (f"{folder}: saving the checkpoint failed on rank {rank} ({str(err).strip()[:200]}); "
            f"{free} on that filesystem; {kept}. Free space (or lower "
            "train.keep_checkpoints) and continue with --resume auto")


def complete_checkpoints(root: Path, exclude: Collection[Path] = ()) -> list[Path]:
    """Complete checkpoint folders, oldest first (symbolic links and ``exclude`` left out)."""
    if not root.is_dir():
        return []
    found = [p for p in _own_folders(root) if p not in exclude and incomplete_reason(p) is None]
    return sorted(found, key=lambda p: p.name)


def _own_folders(root: Path) -> list[Path]:
    """The ``step_NNNNNNNN`` folders under ``root`` that saves create: real folders only,
    never a symbolic link (which may point outside ``checkpoints/``) nor any other folder."""
    return [p for p in root.iterdir()
            if _TAG.fullmatch(p.name) and not p.is_symlink() and p.is_dir()]


def _prune(root: Path, keep: int, current: str) -> None:
    """Deletes complete checkpoints older than the newest ``keep`` and partial ones older
    than ``current``, among :func:`_own_folders` only: ``best/``, ``Backup/``, an export or
    a symlinked ``step_*`` beside them are never touched."""
    ours = _own_folders(root)
    complete = sorted((p for p in ours if incomplete_reason(p) is None), key=lambda p: p.name)
    for old in complete[:-keep]:
        if old.name != current:
            shutil.rmtree(old, ignore_errors=True)
    for leftover in ours:  # partial folders older than the newest complete one
        if not (leftover / COMPLETE).exists() and leftover.name < current:
            shutil.rmtree(leftover, ignore_errors=True)


def _read_latest(root: Path) -> tuple[Path | None, str | None]:
    """The checkpoint ``latest`` points at, or (None, what is wrong with it)."""
    latest = root / LATEST
    try:
        latest.lstat()
    except OSError:
        return None, None
    try:  # never blocks: a FIFO or a device planted as `latest` is refused, not opened
        tag = read_small(latest, limit=4096).decode("utf-8").strip()
    except UnicodeDecodeError:
        return None, "is not text"
    except OSError as err:
        return None, f"cannot be read ({err.strerror or err})"
    if not _TAG.fullmatch(tag):  # also refuses "../x" and absolute paths
        return None, f"holds {tag[:60]!r}, not a checkpoint tag like step_00000300"
    folder = root / tag
    if not folder.is_dir() and not folder.is_symlink():
        return None, f"points at {tag}, which does not exist"
    reason = incomplete_reason(folder)
    if reason is not None:
        return None, f"points at {tag}, which is incomplete: {reason}"
    return folder, None


def find_resume(root: Path, resume: str | None,
                exclude: Collection[Path] = ()) -> Path | None:
    """The checkpoint to resume from, by its structure (marker, files, sizes; no hashes).

    Args:
        root: The run's checkpoints folder.
        resume: None or "none" (start fresh), "auto" (the checkpoint ``latest`` names, else
            the newest complete one with a warning saying why; fresh when there is none), or
            a path to a checkpoint folder.
        exclude: Checkpoints ``auto`` must pass over (found damaged by :func:`resume_point`).

    Raises:
        FileNotFoundError: A named checkpoint is missing or incomplete.
        CheckpointError: ``auto`` found checkpoint folders but none of them is complete.
    """
    if resume in (None, "none"):
        return None
    if resume == "auto":
        folder, problem = _read_latest(root)
        if folder is not None and folder not in exclude:
            return folder
        complete = complete_checkpoints(root, exclude)
        if problem is not None:
            instead = f"resuming from {complete[-1].name} instead" if complete else "ignoring it"
            log.warning("%s %s; %s", root / LATEST, problem, instead)
        if complete:
            return complete[-1]
        if exclude:
            raise CheckpointError(
                f"{root}: no complete checkpoint is intact "
                f"({', '.join(sorted(p.name for p in exclude))} failed their checks, see the "
                "warnings above). Restore a good copy there, or start again from step 0 "
                "with --resume none")
        partial = sorted(_own_folders(root)) if root.is_dir() else []
        if partial:
            raise CheckpointError(
                f"{root}: {len(partial)} checkpoint folder(s) but none is complete "
                f"({partial[-1].name}: {incomplete_reason(partial[-1])}); resume needs a "
                "complete one. Start again from step 0 with --resume none (the partial folders "
                "are removed by the next save), or restore a complete checkpoint there"
            )
        return None
    folder = Path(resume)
    reason = incomplete_reason(folder)
    if reason is not None:
        raise FileNotFoundError(
            f"--resume {resume}: not a complete lmforge checkpoint ({reason}); "
            f"use --resume auto to pick the newest complete one under {root}"
        )
    return folder


def saved_world_size(folder: Path) -> int:
    """The data-parallel world size a complete checkpoint was written with."""
    return int(json.loads((folder / COMPLETE).read_text())["world_size"])


def needs_universal(folder: Path, world_size: int, zero_stage: int) -> bool:
    """Whether resuming ``folder`` on ``world_size`` ranks goes through DeepSpeed's universal
    checkpoint: ZeRO 1-3 partition the optimizer state by rank, so a checkpoint written by
    another number of ranks cannot be loaded as it is (ZeRO 0 keeps it whole)."""
    return zero_stage >= 1 and saved_world_size(folder) != world_size


def universal_copy(folder: Path) -> Path:
    """``folder/universal``: the checkpoint in DeepSpeed's universal (world-size-free) form.

    Collective. Rank 0 converts it with ``deepspeed.checkpoint.ds_to_universal`` the first
    time, into a temporary folder renamed into place, so an interrupted conversion is redone
    and a finished one is reused by every later resume.
    """
    target = folder / UNIVERSAL
    if dist.get_rank() == 0 and not target.is_dir():
        from argparse import Namespace

        from deepspeed.checkpoint import ds_to_universal

        tmp = folder / (UNIVERSAL + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        # One worker: no process pool forked from a rank that holds a process group.
        args = Namespace(input_folder=str(folder), output_folder=str(tmp),
                         num_extract_workers=1, num_merge_workers=1, keep_temp_folder=False,
                         strict=True, inject_missing_state=True)
        with weights_only_loads():
            ds_to_universal.main(args)
        (folder / "latest_universal").unlink(missing_ok=True)  # points at the tmp name
        fsync_tree(tmp)  # what the rename vouches for is on disk first
        os.replace(tmp, target)
        fsync_dir(folder)
    dist.barrier()
    return target


def load_checkpoint(engine: Any, folder: Path, scheduler: bool = True,
                    rng: bool = True) -> dict[str, Any]:
    """Loads a checkpoint into the engine and this rank's RNG; returns the client state.

    An engine built with DeepSpeed's ``checkpoint.load_universal`` (a resume on another
    world size, see :func:`needs_universal`) loads the checkpoint's universal copy.
    ``scheduler``/``rng`` False (a warm start keeping only the optimizer) leave this run's
    LR scheduler and random streams as they are.
    """
    if engine.load_universal_checkpoint():
        load_dir, tag = folder, universal_copy(folder).name
    else:
        load_dir, tag = folder.parent, folder.name
    with weights_only_loads():
        _, client_state = engine.load_checkpoint(
            str(load_dir), tag=tag, load_optimizer_states=True,
            load_lr_scheduler_states=scheduler,
        )
    if client_state is None:
        raise RuntimeError(f"{folder}: DeepSpeed could not load this checkpoint")
    rng_file = folder / f"rank{dist.get_rank():05d}.pt"
    if rng and rng_file.exists():  # absent when resuming on more ranks than were saved
        set_rng_state(load_weights_only(rng_file))
    return client_state


# DeepSpeed's file holding the module weights, LR scheduler and client state (ZeRO 0-2),
# and rank 0's under ZeRO-3 (module weights partitioned: empty placeholders there).
MODEL_STATES = ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt")


def read_model_states(folder: Path) -> dict[str, Any]:
    """A checkpoint's model-states file (module weights in the training dtype,
    ``lr_scheduler``, and the client state: ``train_state``, ``loader``, ...), weights-only."""
    path = next((folder / name for name in MODEL_STATES if (folder / name).is_file()),
                folder / MODEL_STATES[0])
    with weights_only_loads():
        return torch.load(path, map_location="cpu")


def consolidated_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    """The full fp32 weights of a checkpoint, gathered from every ZeRO partition.

    Trainable weights come from ZeRO's fp32 master copies; frozen ones (``trainable``), which
    have none, from the module state (ZeRO 2-3 store them separately, ZeRO 1 only there).
    """
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    states = read_model_states(folder)
    module = states.get("module") or {}
    zero_files = list(folder.glob("*optim_states.pt"))
    if zero_files:
        with weights_only_loads():  # DeepSpeed's reader unpickles freely; a payload is refused
            state = get_fp32_state_dict_from_zero_checkpoint(str(folder.parent), tag=folder.name)
        # A tied copy (one Parameter under two names) must not come back in the training
        # dtype beside its fp32 source; ZeRO-3 leaves empty placeholders in the module state.
        tied = {name for pair in states.get("shared_params") or [] for name in pair}
        have = {module[k].untyped_storage().data_ptr() for k in state if k in module}
        for key, value in module.items():
            if (key not in state and key not in tied and value.numel()
                    and value.untyped_storage().data_ptr() not in have):
                state[key] = value
    else:  # ZeRO stage 0 keeps the module's own weights
        state = module
    return {k: v.float() for k, v in state.items()}
