"""What every kind of `prepare` shares: read-chunk sizing, the work folder, saying what is
happening, and publishing the finished dataset into the output folder."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from lmforge.pipeline.config import DataConfig
from lmforge.pipeline.contract.dataset_manifest import DatasetManifest, ManifestError
from lmforge.pipeline.durable import fsync_dir, write_atomic, write_json

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


# Written into every work folder lmforge creates: only folders carrying it are ever
# removed from `_work/` (a user's folder there is left alone).
WORK_MARKER = ".lmforge-work"
# The shards the manifest being replaced listed, recorded before it is removed: a publish
# that crashes after that still knows what it may delete when it runs again.
_REPLACED = "replaced-shards.json"
_WORK_NAME = re.compile(r"[0-9a-f]{16}-[0-9]+-w[0-9]+")
# The PID-unique temp names of `durable.write_atomic` and `shards.ShardWriter`.
_TEMP = re.compile(r"\.tmp[0-9]+$")


def work_folder(out: Path, fp: str, chunk: int) -> Path:
    """`<out>/_work/<fingerprint>-<chunk bytes>-w<WORK_LAYOUT>`, created with its marker;
    other work folders of earlier runs (named so and carrying `WORK_MARKER`) are removed.

    Chunking never changes the output, but chunk numbering does: the work is keyed by both.
    """
    work_root, work_name = out / "_work", f"{fp[:16]}-{chunk}-w{WORK_LAYOUT}"
    for stale in work_root.glob("*"):
        if (stale.name != work_name and _WORK_NAME.fullmatch(stale.name) and not
                stale.is_symlink() and (stale / WORK_MARKER).is_file()):
            shutil.rmtree(stale, ignore_errors=True)
    work = work_root / work_name
    work.mkdir(parents=True, exist_ok=True)
    if not (work / WORK_MARKER).is_file():
        write_atomic(work / WORK_MARKER, "made by lmforge prepare; removed with its work\n")
    return work


def remove_work(space: Workspace) -> None:
    """After a successful run: remove this run's work folder, and `_work/` if now empty."""
    shutil.rmtree(space.work, ignore_errors=True)
    with contextlib.suppress(OSError):  # something else is in it: leave it
        space.work.parent.rmdir()


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


def publish(staging: Path, out: Path, written: set[str]) -> Path:
    """Move the complete new dataset from `staging` into `out`, its manifest last.

    Until now a previous dataset in `out` was untouched. The shards its manifest lists are
    recorded in the work folder, then that manifest goes (so no manifest ever lists shards
    of the other dataset), every staged file is renamed into place (same filesystem), the
    recorded shards the new dataset does not have are removed — nothing else in `out` is —,
    and the new manifest lands last. A crash in between leaves `out` without a manifest and
    the rest of the new dataset staged: the next `prepare` rewrites only the shards that had
    been moved, then publishes again with the same record.

    Args:
        staging: The complete new dataset folder (inside the run's work folder).
        out: The output folder.
        written: Paths (relative to `out`) of the shards the new dataset has.
    """
    target = DatasetManifest.path_in(out)
    record = staging.parent / _REPLACED
    replaced = _replaced_shards(target, record)
    target.unlink(missing_ok=True)
    fsync_dir(out)
    folders = {out}
    for path in sorted(staging.rglob("*")):
        if path.is_file() and _TEMP.search(path.name):  # a writer killed mid-file
            path.unlink()
        elif path.is_file() and path.name != target.name:
            dest = out / path.relative_to(staging)
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.replace(path, dest)
            folders.add(dest.parent)
    for folder in folders:
        fsync_dir(folder)
    _remove_replaced_shards(out, replaced - written)
    os.replace(DatasetManifest.path_in(staging), target)
    fsync_dir(out)
    record.unlink(missing_ok=True)
    return target


def _replaced_shards(target: Path, record: Path) -> set[str]:
    """The shards of the manifest being replaced (and of one an interrupted publish already
    removed, from `record`), recorded durably in `record` before the manifest goes."""
    listed: set[str] = set()
    if record.is_file():
        with contextlib.suppress(OSError, ValueError):
            listed |= {p for p in json.loads(record.read_text()) if isinstance(p, str)}
    if target.is_file():
        try:
            manifest = DatasetManifest.read(target)
        except ManifestError as err:
            log.warning("%s; its shards are left in place (not known to be lmforge's)", err)
        else:
            listed |= {shard.path for dataset in manifest.datasets.values()
                       for split in dataset.splits.values() for shard in split.shards}
        write_json(record, sorted(listed))
    return listed


def _remove_replaced_shards(out: Path, paths: set[str]) -> None:
    """Delete the replaced dataset's shards the new one does not have: only `.tar` files
    inside `out` (a hand-edited manifest cannot point the deletion anywhere else)."""
    root = out.resolve()
    folders = set()
    for rel in sorted(paths):
        path = out / rel
        if (not rel.endswith(".tar") or path.is_symlink() or not path.is_file()
                or not path.resolve().is_relative_to(root)):
            continue
        path.unlink()
        folders.add(path.parent)
    for folder in folders:
        fsync_dir(folder)
