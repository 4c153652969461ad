"""Reading documents from .txt, .jsonl and .parquet pieces, reporting bad input.

Bad input (binary files, invalid UTF-8, malformed JSON, a missing text field, records over
`max_record_bytes`, truncated compressed files) is counted and reported with file and
line, and reading goes on; in strict mode the first one raises `BadInputError`.
Memory stays bounded: files are read in blocks and an over-long line is skipped without
ever being held whole.
"""

from __future__ import annotations

import gzip
import io
import json
import re
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import IO, Any

import fsspec

from lmforge.pipeline.prepare.sources import ReadPiece
from lmforge.pipeline.prepare.steps import Document

_BLOCK = 4 << 20
# json.loads recurses once per nesting level: a line of 100k '[' exhausts the stack.
_TOO_DEEP = "nested too deeply to parse (RecursionError)"
MAX_EXAMPLES_PER_KIND = 20


class BadInputError(ValueError):
    """Raised in strict mode at the first bad record."""


@dataclass
class BadInputLog:
    """Counts of bad records by kind, with the first few examples of each."""

    strict: bool = False
    counts: dict[str, int] = field(default_factory=dict)
    examples: list[dict] = field(default_factory=list)
    # (url, piece start) -> newlines before the piece: counted once per piece, not once per
    # bad record (2,000 bad lines re-read their file 2,000 times).
    _lines_before: dict[tuple[str, int], int] = field(default_factory=dict, repr=False,
                                                      compare=False)

    def report(self, kind: str, piece: ReadPiece, line: int, detail: str = "") -> None:
        """Record one bad record (or raise in strict mode)."""
        if self.strict:
            location = self._absolute_line(piece, line)
            raise BadInputError(
                f"{piece.file.url}:{location}: {kind}{': ' + detail if detail else ''}; "
                "fix the input or set data.strict=false to skip and report such records"
            )
        self.counts[kind] = self.counts.get(kind, 0) + 1
        if sum(1 for e in self.examples if e["kind"] == kind) < MAX_EXAMPLES_PER_KIND:
            location = self._absolute_line(piece, line)
            self.examples.append(
                {"kind": kind, "file": piece.file.url, "line": location, "detail": detail}
            )

    def _absolute_line(self, piece: ReadPiece, line: int) -> int:
        """Turn a line number relative to the piece start into one relative to the file."""
        if piece.start == 0 or line == 0:
            return line
        key = (piece.file.url, piece.start)
        if key not in self._lines_before:
            self._lines_before[key] = _newlines_before(piece)
        return self._lines_before[key] + line


def _newlines_before(piece: ReadPiece) -> int:
    """Newlines in the file before the piece (one read of that prefix, in blocks)."""
    before = 0
    with fsspec.open(piece.file.url, "rb") as f:
        remaining = piece.start
        while remaining > 0:
            block = f.read(min(_BLOCK, remaining))
            if not block:
                break
            before += block.count(b"\n")
            remaining -= len(block)
    return before


def _open(piece: ReadPiece) -> IO[bytes]:
    raw = fsspec.open(piece.file.url, "rb").open()
    if piece.file.compression == "gz":
        return gzip.GzipFile(fileobj=raw)
    if piece.file.compression == "zst":
        try:
            import zstandard
        except ImportError as err:
            raw.close()
            raise BadInputError(
                f"{piece.file.url}: reading .zst needs the 'zstandard' package; install it"
            ) from err
        return _ZstdReader(raw, zstandard)
    if piece.start:
        raw.seek(piece.start)
    return raw


class _ZstdReader(io.RawIOBase):
    """Streams a .zst file frame by frame and raises EOFError when it ends inside a frame
    (zstandard's own stream reader reports a silent end-of-file for a truncated file).

    Input goes in small pieces: a zstd block can expand ~30000-fold, so what one call
    returns stays a few MB even for a long run of one byte (a 100 MB line is never whole).
    """

    _INPUT = 256  # bytes of input per call: at most ~8 MiB out (all-RLE worst case)

    def __init__(self, raw: IO[bytes], zstandard: Any) -> None:
        self.raw, self.zstandard = raw, zstandard
        self.frame = zstandard.ZstdDecompressor().decompressobj()
        self.pending = b""  # input not yet given to a frame
        self.started = False  # whether the current frame has received any input

    def readable(self) -> bool:
        return True

    def read1(self, size: int = -1) -> bytes:
        while True:
            if not self.pending:
                self.pending = self.raw.read(self._INPUT)
                if not self.pending:
                    if self.started and not self.frame.eof:
                        raise EOFError("zstd stream ended inside a frame (truncated file)")
                    return b""
            if self.frame.eof:  # a new frame follows the finished one
                self.frame = self.zstandard.ZstdDecompressor().decompressobj()
            chunk, self.pending = self.pending, b""
            self.started = True
            out = self.frame.decompress(chunk)
            if self.frame.eof:
                self.pending = self.frame.unused_data
            if out:
                return out

    read = read1

    def close(self) -> None:
        self.raw.close()
        super().close()


