"""Memory of a training step, side by side in one run (see ../shared/BENCHMARKS.md).

Every configuration runs in a fresh process (``--child``), so allocator state and earlier
peaks cannot leak between them. On CPU a step's peak is measured as the kernel's resident
high-water mark: after the model, optimizer and batch exist, ``/proc/self/clear_refs``
(``5``) resets ``VmHWM`` to the current RSS, one step runs, and ``VmHWM`` minus the RSS at
the reset is the step's peak *above* what already existed (printed beside the totals).
On CUDA ``torch.cuda.max_memory_allocated`` is used the same way.

- ``loss_memory_vs_plain_128k``: step peak (forward, backward, AdamW step) with a 128,256
  vocabulary and ``train.loss_chunk_tokens`` ÷ the plain loss's (goal ≤ 0.5); the chunked
  loss's step time ÷ the plain one's at 128k and at a small vocabulary is printed beside it.
- ``docmask_memory_vs_causal@8192``: forward + backward peak with packed-document masking
  ÷ plain causal attention at seq 8,192 (goal ≤ 1.2). On CPU this is the segments path
  (one SDPA call per document length, ``model/document_masks.py``); with ``--device cuda``
  FlexAttention. The dense (B, 1, T, T) mask's peak and time are printed beside it.
- ``memory_plan_error_max``: worst |plan − measured| ÷ measured of the dry-run memory plan
  (``model/memory.py``) over real DeepSpeed steps on 2 CPU processes (ZeRO 0/2/3,
  checkpointing on/off, two sequence lengths) (goal ≤ 0.15). Measured as the bytes a rank
  holds (fixed glibc mmap threshold, above a baseline taken after a warm-up engine has done
  DeepSpeed's lazy imports); ``--glibc-default`` measures the default allocator's RSS, which
  keeps freed heap and grows with the step count (see ``plan_error``).
- ``import_rss_vs_whole``: peak RSS of each of 2 ranks importing a Hugging Face source
  (``llama-1b`` shape, bf16 shards, made on the spot) under ZeRO-3, import gate included,
  ÷ one process loading it whole in fp32 with ``transformers`` (goal ≤ 0.6 per rank; the
  figure is the worse rank); see ``memory_import.py``.
- ``zero3_build_rss_vs_whole_1b``: peak RSS of each of 2 ranks building and initialising
  ``llama-1b`` from scratch under ZeRO-3 (``zero.Init``, one gathered module initialised at
  a time) ÷ one process building it whole (goal ≤ 0.6); see ``memory_build.py``.

glibc keeps freed allocations below its mmap threshold in the heap, so RSS also counts
memory the process no longer uses (before ZeRO-3 built partitioned, the whole build left
~140 MB of it resident here). ``--live`` runs the children with
``MALLOC_MMAP_THRESHOLD_=65536``, so freed blocks above 64 KiB go back to the kernel and
RSS follows the live bytes, which is what the plan predicts; the line says which it was.

Usage: ``.venv/bin/python benchmarks/memory.py [--quick] [--live]
[--only loss|docmask|plan|import|build] [--device cpu|cuda]``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MiB = 2**20
LIVE_ENV: dict[str, str] = {}  # --live: {"MALLOC_MMAP_THRESHOLD_": "65536"}


def bench(metric: str, value: float, goal: str, **detail) -> None:
    print("BENCH " + json.dumps({"metric": metric, "value": round(value, 4), "goal": goal,
                                 "detail": detail}), flush=True)


# ---- measuring one step in this process ----------------------------------------------
def _rss() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def _hwm() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def step_peak(step, device: str) -> dict[str, float]:
    """Runs ``step()`` once; returns its peak above the memory held before it, in bytes."""
    import torch

    if device == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        step()
        torch.cuda.synchronize()
        return {"before": before, "peak": torch.cuda.max_memory_allocated() - before,
                "seconds": time.perf_counter() - start}
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")  # VmHWM := VmRSS now
    before = _rss()
    start = time.perf_counter()
    step()
    return {"before": before, "peak": _hwm() - before, "seconds": time.perf_counter() - start}


def _timed(step, rounds: int) -> float:
    """Median process CPU seconds of ``step`` (one thread: other processes on a shared
    machine stretch wall time, not the work done)."""
    import statistics

    times = []
    for _ in range(rounds):
        start = time.process_time()
        step()
        times.append(time.process_time() - start)
    return statistics.median(times)


# ---- children ---------------------------------------------------------------------------
def child_loss(vocab: int, seq: int, chunk: int, rounds: int, device: str) -> dict:
    """A decoder training step (fwd, bwd, AdamW) with the plain or the chunked loss; the
    peak is the second step's (the first also allocates AdamW's moments)."""
    import torch

    from lmforge.launch.train.objectives import vocab_loss
    from lmforge.model import ModelConfig

    torch.manual_seed(0)
    cfg = ModelConfig.from_preset("tiny", vocab_size=vocab, d_model=256, n_layers=2,
                                  n_heads=4, n_kv_heads=2, d_ff=512, max_seq_len=seq)
    model = cfg.build().to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randint(0, vocab, (1, seq + 1), device=device)

    def step() -> None:
        loss = vocab_loss(model, {"input_ids": x[:, :-1]}, x[:, 1:], chunk)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # steady state: AdamW's moments exist, as in every step after the first
    out = step_peak(step, device)
    out["median_seconds"] = _timed(step, rounds) if rounds else None
    return out


def _documents(seq: int, mean: int, seed: int = 0):
    import torch

    g = torch.Generator().manual_seed(seed)
    lengths, total = [], 0
    while total < seq:
        n = min(int(torch.randint(mean // 4, 2 * mean, (1,), generator=g)), seq - total)
        lengths.append(n)
        total += n
    return torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))[None]


def child_docmask(seq: int, masked: bool, rounds: int, device: str,
                  backend: str = "auto") -> dict:
    """Forward + backward of a decoder at ``seq`` tokens, with or without packed documents
    (masked with ``document_mask_backend(backend)``)."""
    import torch

    from lmforge.model import ModelConfig, causal_lm_loss, segment_positions
    from lmforge.model.document_masks import document_mask_backend
    from lmforge.model.layers import build_attention_mask

    torch.manual_seed(0)
    cfg = ModelConfig.from_preset("tiny", vocab_size=512, d_model=256, n_layers=2, n_heads=4,
                                  n_kv_heads=2, d_ff=512, max_seq_len=seq)
    model = cfg.build().to(device)
    x = torch.randint(0, 512, (1, seq + 1), device=device)
    inputs = {"input_ids": x[:, :-1]}
    if masked:
        segments = _documents(seq, 1024).to(device)
        inputs |= {"segment_ids": segments, "position_ids": segment_positions(segments)}

    def step() -> None:
        with document_mask_backend(backend):
            causal_lm_loss(model(**inputs), x[:, 1:]).backward()
        model.zero_grad(set_to_none=True)

    out = step_peak(step, device)
    out["median_seconds"] = _timed(step, rounds) if rounds else None
    out["backend"] = "sdpa causal"
    if masked:
        index = torch.arange(seq, device=device)[None]
        with document_mask_backend(backend):
            mask, _ = build_attention_mask(cfg, index, index, causal=True,
                                           q_segments=segments, k_segments=segments)
        out["backend"] = type(mask).__name__  # BlockMask, DocumentSegments or Tensor (dense)
    return out


PLAN_MODEL = ["--model.preset=tiny", "--model.d_model=512", "--model.n_layers=4",
              "--model.n_heads=8", "--model.n_kv_heads=4", "--model.d_ff=1536",
              "--model.vocab_size=8192"]


def _warm_up_engine(ds_config: dict) -> None:
    """One step of a throwaway 8 x 8 engine with the same DeepSpeed config, so the modules
    ``deepspeed.initialize`` and the first step import lazily (torch._dynamo, sympy,
    torch.onnx, ...: 820 modules and ~200 k Python objects at ZeRO-0, 1,400 modules at
    ZeRO-3, 50-110 MiB of RSS) are in the baseline: they are the interpreter's, host memory
    of a fixed size, not what the plan counts (and on CUDA not device memory)."""
    import gc

    import deepspeed
    import torch

    model = torch.nn.Linear(8, 8)
    engine, *_ = deepspeed.initialize(model=model, config=ds_config,
                                      optimizer=torch.optim.AdamW(model.parameters()))
    engine.backward(engine(torch.ones(ds_config["train_micro_batch_size_per_gpu"], 8)).sum())
    engine.step()
    del engine, model
    gc.collect()


def _plan_rank(rank: int, world: int, port: int, overrides: list[str], queue) -> None:
    """One rank: a DeepSpeed engine built as launch/train/build.py builds it, two steps."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank), OMP_NUM_THREADS="1")
    import deepspeed
    import torch
    import torch.distributed as dist

    from lmforge.launch.config import load_config
    from lmforge.launch.config.deepspeed import build_deepspeed_config
    from lmforge.launch.train.activation_checkpointing import apply_activation_checkpointing
    from lmforge.launch.train.objectives import vocab_loss
    from lmforge.launch.train.optim import build_optimizer
    from lmforge.launch.train.source_load import model_build_context, uses_partitioned_build

    torch.set_num_threads(1)
    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    cfg = load_config(ROOT / "configs" / "tiny.yaml", overrides)
    torch.manual_seed(0)
    x = torch.randint(0, cfg.model.vocab_size, (cfg.train.micro_batch_size,
                                                cfg.data.seq_len + 1))
    ds_config = build_deepspeed_config(cfg.train, cfg.deepspeed, world, dist.get_backend())
    _warm_up_engine(ds_config)
    dist.barrier()
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")
    before = _rss()
    partitioned = uses_partitioned_build(cfg.deepspeed.zero_stage, cfg.trainable.mode)
    with model_build_context(partitioned, ds_config):  # ZeRO-3: zero.Init
        model = cfg.model.build()
    apply_activation_checkpointing(model, cfg.train.activation_checkpointing,
                                   cfg.train.checkpoint_every_n_layers)
    engine, *_ = deepspeed.initialize(
        model=model, optimizer=build_optimizer(model, cfg.train), config=ds_config)
    for _ in range(2):
        engine.backward(vocab_loss(engine, {"input_ids": x[:, :-1]}, x[:, 1:],
                                   cfg.train.loss_chunk_tokens))
        engine.step()
    peak = torch.tensor([float(_hwm() - before)])
    dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    if rank == 0:
        queue.put(float(peak))
    dist.barrier()
    dist.destroy_process_group()


