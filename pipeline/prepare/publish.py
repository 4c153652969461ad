"""What every kind of `prepare` shares: read-chunk sizing, the work folder, saying what is
happening, and publishing the finished dataset into the output folder."""

from __future__ import annotations

import logging
import math
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from lmforge.pipeline.config import DataConfig
from lmforge.pipeline.contract.dataset_manifest import DatasetManifest
from lmforge.pipeline.durable import fsync_dir

log = logging.getLogger("lmforge.pipeline.prepare.driver")
# The layout of the files and markers under the work folder: a rerun by a version with
# another layout starts that work afresh instead of misreading it (2: read chunks).
WORK_LAYOUT = 2


def say(message: str, progress: bool) -> None:
    """Log `message`, and print it to stderr when showing progress."""
    log.info(message)
    if progress:
        print(f"prepare: {message}", file=sys.stderr, flush=True)


def read_chunk_bytes(configured: int, total_bytes: int, workers: int) -> int:
    """Bytes per read chunk: the configured size, smaller if that would leave fewer than
    ~4 chunks per worker (for balance), but not below 1 MiB unless configured lower."""
    balanced = math.ceil(total_bytes / (4 * workers)) if total_bytes else configured
    return max(min(configured, balanced), min(configured, 2**20))


def work_folder(out: Path, fp: str, chunk: int) -> Path:
    """`<out>/_work/<fingerprint>-<chunk bytes>-w<WORK_LAYOUT>`, other (stale) work folders
    removed.

    Chunking never changes the output, but chunk numbering does: the work is keyed by both.
    """
    work_root, work_name = out / "_work", f"{fp[:16]}-{chunk}-w{WORK_LAYOUT}"
    for stale in work_root.glob("*"):
        if stale.name != work_name:
            shutil.rmtree(stale, ignore_errors=True)
    return work_root / work_name


@dataclass(frozen=True)
class Workspace:
    """Where one prepare run works: its output folder, work folder and staged dataset."""

    out: Path  # data.output_dir, where the finished dataset is published
    work: Path  # the work folder (`work_folder`)
    staging: Path  # the new dataset, until `publish`
    chunk_bytes: int  # input bytes per read chunk (`read_chunk_bytes`)
    input_bytes: int  # all input files together

    @classmethod
    def of(cls, data: DataConfig, sizes: list[int], fp: str, workers: int) -> Workspace:
        """The workspace of a run over input files of `sizes` bytes on `workers` workers."""
        out, input_bytes = Path(data.output_dir), sum(sizes)
        chunk = read_chunk_bytes(data.read_chunk_bytes, input_bytes, workers)
        work = work_folder(out, fp, chunk)
        return cls(out, work, work / "dataset", chunk, input_bytes)


def publish(staging: Path, out: Path, shard_folders: list[str], written: set[str]) -> Path:
    """Move the complete new dataset from `staging` into `out`, its manifest last.

    Until now a previous dataset in `out` was untouched. Its manifest goes first (so no
    manifest ever lists shards of the other dataset), then every staged file is renamed into
    place (same filesystem), stale shards are removed, and the new manifest lands last. A
    crash in between leaves `out` without a manifest and the rest of the new dataset staged:
    the next `prepare` rewrites only the shards that had been moved, then publishes again.

    Args:
        staging: The complete new dataset folder.
        out: The output folder.
        shard_folders: The dataset folders (relative to `out`) whose shards are checked.
        written: Paths (relative to `out`) of the shards the new dataset has.
    """
    target = DatasetManifest.path_in(out)
    target.unlink(missing_ok=True)
    fsync_dir(out)
    folders = {out}
    for path in sorted(staging.rglob("*")):
        if path.is_file() and path.name != target.name:
            dest = out / path.relative_to(staging)
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.replace(path, dest)
            folders.add(dest.parent)
    for folder in folders:
        fsync_dir(folder)
    _remove_stale_shards(out, shard_folders, written)
    os.replace(DatasetManifest.path_in(staging), target)
    fsync_dir(out)
    return target


def _remove_stale_shards(out: Path, shard_folders: list[str], written: set[str]) -> None:
    """Delete shards of an earlier, different run, and temp files of a killed one."""
    for name in shard_folders:
        for path in (out / name).glob("*.tar*"):
            if str(path.relative_to(out)) not in written:
                path.unlink()