_SEPARATORS = {
    "line": re.compile(rb"\n"),
    "paragraph": re.compile(rb"\n(?:\r?\n)+"),  # one or more blank lines
    "file": re.compile(rb"(?!)"),  # never matches: the whole file is one record
}
_LEADING_BLANK_LINES = re.compile(rb"(?:\r?\n)+")


def _iter_records(
    piece: ReadPiece, unit: str, max_bytes: int, log: BadInputLog
) -> Iterator[tuple[int, bytes]]:
    """Yield (line number within the piece, record bytes) for a piece.

    Records are lines, blank-line separated paragraphs, or the whole file, split out of
    large blocks with one regex (per-line Python loops are ~10x slower on short lines).
    Over-long records are reported and skipped without ever being held whole.
    """
    separator = _SEPARATORS[unit]
    remaining = piece.end - piece.start if piece.end >= 0 else -1
    line_no, tail, skipping, truncated, first = 1, b"", False, False, True
    with _open(piece) as f:
        # read1 on a decompressor returns what it has before a truncation point; read
        # would raise and lose it.
        read = f.read1 if piece.file.compression else f.read
        while remaining != 0:
            try:
                block = read(_BLOCK if remaining < 0 else min(_BLOCK, remaining))
            except (EOFError, OSError, zlib.error) as err:
                log.report("truncated_or_corrupt_file", piece, line_no, str(err)[:200])
                truncated = True
                break
            if not block:
                break
            if first and b"\x00" in block[:8192]:
                log.report("binary_file", piece, 0, "NUL bytes in the first 8 KiB; skipped")
                return
            first = False
            if remaining > 0:
                remaining -= len(block)
            buf, pos = tail + block, 0
            for match in separator.finditer(buf):
                record = buf[pos : match.start()]
                if skipping:  # the end of an over-long record, reported when it began
                    skipping = False
                elif len(record) > max_bytes:
                    log.report("record_too_long", piece, line_no, f"{len(record)} bytes")
                elif record:
                    yield line_no, record
                line_no += record.count(b"\n") + match.group().count(b"\n")
                pos = match.end()
            # Keep 2 bytes even when skipping: a separator may straddle two blocks.
            keep = 2 if skipping else len(buf) - pos
            line_no += buf.count(b"\n", pos, len(buf) - keep)
            tail = buf[len(buf) - keep :]
            if not skipping and len(tail) > max_bytes:
                log.report("record_too_long", piece, line_no, f"over {max_bytes} bytes")
                skipping = True
                line_no += tail.count(b"\n", 0, len(tail) - 2)
                tail = tail[-2:]
    if tail and not skipping and not truncated:  # a truncated file's last record is cut
        yield line_no, tail[:-1] if tail.endswith(b"\n") else tail


def _decode(raw: bytes, piece: ReadPiece, line: int, log: BadInputLog) -> str | None:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        log.report("invalid_utf8", piece, line, f"byte {err.start}")
        return None


def read_txt(piece: ReadPiece, unit: str, max_bytes: int, log: BadInputLog) -> Iterator[Document]:
    """Documents of a .txt piece: one per file, paragraph (blank-line separated) or line."""
    url = piece.file.url
    for line_no, raw in _iter_records(piece, unit, max_bytes, log):
        if unit == "line" and raw.endswith(b"\r"):
            raw = raw[:-1]  # CRLF files: the document is the line without its line ending
        elif unit == "paragraph" and raw[:1] in (b"\n", b"\r"):
            # A piece cut inside a run of blank lines starts with the rest of them.
            blank = _LEADING_BLANK_LINES.match(raw)
            if blank:
                line_no += blank.group().count(b"\n")
                raw = raw[blank.end() :]
        if not raw:
            continue
        text = _decode(raw, piece, line_no, log)
        if text is not None:
            yield Document(text, url, line_no, piece.start, len(raw))


def read_jsonl(
    piece: ReadPiece, text_field: str, max_bytes: int, log: BadInputLog
) -> Iterator[Document]:
    """Documents of a JSON-lines piece, the text taken from `text_field`."""
    for line_no, raw in _iter_records(piece, "line", max_bytes, log):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            log.report("malformed_json", piece, line_no, str(err)[:200])
            continue
        except RecursionError:
            log.report("malformed_json", piece, line_no, _TOO_DEEP)
            continue
        if not isinstance(record, dict) or text_field not in record:
            log.report("missing_text_field", piece, line_no, f"no field {text_field!r}")
            continue
        text = record[text_field]
        if not isinstance(text, str):
            log.report("text_not_a_string", piece, line_no, type(text).__name__)
            continue
        yield Document(text, piece.file.url, line_no, piece.start)


