"""Loader throughput and resume time, side by side with a NumPy memmap and training steps.

Writes a dataset of packed 1025-token samples in the shard contract (WebDataset tars +
manifest) and the same tokens as one flat uint16 ``.bin`` (the Megatron/nanoGPT format),
then measures in one run:

- ``loader_vs_memmap``: ShardLoader tokens/s ÷ nanoGPT-style random-sample memmap reads
  producing the same int64 input/label tensors (both in the main process);
- ``loader_vs_train_consumption``: ShardLoader tokens/s ÷ tokens/s of a forward+backward
  step of the tiny and gpt2-124m models on the same machine;
- ``loader_resume_seconds``: a fresh process-side loader seeking to a saved position deep
  in the dataset and yielding its first batch (page cache of the shards dropped first).

Usage: ``.venv/bin/python benchmarks/loader.py [--quick] [--data DIR]``
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import webdataset as wds

from lmforge.pipeline.contract.dataset_manifest import (
    DatasetInfo,
    DatasetManifest,
    ManifestError,
    ShardInfo,
    SplitInfo,
    TokenizerInfo,
)
from lmforge.pipeline.contract.shard_format import sample_key, shard_file_name
from lmforge.pipeline.loader.shard_loader import LoaderConfig, ShardLoader

SEQ_LEN = 1024
VOCAB = 32000


def write_dataset(root: Path, total_bytes: int, per_shard: int, seed: int = 0) -> int:
    """Writes shards, manifest.json and tokens.bin; returns the number of samples."""
    sample_bytes = 3 * 1024 + 256  # measured tar footprint of one 1025-token sample
    samples = max(per_shard, total_bytes // sample_bytes)
    rng = np.random.default_rng(seed)
    (root / "web").mkdir(parents=True, exist_ok=True)
    shards, written = [], 0
    with open(root / "tokens.bin", "wb") as flat:
        for index in itertools.count():
            count = min(per_shard, samples - written)
            if count <= 0:
                break
            tokens = rng.integers(4, VOCAB, (count, SEQ_LEN + 1), dtype=np.uint16)
            flat.write(tokens.tobytes())
            rel = f"web/{shard_file_name('train', index)}"
            with wds.TarWriter(str(root / rel), mtime=0) as sink:
                for i in range(count):
                    cuts = np.sort(rng.choice(SEQ_LEN, 2, replace=False) + 1)
                    starts = np.concatenate([[0], cuts]).astype(np.int32)
                    key = sample_key("web", "train", index, i)
                    sink.write({"__key__": key, "tokens.npy": tokens[i], "doc_starts.npy": starts})
            size = (root / rel).stat().st_size
            with open(root / rel, "rb") as f:  # what prepare records; the loader checks it
                sha256 = hashlib.file_digest(f, "sha256").hexdigest()
            shards.append(ShardInfo(rel, count, count * (SEQ_LEN + 1), size, sha256))
            written += count
    tokenizer = TokenizerInfo(
        file="tokenizer.model", sha256="", vocab_size=VOCAB, type="bpe", pad_id=0, unk_id=1,
        bos_id=2, eos_id=3, special_tokens={}, extra_special_tokens=[], byte_fallback=True,
    )
    train = SplitInfo(written, written * (SEQ_LEN + 1), 0, shards)
    DatasetManifest(
        seq_len=SEQ_LEN, token_dtype="uint16", tokenizer=tokenizer,
        datasets={"web": DatasetInfo(1.0, ["random"], {"train": train})},
        fingerprint="", stats={},
    ).write(DatasetManifest.path_in(root))
    return written


def drop_page_cache(root: Path) -> None:
    """Evicts this dataset's files (only ours) from the page cache."""
    for path in root.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            os.close(fd)


def loader_rate(root: Path, batch: int, batches: int, workers: int, masking: bool) -> float:
    config = LoaderConfig(num_workers=workers, document_masking=masking)
    loader = ShardLoader(root, "train", batch, seed=1, config=config)
    it = iter(loader)
    next(it)  # worker start-up is a one-off
    start = time.perf_counter()
    for _ in range(batches):
        next(it)
    return batch * SEQ_LEN * batches / (time.perf_counter() - start)


def first_batch_seconds(root: Path, batch: int, verify: bool) -> float:
    """Seconds from a fresh loader to its first batch: opens (and maybe hashes) the shards."""
    drop_page_cache(root)
    config = LoaderConfig(num_workers=0, verify_checksums=verify)
    start = time.perf_counter()
    next(iter(ShardLoader(root, "train", batch, seed=1, config=config)))
    return time.perf_counter() - start


def memmap_rate(root: Path, batch: int, batches: int) -> float:
    """nanoGPT's get_batch on aligned random samples of the flat token file."""
    data = np.memmap(root / "tokens.bin", dtype=np.uint16, mode="r")
    samples = len(data) // (SEQ_LEN + 1)
    order = np.random.default_rng(1).permutation(samples)
    start = time.perf_counter()
    for step in range(batches):
        ix = order[(step * batch + np.arange(batch)) % samples] * (SEQ_LEN + 1)
        x = torch.stack([torch.from_numpy(data[i : i + SEQ_LEN].astype(np.int64)) for i in ix])
        y = torch.stack(
            [torch.from_numpy(data[i + 1 : i + 1 + SEQ_LEN].astype(np.int64)) for i in ix]
        )
        del x, y
    return batch * SEQ_LEN * batches / (time.perf_counter() - start)


