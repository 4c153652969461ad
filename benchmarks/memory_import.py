"""``import_rss_vs_whole`` for benchmarks/memory.py: the peak RSS of each of 2 ranks while a
Hugging Face source is imported under ZeRO-3, against one process loading it whole.

The source is made on the spot: a Llama-3-style ``LlamaForCausalLM`` of the ``llama-1b``
shape (``--quick``: ``llama-350m``), random weights, bf16 (as released Llama folders are),
saved by ``transformers`` as sharded safetensors with an index in a temporary folder.

- whole: one process, ``transformers``' ``from_pretrained(dtype=float32)``;
- lmforge: 2 spawned gloo ranks doing what ``build.build_engine`` does with ``init.source``
  at ZeRO-3: ``warm_start.resolve`` (headers only), the model built under
  ``deepspeed.zero.Init``, ``load_source_weights`` (each tensor into the partitions through
  ``GatheredParameters``, then the import gate on rank 0, streamed from the files).

Each figure is the process's RSS high-water mark (``VmHWM``, reset through
``/proc/self/clear_refs`` once the libraries are imported and the process group is up)
minus its RSS at that reset: the memory the import itself costs. The absolute peaks are
printed beside it.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SHAPES = {  # the presets' shapes (model/presets.py), as transformers' LlamaConfig
    "llama-350m": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                       num_key_value_heads=8, intermediate_size=2816),
    "llama-1b": dict(hidden_size=2048, num_hidden_layers=22, num_attention_heads=32,
                     num_key_value_heads=4, intermediate_size=5632),
}
ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 1024}


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


def make_source(folder: Path, shape: str) -> dict:
    """Writes the source (bf16 shards) to ``folder``; returns its size."""
    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=32000, max_position_embeddings=2048,
                                      rope_parameters=dict(ROPE), **SHAPES[shape])
    torch.set_default_dtype(torch.bfloat16)
    model = transformers.LlamaForCausalLM(config)
    model.save_pretrained(folder, max_shard_size="500MB")
    params = sum(p.numel() for p in model.parameters())
    return {"params": params, "fp32_mib": round(params * 4 / 2**20)}


def child_whole(folder: str) -> dict:
    """One process loading the source whole (fp32) with transformers."""
    import torch
    import transformers
    from transformers.models.llama import modeling_llama  # noqa: F401  (imported up front)

    before = _reset_peak()
    start = time.perf_counter()
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    seconds = time.perf_counter() - start
    assert next(model.parameters()).dtype == torch.float32
    return {"before": before, "hwm": _status("VmHWM"), "seconds": seconds}


def _rank(rank: int, world: int, port: int, folder: str, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank), OMP_NUM_THREADS="1",
                      DS_ACCELERATOR="cpu")
    import deepspeed
    import torch
    import torch.distributed as dist
    from transformers.models.llama import modeling_llama  # noqa: F401  (imported up front)

    from lmforge.launch.config import InitConfig, TrainableConfig
    from lmforge.launch.train import import_gate  # noqa: F401  (imported up front)
    from lmforge.launch.train.warm_start import load_source_weights, resolve
    from lmforge.model import ModelConfig

    torch.set_num_threads(1)
    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    dist.barrier()
    before = _reset_peak()
    start = time.perf_counter()
    warm = resolve(InitConfig(source=folder), ModelConfig(), TrainableConfig())
    ds_config = {"train_batch_size": world, "zero_optimization": {"stage": 3}}
    with deepspeed.zero.Init(config_dict_or_path=ds_config):
        model = warm.model.build()
    built = {"built_rss": _status("VmRSS"), "built_hwm": _status("VmHWM")}
    load_source_weights(model, warm, rank)
    seconds = time.perf_counter() - start
    local = sum(p.ds_tensor.numel() for p in model.parameters())
    queue.put({"rank": rank, "before": before, "hwm": _status("VmHWM"), "seconds": seconds,
               "partition_params": local, **built})
    dist.barrier()
    dist.destroy_process_group()


def child_zero3(folder: str) -> dict:
    """2 gloo ranks importing the source under ZeRO-3 (this process only waits)."""
    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    queue = mp.get_context("spawn").SimpleQueue()
    mp.start_processes(_rank, args=(2, port, folder, queue), nprocs=2, start_method="spawn")
    ranks = sorted((queue.get() for _ in range(2)), key=lambda r: r["rank"])
    return {"ranks": ranks}


CHILDREN = {"source": make_source, "whole": child_whole, "zero3": child_zero3}


def _child(kind: str, env: dict[str, str], **kwargs) -> dict:
    done = subprocess.run([sys.executable, __file__, json.dumps([kind, kwargs])],
                          capture_output=True, text=True, check=False,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **env})
    if done.returncode != 0:
        raise RuntimeError(f"{kind} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def import_rss(quick: bool, env: dict[str, str], bench) -> None:
    """Runs the comparison and prints ``BENCH import_rss_vs_whole`` through ``bench``."""
    shape = "llama-350m" if quick else "llama-1b"
    mib = 2**20
    with tempfile.TemporaryDirectory(prefix="lmforge-import-") as tmp:
        folder = str(Path(tmp) / shape)
        source = _child("source", env, folder=folder, shape=shape)
        whole = _child("whole", env, folder=folder)
        ours = _child("zero3", env, folder=folder)["ranks"]
    whole_cost = whole["hwm"] - whole["before"]
    ratios = [(r["hwm"] - r["before"]) / whole_cost for r in ours]
    for r, ratio in zip(ours, ratios, strict=True):
        print(f"rank {r['rank']}: import peak {(r['hwm'] - r['before']) / mib:8.1f} MiB "
              f"(absolute {r['hwm'] / mib:8.1f})  {r['seconds']:.1f} s   ratio {ratio:.3f}")
    print(f"whole:  load peak {whole_cost / mib:8.1f} MiB (absolute {whole['hwm'] / mib:8.1f})"
          f"  {whole['seconds']:.1f} s", flush=True)
    bench("import_rss_vs_whole", max(ratios), "<= 0.6", shape=shape, **source,
          source_dtype="bf16", ranks=2, zero_stage=3,
          per_rank=[round(x, 3) for x in ratios],
          rank_peak_mib=[round((r["hwm"] - r["before"]) / mib) for r in ours],
          rank_abs_peak_mib=[round(r["hwm"] / mib) for r in ours],
          whole_peak_mib=round(whole_cost / mib), whole_abs_peak_mib=round(whole["hwm"] / mib),
          rank_seconds=[round(r["seconds"], 1) for r in ours],
          whole_seconds=round(whole["seconds"], 1),
          measured="VmHWM above the RSS once libraries and the process group are up; "
                   "rank 0 includes the streamed import gate",
          whole="transformers from_pretrained(dtype=float32), one process",
          allocator="freed blocks > 64 KiB returned (--live)" if env else "glibc default")


if __name__ == "__main__":
    kind, kwargs = json.loads(sys.argv[1])
    print(json.dumps(CHILDREN[kind](**kwargs)), flush=True)