def read_json_records(
    piece: ReadPiece, max_bytes: int, log: BadInputLog
) -> Iterator[tuple[int, dict[str, Any]]]:
    """``(line, record)`` for every JSON object of a JSON-lines piece (task data).

    Blank lines are skipped; invalid UTF-8 or JSON, and lines that are not an object, are
    reported with their line and skipped, as are records over `max_bytes`.
    """
    for line_no, raw in _iter_records(piece, "line", max_bytes, log):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw)
        except UnicodeDecodeError as err:
            log.report("invalid_utf8", piece, line_no, f"byte {err.start}")
            continue
        except json.JSONDecodeError as err:
            log.report("malformed_json", piece, line_no, str(err)[:200])
            continue
        except RecursionError:
            log.report("malformed_json", piece, line_no, _TOO_DEEP)
            continue
        if not isinstance(record, dict):
            log.report("not_an_object", piece, line_no, type(record).__name__)
            continue
        yield line_no, record


def read_parquet(
    piece: ReadPiece, text_field: str, max_bytes: int, log: BadInputLog
) -> Iterator[Document]:
    """Documents of a Parquet file, read in bounded batches of one row group at a time.

    Before a row group is decoded, its text column's uncompressed size (file metadata) is
    checked: a group whose values average more than `max_bytes` holds at least one record
    over the limit and is skipped as ``record_too_long`` without being decoded (a few KiB of
    compressed file can decode to GBs). A group that fails to decode is counted as
    ``corrupt_parquet_row_group`` and reading goes on with the next one.
    """
    import pyarrow.parquet as pq  # pyarrow comes with ray[data]

    with fsspec.open(piece.file.url, "rb") as raw:
        try:
            parquet = pq.ParquetFile(raw)
        except Exception as err:  # pyarrow raises several types for a bad file
            log.report("unreadable_parquet", piece, 0, str(err)[:200])
            return
        if text_field not in parquet.schema_arrow.names:
            log.report("missing_text_field", piece, 0, f"no column {text_field!r}")
            return
        leaves = _leaf_columns(parquet.metadata.schema, text_field)
        first = 0  # rows before this row group
        for group in range(parquet.num_row_groups):
            meta = parquet.metadata.row_group(group)
            rows = meta.num_rows
            size = sum(meta.column(j).total_uncompressed_size for j in leaves)
            if rows and size / rows > max_bytes:
                log.report("record_too_long", piece, first + 1,
                           f"row group {group}: {rows} rows, {size} bytes of {text_field!r} "
                           "uncompressed; skipped without decoding")
            else:
                yield from _row_group_documents(parquet, piece, group, text_field,
                                                _batch_rows(size, rows), first, max_bytes, log)
            first += rows


def _leaf_columns(schema: Any, text_field: str) -> list[int]:
    """Indices of the Parquet leaf columns of the top-level field `text_field`."""
    return [j for j in range(len(schema))
            if schema.column(j).path == text_field
            or schema.column(j).path.startswith(text_field + ".")]


def _batch_rows(size: int, rows: int) -> int:
    """Rows per decoded batch: about `_BLOCK` bytes of text each, 1 to 65536 rows."""
    average = size / rows if rows else 1
    return int(max(1, min(65536, _BLOCK // max(average, 1))))


def _row_group_documents(
    parquet: Any, piece: ReadPiece, group: int, text_field: str, batch_rows: int,
    first: int, max_bytes: int, log: BadInputLog,
) -> Iterator[Document]:
    batches = parquet.iter_batches(batch_size=batch_rows, row_groups=[group],
                                   columns=[text_field], use_threads=False)
    row = first
    while True:
        try:
            batch = next(batches, None)
        except Exception as err:  # pyarrow raises OSError, ArrowInvalid, ... for bad pages
            log.report("corrupt_parquet_row_group", piece, row + 1,
                       f"row group {group}: {str(err)[:160]}")
            return
        if batch is None:
            return
        for value in batch.column(0).to_pylist():
            row += 1
            if not isinstance(value, str):
                log.report("text_not_a_string", piece, row, type(value).__name__)
            elif len(value) > max_bytes:
                log.report("record_too_long", piece, row, f"{len(value)} chars")
            else:
                yield Document(value, piece.file.url, row, 0)


def read_piece(
    piece: ReadPiece, txt_unit: str, text_field: str, max_bytes: int, log: BadInputLog
) -> Iterator[Document]:
    """Documents of one piece, dispatching on the file's format."""
    if piece.file.format == "txt":
        return read_txt(piece, txt_unit, max_bytes, log)
    if piece.file.format == "jsonl":
        return read_jsonl(piece, text_field, max_bytes, log)
    return read_parquet(piece, text_field, max_bytes, log)
