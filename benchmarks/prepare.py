"""Prepare throughput against its limit and against Megatron-LM's preprocess_data.py.

Measured side by side in one run on the same synthetic JSON-lines corpus (tinyshakespeare
paragraphs, each tagged with its copy number so dedup keeps them all, grouped into
documents of ~`--doc-bytes`, ~1.2 KB by default, as in web text):

- prepare_fixed_cost_s: whole-process seconds of a prepare with nothing to do (20 KB
  corpus, tokenizer given): imports, starting and stopping its own local Ray, its actors,
  stats and plots; the median of three fresh processes.
- prepare_vs_spm_limit: end-to-end prepare tokens/s (read → clean → dedup → encode → write,
  tokenizer reused) ÷ (workers × single-thread sentencepiece encode tokens/s).
- prepare_vs_megatron: lmforge tokens/s (the full pipeline above) ÷ a Megatron-style
  baseline doing what `tools/preprocess_data.py` does: a `multiprocessing.Pool` whose
  workers `json.loads` each line and encode it (`imap`, chunks of 32 lines, ids as Python
  lists, EOS appended), the main process writing a flat token file (`.bin`, one
  `np.array(ids).tobytes()` per document) and, at the end, the index (`.idx`: sequence
  lengths, byte pointers, document indices) with numpy. It does no cleaning, hashing,
  dedup, val split or packing.
- prepare_same_work_vs_megatron: the same, with lmforge doing only what the baseline does
  (no cleaning steps, no dedup, no val split: read → encode → write). The two token streams
  are checked byte-identical (lmforge's per-task streams, kept with `keep_work`, against the
  baseline's `.bin`), so both sides did exactly the same tokenization.
- prepare_scaling_2w: tokens/s with 2 workers ÷ with 1.
- prepare_rss_growth_10x: peak RSS of the largest Ray worker at 10× the corpus ÷ at 1×.

Throughput, scaling and the baseline comparison run on the 10× corpus; the 1× corpus only
serves the RSS ratio.

Ray is started once before timing (prepare uses the running Ray), a small warm-up run comes
first, and every timed run starts once the previous run's actors have exited. Each prepare
run still starts its own pool of workers (~0.6 s of CPU each), a cost every real run pays;
the baseline's clock likewise includes starting its Pool. `prepare_fixed_cost_s` measures
what the in-Ray runs leave out: a whole process that starts and stops its own Ray.

The limit uses sentencepiece's fastest single-thread call (one document per call, ids as a
numpy array), which lmforge's encoders use too; the baseline returns Python lists of ids,
as Megatron's script does.

Run: .venv/bin/python benchmarks/prepare.py [--quick] [--doc-bytes N]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import sentencepiece as spm

from lmforge.pipeline.config import CleanConfig, DataConfig, DatasetSpec, TokenizerConfig
from lmforge.pipeline.manifest import DatasetManifest
from lmforge.pipeline.prepare import prepare
from lmforge.pipeline.tokenizer import train_tokenizer

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT / "configs" / "corpora" / "tinyshakespeare.txt"
SEQ_LEN = 1024
VOCAB = 8192


def make_corpus(folder: Path, copies: int, doc_bytes: int = 1200) -> list[Path]:
    """`copies` JSON-lines files of tinyshakespeare (1.1 MB of text each) as documents of
    ~`doc_bytes` (whole paragraphs), every paragraph tagged with its copy number so none is
    a duplicate."""
    folder.mkdir(parents=True, exist_ok=True)
    paragraphs = [p for p in re.split(r"\n\n+", CORPUS.read_text()) if p.strip()]
    paths = []
    for k in range(copies):
        docs, doc = [], ""
        for p in paragraphs:
            doc += f"[{k}] {p}\n"
            if len(doc) >= doc_bytes:
                docs.append(doc)
                doc = ""
        if doc:
            docs.append(doc)
        path = folder / f"part-{k:04d}.jsonl"
        path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
        paths.append(path)
    return paths


def read_docs(path: Path) -> list[str]:
    return [json.loads(line)["text"] for line in path.open(encoding="utf-8")]


def spm_single_thread(model: Path, paths: list[Path]) -> float:
    """Single-thread sentencepiece encode tokens/s on the same documents (one file), with
    its fastest call: one document at a time, ids returned as a numpy array (a batch call
    returning Python lists is ~5% slower)."""
    sp = spm.SentencePieceProcessor(model_file=str(model))
    docs = read_docs(paths[-1])
    encode = sp.encode
    start = time.perf_counter()
    tokens = sum(len(encode(doc, return_type="numpy")) for doc in docs)
    return tokens / (time.perf_counter() - start)


def _ray_worker_status(prefix: bytes = b"") -> list[bytes]:
    """/proc/PID/status of every Ray worker process whose name (the kernel's 15-character
    process name) starts with `ray::` + `prefix` (Linux)."""
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/status", "rb") as f:
                status = f.read()
        except OSError:  # the process has just exited
            continue
        if status.startswith(b"Name:\tray::" + prefix):
            found.append(status)
    return found


def _ray_worker_peaks() -> list[int]:
    """The kernel's high-water mark of the RSS (VmHWM) of every Ray worker process, read
    from /proc/PID/status alone (one small read per process)."""
    peaks = []
    for status in _ray_worker_status():
        at = status.find(b"VmHWM:")
        if at >= 0:
            peaks.append(int(status[at + 6 : status.index(b"kB", at)]) * 1024)
    return peaks


def wait_for_quiet(timeout: float = 30.0) -> None:
    """Wait until the actors of the previous prepare run (its phase workers) have exited:
    Ray tears them down in the background, and a timed run must not share the cores with
    that."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and _ray_worker_status(b"PhaseWorke"):
        time.sleep(0.1)


