"""Training-engine costs, side by side in one run (see ../shared/BENCHMARKS.md).

- ``engine_zero2_vs_ddp``: plain PyTorch DDP step time ÷ DeepSpeed ZeRO-2 step time, same
  model, batch, optimizer (lmforge's AdamW with decay groups) and clipping; the engine gets
  the DeepSpeed JSON lmforge generates. 2 processes on gloo (CPU), fp32, steps interleaved
  one by one. Goal ≥ 0.87. The same run times a bare gloo all-reduce + all-gather of the
  model's size: the part of a ZeRO-2 step that DeepSpeed cannot overlap on CPU.
- ``ac_full_time_overhead``: extra fwd+bwd time with full activation checkpointing ÷ without.
  Goal ≤ 0.40.
- ``ac_full_activation_saving``: 1 − (bytes saved for backward with full AC ÷ without),
  counted with autograd's saved-tensor hooks. Goal ≥ 0.50.
- ``offload_memory_saving`` / ``offload_step_cost``: ZeRO-2 with optimizer offload
  (DeepSpeedCPUAdam) against the same engine without it, 2 processes, steps interleaved.
  Memory is rank 0's RSS growth from building the engine through its third step, each
  variant in its own processes (on a CPU the "device" is host memory too); the cost is
  offload step time ÷ plain step time − 1. Report only.
- ``compile_speedup_124m``: forward + backward time eager ÷ with ``train.compile`` (each
  block compiled by inductor, its C++ backend on a CPU), medians of interleaved steps after
  the compiling one; the compile time (first step) beside it. Report (≥ 1.0 expected).
- ``reshape_resume_seconds``: a gpt2-124m ZeRO-2 checkpoint written by 2 processes, resumed
  on 1: universal conversion plus load, as ``--resume`` does it. Goal < 30 s.

Run: ``.venv/bin/python benchmarks/engine.py [--quick]``.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import time
from pathlib import Path

import psutil
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lmforge.launch.config import load_config
from lmforge.launch.config.deepspeed import build_deepspeed_config
from lmforge.launch.train import checkpoint as ckpt
from lmforge.launch.train.activation_checkpointing import apply_activation_checkpointing
from lmforge.launch.train.compile_blocks import compile_blocks
from lmforge.launch.train.optim import build_optimizer
from lmforge.model import ModelConfig, causal_lm_loss

ROOT = Path(__file__).resolve().parents[1]
SIZES = {  # name: (preset overrides, micro batch, seq len)
    "tiny": ({"vocab_size": 2048}, 8, 128),
    "124m": ({"vocab_size": 50304}, 1, 256),
    "124m-seq1024": ({"vocab_size": 50304}, 1, 1024),
}


def bench(metric: str, value: float, goal: str, **detail) -> None:
    print("BENCH " + json.dumps({"metric": metric, "value": round(value, 4), "goal": goal,
                                 "detail": detail}), flush=True)


def build(size: str) -> tuple[torch.nn.Module, torch.Tensor]:
    overrides, batch, seq = SIZES[size]
    preset = "tiny" if size == "tiny" else "gpt2-124m"
    torch.manual_seed(0)
    model = ModelConfig.from_preset(preset, **overrides).build()
    tokens = torch.randint(0, overrides["vocab_size"], (batch, seq + 1))
    return model, tokens


def _interleaved_medians(steps: dict, rounds: int) -> dict[str, float]:
    """Median seconds of each step function, run one after another ``rounds`` times.

    Interleaving single steps makes any change in machine load hit every variant alike.
    """
    for step in steps.values():
        step()  # warm-up
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def _engine_config(size: str, *extra: str):
    """lmforge's own run config for this benchmark: ZeRO-2, fp32, no checkpointing."""
    _, batch, _ = SIZES[size]
    overrides = [*extra,
        "--train.precision=fp32", "--train.activation_checkpointing=none",
        f"--train.micro_batch_size={batch}", "--train.global_batch_size=null",
        "--train.grad_accum_steps=1", "--deepspeed.zero_stage=2",
    ]
    return load_config(ROOT / "configs" / "tiny.yaml", overrides)


