"""Cost of MLflow tracking on a training step: lmforge's Tracker on vs off, side by side.

A small torch transformer trains on CPU; blocks of steps alternate between a disabled tracker
and a real one (sqlite store in a temp run dir, or `--uri`), logging 10 metrics every
`--log-every` steps (default 1, harsher than the engine's default of 10) with system metrics
on. Alternating blocks and medians keep a noisy shared machine from deciding the result.

    .venv/bin/python benchmarks/tracking.py [--quick] [--uri http://127.0.0.1:5000]

Prints `BENCH {"metric": "tracking_overhead", ...}`: median over rounds of (step time with
tracking - without) / step time without, each round pairing two adjacent blocks (lower is
better, goal <= 0.01); and `tracking_cpu_overhead`: (time inside tracker calls + CPU used by
the delivery thread) / step time, an upper bound that machine noise does not move.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path

import psutil
import torch
from torch import nn

from lmforge.launch.config import TrackingConfig
from lmforge.launch.tracking import Tracker


def build_model(d_model: int, layers: int, vocab: int) -> nn.Module:
    """A small causal-LM-shaped stack: embedding, encoder layers, output head."""
    layer = nn.TransformerEncoderLayer(d_model, nhead=4, dim_feedforward=4 * d_model,
                                       batch_first=True, dropout=0.0)
    return nn.Sequential(nn.Embedding(vocab, d_model), nn.TransformerEncoder(layer, layers),
                         nn.Linear(d_model, vocab))


def run_block(model: nn.Module, opt: torch.optim.Optimizer, tracker: Tracker, batch: torch.Tensor,
              first_step: int, steps: int, log_every: int) -> tuple[list[float], float]:
    """Train `steps` steps, logging every `log_every`; returns step times and time in tracker."""
    step_times, in_tracker = [], 0.0
    vocab = model[-1].out_features
    for step in range(first_step, first_step + steps):
        began = time.perf_counter()
        logits = model(batch[:, :-1])  # (B, T, V)
        loss = nn.functional.cross_entropy(logits.reshape(-1, vocab), batch[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        metrics = {
            "train/loss": loss.item(), "train/lr": 1e-3, "train/grad_norm": grad_norm.item(),
            "train/tokens_per_s": 1.0, "train/samples_per_s": 1.0, "train/step_time_s": 1.0,
            "train/tokens_seen": float(step), "train/mfu": 0.1, "mem/rss_gb": 1.0,
            "mem/peak_gb": 1.0,
        }
        call = time.perf_counter()
        if step % log_every == 0:
            tracker.log_metrics(metrics, step)
        done = time.perf_counter()
        in_tracker += done - call
        step_times.append(done - began)
    return step_times, in_tracker


def thread_cpu_s(name: str) -> float:
    """CPU seconds (user + system) used so far by the live thread called `name`."""
    native = {t.native_id for t in threading.enumerate() if t.name == name}
    return sum(t.user_time + t.system_time for t in psutil.Process().threads() if t.id in native)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer, smaller steps (< 2 min)")
    parser.add_argument("--uri", default=None, help="MLflow tracking URI (default: sqlite)")
    parser.add_argument("--log-every", type=int, default=1,
                        help="steps between log_metrics calls (1: the harshest case)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.manual_seed(0)
    rounds, block = (4, 25) if args.quick else (10, 50)
    d_model, layers, seq, batch_size, vocab = 256, 2, 128, 8, 4096
    model = build_model(d_model, layers, vocab)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    batch = torch.randint(0, vocab, (batch_size, seq + 1))

    with tempfile.TemporaryDirectory() as tmp:
        cfg = TrackingConfig(uri=args.uri, system_metrics=True)
        tracker = Tracker(cfg, Path(tmp) / "run")
        tracker.start(run_name="tracking-benchmark")
        off = Tracker.disabled()
        run_block(model, opt, off, batch, 0, 5, 1)  # warm-up: allocator, autograd graph
        times: dict[str, list[float]] = {"off": [], "on": []}
        round_ratios = []
        in_tracker, step = 0.0, 0
        worker_cpu_start = thread_cpu_s("lmforge-tracking")
        for _ in range(rounds):
            medians = {}
            for name, t in (("off", off), ("on", tracker)):
                block_times, spent = run_block(model, opt, t, batch, step, block,
                                                args.log_every)
                times[name] += block_times
                medians[name] = statistics.median(block_times)
                step += block
                if name == "on":
                    in_tracker += spent
            round_ratios.append(medians["on"] / medians["off"] - 1)
        # Before close(): the thread's CPU while training ran (it delivers every 5 s).
        worker_cpu = thread_cpu_s("lmforge-tracking") - worker_cpu_start
        began = time.perf_counter()
        delivered = tracker.close(timeout=120)
        close_s = time.perf_counter() - began

    off_s, on_s = statistics.median(times["off"]), statistics.median(times["on"])
    n_on = len(times["on"])
    # Paired rounds (on vs off block next to it) cancel slow drifts of machine load.
    overhead = statistics.median(round_ratios)
    # Upper bound that does not depend on noise: the training thread's time in tracker calls
    # plus all CPU the delivery thread used, as if none of it overlapped with training.
    cpu_overhead = (in_tracker + worker_cpu) / n_on / off_s
    print(f"{'':24}{'median step ms':>16}{'mean step ms':>14}")
    for name in ("off", "on"):
        print(f"tracking {name:<15}{statistics.median(times[name]) * 1e3:16.2f}"
              f"{statistics.mean(times[name]) * 1e3:14.2f}")
    print(f"in tracker calls: {in_tracker / n_on * 1e6:.1f} us/step; delivery thread CPU: "
          f"{worker_cpu / n_on * 1e6:.1f} us/step; close(): {close_s:.2f} s")
    detail = {
        "step_ms_off": round(off_s * 1e3, 3), "step_ms_on": round(on_s * 1e3, 3),
        "whole_run_median_ratio": round((on_s - off_s) / off_s, 4),
        "round_ratios": [round(r, 4) for r in round_ratios],
        "delivery_thread_cpu_us_per_step": round(worker_cpu / n_on * 1e6, 1),
        "log_metrics_us_per_step": round(in_tracker / n_on * 1e6, 2),
        "metrics_per_call": 10, "log_every": args.log_every, "steps_each": n_on,
        "store": args.uri or "sqlite",
        "system_metrics": True, "close_s": round(close_s, 2), "all_delivered": delivered,
    }
    print("BENCH " + json.dumps({"metric": "tracking_overhead", "value": round(overhead, 4),
                                 "goal": 0.01, "detail": detail}))
    print("BENCH " + json.dumps({
        "metric": "tracking_cpu_overhead", "value": round(cpu_overhead, 5), "goal": 0.01,
        "detail": {"note": "(time in Tracker calls + delivery thread CPU) / step time; an "
                           "upper bound insensitive to machine noise"}}))


if __name__ == "__main__":
    main()
