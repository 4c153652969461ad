"""ShardReader: O(1) seeks in regular shards, the header walk otherwise, sample verdicts."""

from __future__ import annotations

import numpy as np
import pytest
import webdataset as wds

from lmforge.pipeline.contract.shard_tar import ShardError
from lmforge.pipeline.loader.shard import ShardReader

SEQ = 16


def write(path, doc_counts: list[int]) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """One shard whose sample ``i`` has ``doc_counts[i]`` documents."""
    rng = np.random.default_rng(0)
    written = []
    with wds.TarWriter(str(path), mtime=0) as sink:
        for i, docs in enumerate(doc_counts):
            key = f"web-train-000000-{i:08d}"
            tokens = rng.integers(4, 1000, SEQ + 1).astype(np.uint16)
            starts = np.arange(docs, dtype=np.int32) * (SEQ // docs)
            sink.write({"__key__": key, "tokens.npy": tokens, "doc_starts.npy": starts})
            written.append((key, tokens, starts))
    return written


def check_all(reader: ShardReader, written) -> None:
    for i, (key, tokens, starts) in enumerate(written):
        got_tokens, got_starts = reader.sample(i)
        assert reader.key(i) == key
        assert got_tokens.tolist() == tokens.tolist() and got_starts == starts.tolist()


def test_regular_shard_is_read_without_a_walk(tmp_path):
    written = write(tmp_path / "s.tar", [1, 3, 2, 4, 1])
    reader = ShardReader(str(tmp_path / "s.tar"), 5, SEQ, "uint16")
    assert reader._stride == 4 * 512 and reader._walked is None
    check_all(reader, written)
    assert reader._walked is None  # every sample was where the stride put it


def test_irregular_shard_falls_back_to_the_walk(tmp_path):
    # Sample 1's doc_starts.npy needs two tar blocks, shifting every later sample.
    seq = 120
    path = tmp_path / "t.tar"
    rng = np.random.default_rng(1)
    written = []
    with wds.TarWriter(str(path), mtime=0) as sink:
        for i in range(4):
            key = f"web-train-000000-{i:08d}"
            tokens = rng.integers(4, 1000, seq + 1).astype(np.uint16)
            starts = np.arange(1 if i != 1 else seq + 1, dtype=np.int32)  # 128 + 484 bytes
            sink.write({"__key__": key, "tokens.npy": tokens, "doc_starts.npy": starts})
            written.append((key, tokens, starts))
    reader = ShardReader(str(path), 4, seq, "uint16")
    check_all(reader, written)
    assert reader._walked is not None  # samples 2 and 3 were not at k × stride


def test_a_damaged_sample_is_bad_alone_and_a_truncated_shard_as_a_whole(tmp_path):
    written = write(tmp_path / "s.tar", [1, 2, 3, 1])
    original = (tmp_path / "s.tar").read_bytes()
    data = bytearray(original)
    data[2 * 2048 : 2 * 2048 + 100] = b"\0" * 100  # wipe sample 2's first header name
    (tmp_path / "s.tar").write_bytes(bytes(data))
    reader = ShardReader(str(tmp_path / "s.tar"), 4, SEQ, "uint16")
    check_all(reader, [w for i, w in enumerate(written) if i < 2])
    with pytest.raises(ShardError, match="sample 2 cannot be found"):
        reader.sample(2)
    assert reader.sample(3)[0].tolist() == written[3][1].tolist()
    (tmp_path / "s.tar").write_bytes(original[:5000])
    with pytest.raises(ShardError, match="truncated"):
        ShardReader(str(tmp_path / "s.tar"), 4, SEQ, "uint16")
