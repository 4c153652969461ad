"""Prepare speed against its limit and against Megatron-LM's preprocess_data.py.

Measured side by side in one run on the same synthetic JSON-lines corpus (tinyshakespeare
paragraphs, each tagged with its copy number so dedup keeps them all, grouped into documents
of ~`--doc-bytes`: ~1.2 KB by default, as in web text; try 10000 for long documents), at
each size in `--sizes` (MB), `--runs` times, every figure a whole process as a user runs it:

- lmforge: `lmforge prepare CONFIG` in a fresh process (imports, its own local Ray, workers,
  stats, plots, Ray shutdown), tokenizer given, doing what the baseline does: read, encode,
  write (no cleaning steps, no dedup, no val split: the one-pass path), with 2 workers and
  with 1; and the full pipeline (clean, hash, global dedup, val split, encode, write).
- The Megatron-style baseline (`megatron_baseline.py`, a fresh process): what
  `tools/preprocess_data.py` does, `multiprocessing.Pool` + `imap` chunks of 32 lines,
  flat `.bin` + numpy `.idx`. The token streams of both sides are checked byte-identical
  (lmforge's per-task streams, kept with `keep_work`, against the `.bin`) in the first run.
- The limit: single-thread sentencepiece with its fastest call (one document per call,
  numpy ids, as lmforge's encoders), on the same documents, 3 s of it before each round
  of runs (each round is compared with its own: a core's rate moves by 10-30% over minutes).

BENCH lines (medians over the runs; each run and the spread in the detail):
- prepare_fixed_cost_s: whole `lmforge prepare` of a 20 KB corpus (nothing to do but the
  fixed cost: imports, Ray start and stop, workers, stats, plots).
- prepare_vs_spm_limit@SIZE: end-to-end tokens/s (whole process, 2 workers) ÷ (2 ×
  single-thread sentencepiece).
- prepare_encode_vs_spm_limit@SIZE: the encode stage alone: tokens ÷ its wall time once its
  workers have started ÷ (2 × single-thread).
- prepare_vs_pool@SIZE: the baseline's whole-process seconds ÷ lmforge's (same work).
- prepare_full_vs_spm_limit@SIZE: the full pipeline, end to end, ÷ the limit.
- prepare_scaling_2w@SIZE: 1-worker seconds ÷ 2-worker seconds, whole process.
- prepare_rss_growth: the largest worker's peak RSS at the largest size ÷ at the smallest.
- prepare_hf_tokenizer_vs_limit@SIZE (`--hf-size`, 60 MB by default): the same one-pass
  prepare with a Hugging Face tokenizer (a byte-level BPE of `VOCAB` tokens, an HF folder:
  hf_tokenizer_limit.py): the encode stage's tokens/s ÷ (2 × single-thread `tokenizers` on
  the same documents, its fastest call). The end-to-end ratio is in the detail. Threads:
  each encoder actor runs `tokenizers` on one thread (the encoder sets
  TOKENIZERS_PARALLELISM=false in its process unless the environment sets it, so the
  library's own Rayon pool never starts; RAYON_NUM_THREADS then plays no part): 2 workers
  are 2 threads on 2 cores.
A breakdown of each 2-worker run is printed: import, Ray start, worker start, encode,
write, stats + plots + manifest, Ray stop, interpreter start and exit.

Run: .venv/bin/python benchmarks/prepare.py [--quick] [--sizes 60,230] [--doc-bytes N]
     [--runs 3] [--hf-size 60] [--hf-only]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import sentencepiece as spm
import yaml

from lmforge.pipeline.config import TokenizerConfig
from lmforge.pipeline.prepare.tokenizer import train_tokenizer

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


def spm_single_thread(model: Path, paths: list[Path], seconds: float = 3.0) -> float:
    """Single-thread sentencepiece encode tokens/s on the same documents (one file, passed
    over again until `seconds` have gone by: a core's rate moves between runs, and a short
    measure catches a burst), with its fastest call: one document at a time, ids returned
    as a numpy array (a batch call returning Python lists is ~5% slower)."""
    sp = spm.SentencePieceProcessor(model_file=str(model))
    docs = read_docs(paths[-1])
    encode = sp.encode
    tokens, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        tokens += sum(len(encode(doc, return_type="numpy")) for doc in docs)
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
    """The kernel's high-water mark of the RSS (VmHWM) of every prepare worker process
    (`ray::PhaseWorker`), read from /proc/PID/status alone (one small read per process)."""
    peaks = []
    for status in _ray_worker_status(b"PhaseWorke"):
        at = status.find(b"VmHWM:")
        if at >= 0:
            peaks.append(int(status[at + 6 : status.index(b"kB", at)]) * 1024)
    return peaks


class PeakRss:
    """The largest peak RSS of any prepare worker process while it is active.

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



