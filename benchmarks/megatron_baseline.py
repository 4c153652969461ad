"""The Megatron-style baseline of benchmarks/prepare.py, run as its own process.

What Megatron-LM's `tools/preprocess_data.py` does with one JSON key, no sentence
splitting and `--append-eod`: a `multiprocessing.Pool` whose workers `json.loads` each line
and encode its text to a Python list of ids plus EOS (`imap`, chunks of 32 lines), the main
process writing a flat token file (`.bin`, one `np.array(ids).tobytes()` per document) and,
at the end, the index (`.idx`: sequence lengths, byte pointers, document indices) with
numpy. It imports only the standard library, numpy and sentencepiece (Megatron's script
also imports torch and Megatron, ~7 s, which this baseline does not pay).

Run: python benchmarks/megatron_baseline.py OUT_DIR MODEL WORKERS FILE.jsonl...
Prints one JSON line: {"tokens": N, "sha256": digest of the token stream}.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import sys
from pathlib import Path

import numpy as np
import sentencepiece as spm


class Encoder:
    """What each Pool worker runs: the line's text as a list of ids plus EOS."""

    sp: spm.SentencePieceProcessor | None = None

    def __init__(self, model: str) -> None:
        self.model = model

    def initializer(self) -> None:
        Encoder.sp = spm.SentencePieceProcessor(model_file=self.model)

    def encode(self, json_line: str) -> tuple[list[int], list[int], int]:
        text = json.loads(json_line)["text"]
        ids = Encoder.sp.encode_as_ids(text)
        lengths = [len(ids)]
        if ids:
            ids.append(Encoder.sp.eos_id())
            lengths[-1] += 1
        return ids, lengths, len(json_line)


class IndexedDatasetBuilder:
    """Megatron's flat `.bin` token file and `.idx` index (MMapIndexedDataset format)."""

    HDR = b"MMIDIDX\x00\x00"

    def __init__(self, bin_path: Path, dtype: type) -> None:
        self.data_file = open(bin_path, "wb")  # noqa: SIM115 - closed in finalize
        self.dtype = dtype
        self.sequence_lengths: list[int] = []
        self.document_indices = [0]

    def add_document(self, tokens: list[int], lengths: list[int]) -> None:
        self.data_file.write(np.array(tokens, dtype=self.dtype).tobytes(order="C"))
        self.sequence_lengths.extend(lengths)
        self.document_indices.append(len(self.sequence_lengths))

    def finalize(self, idx_path: Path) -> None:
        self.data_file.close()
        lengths = np.array(self.sequence_lengths, dtype=np.int32)
        pointers = np.zeros(len(lengths), dtype=np.int64)
        np.cumsum(lengths[:-1] * np.dtype(self.dtype).itemsize, out=pointers[1:])
        with open(idx_path, "wb") as f:
            f.write(self.HDR)
            f.write(np.array([1], "<u8").tobytes())  # version
            f.write(np.array([8 if self.dtype == np.uint16 else 4], "<u1").tobytes())
            f.write(np.array([len(lengths)], "<u8").tobytes())
            f.write(np.array([len(self.document_indices)], "<u8").tobytes())
            f.write(lengths.tobytes(order="C"))
            f.write(pointers.tobytes(order="C"))
            f.write(np.array(self.document_indices, np.int64).tobytes(order="C"))


def main(out: Path, model: str, workers: int, paths: list[str]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    encoder = Encoder(model)
    lines = (line for path in paths for line in open(path, encoding="utf-8"))  # noqa: SIM115
    builder = IndexedDatasetBuilder(out / "bench_text_document.bin", np.uint16)
    pool = multiprocessing.Pool(workers, initializer=encoder.initializer)
    for ids, lengths, _ in pool.imap(encoder.encode, lines, 32):
        builder.add_document(ids, lengths)
    builder.finalize(out / "bench_text_document.idx")
    pool.close()
    pool.join()
    stream = (out / "bench_text_document.bin").read_bytes()
    print(json.dumps({"tokens": len(stream) // 2,
                      "sha256": hashlib.sha256(stream).hexdigest()}))


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), sys.argv[4:])
