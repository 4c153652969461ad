"""`prepare` under faults: a full disk while shards are written, and damaged resume markers.

The full disk is a real one: a small tmpfs mounted for the test (`mount -t tmpfs`, which
needs root; the test fails, never skips, when it cannot mount). A re-prepare there runs out
of space writing shards: the error names the shard and the free space, and the previous
dataset stays complete and readable, because the new one is built beside it and swapped in
only when complete.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from lmforge.pipeline.config import DataConfig, DatasetSpec, TokenizerConfig
from lmforge.pipeline.contract.dataset_manifest import DatasetManifest
from lmforge.pipeline.loader.shard_loader import LoaderConfig, ShardLoader
from lmforge.pipeline.prepare.driver import prepare

CORPUS = Path(__file__).resolve().parents[3] / "configs" / "corpora" / "tinyshakespeare.txt"


def configs(corpus: Path, out: Path, **data_kwargs) -> tuple[DataConfig, TokenizerConfig]:
    data = DataConfig(datasets=[DatasetSpec(name="s", paths=[str(corpus)])], output_dir=str(out),
                      seq_len=64, val_fraction=0.05, read_chunk_bytes=16_000,
                      shard_target_bytes=8192, **data_kwargs)
    return data, TokenizerConfig(vocab_size=400, train_text_bytes=100_000)


def dataset_bytes(out: Path) -> dict[str, bytes]:
    """manifest.json, tokenizer and every shard it lists, by relative path."""
    manifest = DatasetManifest.read(out)
    files = {"manifest.json": (out / "manifest.json").read_bytes(),
             "tokenizer.model": (out / "tokenizer.model").read_bytes()}
    for dataset in manifest.datasets.values():
        for split in dataset.splits.values():
            for shard in split.shards:
                files[shard.path] = (out / shard.path).read_bytes()
    return files


def allocated(folder: Path) -> int:
    return sum(p.stat().st_blocks * 512 for p in folder.rglob("*") if p.is_file())


@pytest.fixture
def small_fs(tmp_path):
    """A 16 MiB tmpfs mounted at tmp_path/fs, unmounted afterwards."""
    mount = tmp_path / "fs"
    mount.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mount)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, (
        f"cannot mount a tmpfs at {mount} ({proc.stderr.strip()}): this test needs root "
        "(or CAP_SYS_ADMIN) to make a real full filesystem"
    )
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.mark.slow
def test_full_disk_while_writing_shards_keeps_the_previous_dataset(small_fs, tmp_path):
    corpus_a, corpus_b = tmp_path / "a.txt", tmp_path / "b.txt"
    text = CORPUS.read_bytes()
    corpus_a.write_bytes(text[:30_000])
    corpus_b.write_bytes(text[30_000:130_000])
    out = small_fs / "data"
    prepare(*configs(corpus_a, out), progress=False, executor="local")
    before = dataset_bytes(out)

    # How much B needs besides its shards, measured on a roomy disk; then leave about that
    # plus half of its shards free, so the re-prepare runs out of space writing shards.
    roomy = tmp_path / "roomy"
    data_b, tok = configs(corpus_b, roomy, keep_work=True)
    prepare(data_b, tok, progress=False, executor="local")
    shards_b = sum(p.stat().st_blocks * 512 for p in (roomy / "s").glob("*.tar"))
    work_b = allocated(roomy / "_work")
    free = shutil.disk_usage(small_fs).free
    filler_size = free - (work_b + shards_b // 2)
    assert filler_size > 0, (free, work_b, shards_b)
    with open(small_fs / "filler", "wb") as f:
        f.write(b"\0" * filler_size)

    with pytest.raises(ValueError) as err:
        prepare(*configs(corpus_b, out), progress=False, executor="local")
    message = str(err.value)
    assert "no space left on device" in message and "MiB free of 16.0 MiB" in message, message
    assert f"{out}/_work/" in message and ".tar" in message  # the shard being written
    assert dataset_bytes(out) == before  # the previous dataset is untouched...
    loader = ShardLoader(out, "train", 2, config=LoaderConfig(), infinite=False)
    assert sum(1 for _ in loader) > 0  # ...and readable
    assert not list(out.rglob("*.tar.tmp*"))  # the half-written shard is gone

    (small_fs / "filler").unlink()  # room again: the rerun finishes and swaps
    manifest = prepare(*configs(corpus_b, out), progress=False, executor="local")
    after = dataset_bytes(out)
    assert after == dataset_bytes(roomy) | {"manifest.json": after["manifest.json"]}
    assert DatasetManifest.read(manifest).fingerprint != json.loads(
        before["manifest.json"])["fingerprint"]
    assert not (out / "_work").exists()
    assert len(after) > len(before)  # B is the bigger corpus: more shards


def test_empty_or_truncated_markers_are_redone_with_a_warning(tmp_path, caplog):
    corpus = tmp_path / "c.txt"
    corpus.write_bytes(CORPUS.read_bytes()[:40_000])
    out = tmp_path / "out"
    data, tok = configs(corpus, out, keep_work=True)
    prepare(data, tok, progress=False, executor="local")
    reference = dataset_bytes(out)
    markers = sorted(out.glob("_work/*/done/*/*.json"))
    phases = {m.parent.name for m in markers}
    assert {"clean", "encode", "write"} <= phases, phases
    damaged = [next(m for m in markers if m.parent.name == p) for p in ("clean", "write")]
    damaged[0].write_bytes(b"")  # what a crash leaves without tmp + fsync + rename
    damaged[1].write_bytes(damaged[1].read_bytes()[:10])
    (out / "manifest.json").unlink()  # a rerun then goes through every marker
    with caplog.at_level(logging.WARNING, logger="lmforge.pipeline"):
        prepare(data, tok, progress=False, executor="local")
    for marker in damaged:
        assert f"ignoring the unreadable resume marker {marker}" in caplog.text
        json.loads(marker.read_text())  # redone and written whole
    after = dataset_bytes(out)
    assert {k: v for k, v in after.items() if k != "manifest.json"} == {
        k: v for k, v in reference.items() if k != "manifest.json"}


def test_markers_and_manifest_are_fsynced_and_renamed(tmp_path, monkeypatch):
    from lmforge.pipeline import durable

    synced: list[int] = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd))[1])
    durable.write_json(tmp_path / "done" / "x.json", {"a": 1})
    assert len(synced) == 2  # the file, then its folder (the rename)
    assert json.loads((tmp_path / "done" / "x.json").read_text()) == {"a": 1}
    assert not list((tmp_path / "done").glob("*.tmp*"))