# The `lmforge prepare` command in this process, timing Ray's start and stop and the start
# of prepare's workers (waiting for them, as the first items would) around it.
LMFORGE_CHILD = r"""
import json, sys, time
t0 = time.perf_counter()
import ray
from lmforge.launch.cli import main
from lmforge.pipeline.run import executor
marks = {"import": time.perf_counter() - t0}

def timed(name, fn):
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            marks[name] = marks.get(name, 0.0) + time.perf_counter() - start
            marks[name + "_at"] = time.perf_counter() - t0
    return wrapper

grow = executor.RayExecutor._grow_pool
def grow_and_wait(self, size):
    new = len(self.pool) < size
    grow(self, size)
    if new:
        ray.get(self._started)
ray.init = timed("ray_start", ray.init)
ray.shutdown = timed("ray_stop", ray.shutdown)
executor.RayExecutor._grow_pool = timed("workers_start", grow_and_wait)
code = 0
try:
    main(["prepare", sys.argv[1]])
except SystemExit as exit:
    code = exit.code or 0
marks["in_process"] = time.perf_counter() - t0
print("MARKS " + json.dumps(marks), flush=True)
sys.exit(code)
"""


@dataclass
class Run:
    """One whole-process run: wall seconds, tokens, peak worker RSS and where time went."""

    wall: float
    tokens: int
    rss: int = 0
    parts: dict[str, float] = field(default_factory=dict)
    encode_s: float = 0.0  # the encode stage once its workers have started
    stream: str = ""


def _child_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}


def run_lmforge(paths: list[Path], out: Path, model: Path, workers: int, chunk: int,
                same_work: bool = True, keep_work: bool = False) -> Run:
    """`lmforge prepare` as a user runs it, in a fresh process with its own local Ray."""
    shutil.rmtree(out, ignore_errors=True)
    data: dict = {"datasets": [{"name": "bench", "paths": [str(p) for p in paths]}],
                  "output_dir": str(out), "seq_len": SEQ_LEN, "num_workers": workers,
                  "read_chunk_bytes": chunk, "keep_work": keep_work}
    if same_work:
        data.update(val_fraction=0.0, dedup=False, clean={"steps": []})
    else:
        data.update(val_fraction=0.01)
    out.parent.mkdir(parents=True, exist_ok=True)
    config = out.with_suffix(".yaml")
    config.write_text(yaml.safe_dump({"data": data, "tokenizer": {
        "vocab_size": VOCAB, "model_path": str(model)}}))
    with PeakRss() as rss:
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, "-c", LMFORGE_CHILD, str(config)],
                              capture_output=True, text=True, env=_child_env())
        wall = time.perf_counter() - start
    if proc.returncode:
        raise RuntimeError(f"lmforge prepare failed:\n{proc.stderr[-3000:]}")
    marks = json.loads(proc.stdout.split("MARKS ", 1)[1].splitlines()[0])
    stats = json.loads((out / "stats.json").read_text())
    seconds = stats["seconds"]
    encode_phase = seconds.get("clean+encode", seconds.get("encode", 0.0))
    pipeline_s = sum(seconds.values())
    body = marks["ray_stop_at"] - marks["ray_stop"] - marks["ray_start_at"]
    parts = {
        "import": marks["import"], "ray_start": marks["ray_start"],
        "workers_start": marks["workers_start"],
        "encode": encode_phase - marks["workers_start"], "write": seconds.get("write", 0.0),
        "other_phases": pipeline_s - encode_phase - seconds.get("write", 0.0),
        "stats_plots_manifest": body - pipeline_s, "ray_stop": marks["ray_stop"],
        "interpreter_start_exit": wall - marks["in_process"],
    }
    tokens = sum(sum(split.values()) for split in stats["tokens"].values())
    stream = ""
    if keep_work:  # the tasks' streams, in task (= document) order, are the whole stream
        digest = hashlib.sha256()
        for part in sorted(out.glob("_work/*/tokens/*.train.tokens.npy")):
            digest.update(np.load(part).tobytes())
        stream = digest.hexdigest()
    return Run(wall, tokens, rss.peak, parts, encode_phase - marks["workers_start"], stream)


