"""The dataset folder is the user's (issue 21, items 4-6): a re-prepare removes only what the
manifest it replaces listed, two prepares on one folder are refused naming the holder, and
every file the manifest vouches for was fsynced first."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from lmforge.pipeline.config import DataConfig, DatasetSpec, TokenizerConfig
from lmforge.pipeline.contract.dataset_manifest import DatasetManifest
from lmforge.pipeline.folder_lock import LOCK_FILE, FolderLocked
from lmforge.pipeline.prepare.driver import prepare
from lmforge.pipeline.prepare.publish import WORK_MARKER

CORPUS = Path(__file__).resolve().parents[3] / "configs" / "corpora" / "tinyshakespeare.txt"


def configs(tmp_path: Path, out: Path, shard_bytes: int) -> tuple[DataConfig, TokenizerConfig]:
    corpus = tmp_path / "corpus.txt"
    if not corpus.exists():
        corpus.write_text(CORPUS.read_text()[:60_000])
    data = DataConfig(datasets=[DatasetSpec(name="books", paths=[str(corpus)])],
                      output_dir=str(out), seq_len=32, val_fraction=0.1,
                      shard_target_bytes=shard_bytes)
    return data, TokenizerConfig(vocab_size=400, train_text_bytes=50_000)


def listed_shards(out: Path) -> set[str]:
    manifest = DatasetManifest.read(out)
    return {s.path for d in manifest.datasets.values() for split in d.splits.values()
            for s in split.shards}


def test_a_re_prepare_removes_only_what_the_replaced_manifest_listed(tmp_path):
    out = tmp_path / "data"
    prepare(*configs(tmp_path, out, 40_000), progress=False, executor="local")
    first = listed_shards(out)
    assert len(first) > 4
    # The user's files beside the dataset, and a killed earlier run's work folder.
    (out / "notes.txt").write_text("mine")
    (out / "books" / "my-extra.tar").write_bytes(b"not a shard of lmforge's")
    (out / "elsewhere").mkdir()
    (out / "elsewhere" / "train-000000.tar").write_bytes(b"mine too")
    scratch = out / "_work" / "user-scratch"
    scratch.mkdir(parents=True)
    (scratch / "keep.txt").write_text("mine")
    look_alike = out / "_work" / "0123456789abcdef-4096-w2"  # lmforge's name, no marker
    look_alike.mkdir()
    stale = out / "_work" / "fedcba9876543210-4096-w2"  # a killed run's, with the marker
    (stale / "done").mkdir(parents=True)
    (stale / WORK_MARKER).write_text("")

    prepare(*configs(tmp_path, out, 400_000), progress=False, executor="local")
    second = listed_shards(out)
    assert len(second) < len(first)
    on_disk = {str(p.relative_to(out)) for p in (out / "books").glob("*.tar")}
    assert on_disk == second | {"books/my-extra.tar"}  # the replaced shards are gone
    assert (out / "notes.txt").read_text() == "mine"
    assert (out / "elsewhere" / "train-000000.tar").read_bytes() == b"mine too"
    assert (scratch / "keep.txt").read_text() == "mine"
    assert look_alike.is_dir() and not stale.exists()
    assert sorted(p.name for p in (out / "_work").iterdir()) == [look_alike.name, scratch.name]


_HOLD = """
import sys, time
from lmforge.pipeline.folder_lock import folder_lock
with folder_lock(sys.argv[1], sys.argv[2], shared=sys.argv[3] == "shared"):
    print("held", flush=True)
    sys.stdin.readline()
