"""The shard tar walker against hostile headers (issue 21, item 7): a negative member size
or a zero-length pax record is a `ShardError` naming the shard and the offset, never an
endless loop."""

from __future__ import annotations

import tarfile
import threading
from itertools import islice

import numpy as np
import pytest
import webdataset as wds

from lmforge.pipeline.contract.shard_tar import ShardError, walk_tar
from lmforge.pipeline.loader.shard import ShardReader

SEQ = 16


def shard_bytes(path) -> bytes:
    with wds.TarWriter(str(path), mtime=0) as sink:
        for i in range(3):
            sink.write({"__key__": f"web-train-000000-{i:08d}",
                        "tokens.npy": np.arange(SEQ + 1, dtype=np.uint16),
                        "doc_starts.npy": np.zeros(1, dtype=np.int32)})
    return path.read_bytes()


def walk_in_time(buf: bytes, url: str, seconds: float = 20) -> list:
    """Walk ``buf`` in a daemon thread; fail (instead of hanging) if it does not end."""
    outcome: dict = {}

    def run() -> None:
        try:
            outcome["members"] = list(islice(walk_tar(buf, url), 10_000))
        except BaseException as err:  # noqa: BLE001 - handed to the test thread
            outcome["error"] = err

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), "walk_tar did not end"
    if "error" in outcome:
        raise outcome["error"]
    assert len(outcome["members"]) < 10_000, "walk_tar kept yielding the same member"
    return outcome["members"]


def test_a_negative_member_size_is_a_shard_error_naming_the_offset(tmp_path):
    data = bytearray(shard_bytes(tmp_path / "s.tar"))
    header = 2 * 512  # the second member's header (the first member takes 2 blocks)
    data[header + 124 : header + 136] = b"-0000001000\0"
    (tmp_path / "s.tar").write_bytes(bytes(data))
    with pytest.raises(ShardError, match=rf"s\.tar: corrupt tar header at byte {header}"):
        walk_in_time(bytes(data), str(tmp_path / "s.tar"))
    with pytest.raises(ShardError, match=r"s\.tar.*byte 1024"):
        ShardReader(str(tmp_path / "s.tar"), 3, SEQ, "uint16").sample(2)


def pax_header(payload: bytes) -> bytes:
    info = tarfile.TarInfo("PaxHeader")
    info.type, info.size = tarfile.XHDTYPE, len(payload)
    block = info.tobuf(tarfile.GNU_FORMAT)
    return block + payload + b"\0" * (-len(payload) % 512)


@pytest.mark.parametrize(("payload", "where"), [
    (b"0 path=x\n", "pax header at byte 0"),  # a zero length never advanced: endless loop
    (b"3 path=x\n", "pax header at byte 0"),
    (b"99 size=1\n", "pax header at byte 0"),
    (b"xx size=1\n", "pax header at byte 0"),
    (b"13 size=-512\n", "tar header at byte 1024"),  # the member the pax size applies to
])
def test_a_bad_pax_record_is_a_shard_error(tmp_path, payload, where):
    shard = shard_bytes(tmp_path / "s.tar")
    buf = pax_header(payload) + shard
    with pytest.raises(ShardError, match=rf"bad\.tar: corrupt {where}"):
        walk_in_time(buf, str(tmp_path / "bad.tar"))


def test_good_pax_records_still_name_members(tmp_path):
    shard = shard_bytes(tmp_path / "s.tar")
    record = b"path=web-train-000000-00000000.renamed.npy\n"
    line = f"{len(record) + 3} ".encode() + record
    assert len(line) == int(line.split(b" ")[0])
    members = walk_in_time(pax_header(line) + shard, "ok.tar")
    assert members[0][0] == b"web-train-000000-00000000.renamed.npy"
    assert len(members) == 6
