"""Hostile input against the readers' limits (issue 21, item 7): linear time for many bad
records, deep JSON, corrupt and oversize Parquet row groups."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lmforge.pipeline.config import DatasetSpec
from lmforge.pipeline.prepare import readers
from lmforge.pipeline.prepare.readers import (
    BadInputError,
    BadInputLog,
    read_json_records,
    read_piece,
)
from lmforge.pipeline.prepare.sources import ReadPiece, discover_files


def source(path: Path):
    return discover_files(DatasetSpec(name="d", paths=[str(path)]))[0]


def test_bad_records_of_a_piece_mid_file_read_the_prefix_once(tmp_path, monkeypatch):
    # Every report used to count the newlines before the piece from byte 0 again:
    # 2,000 bad lines after an 8 MiB prefix re-read 16 GB.
    good = (json.dumps({"text": "x" * 100}) + "\n").encode()
    prefix = good * (8 * 2**20 // len(good))
    path = tmp_path / "c.jsonl"
    path.write_bytes(prefix + b"{not json\n" * 2000 + good)
    opened = []
    real_open = readers.fsspec.open

    def counting_open(*args, **kwargs):
        opened.append(args[0])
        return real_open(*args, **kwargs)

    monkeypatch.setattr(readers.fsspec, "open", counting_open)
    log = BadInputLog()
    t0 = time.perf_counter()
    docs = list(read_piece(ReadPiece(source(path), len(prefix)), "line", "text", 1 << 20, log))
    seconds = time.perf_counter() - t0
    assert len(docs) == 1 and log.counts == {"malformed_json": 2000}
    first_line = prefix.count(b"\n") + 1
    assert [e["line"] for e in log.examples[:2]] == [first_line, first_line + 1]
    assert len(opened) <= 2  # the piece, and its prefix once for the line numbers
    assert seconds < 10, seconds


def test_deeply_nested_json_is_malformed_not_a_crash(tmp_path):
    deep = "[" * 200_000 + "]" * 200_000
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"text": "ok"}) + "\n" + deep + "\n"
                    + '{"text": ' + deep + "}\n" + json.dumps({"text": "fine"}) + "\n")
    log = BadInputLog()
    docs = list(read_piece(ReadPiece(source(path)), "line", "text", 1 << 20, log))
    assert [d.text for d in docs] == ["ok", "fine"]
    assert log.counts == {"malformed_json": 2}
    assert [e["line"] for e in log.examples] == [2, 3]
    assert "nested too deeply" in log.examples[0]["detail"]
    # Task records take the same road.
    task_log = BadInputLog()
    records = list(read_json_records(ReadPiece(source(path)), 1 << 20, task_log))
    assert [line for line, _ in records] == [1, 4] and task_log.counts == {"malformed_json": 2}
    with pytest.raises(BadInputError, match=r"d\.jsonl:2: malformed_json: nested too deeply"):
        list(read_piece(ReadPiece(source(path)), "line", "text", 1 << 20,
                        BadInputLog(strict=True)))


def corrupt_row_group(path: Path, group: int) -> None:
    """Overwrite the compressed pages of one row group's text column with garbage."""
    column = pq.ParquetFile(path).metadata.row_group(group).column(0)
    start = column.dictionary_page_offset or column.data_page_offset
    data = bytearray(path.read_bytes())
    data[start + 20 : start + column.total_compressed_size - 5] = b"Z" * (
        column.total_compressed_size - 25)
    path.write_bytes(bytes(data))


def test_a_corrupt_parquet_row_group_is_counted_and_the_others_are_read(tmp_path):
    path = tmp_path / "c.parquet"
    rows = [f"row {i} " * 20 for i in range(300)]
    pq.write_table(pa.table({"text": rows}), path, row_group_size=100, compression="zstd")
    corrupt_row_group(path, 1)
    log = BadInputLog()
    docs = list(read_piece(ReadPiece(source(path)), "line", "text", 1 << 20, log))
    assert [d.text for d in docs] == rows[:100] + rows[200:]
    assert [d.line for d in docs][99:101] == [100, 201]  # rows keep their file numbers
    assert log.counts == {"corrupt_parquet_row_group": 1}
    assert log.examples[0]["line"] == 101 and "row group 1" in log.examples[0]["detail"]
    with pytest.raises(BadInputError, match=r"c\.parquet:101: corrupt_parquet_row_group"):
        list(read_piece(ReadPiece(source(path)), "line", "text", 1 << 20,
                        BadInputLog(strict=True)))


# Reads the file in a fresh process and prints what it found and pyarrow's peak memory.
_PEAK = """
import json, sys
import pyarrow as pa
from lmforge.pipeline.config import DatasetSpec
from lmforge.pipeline.prepare.readers import BadInputLog, read_piece
from lmforge.pipeline.prepare.sources import ReadPiece, discover_files
f = discover_files(DatasetSpec(name="d", paths=[sys.argv[1]]))[0]
log = BadInputLog()
docs = [d.text for d in read_piece(ReadPiece(f), "line", "text", 2**20, log)]
print(json.dumps({"docs": docs, "counts": log.counts, "examples": log.examples,
                  "peak": pa.default_memory_pool().max_memory()}))
"""


def test_an_oversize_parquet_row_group_is_skipped_before_it_is_decoded(tmp_path):
    # 64 MiB of one repeated byte compresses to a few KiB; max_record_bytes is 1 MiB.
    path = tmp_path / "bomb.parquet"
    table = pa.table({"text": ["a" * (64 << 20), "small", "after"]})
    with pq.ParquetWriter(path, table.schema, compression="zstd") as writer:
        writer.write_table(table.slice(0, 1))
        writer.write_table(table.slice(1, 2))
    assert path.stat().st_size < 64 << 10
    result = subprocess.run([sys.executable, "-c", _PEAK, str(path)], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    found = json.loads(result.stdout)
    assert found["docs"] == ["small", "after"]
    assert found["counts"] == {"record_too_long": 1}
    assert found["examples"][0]["line"] == 1 and "row group 0" in found["examples"][0]["detail"]
    assert found["peak"] < 8 << 20, found["peak"]  # the 64 MiB value was never decoded
