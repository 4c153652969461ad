"""Window packing and reproducible WebDataset tar writing."""

from __future__ import annotations

import hashlib
import tarfile
from pathlib import Path

import numpy as np
import webdataset as wds

from lmforge.pipeline.contract.shard_format import samples_per_shard
from lmforge.pipeline.prepare.shards import member_header, npy_bytes, pack_windows, write_shard


def test_pack_windows_cuts_pads_and_finds_doc_starts() -> None:
    tokens = np.arange(1, 12, dtype=np.uint16)  # stream positions 10..20
    doc_starts = np.array([0, 7, 12, 13, 19, 40])
    samples, starts = pack_windows(tokens, doc_starts, first_position=10, window=5, pad_id=0)
    assert samples.tolist() == [[1, 2, 3, 4, 5], [6, 7, 8, 9, 10], [11, 0, 0, 0, 0]]
    assert [s.tolist() for s in starts] == [[0, 2, 3], [0, 4], [0]]
    assert all(s.dtype == np.int32 for s in starts)


def test_npy_bytes_match_numpy_save(tmp_path: Path) -> None:
    for array in (np.arange(7, dtype=np.uint16), np.array([0, 3], np.int32),
                  np.zeros(0, np.int32)):
        np.save(tmp_path / "a.npy", array)
        assert npy_bytes(array) == (tmp_path / "a.npy").read_bytes()


def test_member_headers_are_what_tarfile_writes() -> None:
    names = ["a", "shakespeare-train-000001-00000042.tokens.npy", "x" * 99, "x" * 100,
             "y" * 300, "données-train-000000-00000000.tokens.npy", ""]
    for name in names:
        for size in (0, 1, 2178, 4096, 8**11 - 1):
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = size, 0, 0o444
            info.uname = info.gname = ""
            expected = info.tobuf(tarfile.GNU_FORMAT, "utf-8", "strict")
            assert member_header(name, size) == expected, (name, size)


def test_shard_is_reproducible_and_readable_by_webdataset(tmp_path: Path) -> None:
    samples = np.arange(3 * 9, dtype=np.uint16).reshape(3, 9)
    starts = [np.array([0], np.int32), np.array([0, 4], np.int32), np.array([0, 1, 2], np.int32)]
    keys = [f"ds-train-000000-{i:08d}" for i in range(3)]
    a = write_shard(tmp_path / "a" / "train-000000.tar", keys, samples, starts, 27, tmp_path)
    b = write_shard(tmp_path / "b" / "train-000000.tar", keys, samples, starts, 27, tmp_path)
    data = (tmp_path / a.path).read_bytes()
    assert data == (tmp_path / b.path).read_bytes()
    assert a.sha256 == hashlib.sha256(data).hexdigest() and a.bytes == len(data)
    assert (a.samples, a.tokens, a.path) == (3, 27, "a/train-000000.tar")
    read = list(wds.WebDataset([str(tmp_path / a.path)], shardshuffle=False).decode())
    assert [r["__key__"] for r in read] == keys
    for r, tokens, offsets in zip(read, samples, starts, strict=True):
        assert np.array_equal(r["tokens.npy"], tokens) and r["tokens.npy"].dtype == np.uint16
        assert np.array_equal(r["doc_starts.npy"], offsets)
    assert not list(tmp_path.rglob("*.tmp*"))


def test_samples_per_shard_hits_the_target_size() -> None:
    per_shard = samples_per_shard(256 * 2**20, 1024, 2)
    assert 256 * 2**20 / 4096 - 1 <= per_shard <= 256 * 2**20 / 4096
    assert samples_per_shard(10, 1024, 2) == 1


def test_shard_planner_is_order_independent_and_covers_every_window() -> None:
    from lmforge.pipeline.config import DataConfig, DatasetSpec
    from lmforge.pipeline.prepare.manifest_writer import ShardPlanner

    data = DataConfig(datasets=[DatasetSpec(name="a", paths=["x"]),
                                DatasetSpec(name="b", paths=["y"])],
                      seq_len=9, shard_target_bytes=3 * 2048)  # 3 windows of 10 per shard
    from lmforge.pipeline.prepare.results import EncodeResult, SplitTokens

    chunk_datasets = ["a", "a", "a", "b", "b"]
    tokens = [(37, 5), (0, 0), (51, 9), (8, 0), (15, 4)]
    results = [EncodeResult(i, {"train": SplitTokens(1, t), "val": SplitTokens(1, v)}, [])
               for i, (t, v) in enumerate(tokens)]

    def plan(order: list[int]) -> list[tuple]:
        planner = ShardPlanner(data, 2, chunk_datasets)
        for i in order:
            planner.add(results[i])
        planner.check_complete()
        return sorted((p.dataset, p.split, p.index, p.first_window, p.n_windows, tuple(p.chunks))
                      for p in planner.plans)

    in_order = plan([0, 1, 2, 3, 4])
    assert plan([4, 2, 0, 3, 1]) == in_order
    windows = {}
    for dataset, split, _, first, count, _ in in_order:
        windows.setdefault((dataset, split), []).append((first, count))
    assert windows[("a", "train")] == [(0, 3), (3, 3), (6, 3)]  # 88 tokens: 9 windows
    assert windows[("a", "val")] == [(0, 2)]  # 14 tokens
    assert windows[("b", "train")] == [(0, 3)]  # 23 tokens
    assert windows[("b", "val")] == [(0, 1)]
    assert ("a", "train", 1, 3, 3, ((0, 0), (2, 37))) in in_order  # tokens 30..59
