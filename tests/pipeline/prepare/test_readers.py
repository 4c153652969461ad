"""Readers and read planning: formats, compression, splitting, and bad input reporting."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lmforge.pipeline.config import DatasetSpec
from lmforge.pipeline.prepare.readers import BadInputError, BadInputLog, read_piece
from lmforge.pipeline.prepare.sources import ReadPiece, discover_files, plan_read_chunks, split_file

CORPUS = Path(__file__).resolve().parents[3] / "configs" / "corpora" / "tinyshakespeare.txt"


def read_all(path: Path, unit: str = "paragraph", max_bytes: int = 1 << 20,
             strict: bool = False, chunk: int = 1 << 30, **spec_kw) -> tuple[list, BadInputLog]:
    spec = DatasetSpec(name="d", paths=[str(path)], txt_unit=unit, **spec_kw)
    files = discover_files(spec)
    log = BadInputLog(strict=strict)
    docs = []
    for read_chunk in plan_read_chunks([spec], chunk, files):
        for piece in read_chunk.pieces:
            docs.extend(read_piece(piece, unit, spec.text_field, max_bytes, log))
    return docs, log


def test_split_reads_give_the_same_documents_as_one_read(tmp_path: Path) -> None:
    path = tmp_path / "c.txt"
    path.write_bytes(CORPUS.read_bytes()[:60_000])
    for unit in ("paragraph", "line"):
        whole, _ = read_all(path, unit)
        split, _ = read_all(path, unit, chunk=4096)
        assert len(split_file(discover_files(DatasetSpec(name="d", paths=[str(path)]))[0],
                              4096, unit)) > 10
        assert [d.text for d in split] == [d.text for d in whole]
        # Line numbers are file lines even for pieces that start mid-file.
        lines = path.read_text().split("\n")
        for doc in split[-3:]:
            log = BadInputLog()
            log.report("x", ReadPiece(discover_files(DatasetSpec(name="d", paths=[str(path)]))[0],
                                      doc.offset), doc.line)
            assert lines[log.examples[0]["line"] - 1] == doc.text.split("\n")[0]


def test_formats_and_compression(tmp_path: Path) -> None:
    (tmp_path / "a.txt.gz").write_bytes(gzip.compress(b"one\n\ntwo\nlines\n"))
    rows = [{"text": "j1"}, {"text": "j2", "meta": 1}]
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    pq.write_table(pa.table({"body": ["p1", "p2", "p3"]}), tmp_path / "c.parquet",
                   row_group_size=2)
    assert [d.text for d in read_all(tmp_path / "a.txt.gz")[0]] == ["one", "two\nlines"]
    assert [d.text for d in read_all(tmp_path / "b.jsonl")[0]] == ["j1", "j2"]
    docs, _ = read_all(tmp_path / "c.parquet", text_field="body")
    assert [(d.text, d.line) for d in docs] == [("p1", 1), ("p2", 2), ("p3", 3)]
    spec = DatasetSpec(name="d", paths=[str(tmp_path / "*")])
    assert [(f.format, f.compression) for f in discover_files(spec)] == [
        ("txt", "gz"), ("jsonl", None), ("parquet", None)]


def test_bad_input_is_counted_with_file_and_line(tmp_path: Path) -> None:
    (tmp_path / "utf8.txt").write_bytes(b"good\n\nbad \xff byte\n\nfine\n")
    (tmp_path / "bin.txt").write_bytes(b"\x00\x01\x02binary" * 100)
    (tmp_path / "empty.txt").write_bytes(b"")
    paragraphs = [f"paragraph {i} {i * 7919 % 10007} {i ** 3}" for i in range(3000)]
    good = gzip.compress("\n\n".join(paragraphs).encode())
    (tmp_path / "cut.txt.gz").write_bytes(good[: len(good) // 2])
    (tmp_path / "j.jsonl").write_text('{"text": "ok"}\n{broken\n{"title": "no text"}\n'
                                      '{"text": 5}\n')
    (tmp_path / "long.txt").write_bytes(b"short\n" + b"y" * 50_000 + b"\nafter\n")
    counts = {}
    for name, unit in [("utf8.txt", "paragraph"), ("bin.txt", "paragraph"),
                       ("empty.txt", "line"), ("cut.txt.gz", "paragraph"),
                       ("j.jsonl", "line"), ("long.txt", "line")]:
        docs, log = read_all(tmp_path / name, unit, max_bytes=10_000)
        counts[name] = ([d.text for d in docs], log.counts,
                        [(e["file"].rsplit("/", 1)[-1], e["line"]) for e in log.examples])
    assert counts["utf8.txt"] == (["good", "fine"], {"invalid_utf8": 1}, [("utf8.txt", 3)])
    assert counts["bin.txt"] == ([], {"binary_file": 1}, [("bin.txt", 0)])
    assert counts["empty.txt"] == ([], {}, [])  # no read chunk at all; prepare reports it
    salvaged = counts["cut.txt.gz"][0]  # complete paragraphs before the cut, none after
    assert 100 < len(salvaged) < 3000 and salvaged == paragraphs[: len(salvaged)]
    assert counts["cut.txt.gz"][1] == {"truncated_or_corrupt_file": 1}
    assert counts["j.jsonl"] == (
        ["ok"],
        {"malformed_json": 1, "missing_text_field": 1, "text_not_a_string": 1},
        [("j.jsonl", 2), ("j.jsonl", 3), ("j.jsonl", 4)],
    )
    assert counts["long.txt"] == (["short", "after"], {"record_too_long": 1}, [("long.txt", 2)])


def test_a_100_mb_line_is_skipped_without_holding_it(tmp_path: Path) -> None:
    path = tmp_path / "huge.jsonl"
    with open(path, "wb") as f:
        f.write(b'{"text": "before"}\n{"text": "')
        block = b"z" * (1 << 20)
        for _ in range(100):
            f.write(block)
        f.write(b'"}\n{"text": "after"}\n')
    docs, log = read_all(path, "line", max_bytes=8 << 20)
    assert [d.text for d in docs] == ["before", "after"]
    assert log.counts == {"record_too_long": 1}
    assert log.examples[0]["line"] == 2


def test_strict_mode_stops_at_the_first_bad_record(tmp_path: Path) -> None:
    path = tmp_path / "j.jsonl"
    path.write_text('{"text": "ok"}\n{"text": "ok2"}\nnot json\n')
    with pytest.raises(BadInputError, match=r"j\.jsonl:3: malformed_json.*data\.strict=false"):
        read_all(path, "line", strict=True)


def test_missing_path_names_the_pattern(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"^paths: no files match '.*nothing/\*\.txt'"):
        discover_files(DatasetSpec(name="d", paths=[str(tmp_path / "nothing" / "*.txt")]))
    (tmp_path / "x.bin").write_text("?")
    with pytest.raises(ValueError, match="^format: cannot tell"):
        discover_files(DatasetSpec(name="d", paths=[str(tmp_path / "x.bin")]))


def test_uneven_files_make_balanced_read_chunks(tmp_path: Path) -> None:
    sizes = [5_000, 300, 120_000, 800, 900, 40_000, 100]
    text = CORPUS.read_bytes()
    for i, size in enumerate(sizes):
        (tmp_path / f"f{i}.txt").write_bytes(text[:size])
    spec = DatasetSpec(name="d", paths=[str(tmp_path / "*.txt")], txt_unit="line")
    chunks = plan_read_chunks([spec], 16_000, discover_files(spec))
    assert sum(c.bytes for c in chunks) == sum(sizes)
    assert all(c.bytes <= 2 * 16_000 for c in chunks)  # big files are split ...
    assert len(chunks) <= sum(sizes) // 16_000 + 2  # ... and small files grouped
    order = [(p.file.url, p.start) for c in chunks for p in c.pieces]
    assert order == sorted(order)  # document order is file order, then offset


def test_fsspec_urls_are_read(tmp_path: Path) -> None:
    import fsspec

    fs = fsspec.filesystem("memory")
    fs.pipe("/corpus/a.jsonl", b'{"text": "from memory"}\n')
    fs.pipe("/corpus/b.txt", b"para one\n\npara two\n")
    spec = DatasetSpec(name="d", paths=["memory://corpus/*"])
    files = discover_files(spec)
    assert [f.url for f in files] == ["memory:///corpus/a.jsonl", "memory:///corpus/b.txt"]
    log = BadInputLog()
    docs = [d.text for c in plan_read_chunks([spec], 1 << 20, files) for p in c.pieces
            for d in read_piece(p, "paragraph", "text", 1 << 20, log)]
    assert docs == ["from memory", "para one", "para two"]