def child_plan(overrides: list[str]) -> dict:
    """Measured peak per rank (the larger of 2) and the plan of the same config."""
    import socket

    import torch.multiprocessing as mp

    from lmforge.launch.config import load_config
    from lmforge.launch.memory_plan import run_memory_plan

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    queue = mp.get_context("spawn").SimpleQueue()
    mp.start_processes(_plan_rank, args=(2, port, overrides, queue), nprocs=2,
                       start_method="spawn")
    plan = run_memory_plan(load_config(ROOT / "configs" / "tiny.yaml", overrides))
    return {"peak": queue.get(), "plan": plan.device_total,
            "parts": {name: value for name, value in plan.rows()}}


CHILDREN = {"loss": child_loss, "docmask": child_docmask, "plan": child_plan}


def run_child(kind: str, allocator: dict[str, str] | None = None, **kwargs) -> dict:
    """One measurement in a fresh interpreter (one thread, like a rank under DeepSpeed);
    ``allocator``: glibc settings for it (default: ``--live``'s)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           **(LIVE_ENV if allocator is None else allocator)}
    done = subprocess.run([sys.executable, __file__, "--child", json.dumps([kind, kwargs])],
                          capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{kind} {kwargs} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# ---- the benchmarks ---------------------------------------------------------------------
def loss_memory(quick: bool, device: str) -> None:
    seq, chunk, rounds = (1024, 256, 2) if quick else (2048, 512, 3)
    plain = run_child("loss", vocab=128256, seq=seq, chunk=0, rounds=rounds, device=device)
    chunked = run_child("loss", vocab=128256, seq=seq, chunk=chunk, rounds=rounds,
                        device=device)
    small = {c: run_child("loss", vocab=8192, seq=seq, chunk=c, rounds=rounds + 2,
                          device=device) for c in (0, chunk)}
    bench("loss_memory_vs_plain_128k", chunked["peak"] / plain["peak"], "<= 0.5",
          device=device, seq_len=seq, micro_batch=1, loss_chunk_tokens=chunk,
          plain_step_peak_mib=round(plain["peak"] / MiB), step_peak_mib=round(
              chunked["peak"] / MiB),
          plain_total_mib=round((plain["before"] + plain["peak"]) / MiB),
          total_mib=round((chunked["before"] + chunked["peak"]) / MiB),
          time_vs_plain_128k=round(chunked["median_seconds"] / plain["median_seconds"], 3),
          time_vs_plain_vocab8192=round(small[chunk]["median_seconds"]
                                        / small[0]["median_seconds"], 3),
          logits_fp32_mib=round(seq * 128256 * 4 / MiB))


def docmask_memory(quick: bool, device: str) -> None:
    seq = 4096 if quick else 8192
    causal = run_child("docmask", seq=seq, masked=False, rounds=2, device=device)
    masked = run_child("docmask", seq=seq, masked=True, rounds=2, device=device)
    dense = run_child("docmask", seq=seq, masked=True, rounds=2, device=device,
                      backend="dense")
    bench(f"docmask_memory_vs_causal@{seq}", masked["peak"] / causal["peak"], "<= 1.2",
          device=device, backend=masked["backend"],
          causal_peak_mib=round(causal["peak"] / MiB), peak_mib=round(masked["peak"] / MiB),
          dense_peak_mib=round(dense["peak"] / MiB), dense_mask_mib=round(seq * seq / MiB),
          time_vs_causal=round(masked["median_seconds"] / causal["median_seconds"], 3),
          dense_time_vs_causal=round(dense["median_seconds"] / causal["median_seconds"], 3))


def plan_error(quick: bool, glibc_default: bool = False) -> None:
    """The dry-run plan against real DeepSpeed steps (fp32, 2 ranks on this CPU).

    The plan counts the bytes of the tensors a rank holds, what ``max_memory_allocated``
    measures on CUDA. On CPU the ranks run with a fixed glibc mmap threshold (64 KiB), so a
    freed tensor goes back to the kernel and the resident peak is those bytes. With glibc's
    default (a threshold that rises to 32 MiB as large blocks are freed) the ranks keep freed
    heap resident: 12-45 % above the live peak here, growing with the step count (ZeRO-0
    1,015 MiB after 2 steps, 1,159 after 7; live 897 both) and varying by ±130 MiB between
    runs at ZeRO-3; ``--glibc-default`` measures that instead (RESULTS.md, 2026-12-07)."""
    allocator = {} if glibc_default else {"MALLOC_MMAP_THRESHOLD_": "65536"}
    configs = [(0, "none", 512), (2, "none", 512), (3, "none", 512), (2, "full", 512),
               (0, "full", 256), (3, "full", 256)]
    if not quick:
        configs += [(2, "none", 256), (3, "none", 256), (0, "none", 256), (0, "full", 512)]
    from concurrent.futures import ThreadPoolExecutor

    def measure(config: tuple[int, str, int]) -> dict:
        stage, ac, seq = config
        return run_child("plan", allocator=allocator, overrides=[
            *PLAN_MODEL, f"--deepspeed.zero_stage={stage}", "--train.precision=fp32",
            f"--train.activation_checkpointing={ac}", f"--data.seq_len={seq}",
            "--train.micro_batch_size=4", "--train.global_batch_size=null",
            "--train.grad_accum_steps=1", "--launch.nproc_per_node=2"])

    errors = {}
    # two configurations at a time: each rank's peak RSS is its own process's, so running
    # side by side changes the wall time only
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(measure, configs))
    for (stage, ac, seq), out in zip(configs, results, strict=True):
        name = f"zero{stage}/{ac}/seq{seq}"
        errors[name] = (out["plan"] - out["peak"]) / out["peak"]
        print(f"{name:<20} plan {out['plan'] / MiB:8.1f} MiB  measured {out['peak'] / MiB:8.1f}"
              f" MiB  error {errors[name]:+.3f}", flush=True)
    worst = max(errors, key=lambda k: abs(errors[k]))
    bench("memory_plan_error_max", abs(errors[worst]), "<= 0.15", worst=worst,
          errors={k: round(v, 3) for k, v in errors.items()}, precision="fp32", ranks=2,
          measured="peak RSS above the RSS before the model is built (after a warm-up "
                   "engine's imports), max over ranks",
          allocator="glibc default" if glibc_default
          else "fixed mmap threshold 64 KiB: freed tensors returned (live bytes)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes (< 2 min)")
    parser.add_argument("--only", choices=["loss", "docmask", "plan", "import", "build"],
                        default=None)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--live", action="store_true",
                        help="children return freed memory to the kernel (see above)")
    parser.add_argument("--glibc-default", action="store_true",
                        help="plan: measure the ranks with glibc's default allocator")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.live:
        LIVE_ENV["MALLOC_MMAP_THRESHOLD_"] = "65536"
    if args.child:
        kind, kwargs = json.loads(args.child)
        print(json.dumps(CHILDREN[kind](**kwargs)), flush=True)
        return
    if args.only in (None, "loss"):
        loss_memory(args.quick, args.device)
    if args.only in (None, "docmask"):
        docmask_memory(args.quick, args.device)
    if args.only in (None, "plan"):
        plan_error(args.quick, args.glibc_default)
    if args.only in (None, "import"):
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from memory_import import import_rss

        import_rss(args.quick, LIVE_ENV, bench)
    if args.only in (None, "build"):
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from memory_build import build_rss

        build_rss(args.quick, LIVE_ENV, bench)


if __name__ == "__main__":
    main()