class PeakRss:
    """The largest peak RSS of any Ray worker process (`ray::...`) while it is active.

    Reads each process's kernel high-water mark (VmHWM) every 0.25 s, so a short spike is
    not missed, and only /proc/PID/status, so the poller stays cheap (it shares the 2
    cores with the run it measures).
    """

    def __init__(self) -> None:
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        while not self._stop.is_set():
            self.peak = max([self.peak, *_ray_worker_peaks()])
            self._stop.wait(0.25)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def run_prepare(
    paths: list[Path], out: Path, model: Path, workers: int, chunk: int = 2**20,
    same_work: bool = False,
) -> tuple[float, int, int, str]:
    """(tokens/s, tokens, peak worker RSS, sha256 of the token stream or "") of one
    end-to-end prepare. `same_work`: only what the Megatron-style baseline does, with the
    per-task token streams kept (`keep_work`) so the stream can be compared."""
    shutil.rmtree(out, ignore_errors=True)
    bare = {"val_fraction": 0.0, "dedup": False, "clean": CleanConfig(steps=[]),
            "keep_work": True}
    data = DataConfig(
        datasets=[DatasetSpec(name="bench", paths=[str(p) for p in paths])],
        output_dir=str(out), seq_len=SEQ_LEN, num_workers=workers,
        read_chunk_bytes=chunk,  # the same task size at 1x and 10x, for the RSS comparison
        **(bare if same_work else {"val_fraction": 0.01}),
    )
    tok = TokenizerConfig(vocab_size=VOCAB, model_path=str(model))
    wait_for_quiet()
    with PeakRss() as rss:
        start = time.perf_counter()
        manifest = DatasetManifest.read(prepare(data, tok, progress=False))
        seconds = time.perf_counter() - start
    tokens = sum(s.tokens for s in manifest.datasets["bench"].splits.values())
    stream = ""
    if same_work:  # the tasks' streams, in task (= document) order, are the whole stream
        digest = hashlib.sha256()
        for part in sorted(out.glob("_work/*/tokens/*.train.tokens.npy")):
            digest.update(np.load(part).tobytes())
        stream = digest.hexdigest()
    return tokens / seconds, tokens, rss.peak, stream


