"""Prepare throughput against its limit and against a multiprocessing.Pool tokenizer.

Measured side by side in one run on the same synthetic corpus (tinyshakespeare copies, each
paragraph tagged with its copy number so dedup keeps them all):

- prepare_vs_spm_limit: end-to-end prepare tokens/s (read → clean → dedup → encode → write,
  tokenizer reused) ÷ (workers × single-thread sentencepiece encode tokens/s).
- prepare_vs_pool: lmforge tokens/s (the full pipeline above) ÷ a Megatron-style
  multiprocessing.Pool tokenizer (`imap` over documents, main process packs and writes the
  same shards). The Pool does none of the cleaning, hashing, dedup or val split.
- prepare_same_work_vs_pool: the same, with lmforge doing only what the Pool does (no
  cleaning steps, no dedup, no val split: read → encode → write); the token counts of the
  two are checked equal.
- prepare_scaling_2w: tokens/s with 2 workers ÷ with 1.
- prepare_rss_growth_10x: peak RSS of the largest Ray worker at 10× the corpus ÷ at 1×.

Throughput, scaling and the Pool comparison run on the 10× corpus (fixed start-up costs of
Ray actors, a few seconds, matter less there); the 1× corpus only serves the RSS ratio.

Ray is started once before timing (prepare uses the running Ray), a small warm-up run comes
first, and every timed run starts once the previous run's actors have exited. Each prepare
run still starts its own phase workers and encoder actors (~0.6 s of CPU each, 1.2 with
Ray Data), a cost every real run pays.

The limit uses sentencepiece's fastest single-thread call (one document per call, ids as a
numpy array), which lmforge's encoders use too; the Pool returns Python lists of ids, as
Megatron's preprocess_data.py does.

Run: .venv/bin/python benchmarks/prepare.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import re
import shutil
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import sentencepiece as spm

from lmforge.pipeline.config import CleanConfig, DataConfig, DatasetSpec, TokenizerConfig
from lmforge.pipeline.manifest import DatasetManifest
from lmforge.pipeline.prepare import prepare
from lmforge.pipeline.shard_format import sample_key, samples_per_shard, shard_file_name
from lmforge.pipeline.shards import pack_windows, write_shard
from lmforge.pipeline.tokenizer import train_tokenizer

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT / "configs" / "corpora" / "tinyshakespeare.txt"
SEQ_LEN = 1024
VOCAB = 8192


def make_corpus(folder: Path, copies: int) -> list[Path]:
    """`copies` files of tinyshakespeare as ~3 KB documents (20 paragraphs each, about the
    size of a web page), every paragraph tagged with its copy number so none is a duplicate."""
    folder.mkdir(parents=True, exist_ok=True)
    paragraphs = [p for p in re.split(r"\n\n+", CORPUS.read_text()) if p.strip()]
    paths = []
    for k in range(copies):
        tagged = [f"[{k}] {p}" for p in paragraphs]
        docs = ["\n".join(tagged[i : i + 20]) for i in range(0, len(tagged), 20)]
        path = folder / f"part-{k:04d}.txt"
        path.write_text("\n\n".join(docs) + "\n")
        paths.append(path)
    return paths


def spm_single_thread(model: Path, paths: list[Path]) -> float:
    """Single-thread sentencepiece encode tokens/s on the same documents (one file), with
    its fastest call: one document at a time, ids returned as a numpy array (a batch call
    returning Python lists is ~5% slower)."""
    sp = spm.SentencePieceProcessor(model_file=str(model))
    docs = [p for p in re.split(r"\n\n+", paths[-1].read_text()) if p]
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
    """Wait until the actors of the previous prepare run (encoders, phase workers) have
    exited: Ray tears them down in the background, and a timed run must not share the
    cores with that."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(
        _ray_worker_status(b"MapWorker") + _ray_worker_status(b"PhaseWorke")
    ):
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
    same_work_as_pool: bool = False,
) -> tuple[float, int, int]:
    """(tokens/s, tokens, peak worker RSS) of one end-to-end prepare."""
    shutil.rmtree(out, ignore_errors=True)
    bare = {"val_fraction": 0.0, "dedup": False, "clean": CleanConfig(steps=[])}
    data = DataConfig(
        datasets=[DatasetSpec(name="bench", paths=[str(p) for p in paths])],
        output_dir=str(out), seq_len=SEQ_LEN, num_workers=workers,
        read_chunk_bytes=chunk,  # the same task size at 1x and 10x, for the RSS comparison
        **(bare if same_work_as_pool else {"val_fraction": 0.01}),
    )
    tok = TokenizerConfig(vocab_size=VOCAB, model_path=str(model))
    wait_for_quiet()
    with PeakRss() as rss:
        start = time.perf_counter()
        manifest = DatasetManifest.read(prepare(data, tok, progress=False))
        seconds = time.perf_counter() - start
    tokens = sum(s.tokens for s in manifest.datasets["bench"].splits.values())
    return tokens / seconds, tokens, rss.peak


_SP: spm.SentencePieceProcessor | None = None


def _init(model: str) -> None:
    global _SP
    os.environ["OMP_NUM_THREADS"] = "1"
    _SP = spm.SentencePieceProcessor(model_file=model)


def _encode(doc: str) -> list[int]:
    ids = _SP.encode(doc)
    ids.append(_SP.eos_id())
    return ids