def train_rate(preset: str, batch: int, seq: int, steps: int) -> tuple[float, str]:
    """Tokens/s of forward+backward+AdamW on one process (lmforge.model)."""
    vocab = 8192 if preset == "tiny" else 50257  # tiny.yaml's tokenizer; GPT-2's
    from lmforge.model import ModelConfig, build_model

    model = build_model(ModelConfig.from_preset(preset, vocab_size=vocab))
    source = "lmforge.model"
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(4, vocab, (batch, seq + 1))
    times = []
    for _ in range(steps + 1):
        start = time.perf_counter()
        logits = model(ids[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, vocab), ids[:, 1:].flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    return batch * seq / min(times[1:]), source


def resume_seconds(root: Path, samples: int, batch: int) -> float:
    """Builds a loader, seeks 3.6 epochs in and returns the time to its first batch."""
    first = ShardLoader(root, "train", batch, seed=1)
    state = first.state_dict()
    state["position"] = state["samples_seen"] = int(3.6 * samples) // batch * batch
    drop_page_cache(root)
    start = time.perf_counter()
    loader = ShardLoader(root, "train", batch, seed=1)
    loader.load_state_dict(state)
    next(iter(loader))
    return time.perf_counter() - start


def bench(name: str, value: float, goal: str, **detail) -> None:
    print("BENCH " + json.dumps({"metric": name, "value": round(value, 3), "goal": goal,
                                 "detail": detail}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="100 MB and fewer steps")
    parser.add_argument("--data", type=Path, help="reuse/keep the dataset in this folder")
    parser.add_argument("--no-train", action="store_true", help="skip the model steps")
    args = parser.parse_args()
    torch.set_num_threads(max(1, (os.cpu_count() or 1)))
    root = args.data or Path(tempfile.mkdtemp(prefix="lmforge-loader-bench-"))
    try:
        run(root, args)
    finally:
        if args.data is None:
            shutil.rmtree(root, ignore_errors=True)


def run(root: Path, args: argparse.Namespace) -> None:
    """Writes the dataset unless it is there, then prints every figure."""
    size = (100 if args.quick else 1024) << 20
    batch, batches = 8, (300 if args.quick else 1500)
    try:
        manifest = DatasetManifest.read(root)
    except ManifestError:  # not written yet, or by an older version of this script
        start = time.perf_counter()
        samples = write_dataset(root, size, per_shard=65536)  # ~256 MB, as prepare writes
        print(f"wrote {samples} samples in {time.perf_counter() - start:.1f} s to {root}")
        manifest = DatasetManifest.read(root)
    samples = manifest.datasets["web"].splits["train"].samples
    gb = sum(p.stat().st_size for p in root.rglob("*.tar")) / 1e9

    # Best of three interleaved rounds: the first also maps the pages into this process,
    # and other load on the machine comes and goes.
    memmaps, rates = [], {}
    for _ in range(3):
        memmaps.append(memmap_rate(root, batch, batches))
        for w, m in itertools.product((0, 2), (True, False)):
            rate = loader_rate(root, batch, batches, w, m)
            rates[(w, m)] = max(rates.get((w, m), 0.0), rate)
    memmap = max(memmaps)
    for (w, m), rate in rates.items():
        print(f"loader workers={w} document_masking={m}: {rate / 1e6:.1f} M tokens/s")
    print(f"memmap (nanoGPT get_batch): {memmap / 1e6:.1f} M tokens/s")
    best = max(rates[(0, True)], rates[(2, True)])
    bench("loader_vs_memmap", rates[(0, True)] / memmap, ">= 0.5",
          loader_tokens_s=rates[(0, True)], memmap_tokens_s=memmap, workers=0,
          document_masking=True, no_masking_ratio=rates[(0, False)] / memmap,
          workers2_ratio=rates[(2, True)] / memmap, batch=batch, seq_len=SEQ_LEN)
    shapes = (("tiny", 4, 128), ("gpt2-124m", 1, 256)) if args.quick else (
        ("tiny", 8, 512), ("gpt2-124m", 1, 1024))
    for preset, b, seq in () if args.no_train else shapes:
        rate, source = train_rate(preset, b, seq, 1 if args.quick else 3)
        print(f"train {preset} ({source}) fwd+bwd+step: {rate:.0f} tokens/s")
        bench(f"loader_vs_train_consumption_{preset}", best / rate, ">= 10",
              loader_tokens_s=best, train_tokens_s=rate, model=source, batch=b, seq=seq)
    # Checksums on first read (data.loader.verify_checksums, on by default): the extra time
    # a fresh process pays, against one pass of the loader over the same data.
    plain = min(first_batch_seconds(root, batch, False) for _ in range(3))
    hashed = min(first_batch_seconds(root, batch, True) for _ in range(3))
    one_pass = samples * SEQ_LEN / rates[(0, True)]
    print(f"first batch: {plain:.2f} s unverified, {hashed:.2f} s verified ({gb:.2f} GB hashed)")
    bench("checksum_first_read_cost", (hashed - plain) / one_pass, "<= 0.1",
          extra_seconds=hashed - plain, verified_first_batch_s=hashed,
          unverified_first_batch_s=plain, one_pass_s=one_pass, dataset_gb=round(gb, 2),
          hash_gb_s=gb / max(hashed - plain, 1e-9), page_cache="dropped before each")
    seconds = [resume_seconds(root, samples, batch) for _ in range(3)]
    bench("loader_resume_seconds", max(seconds), "<= 2", dataset_gb=round(gb, 2),
          runs=[round(s, 3) for s in seconds], page_cache="dropped for the shards")


if __name__ == "__main__":
    main()