class MegatronEncoder:
    """What Megatron-LM's tools/preprocess_data.py runs in each Pool worker (one JSON key,
    no sentence splitting, `--append-eod`): the line's text as a list of ids plus EOS."""

    sp: spm.SentencePieceProcessor | None = None

    def __init__(self, model: str) -> None:
        self.model = model

    def initializer(self) -> None:
        MegatronEncoder.sp = spm.SentencePieceProcessor(model_file=self.model)

    def encode(self, json_line: str) -> tuple[list[int], list[int], int]:
        text = json.loads(json_line)["text"]
        ids = MegatronEncoder.sp.encode_as_ids(text)
        lengths = [len(ids)]
        if ids:
            ids.append(MegatronEncoder.sp.eos_id())
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


def run_megatron(paths: list[Path], out: Path, model: Path, workers: int
                 ) -> tuple[float, int, str]:
    """(tokens/s, tokens, sha256 of the token stream) of the Megatron-style baseline:
    Pool.imap over the JSON lines in chunks of 32, the main process writing .bin + .idx."""
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    wait_for_quiet()
    start = time.perf_counter()
    encoder = MegatronEncoder(str(model))
    lines = (line for path in paths for line in path.open(encoding="utf-8"))
    builder = IndexedDatasetBuilder(out / "bench_text_document.bin", np.uint16)
    pool = multiprocessing.Pool(workers, initializer=encoder.initializer)
    for ids, lengths, _ in pool.imap(encoder.encode, lines, 32):
        builder.add_document(ids, lengths)
    builder.finalize(out / "bench_text_document.idx")
    # Workers exit on their own (a SIGTERM from Pool.terminate would make the signal
    # handler Ray installed in this process print a stack trace in each).
    pool.close()
    pool.join()
    seconds = time.perf_counter() - start
    stream = (out / "bench_text_document.bin").read_bytes()
    return len(stream) // 2 / seconds, len(stream) // 2, hashlib.sha256(stream).hexdigest()


FIXED_COST_JOB = """
import sys, time
start = time.perf_counter()
from lmforge.pipeline.config import DataConfig, DatasetSpec, TokenizerConfig
from lmforge.pipeline.prepare import prepare
data = DataConfig(datasets=[DatasetSpec(name="tiny", paths=[sys.argv[1]])],
                  output_dir=sys.argv[2], seq_len=128, num_workers=2)
prepare(data, TokenizerConfig(vocab_size=8192, model_path=sys.argv[3]), progress=False)
print(time.perf_counter() - start)
"""


