"""``zero3_build_rss_vs_whole_1b`` for benchmarks/memory.py: the peak RSS of each of 2 ranks
while building and initialising ``llama-1b`` (model/presets.py, vocabulary 32,000) from
scratch under ZeRO-3, against one process building it whole (``--quick``: ``llama-350m``).

- whole: one process, ``ModelConfig.build()`` (every module made, then ``init_weights``);
- lmforge: 2 spawned gloo ranks doing what ``build.build_engine`` does at ZeRO-3:
  ``source_load.model_build_context`` (``deepspeed.zero.Init``; ``init_weights`` writes
  one gathered module at a time) around the same ``build()``, from the same seed.

Each figure is the process's RSS high-water mark (``VmHWM``, reset through
``/proc/self/clear_refs`` once the libraries are imported and the process group is up)
minus its RSS at that reset: the memory the build itself costs. Absolute peaks beside it.

Usage: ``.venv/bin/python benchmarks/memory_build.py [--quick] [--live]`` (or
``benchmarks/memory.py --only build``).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time

VOCAB = 32000  # TinyLlama's, the shape llama-1b follows
MiB = 2**20


def _status(key: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {key} in /proc/self/status")


def _reset_peak() -> int:
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")
    return _status("VmRSS")


def child_whole(preset: str) -> dict:
    """One process building the model whole (fp32)."""
    import torch

    from lmforge.model import ModelConfig

    torch.set_num_threads(1)
    cfg = ModelConfig.from_preset(preset, vocab_size=VOCAB)
    torch.manual_seed(0)
    before = _reset_peak()
    start = time.perf_counter()
    model = cfg.build()
    seconds = time.perf_counter() - start
    params = sum(p.numel() for p in model.parameters())
    return {"before": before, "hwm": _status("VmHWM"), "seconds": seconds, "params": params}


def _rank(rank: int, world: int, port: int, preset: str, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank), OMP_NUM_THREADS="1",
                      DS_ACCELERATOR="cpu")
    import deepspeed
    import torch
    import torch.distributed as dist

    from lmforge.launch.train.source_load import model_build_context
    from lmforge.model import ModelConfig

    torch.set_num_threads(1)
    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    cfg = ModelConfig.from_preset(preset, vocab_size=VOCAB)
    ds_config = {"train_batch_size": world, "zero_optimization": {"stage": 3}}
    dist.barrier()
    torch.manual_seed(0)
    before = _reset_peak()
    start = time.perf_counter()
    with model_build_context(True, ds_config):
        model = cfg.build()
    seconds = time.perf_counter() - start
    local = sum(p.ds_tensor.numel() for p in model.parameters())
    queue.put({"rank": rank, "before": before, "hwm": _status("VmHWM"), "seconds": seconds,
               "partition_params": local, "rss_after": _status("VmRSS")})
    dist.barrier()
    dist.destroy_process_group()


def child_zero3(preset: str) -> dict:
    """2 gloo ranks building the model under ZeRO-3 (this process only waits)."""
    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    queue = mp.get_context("spawn").SimpleQueue()
    mp.start_processes(_rank, args=(2, port, preset, queue), nprocs=2, start_method="spawn")
    return {"ranks": sorted((queue.get() for _ in range(2)), key=lambda r: r["rank"])}


CHILDREN = {"whole": child_whole, "zero3": child_zero3}


def _child(kind: str, env: dict[str, str], **kwargs) -> dict:
    done = subprocess.run([sys.executable, __file__, "--child", json.dumps([kind, kwargs])],
                          capture_output=True, text=True, check=False,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **env})
    if done.returncode != 0:
        raise RuntimeError(f"{kind} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def build_rss(quick: bool, env: dict[str, str], bench) -> None:
    """Runs the comparison and prints ``BENCH zero3_build_rss_vs_whole_1b`` via ``bench``."""
    preset = "llama-350m" if quick else "llama-1b"
    whole = _child("whole", env, preset=preset)
    ours = _child("zero3", env, preset=preset)["ranks"]
    whole_cost = whole["hwm"] - whole["before"]
    ratios = [(r["hwm"] - r["before"]) / whole_cost for r in ours]
    for r, ratio in zip(ours, ratios, strict=True):
        print(f"rank {r['rank']}: build peak {(r['hwm'] - r['before']) / MiB:8.1f} MiB "
              f"(absolute {r['hwm'] / MiB:8.1f})  {r['seconds']:.1f} s   ratio {ratio:.3f}")
    print(f"whole:  build peak {whole_cost / MiB:8.1f} MiB (absolute {whole['hwm'] / MiB:8.1f})"
          f"  {whole['seconds']:.1f} s", flush=True)
    metric = "zero3_build_rss_vs_whole_1b" if not quick else "zero3_build_rss_vs_whole_350m"
    bench(metric, max(ratios), "<= 0.6", preset=preset, vocab_size=VOCAB,
          params=whole["params"], fp32_mib=round(whole["params"] * 4 / MiB), ranks=2,
          zero_stage=3, per_rank=[round(x, 3) for x in ratios],
          rank_peak_mib=[round((r["hwm"] - r["before"]) / MiB) for r in ours],
          rank_abs_peak_mib=[round(r["hwm"] / MiB) for r in ours],
          partition_fraction=[round(r["partition_params"] / whole["params"], 3) for r in ours],
          whole_peak_mib=round(whole_cost / MiB), whole_abs_peak_mib=round(whole["hwm"] / MiB),
          rank_seconds=[round(r["seconds"], 1) for r in ours],
          whole_seconds=round(whole["seconds"], 1),
          measured="VmHWM above the RSS once libraries and the process group are up",
          whole="ModelConfig.build(), one process",
          allocator="freed blocks > 64 KiB returned (--live)" if env else "glibc default")


def _bench(metric: str, value: float, goal: str, **detail) -> None:
    print("BENCH " + json.dumps({"metric": metric, "value": round(value, 4), "goal": goal,
                                 "detail": detail}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="llama-350m instead of llama-1b")
    parser.add_argument("--live", action="store_true",
                        help="children return freed blocks > 64 KiB to the kernel")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, kwargs = json.loads(args.child)
        print(json.dumps(CHILDREN[kind](**kwargs)), flush=True)
        return
    env = {"MALLOC_MMAP_THRESHOLD_": "65536"} if args.live else {}
    build_rss(args.quick, env, _bench)


if __name__ == "__main__":
    main()
