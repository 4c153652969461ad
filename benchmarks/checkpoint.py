"""What checkpoint integrity costs, side by side in one run (see ../shared/BENCHMARKS.md).

- ``integrity_check_overhead``: (save + resume with integrity − the same without) ÷ the same
  without, for gpt2-124m, ZeRO-2 fp32, one process on gloo. "With" is what training does:
  every file hashed (xxh3-64) while it is written and fsynced with its folder before COMPLETE,
  and every file hashed again on resume before anything loads it (``resume.load_resume``).
  "Without" is ``save_checkpoint(..., integrity=False)`` (sizes only, nothing fsynced but
  the marker and `latest`) and ``find_resume`` + ``load_checkpoint``. Goal ≤ 0.05.
  DeepSpeed's bare save + load runs beside them for reference (``detail.bare_save_load_s``).
  The variants alternate, each repeated; medians are compared.

Run: ``.venv/bin/python benchmarks/checkpoint.py [--quick]`` (``--quick``: the tiny preset).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import tempfile
import time
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist

from lmforge.launch.config import load_config
from lmforge.launch.config.deepspeed import build_deepspeed_config
from lmforge.launch.train import checkpoint as ckpt
from lmforge.launch.train.optim import build_optimizer
from lmforge.launch.train.resume import load_resume

REPO = Path(__file__).resolve().parents[1]


def engine_for(preset: str):
    cfg = load_config(REPO / "configs" / "tiny.yaml", [
        f"--model.preset={preset}", "--model.vocab_size=50257", "--launch.nproc_per_node=1",
        "--train.global_batch_size=null", "--train.precision=fp32",
        "--train.activation_checkpointing=none", "--data.seq_len=128"])
    torch.manual_seed(0)
    model = cfg.model.build()
    config = build_deepspeed_config(cfg.train, cfg.deepspeed, 1, "gloo")
    engine, *_ = deepspeed.initialize(model=model, optimizer=build_optimizer(model, cfg.train),
                                      config=config)
    x = torch.randint(0, 50257, (2, 128))
    loss = engine(x).float().logsumexp(-1).mean()  # one step so optimizer state exists
    engine.backward(loss)
    engine.step()
    return engine


def bare(engine, root: Path, step: int) -> tuple[float, float]:
    tag = ckpt.tag_for(step)
    start = time.perf_counter()
    engine.save_checkpoint(str(root), tag=tag, client_state={"step": step}, save_latest=False)
    saved = time.perf_counter()
    engine.load_checkpoint(str(root), tag=tag, load_optimizer_states=True,
                           load_lr_scheduler_states=True)
    return saved - start, time.perf_counter() - saved


def without(engine, root: Path, step: int) -> tuple[float, float]:
    start = time.perf_counter()
    ckpt.save_checkpoint(engine, root, step, {"step": step}, keep=1, integrity=False)
    saved = time.perf_counter()
    folder = ckpt.find_resume(root, "auto")
    ckpt.load_checkpoint(engine, folder)
    return saved - start, time.perf_counter() - saved


def with_integrity(engine, root: Path, step: int) -> tuple[float, float]:
    start = time.perf_counter()
    ckpt.save_checkpoint(engine, root, step, {"step": step}, keep=1)
    saved = time.perf_counter()
    folder, _ = load_resume(engine, root, "auto")
    assert folder == root / ckpt.tag_for(step)
    return saved - start, time.perf_counter() - saved


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny preset instead of gpt2-124m")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        os.environ["MASTER_PORT"] = str(s.getsockname()[1])
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    preset = "tiny" if args.quick else "gpt2-124m"
    engine = engine_for(preset)
    arms = (("bare", bare), ("without", without), ("with", with_integrity))
    times: dict[str, list[tuple[float, float]]] = {name: [] for name, _ in arms}
    with tempfile.TemporaryDirectory(dir=REPO) as tmp:  # the repo's disk, not a tmpfs
        for i in range(args.repeats):
            for name, run in arms:
                root = Path(tmp) / f"{name}-{i}"
                save_s, load_s = run(engine, root, step=i + 1)
                times[name].append((save_s, load_s))
                print(f"{name:8s} repeat {i}: save {save_s:.2f} s, resume {load_s:.2f} s",
                      flush=True)
                checkpoint_bytes = sum(f.stat().st_size for f in root.rglob("*") if f.is_file())
                shutil.rmtree(root)
    size = "tiny" if args.quick else "gpt2-124m"
    med = {name: {"save_s": round(statistics.median(s for s, _ in runs), 3),
                  "resume_s": round(statistics.median(r for _, r in runs), 3),
                  "total_s": round(statistics.median(s + r for s, r in runs), 3)}
           for name, runs in times.items()}
    base, ours = med["without"]["total_s"], med["with"]["total_s"]
    print("BENCH " + json.dumps({
        "metric": "integrity_check_overhead", "value": round(ours / base - 1, 4),
        "goal": 0.05, "detail": {"model": size, "with": med["with"], "without": med["without"],
                                 "bare_save_load_s": med["bare"]["total_s"],
                                 "checkpoint_mb": round(checkpoint_bytes / 2**20, 1),
                                 "repeats": args.repeats}}))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