def fixed_cost(folder: Path, model: Path, runs: int = 3) -> tuple[float, list[float]]:
    """Whole-process seconds of a prepare of a 20 KB corpus (nothing to do, so all of it is
    fixed cost: imports, starting and stopping its own local Ray, actors, stats, plots);
    the median over `runs`, and each run (a fresh Python process each, no Ray running)."""
    folder.mkdir(parents=True, exist_ok=True)
    corpus = folder / "tiny.jsonl"
    corpus.write_text("".join(json.dumps({"text": d}) + "\n"
                              for d in read_docs(make_corpus(folder, 1)[0])[:16]))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    walls = []
    for i in range(runs):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", FIXED_COST_JOB, str(corpus),
                        str(folder / f"out{i}"), str(model)], check=True,
                       capture_output=True, env=env)
        walls.append(time.perf_counter() - start)
    return sorted(walls)[len(walls) // 2], walls


def bench(metric: str, value: float, goal: float, **detail: object) -> None:
    print("BENCH " + json.dumps({"metric": metric, "value": round(value, 4), "goal": goal,
                                 "detail": detail}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small corpus, a few minutes")
    parser.add_argument("--doc-bytes", type=int, default=1200,
                        help="document size of the corpus (~1.2 KB: web text; try 10000)")
    args = parser.parse_args()
    # 1.1 MB per copy; tasks of `chunk` bytes at both sizes (prepare shrinks tasks below
    # the configured size only when the corpus has fewer than 4 per worker).
    copies, chunk = (2, 2**20) if args.quick else (20, 2 * 2**20)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import ray

    tmp = Path(tempfile.mkdtemp(prefix="lmforge-bench-"))
    try:
        start = time.perf_counter()
        model = train_tokenizer(CORPUS, TokenizerConfig(vocab_size=VOCAB), tmp / "tok.model")
        train_s = time.perf_counter() - start
        # Before this process starts Ray: each run starts and stops its own.
        fixed_s, fixed_runs = fixed_cost(tmp / "fixed", model)
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
        paths = make_corpus(tmp / "corpus", copies, args.doc_bytes)
        big = make_corpus(tmp / "corpus10", copies * 10, args.doc_bytes)
        run_prepare(paths[:1], tmp / "warmup", model, 2)

        single_before = spm_single_thread(model, paths)
        _, tokens1, rss1, _ = run_prepare(paths, tmp / "x1", model, 2, chunk)
        tps2, tokens, rss10, _ = run_prepare(big, tmp / "w2", model, 2, chunk)
        tps1, _, _, _ = run_prepare(big, tmp / "w1", model, 1, chunk)
        base_tps, base_tokens, base_stream = run_megatron(big, tmp / "megatron", model, 2)
        same_tps, same_tokens, _, same_stream = run_prepare(big, tmp / "same", model, 2,
                                                            chunk, same_work=True)
        if same_stream != base_stream:
            raise RuntimeError(f"not the same token stream: {same_tokens:,} tokens "
                               f"({same_stream[:12]}) vs {base_tokens:,} ({base_stream[:12]})")
        mb = sum(p.stat().st_size for p in big) / 1e6
        docs = sum(1 for p in big for _ in p.open())
        # The limit is measured before and after the runs: a single-core rate drifts with
        # the machine's state over the minutes between.
        single_after = spm_single_thread(model, paths)
        single = (single_before + single_after) / 2

        print(f"corpus {mb:.1f} MB, {docs:,} documents of ~{args.doc_bytes} B, "
              f"{tokens:,} tokens; tokenizer training {train_s:.1f} s")
        print(f"spm single thread {single:,.0f} tok/s; prepare 2w {tps2:,.0f}, 1w {tps1:,.0f}; "
              f"megatron-style 2w {base_tps:,.0f} ({base_tokens:,} tokens, same stream as "
              f"lmforge: sha256 {base_stream[:16]}); prepare 2w doing the same work "
              f"{same_tps:,.0f}")
        print(f"peak worker RSS {rss1 / 2**20:.0f} MiB at 1x ({tokens1:,} tokens), "
              f"{rss10 / 2**20:.0f} MiB at 10x")
        bench("prepare_fixed_cost_s", fixed_s, 3.0, runs_s=fixed_runs,
              what="whole process, 20 KB corpus, own local Ray, 2 workers")
        bench("prepare_vs_spm_limit", tps2 / (2 * single), 0.85, prepare_tokens_per_s=tps2,
              spm_single_thread_tokens_per_s=single,
              spm_single_thread_before_after=[single_before, single_after], workers=2,
              corpus_mb=mb, doc_bytes=args.doc_bytes)
        bench("prepare_vs_megatron", tps2 / base_tps, 1.0, prepare_tokens_per_s=tps2,
              megatron_tokens_per_s=base_tps)
        bench("prepare_same_work_vs_megatron", same_tps / base_tps, 1.5,
              prepare_tokens_per_s=same_tps, megatron_tokens_per_s=base_tps,
              tokens=same_tokens, same_stream_sha256=same_stream)
        bench("prepare_scaling_2w", tps2 / tps1, 1.8, one_worker_tokens_per_s=tps1,
              two_workers_tokens_per_s=tps2)
        bench("prepare_rss_growth_10x", rss10 / max(rss1, 1), 1.5, peak_rss_1x_mib=rss1 / 2**20,
              peak_rss_10x_mib=rss10 / 2**20)
    finally:
        ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