"""


@pytest.mark.parametrize("mode", ["exclusive", "shared"])
def test_prepare_refuses_a_dataset_folder_another_process_holds(tmp_path, mode):
    # Another prepare (exclusive) or a training job reading the data (shared).
    out = tmp_path / "data"
    purpose = "lmforge prepare" if mode == "exclusive" else "lmforge train (reads the data)"
    holder = subprocess.Popen([sys.executable, "-c", _HOLD, str(out), purpose, mode],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        with pytest.raises(FolderLocked, match=rf"pid={holder.pid} .*purpose={re.escape(purpose)}.*"
                                               r"lmforge prepare cannot take it"):
            prepare(*configs(tmp_path, out, 40_000), progress=False, executor="local")
        assert not DatasetManifest.path_in(out).exists() and not (out / "_work").exists()
    finally:
        holder.communicate("done\n", timeout=30)
    assert holder.returncode == 0
    prepare(*configs(tmp_path, out, 40_000), progress=False, executor="local")
    assert f"pid={os.getpid()} " in (out / LOCK_FILE).read_text()  # prepare held it


@pytest.fixture
def synced(monkeypatch) -> set[tuple[int, int]]:
    """The (device, inode) of every file or folder fsynced while the test runs (the real
    fsync still runs)."""
    inodes: set[tuple[int, int]] = set()
    real_fsync = os.fsync

    def recording_fsync(fd: int) -> None:
        st = os.fstat(fd)
        inodes.add((st.st_dev, st.st_ino))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    return inodes


def test_every_file_the_manifest_vouches_for_was_fsynced(tmp_path, synced):
    # A power cut after the fsynced manifest must not leave a zero-filled tokenizer.model
    # or shard behind it: every published file and folder was fsynced (by inode: renames
    # keep it), the trained tokenizer before its sha256 was taken.
    out = tmp_path / "data"
    prepare(*configs(tmp_path, out, 40_000), progress=False, executor="local")
    published = [p for p in out.rglob("*") if p.name != LOCK_FILE]
    assert {p.name for p in published} >= {"manifest.json", "tokenizer.model", "stats.json"}
    assert any(p.suffix == ".png" for p in published)
    not_synced = [str(p.relative_to(out)) for p in [out, *published]
                  if (p.stat().st_dev, p.stat().st_ino) not in synced]
    assert not_synced == []


def test_a_trained_tokenizer_is_fsynced_before_its_sha256_is_taken(tmp_path, synced):
    from lmforge.pipeline.prepare import tokenizer as tokenizer_module

    text = tmp_path / "text.txt"
    text.write_text(CORPUS.read_text()[:50_000])
    (tmp_path / "tok").mkdir()
    model = tokenizer_module.train_tokenizer(text, TokenizerConfig(vocab_size=400),
                                             tmp_path / "tok" / "tokenizer.model")
    for path in (model, model.parent):
        assert (path.stat().st_dev, path.stat().st_ino) in synced, path


def manifest_listing(*paths: str) -> dict:
    shards = [{"path": p, "samples": 1, "tokens": 1, "bytes": 1, "sha256": "ab" * 32}
              for p in paths]
    return {
        "version": 1, "seq_len": 8, "token_dtype": "uint16",
        "tokenizer": {"file": "tokenizer.model", "sha256": "cd" * 32, "vocab_size": 300,
                      "type": "bpe", "pad_id": 0, "unk_id": 1, "bos_id": 2, "eos_id": 3,
                      "special_tokens": {}, "byte_fallback": True},
        "datasets": {"books": {"weight": 1, "sources": [], "splits": {"train": {
            "samples": len(paths), "tokens": len(paths), "padding_tokens": 0,
            "shards": shards}}}},
        "fingerprint": "f", "stats": {},
    }


def test_a_publish_interrupted_after_the_old_manifest_went_still_knows_its_shards(tmp_path):
    from lmforge.pipeline.prepare.publish import publish

    out = tmp_path / "data"
    (out / "books").mkdir(parents=True)
    for name in ("train-000000.tar", "train-000001.tar", "mine.tar"):
        (out / "books" / name).write_bytes(b"old")
    DatasetManifest.from_dict(manifest_listing(
        "books/train-000000.tar", "books/train-000001.tar", "../outside.tar")).write(out)
    (tmp_path / "outside.tar").write_bytes(b"not in the dataset folder")
    staging = out / "_work" / "run" / "dataset"
    (staging / "books").mkdir(parents=True)
    (staging / "books" / "train-000000.tar").write_bytes(b"new")
    (staging / "stats.json").write_text("{}")
    DatasetManifest.from_dict(manifest_listing("books/train-000000.tar")).write(staging)
    (out / "stats.json").mkdir()  # the move fails after the old manifest is gone
    with pytest.raises(OSError):
        publish(staging, out, {"books/train-000000.tar"})
    assert not DatasetManifest.path_in(out).exists()
    (out / "stats.json").rmdir()
    publish(staging, out, {"books/train-000000.tar"})  # the rerun's publish
    assert sorted(p.name for p in (out / "books").iterdir()) == ["mine.tar", "train-000000.tar"]
    assert (out / "books" / "train-000000.tar").read_bytes() == b"new"
    assert (tmp_path / "outside.tar").exists()
    assert listed_shards(out) == {"books/train-000000.tar"}