def run_megatron(paths: list[Path], out: Path, model: Path, workers: int) -> Run:
    """The Megatron-style baseline in a fresh process (megatron_baseline.py)."""
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).with_name("megatron_baseline.py")), str(out),
         str(model), str(workers), *map(str, paths)],
        capture_output=True, text=True, check=True, env=_child_env())
    wall = time.perf_counter() - start
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    return Run(wall, result["tokens"], stream=result["sha256"])


def fixed_cost(folder: Path, model: Path, runs: int = 3) -> list[Run]:
    """Whole `lmforge prepare` of a 20 KB corpus, `runs` times (nothing to do but the
    fixed cost)."""
    folder.mkdir(parents=True, exist_ok=True)
    corpus = folder / "tiny.jsonl"
    corpus.write_text("".join(json.dumps({"text": d}) + "\n"
                              for d in read_docs(make_corpus(folder, 1)[0])[:16]))
    return [run_lmforge([corpus], folder / f"out{i}", model, 2, 2**20) for i in range(runs)]


def bench(metric: str, value: float, goal: float, **detail: object) -> None:
    print("BENCH " + json.dumps({"metric": metric, "value": round(value, 4), "goal": goal,
                                 "detail": detail}), flush=True)


def spread(values: list[float]) -> dict[str, object]:
    return {"median": round(statistics.median(values), 4),
            "runs": [round(v, 4) for v in values]}


def breakdown(runs: list[Run]) -> str:
    names = list(runs[0].parts)
    cells = [f"{n} {statistics.median(r.parts[n] for r in runs):.2f}" for n in names]
    return f"wall {statistics.median(r.wall for r in runs):.2f} s = " + " + ".join(cells)


