"""Reading documents from .txt, .jsonl and .parquet pieces, reporting bad input.

Bad input (binary files, invalid UTF-8, malformed JSON, a missing text field, records over
`max_record_bytes`, truncated compressed files) is counted and reported with file and
line, and reading goes on; in strict mode the first one raises `BadInputError`.
Memory stays bounded: files are read in blocks and an over-long line is skipped without
ever being held whole.
"""

from __future__ import annotations

import gzip
import json
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import IO

import fsspec
from lmforge.pipeline.sources import ReadPiece
from lmforge.pipeline.steps import Document

_BLOCK = 4 << 20
MAX_EXAMPLES_PER_KIND = 20


class BadInputError(ValueError):
    """Raised in strict mode at the first bad record."""


@dataclass
class BadInputLog:
    """Counts of bad records by kind, with the first few examples of each."""

    strict: bool = False
    counts: dict[str, int] = field(default_factory=dict)
    examples: list[dict] = field(default_factory=list)

    def report(self, kind: str, piece: ReadPiece, line: int, detail: str = "") -> None:
        """Record one bad record (or raise in strict mode)."""
        location = _absolute_line(piece, line)
        if self.strict:
            raise BadInputError(
                f"{piece.file.url}:{location}: {kind}{': ' + detail if detail else ''}; "
                "fix the input or set data.strict=false to skip and report such records"
            )
        self.counts[kind] = self.counts.get(kind, 0) + 1
        if sum(1 for e in self.examples if e["kind"] == kind) < MAX_EXAMPLES_PER_KIND:
            self.examples.append(
                {"kind": kind, "file": piece.file.url, "line": location, "detail": detail}
            )


def _absolute_line(piece: ReadPiece, line: int) -> int:
    """Turn a line number relative to the piece start into one relative to the file."""
    if piece.start == 0 or line == 0:
        return line
    # Only done for the few reported records; counts newlines before the piece.
    before = 0
    with fsspec.open(piece.file.url, "rb") as f:
        remaining = piece.start
        while remaining > 0:
            block = f.read(min(_BLOCK, remaining))
            if not block:
                break
            before += block.count(b"\n")
            remaining -= len(block)
    return before + line


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
        return zstandard.ZstdDecompressor().stream_reader(raw, closefd=True)
    if piece.start:
        raw.seek(piece.start)
    return raw


def _iter_lines(
    piece: ReadPiece, max_bytes: int, log: BadInputLog
) -> Iterator[tuple[int, bytes | None]]:
    """Yield (line number within the piece, line without newline) for a piece.

    Over-long lines are yielded as None (already reported) and never held whole.
    """
    remaining = piece.end - piece.start if piece.end >= 0 else -1
    line_no, tail, skipping, truncated = 0, b"", False, False
    with _open(piece) as f:
        # read1 on a decompressor returns what it has before a truncation point; read
        # would raise and lose it.
        read = f.read1 if piece.file.compression else f.read
        first = True
        while remaining != 0:
            try:
                block = read(_BLOCK if remaining < 0 else min(_BLOCK, remaining))
            except (EOFError, OSError, zlib.error) as err:
                log.report("truncated_or_corrupt_file", piece, line_no + 1, str(err)[:200])
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
            parts = block.split(b"\n")
            for part in parts[:-1]:
                line_no += 1
                if skipping:  # the end of an over-long line, reported when it began
                    skipping = False
                    yield line_no, None
                    continue
                line, tail = tail + part, b""
                if len(line) > max_bytes:
                    log.report("record_too_long", piece, line_no, f"{len(line)} bytes")
                    yield line_no, None
                else:
                    yield line_no, line
            if not skipping:
                tail += parts[-1]
                if len(tail) > max_bytes:
                    log.report("record_too_long", piece, line_no + 1, f"over {max_bytes} bytes")
                    skipping, tail = True, b""
    if skipping:
        yield line_no + 1, None
    elif tail and not truncated:  # a truncated file's last line is incomplete: dropped
        yield line_no + 1, tail


def _decode(raw: bytes, piece: ReadPiece, line: int, log: BadInputLog) -> str | None:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        log.report("invalid_utf8", piece, line, f"byte {err.start}")
        return None


def read_txt(piece: ReadPiece, unit: str, max_bytes: int, log: BadInputLog) -> Iterator[Document]:
    """Documents of a .txt piece: one per file, paragraph (blank-line separated) or line."""
    url = piece.file.url
    if unit == "line":
        for line_no, raw in _iter_lines(piece, max_bytes, log):
            if raw is not None and raw.strip(b"\r"):
                text = _decode(raw, piece, line_no, log)
                if text is not None:
                    yield Document(text, url, line_no, piece.start)
        return
    lines: list[bytes] = []
    first_line, size, broken = 0, 0, False
    for line_no, raw in _iter_lines(piece, max_bytes, log):
        if unit == "paragraph" and raw is not None and not raw.strip(b"\r"):
            if lines and not broken:
                text = _decode(b"\n".join(lines), piece, first_line, log)
                if text is not None:
                    yield Document(text, url, first_line, piece.start)
            lines, size, broken = [], 0, False
            continue
        if not lines and not broken:
            first_line = line_no
        if raw is None or broken or size + len(raw) > max_bytes:
            if raw is not None and not broken:
                log.report("record_too_long", piece, first_line, f"over {max_bytes} bytes")
            lines, broken = [], True
            continue
        lines.append(raw)
        size += len(raw) + 1
    if lines and not broken:
        text = _decode(b"\n".join(lines), piece, first_line, log)
        if text is not None:
            yield Document(text, url, first_line, piece.start)


def read_jsonl(
    piece: ReadPiece, text_field: str, max_bytes: int, log: BadInputLog
) -> Iterator[Document]:
    """Documents of a JSON-lines piece, the text taken from `text_field`."""
    for line_no, raw in _iter_lines(piece, max_bytes, log):
        if raw is None or not raw.strip():
            continue
        try:
            record = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            log.report("malformed_json", piece, line_no, str(err)[:200])
            continue
        if not isinstance(record, dict) or text_field not in record:
            log.report("missing_text_field", piece, line_no, f"no field {text_field!r}")
            continue
        text = record[text_field]
        if not isinstance(text, str):
            log.report("text_not_a_string", piece, line_no, type(text).__name__)
            continue
        yield Document(text, piece.file.url, line_no, piece.start)


def read_parquet(
    piece: ReadPiece, text_field: str, max_bytes: int, log: BadInputLog
) -> Iterator[Document]:
    """Documents of a Parquet file, read one row group at a time."""
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
        row = 0
        for group in range(parquet.num_row_groups):
            column = parquet.read_row_group(group, columns=[text_field]).column(0)
            for value in column.to_pylist():
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