def _ddp_vs_zero2(rank: int, world: int, port: int, size: str, steps: int, out) -> None:
    import deepspeed

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    cfg = _engine_config(size)
    model, tokens = build(size)
    x, y = tokens[:, :-1], tokens[:, 1:]

    # The same optimizer (lmforge's AdamW with decay groups) and clipping on both sides.
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    ddp_opt = build_optimizer(ddp.module, cfg.train)

    def ddp_step():
        loss = causal_lm_loss(ddp(x), y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(ddp.parameters(), cfg.train.grad_clip)
        ddp_opt.step()
        ddp_opt.zero_grad(set_to_none=True)

    # The engine exactly as lmforge's trainer builds it: generated DeepSpeed JSON.
    ds_model, _ = build(size)
    engine, *_ = deepspeed.initialize(
        model=ds_model, optimizer=build_optimizer(ds_model, cfg.train),
        config=build_deepspeed_config(cfg.train, cfg.deepspeed, cfg.world_size,
                                      dist.get_backend()),
    )

    def ds_step():
        loss = causal_lm_loss(engine(x), y)
        engine.backward(loss)
        engine.step()

    medians = _interleaved_medians({"ddp": ddp_step, "zero2": ds_step}, steps)
    comm = _exposed_comm_seconds(sum(p.numel() for p in model.parameters()), world)
    if rank == 0:
        out.put((medians["ddp"], medians["zero2"], comm))
    dist.barrier()
    dist.destroy_process_group()


def _exposed_comm_seconds(numel: int, world: int) -> float:
    """Seconds for one all-reduce of every gradient plus one all-gather of every parameter.

    ZeRO-2 moves these bytes each step. DDP hides its all-reduce behind backward on a
    background thread; DeepSpeed on CPU has no streams and reduces synchronously, so this is
    the time a CPU ZeRO-2 step adds to DDP's at the least.
    """
    grads, gathered = torch.ones(numel), torch.empty(numel)
    shard = torch.ones(numel // world)
    gathered = gathered[: shard.numel() * world]

    def comm():
        dist.all_reduce(grads)
        dist.all_gather_into_tensor(gathered, shard)

    return _interleaved_medians({"comm": comm}, 3)["comm"]


def _spawn(fn, world: int, *args):
    """Runs ``fn(rank, world, port, *args, queue)`` on ``world`` processes; rank 0's result."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    queue = mp.get_context("spawn").SimpleQueue()
    mp.start_processes(fn, args=(world, port, *args, queue), nprocs=world, start_method="spawn")
    return queue.get()


def _init_rank(rank: int, world: int, port: int) -> None:
    import deepspeed

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    deepspeed.init_distributed(dist_backend="gloo", verbose=False)


def _lmforge_engine(size: str, *overrides: str, load_universal: bool = False):
    """A DeepSpeed engine built the way launch/train/build.py builds it."""
    import deepspeed

    cfg = _engine_config(size, *overrides)
    model, tokens = build(size)
    optimizer = build_optimizer(model, cfg.train, cfg.deepspeed.offload_optimizer != "none")
    ds_config = build_deepspeed_config(cfg.train, cfg.deepspeed, dist.get_world_size(),
                                       dist.get_backend(), load_universal)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    x, y = tokens[:, :-1], tokens[:, 1:]

    def step():
        engine.backward(causal_lm_loss(engine(x), y))
        engine.step()

    return engine, step


def _offload_rss(rank: int, world: int, port: int, size: str, offload: str, out) -> None:
    """RSS growth of one engine (own processes, so neither variant pays the other's
    one-time costs): from before building it to after its third step."""
    _init_rank(rank, world, port)
    before = psutil.Process().memory_info().rss
    _, step = _lmforge_engine(size, f"--deepspeed.offload_optimizer={offload}")
    for _ in range(3):
        step()
    if rank == 0:
        out.put(psutil.Process().memory_info().rss - before)
    dist.barrier()
    dist.destroy_process_group()


def _offload_steps(rank: int, world: int, port: int, size: str, steps: int, out) -> None:
    _init_rank(rank, world, port)
    fns = {name: _lmforge_engine(size, f"--deepspeed.offload_optimizer={offload}")[1]
           for name, offload in (("plain", "none"), ("offload", "cpu"))}
    medians = _interleaved_medians(fns, steps)
    if rank == 0:
        out.put(medians)
    dist.barrier()
    dist.destroy_process_group()


def offload(size: str, steps: int) -> None:
    growth = {name: _spawn(_offload_rss, 2, size, device)
              for name, device in (("plain", "none"), ("offload", "cpu"))}
    medians = _spawn(_offload_steps, 2, size, steps)
    plain_mb, off_mb = growth["plain"] / 2**20, growth["offload"] / 2**20
    bench(f"offload_memory_saving_{size}", 1 - off_mb / plain_mb, "report",
          plain_rss_growth_mb=round(plain_mb, 1), offload_rss_growth_mb=round(off_mb, 1),
          zero_stage=2, processes=2, note="CPU: device memory is host memory")
    bench(f"offload_step_cost_{size}", medians["offload"] / medians["plain"] - 1, "report",
          plain_step_s=round(medians["plain"], 4), offload_step_s=round(medians["offload"], 4),
          steps=steps, optimizer="DeepSpeedCPUAdam vs torch AdamW (fused)")


def _reshape(rank: int, world: int, port: int, size: str, root: str, out) -> None:
    _init_rank(rank, world, port)
    root = Path(root)
    if world == 2:  # write the checkpoint
        engine, step = _lmforge_engine(size)
        step()
        ckpt.save_checkpoint(engine, root, 1, {}, keep=1)
        result = None
    else:  # resume it on one process: conversion + load, then a load of the kept copy
        engine, _ = _lmforge_engine(size, load_universal=True)
        folder = root / ckpt.tag_for(1)
        start = time.perf_counter()
        ckpt.universal_copy(folder)
        converted = time.perf_counter()
        ckpt.load_checkpoint(engine, folder)
        result = (converted - start, time.perf_counter() - converted)
    if rank == 0:
        out.put(result)
    dist.barrier()
    dist.destroy_process_group()


def reshape_resume(size: str) -> None:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        _spawn(_reshape, 2, size, tmp)
        convert_s, load_s = _spawn(_reshape, 1, size, tmp)
    bench(f"reshape_resume_seconds_{size}", convert_s + load_s, "< 30", convert_s=round(
        convert_s, 2), load_s=round(load_s, 2), zero_stage=2, from_world=2, to_world=1)


def ddp_vs_zero2(size: str, steps: int) -> None:
    ddp, ds, comm = _spawn(_ddp_vs_zero2, 2, size, steps)
    _, batch, seq = SIZES[size]
    bench(f"engine_zero2_vs_ddp_{size}", ddp / ds, ">= 0.87", ddp_step_s=round(ddp, 4),
          zero2_step_s=round(ds, 4), batch=batch, seq_len=seq, steps=steps, processes=2,
          backend="gloo", precision="fp32", gloo_allreduce_plus_allgather_s=round(comm, 4),
          ratio_bound_without_overlap=round(ddp / (ddp + comm), 4))


def saved_activation_bytes(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> int:
    """Bytes of the distinct tensors autograd keeps for backward during one forward."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        if t.device.type != "meta" and not isinstance(t, torch.nn.Parameter):
            storage = t.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = causal_lm_loss(model(x), y)
    loss.backward()
    model.zero_grad(set_to_none=True)
    return sum(n for ptr, n in seen.items() if ptr not in params)


def activation_checkpointing(size: str, steps: int) -> None:
    torch.set_num_threads(2)
    step_fns, saved = {}, {}
    for mode in ("none", "full"):
        model, tokens = build(size)
        apply_activation_checkpointing(model, mode)
        x, y = tokens[:, :-1], tokens[:, 1:]

        def step(model=model, x=x, y=y):
            causal_lm_loss(model(x), y).backward()
            model.zero_grad(set_to_none=True)

        step_fns[mode] = step
        saved[mode] = saved_activation_bytes(model, x, y)
    times = _interleaved_medians(step_fns, steps)
    (t0, m0), (t1, m1) = (times["none"], saved["none"]), (times["full"], saved["full"])
    bench(f"ac_full_time_overhead_{size}", t1 / t0 - 1, "<= 0.40", none_s=round(t0, 4),
          full_s=round(t1, 4), steps=steps)
    bench(f"ac_full_activation_saving_{size}", 1 - m1 / m0, ">= 0.50",
          none_mb=round(m0 / 2**20, 2), full_mb=round(m1 / 2**20, 2))


def compile_speedup(size: str, steps: int) -> None:
    torch.set_num_threads(2)
    step_fns, compile_s = {}, 0.0
    for name in ("eager", "compiled"):
        model, tokens = build(size)
        compile_blocks(model, name == "compiled")
        x, y = tokens[:, :-1], tokens[:, 1:]

        def step(model=model, x=x, y=y):
            causal_lm_loss(model(x), y).backward()
            model.zero_grad(set_to_none=True)

        if name == "compiled":
            start = time.perf_counter()
            step()  # compiles every block's graph (one, shared by the 12 alike blocks)
            compile_s = time.perf_counter() - start
        step_fns[name] = step
    times = _interleaved_medians(step_fns, steps)
    eager, compiled = times["eager"], times["compiled"]
    bench(f"compile_speedup_{size}", eager / compiled, ">= 1.0 (report)",
          eager_s=round(eager, 4), compiled_s=round(compiled, 4),
          compile_s=round(compile_s, 1), steps=steps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny model only, few steps")
    parser.add_argument("--only", choices=["zero2", "ac", "offload", "reshape", "compile"],
                        nargs="*",
                        help="run only these groups (default: all)")
    args = parser.parse_args()
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    groups = set(args.only or ["zero2", "ac", "offload", "reshape", "compile"])
    sizes = ["tiny"] if args.quick else list(SIZES)
    for size in sizes:
        steps = 20 if size == "tiny" else 6
        if "zero2" in groups:
            ddp_vs_zero2(size, steps)
        if "ac" in groups and size != "124m-seq1024":
            activation_checkpointing(size, 20 if size == "tiny" else 4)
        if "offload" in groups and size != "124m-seq1024":
            offload(size, steps)
        if "compile" in groups and size != "124m-seq1024":
            compile_speedup(size, 20 if size == "tiny" else 5)
    if "reshape" in groups:  # the goal is stated for gpt2-124m; --quick measures tiny
        reshape_resume("tiny" if args.quick else "124m")


if __name__ == "__main__":
    main()