def measure_size(size_mb: float, doc_bytes: int, runs: int, tmp: Path, model: Path) -> dict:
    """Every side at one corpus size, `runs` times, alternating, and the limit before and
    after them; prints the figures, returns the largest worker peak RSS."""
    probe = make_corpus(tmp / "probe", 1, doc_bytes)
    one = probe[0].stat().st_size
    copies = max(1, round(size_mb * 1e6 / one))
    paths = make_corpus(tmp / f"corpus{size_mb:g}", copies, doc_bytes)
    mb = sum(p.stat().st_size for p in paths) / 1e6
    docs = sum(1 for p in paths for _ in p.open())
    chunk = 2 * 2**20
    out = tmp / "out"
    two, one_w, base, full, singles = [], [], [], [], []
    for i in range(runs):
        singles.append(spm_single_thread(model, probe))  # the limit of this round
        two.append(run_lmforge(paths, out / "w2", model, 2, chunk, keep_work=i == 0))
        base.append(run_megatron(paths, out / "megatron", model, 2))
        if i == 0 and two[0].stream != base[0].stream:
            raise RuntimeError(f"not the same token stream: {two[0].tokens:,} tokens vs "
                               f"{base[0].tokens:,}")
        one_w.append(run_lmforge(paths, out / "w1", model, 1, chunk))
        full.append(run_lmforge(paths, out / "full", model, 2, chunk, same_work=False))
        print(f"  {mb:.0f} MB run {i + 1}: lmforge 2w {two[-1].wall:.1f} s, 1w "
              f"{one_w[-1].wall:.1f} s, full {full[-1].wall:.1f} s, megatron-style "
              f"{base[-1].wall:.1f} s", flush=True)
    singles.append(spm_single_thread(model, probe))
    tokens = two[0].tokens
    label = f"{size_mb:g}MB"
    print(f"{label}: {mb:.1f} MB, {docs:,} documents of ~{doc_bytes} B, {tokens:,} tokens "
          f"(same stream as the baseline: sha256 {base[0].stream[:16]})")
    print(f"  lmforge 2 workers: {breakdown(two)}")
    print(f"  lmforge 1 worker:  {breakdown(one_w)}")
    print(f"  full pipeline:     {breakdown(full)}")
    print("  spm single thread before each round and after the last: "
          + ", ".join(f"{s:,.0f}" for s in singles) + " tok/s")
    # Each round's 2-worker run against the limit measured just before it.
    limits = [2 * s for s in singles[:runs]]
    common = {"corpus_mb": round(mb, 1), "documents": docs, "doc_bytes": doc_bytes,
              "tokens": tokens, "limit_tokens_per_s": spread(limits)}
    e2e = [tokens / r.wall / lim for r, lim in zip(two, limits, strict=True)]
    encode = [tokens / r.encode_s / lim for r, lim in zip(two, limits, strict=True)]
    vs_pool = [b.wall / r.wall for b, r in zip(base, two, strict=True)]
    scaling = [o.wall / t.wall for o, t in zip(one_w, two, strict=True)]
    bench(f"prepare_vs_spm_limit@{label}", statistics.median(e2e), 0.5, **common,
          wall_s=spread([r.wall for r in two]), ratio=spread(e2e))
    bench(f"prepare_encode_vs_spm_limit@{label}", statistics.median(encode), 0.85, **common,
          encode_s=spread([r.encode_s for r in two]), ratio=spread(encode))
    bench(f"prepare_vs_pool@{label}", statistics.median(vs_pool), 1.5, **common,
          megatron_wall_s=spread([b.wall for b in base]), ratio=spread(vs_pool))
    bench(f"prepare_full_vs_spm_limit@{label}",
          statistics.median(r.tokens / r.wall / lim for r, lim in zip(full, limits,
                                                                      strict=True)), 0.5,
          **common,
          wall_s=spread([r.wall for r in full]), tokens_full=full[0].tokens)
    bench(f"prepare_scaling_2w@{label}", statistics.median(scaling), 1.8, **common,
          one_worker_wall_s=spread([o.wall for o in one_w]), ratio=spread(scaling))
    shutil.rmtree(tmp / f"corpus{size_mb:g}", ignore_errors=True)
    shutil.rmtree(out, ignore_errors=True)
    return {"label": label, "rss": max(r.rss for r in two)}


