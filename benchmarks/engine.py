"""Training-engine costs, side by side in one run (see ../shared/BENCHMARKS.md).

- ``engine_zero2_vs_ddp``: plain PyTorch DDP step time ÷ DeepSpeed ZeRO-2 step time, same
  model, batch and optimizer (AdamW), 2 processes on gloo (CPU), fp32. Goal ≥ 0.87.
- ``ac_full_time_overhead``: extra fwd+bwd time with full activation checkpointing ÷ without.
  Goal ≤ 0.40.
- ``ac_full_activation_saving``: 1 − (bytes saved for backward with full AC ÷ without),
  counted with autograd's saved-tensor hooks. Goal ≥ 0.50.

Run: ``.venv/bin/python benchmarks/engine.py [--quick]``.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lmforge.launch.parallelize import apply_activation_checkpointing
from lmforge.model import ModelConfig, causal_lm_loss

SIZES = {  # name: (preset overrides, micro batch, seq len)
    "tiny": ({"vocab_size": 2048}, 8, 128),
    "124m": ({"vocab_size": 50304}, 1, 256),
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


def _timed_steps(step, steps: int) -> float:
    step()  # warm-up
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _ddp_vs_zero2(rank: int, world: int, port: int, size: str, steps: int, out) -> None:
    import deepspeed

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    model, tokens = build(size)
    x, y = tokens[:, :-1], tokens[:, 1:]

    ddp = torch.nn.parallel.DistributedDataParallel(model)
    ddp_opt = torch.optim.AdamW(ddp.parameters(), lr=1e-4)

    def ddp_step():
        loss = causal_lm_loss(ddp(x), y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(ddp.parameters(), 1.0)
        ddp_opt.step()
        ddp_opt.zero_grad(set_to_none=True)

    ds_model, _ = build(size)
    config = {
        "train_micro_batch_size_per_gpu": x.shape[0],
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 1.0,
        "zero_optimization": {"stage": 2, "overlap_comm": True, "contiguous_gradients": True},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
    }
    engine, *_ = deepspeed.initialize(
        model=ds_model, optimizer=torch.optim.AdamW(ds_model.parameters(), lr=1e-4), config=config
    )

    def ds_step():
        loss = causal_lm_loss(engine(x), y)
        engine.backward(loss)
        engine.step()

    rounds = []
    for _ in range(2):  # alternate so that load changes hit both alike
        rounds.append((_timed_steps(ddp_step, steps), _timed_steps(ds_step, steps)))
    if rank == 0:
        out.put(rounds)
    dist.barrier()
    dist.destroy_process_group()


def ddp_vs_zero2(size: str, steps: int) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    mp.start_processes(_ddp_vs_zero2, args=(2, port, size, steps, queue), nprocs=2,
                       start_method="spawn")
    rounds = queue.get()
    ddp = statistics.median(r[0] for r in rounds)
    ds = statistics.median(r[1] for r in rounds)
    bench(f"engine_zero2_vs_ddp_{size}", ddp / ds, ">= 0.87", ddp_step_s=round(ddp, 4),
          zero2_step_s=round(ds, 4), processes=2, backend="gloo", precision="fp32")


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
    results = {}
    for mode in ("none", "full"):
        model, tokens = build(size)
        apply_activation_checkpointing(model, mode)
        x, y = tokens[:, :-1], tokens[:, 1:]

        def step(model=model, x=x, y=y):
            causal_lm_loss(model(x), y).backward()
            model.zero_grad(set_to_none=True)

        results[mode] = (_timed_steps(step, steps), saved_activation_bytes(model, x, y))
    (t0, m0), (t1, m1) = results["none"], results["full"]
    bench(f"ac_full_time_overhead_{size}", t1 / t0 - 1, "<= 0.40", none_s=round(t0, 4),
          full_s=round(t1, 4))
    bench(f"ac_full_activation_saving_{size}", 1 - m1 / m0, ">= 0.50",
          none_mb=round(m0 / 2**20, 2), full_mb=round(m1 / 2**20, 2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny model only, few steps")
    args = parser.parse_args()
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    sizes = ["tiny"] if args.quick else ["tiny", "124m"]
    steps = 5 if args.quick else 10
    for size in sizes:
        ddp_vs_zero2(size, steps)
        activation_checkpointing(size, steps)


if __name__ == "__main__":
    main()
