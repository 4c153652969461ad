"""Finding input files and splitting them into balanced read chunks.

Files come from local paths, globs or fsspec URLs. Uncompressed line-oriented files bigger
than `read_chunk_bytes` are cut at record boundaries (a newline, or a blank line for
paragraphs) into pieces, so that several chunks read one big file; small files are grouped
so that a chunk holds about `read_chunk_bytes`. Chunk order (dataset, file, offset) fixes
the document order, so the output does not depend on how many workers ran.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import fsspec
from fsspec.core import url_to_fs

from lmforge.pipeline.config import DatasetSpec

FORMAT_BY_EXTENSION = {
    ".txt": "txt", ".text": "txt", ".md": "txt",
    ".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl",
    ".parquet": "parquet",
}
COMPRESSION_BY_EXTENSION = {".gz": "gz", ".gzip": "gz", ".zst": "zst", ".zstd": "zst"}
_BOUNDARY_SCAN_BLOCK = 1 << 20


@dataclass
class SourceFile:
    """One input file of a dataset."""

    dataset: str
    url: str
    size: int
    format: str
    compression: str | None
    mtime: str = ""


@dataclass
class ReadPiece:
    """A byte range [start, end) of one file (end -1 = to the end of the file)."""

    file: SourceFile
    start: int = 0
    end: int = -1


@dataclass
class ReadChunk:
    """The read work item of the clean (or clean+encode) phase: consecutive pieces of one
    dataset's files, about `data.read_chunk_bytes` in all."""

    index: int
    dataset: str
    pieces: list[ReadPiece] = field(default_factory=list)

    @property
    def bytes(self) -> int:
        return sum((p.end if p.end >= 0 else p.file.size) - p.start for p in self.pieces)


def _full_url(fs: fsspec.AbstractFileSystem, path: str) -> str:
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return path if protocol in ("file", "local") else fs.unstrip_protocol(path)


def detect_format(url: str, configured: str) -> tuple[str, str | None]:
    """Return (format, compression) of `url` from its extension and the configured format.

    Raises:
        ValueError: If the format is `auto` and the extension is not one we know.
    """
    name = url.rsplit("/", 1)[-1].lower()
    compression = None
    for ext, comp in COMPRESSION_BY_EXTENSION.items():
        if name.endswith(ext):
            compression, name = comp, name[: -len(ext)]
            break
    if configured != "auto":
        return configured, compression
    for ext, fmt in FORMAT_BY_EXTENSION.items():
        if name.endswith(ext):
            return fmt, compression
    raise ValueError(
        f"format: cannot tell the format of {url!r} from its extension; "
        "set format to txt, jsonl or parquet"
    )


def discover_files(spec: DatasetSpec) -> list[SourceFile]:
    """Expand a dataset's paths (files, folders, globs, fsspec URLs) into sorted files.

    Raises:
        ValueError: If a path matches no file (naming the path).
    """
    files: dict[str, SourceFile] = {}
    for pattern in spec.paths:
        fs, path = url_to_fs(pattern)
        if any(c in path for c in "*?["):
            matches = fs.glob(path, detail=True)
        elif fs.isdir(path):
            matches = fs.find(path, detail=True)
        elif fs.exists(path):
            matches = {path: fs.info(path)}
        else:
            matches = {}
        matches = {p: info for p, info in matches.items() if info.get("type") != "directory"}
        if not matches:
            raise ValueError(
                f"paths: no files match {pattern!r} (dataset {spec.name!r}); check the path"
            )
        for path_i, info in sorted(matches.items()):
            url = _full_url(fs, path_i)
            fmt, comp = detect_format(url, spec.format)
            mtime = info.get("mtime", info.get("LastModified", info.get("last_modified", "")))
            files[url] = SourceFile(spec.name, url, int(info.get("size") or 0), fmt, comp,
                                    str(mtime))
    return [files[url] for url in sorted(files)]


def _boundary_after(url: str, target: int, limit: int, paragraph: bool) -> int | None:
    """First record boundary at or after `target` and before `limit`, or None."""
    pattern = re.compile(rb"\n\r?\n" if paragraph else rb"\n")
    with fsspec.open(url, "rb") as f:
        f.seek(target)
        carry, pos = b"", target
        while pos < limit:
            block = f.read(min(_BOUNDARY_SCAN_BLOCK, limit - pos))
            if not block:
                return None
            buf = carry + block
            match = pattern.search(buf)
            if match:
                cut = pos - len(carry) + match.end()
                return cut if cut < limit else None
            carry = buf[-2:]
            pos += len(block)
    return None


def split_file(file: SourceFile, chunk_bytes: int, txt_unit: str) -> list[ReadPiece]:
    """Cut one file into pieces of about `chunk_bytes` at record boundaries."""
    splittable = (
        file.compression is None
        and file.format in ("txt", "jsonl")
        and not (file.format == "txt" and txt_unit == "file")
    )
    if not splittable or file.size <= chunk_bytes:
        return [ReadPiece(file)]
    paragraph = file.format == "txt" and txt_unit == "paragraph"
    cuts = [0]
    target = chunk_bytes
    while target < file.size:
        cut = _boundary_after(file.url, max(target, cuts[-1]), file.size, paragraph)
        if cut is None:
            break
        if cut > cuts[-1]:
            cuts.append(cut)
        target = cut + chunk_bytes
    cuts.append(file.size)
    return [ReadPiece(file, a, b) for a, b in zip(cuts, cuts[1:], strict=False) if b > a]


def plan_read_chunks(
    specs: list[DatasetSpec], chunk_bytes: int, files: list[SourceFile]
) -> list[ReadChunk]:
    """Group/split the discovered files into balanced read chunks.

    Args:
        specs: The datasets, in config order.
        chunk_bytes: Target input bytes per chunk.
        files: Every dataset's files (from `discover_files`).

    Returns:
        Chunks in document order (dataset, file, offset). Empty files get no chunk; the
        caller reports them.
    """
    chunks: list[ReadChunk] = []
    for spec in specs:
        current: ReadChunk | None = None
        current_bytes = 0
        for file in files:
            if file.dataset != spec.name or file.size == 0:
                continue
            for piece in split_file(file, chunk_bytes, spec.txt_unit):
                if current is None or current_bytes >= chunk_bytes:
                    current, current_bytes = ReadChunk(len(chunks), spec.name), 0
                    chunks.append(current)
                current.pieces.append(piece)
                current_bytes += (piece.end if piece.end >= 0 else file.size) - piece.start
    return chunks