def run_pool(paths: list[Path], out: Path, model: Path, workers: int) -> tuple[float, int]:
    """Megatron preprocess_data.py style: Pool.imap over documents, main process writes."""
    shutil.rmtree(out, ignore_errors=True)
    window = SEQ_LEN + 1
    per_shard = samples_per_shard(256 * 2**20, SEQ_LEN, 2)
    wait_for_quiet()
    start = time.perf_counter()
    docs = (p for path in paths for p in re.split(r"\n\n+", path.read_text()) if p)
    buffer: list[np.ndarray] = []
    buffered = tokens = shard = 0
    with multiprocessing.Pool(workers, initializer=_init, initargs=(str(model),)) as pool:
        for ids in pool.imap(_encode, docs, chunksize=32):
            buffer.append(np.asarray(ids, np.uint16))
            buffered += len(ids)
            tokens += len(ids)
            if buffered >= per_shard * window:
                buffered = _flush(buffer, out, shard, per_shard * window, window)
                shard += 1
        while buffer:
            buffered = _flush(buffer, out, shard, per_shard * window, window)
            shard += 1
    return tokens / (time.perf_counter() - start), tokens


def _flush(buffer: list[np.ndarray], out: Path, shard: int, size: int, window: int) -> int:
    stream = np.concatenate(buffer)
    head, rest = stream[:size], stream[size:]
    buffer.clear()
    if len(rest):
        buffer.append(rest)
    ends = np.flatnonzero(head == 3) + 1
    samples, starts = pack_windows(head, np.concatenate([[0], ends]), 0, window, 0)
    keys = [sample_key("bench", "train", shard, i) for i in range(len(samples))]
    write_shard(out / shard_file_name("train", shard), keys, samples, starts, len(head), out)
    return len(rest)


def bench(metric: str, value: float, goal: float, **detail: object) -> None:
    print("BENCH " + json.dumps({"metric": metric, "value": round(value, 4), "goal": goal,
                                 "detail": detail}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small corpus, under two minutes")
    args = parser.parse_args()
    # 1.1 MB per copy; tasks of `chunk` bytes at both sizes (prepare shrinks tasks below
    # the configured size only when the corpus has fewer than 4 per worker).
    copies, chunk = (2, 2**20) if args.quick else (20, 2 * 2**20)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    tmp = Path(tempfile.mkdtemp(prefix="lmforge-bench-"))
    try:
        paths = make_corpus(tmp / "corpus", copies)
        big = make_corpus(tmp / "corpus10", copies * 10)
        start = time.perf_counter()
        model = train_tokenizer(paths[0], TokenizerConfig(vocab_size=VOCAB), tmp / "tok.model")
        train_s = time.perf_counter() - start
        run_prepare(paths[:1], tmp / "warmup", model, 2)

        single_before = spm_single_thread(model, paths)
        _, tokens1, rss1 = run_prepare(paths, tmp / "x1", model, 2, chunk)
        tps2, tokens, rss10 = run_prepare(big, tmp / "w2", model, 2, chunk)
        tps1, _, _ = run_prepare(big, tmp / "w1", model, 1, chunk)
        pool_tps, pool_tokens = run_pool(big, tmp / "pool", model, 2)
        same_tps, same_tokens, _ = run_prepare(big, tmp / "same", model, 2, chunk, True)
        if same_tokens != pool_tokens:
            raise RuntimeError(f"not the same work: {same_tokens:,} vs {pool_tokens:,} tokens")
        mb = sum(p.stat().st_size for p in big) / 1e6
        # The limit is measured before and after the runs: a single-core rate drifts with
        # the machine's state over the minutes between.
        single_after = spm_single_thread(model, paths)
        single = (single_before + single_after) / 2

        print(f"corpus {mb:.1f} MB, {tokens:,} tokens; tokenizer training {train_s:.1f} s")
        print(f"spm single thread {single:,.0f} tok/s; prepare 2w {tps2:,.0f}, 1w {tps1:,.0f}; "
              f"pool 2w {pool_tps:,.0f} ({pool_tokens:,} tokens); prepare 2w doing the "
              f"pool's work {same_tps:,.0f}")
        print(f"peak worker RSS {rss1 / 2**20:.0f} MiB at 1x ({tokens1:,} tokens), "
              f"{rss10 / 2**20:.0f} MiB at 10x")
        bench("prepare_vs_spm_limit", tps2 / (2 * single), 0.75, prepare_tokens_per_s=tps2,
              spm_single_thread_tokens_per_s=single,
              spm_single_thread_before_after=[single_before, single_after], workers=2,
              corpus_mb=mb)
        bench("prepare_vs_pool", tps2 / pool_tps, 1.0, prepare_tokens_per_s=tps2,
              pool_tokens_per_s=pool_tps)
        bench("prepare_same_work_vs_pool", same_tps / pool_tps, 1.0,
              prepare_tokens_per_s=same_tps, pool_tokens_per_s=pool_tps, tokens=same_tokens)
        bench("prepare_scaling_2w", tps2 / tps1, 1.7, one_worker_tokens_per_s=tps1,
              two_workers_tokens_per_s=tps2)
        bench("prepare_rss_growth_10x", rss10 / max(rss1, 1), 1.5, peak_rss_1x_mib=rss1 / 2**20,
              peak_rss_10x_mib=rss10 / 2**20)
    finally:
        ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