def measure_hf(size_mb: float, doc_bytes: int, runs: int, tmp: Path) -> None:
    """`prepare_hf_tokenizer_vs_limit`: one-pass prepare with an HF tokenizer folder,
    2 workers, against 2 × single-thread `tokenizers` measured before each run."""
    from hf_tokenizer_limit import hf_tokenizer_folder, single_thread_rate  # beside this file

    folder = hf_tokenizer_folder(tmp / "hf-tokenizer", VOCAB)
    probe = make_corpus(tmp / "probe", 1, doc_bytes)
    copies = max(1, round(size_mb * 1e6 / probe[0].stat().st_size))
    paths = make_corpus(tmp / f"hf-corpus{size_mb:g}", copies, doc_bytes)
    mb = sum(p.stat().st_size for p in paths) / 1e6
    two, singles = [], []
    for i in range(runs):
        singles.append(single_thread_rate(folder, probe[-1]))
        two.append(run_lmforge(paths, tmp / "hf-out" / "w2", folder, 2, 2 * 2**20))
        print(f"  HF tokenizer {mb:.0f} MB run {i + 1}: {two[-1].wall:.1f} s", flush=True)
    singles.append(single_thread_rate(folder, probe[-1]))
    limits = [2 * s for s in singles[:runs]]
    tokens = two[0].tokens
    print(f"  HF tokenizer, 2 workers: {breakdown(two)}")
    print("  tokenizers single thread before each run and after the last: "
          + ", ".join(f"{s:,.0f}" for s in singles) + " tok/s")
    encode = [tokens / r.encode_s / lim for r, lim in zip(two, limits, strict=True)]
    e2e = [tokens / r.wall / lim for r, lim in zip(two, limits, strict=True)]
    bench(f"prepare_hf_tokenizer_vs_limit@{size_mb:g}MB", statistics.median(encode), 0.85,
          corpus_mb=round(mb, 1), tokens=tokens, vocab=VOCAB, doc_bytes=doc_bytes,
          limit_tokens_per_s=spread(limits), encode_s=spread([r.encode_s for r in two]),
          ratio=spread(encode), end_to_end_ratio=spread(e2e),
          wall_s=spread([r.wall for r in two]))
    shutil.rmtree(tmp / f"hf-corpus{size_mb:g}", ignore_errors=True)
    shutil.rmtree(tmp / "hf-out", ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="one 23 MB corpus, one run: about two minutes")
    parser.add_argument("--sizes", default="60,230", help="corpus sizes in MB")
    parser.add_argument("--doc-bytes", type=int, default=1200,
                        help="document size of the corpus (~1.2 KB: web text; try 10000)")
    parser.add_argument("--runs", type=int, default=3, help="runs of each side per size")
    parser.add_argument("--hf-size", type=float, default=60.0,
                        help="corpus MB of the HF-tokenizer figure (0: skip it)")
    parser.add_argument("--hf-only", action="store_true",
                        help="only the HF-tokenizer figure (prepare_hf_tokenizer_vs_limit)")
    args = parser.parse_args()
    sizes = [23.0] if args.quick else [float(s) for s in args.sizes.split(",")]
    runs = 1 if args.quick else args.runs
    tmp = Path(tempfile.mkdtemp(prefix="lmforge-bench-"))
    try:
        hf_size = 23.0 if args.quick else args.hf_size
        if args.hf_only:
            measure_hf(hf_size, args.doc_bytes, runs, tmp)
            return
        start = time.perf_counter()
        model = train_tokenizer(CORPUS, TokenizerConfig(vocab_size=VOCAB), tmp / "tok.model")
        print(f"tokenizer training {time.perf_counter() - start:.1f} s", flush=True)
        fixed = fixed_cost(tmp / "fixed", model)
        print(f"fixed cost: {breakdown(fixed)}", flush=True)
        bench("prepare_fixed_cost_s", statistics.median(r.wall for r in fixed), 3.0,
              wall_s=spread([r.wall for r in fixed]),
              what="whole `lmforge prepare`, 20 KB corpus, own local Ray, 2 workers")
        results = [measure_size(size, args.doc_bytes, runs, tmp, model) for size in sizes]
        if len(results) > 1:
            bench("prepare_rss_growth", results[-1]["rss"] / max(results[0]["rss"], 1), 1.5,
                  **{f"peak_worker_rss_mib@{r['label']}": round(r["rss"] / 2**20)
                     for r in results})
        if hf_size:
            measure_hf(hf_size, args.doc_bytes, runs, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
