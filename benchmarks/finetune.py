"""Fine-tuning costs, side by side in one run (see ../shared/BENCHMARKS.md).

- ``lora_optimizer_memory_ratio``: AdamW state bytes with LoRA rank 8 (``trainable.mode=lora``,
  default targets ``qkv`` and ``out``) ÷ with full fine-tuning, gpt2-124m. Goal ≤ 0.05.
- ``lora_step_time_ratio``: LoRA step time ÷ full fine-tuning step time, gpt2-124m, same
  batch. Goal ≤ 1.0 (no slower).
- ``classify_head_only_step_time_ratio`` / ``classify_lora_step_time_ratio``: a bert-base
  [CLS] classifier (2 labels) with ``trainable.mode=head_only`` (frozen body) or ``lora``
  ÷ full fine-tuning. Report only.

One process on the CPU, fp32, lmforge's own pieces (``apply_trainable``, ``build_optimizer``
with its fused AdamW over the trainable parameters only, the objectives' losses); a step is
forward, backward and the optimizer step. Variants are timed interleaved, one step of each in
turn, so machine load hits them alike; the median is reported. Optimizer state is counted
after the first step (AdamW's ``exp_avg``/``exp_avg_sq``/``step`` tensors).

Run: ``.venv/bin/python benchmarks/finetune.py [--quick]``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from lmforge.launch.config import TrainableConfig, TrainConfig
from lmforge.launch.train.optim import build_optimizer
from lmforge.launch.train.trainable import apply_trainable
from lmforge.model import ModelConfig, causal_lm_loss


def bench(metric: str, value: float, goal: str, **detail) -> None:
    print("BENCH " + json.dumps({"metric": metric, "value": round(value, 4), "goal": goal,
                                 "detail": detail}), flush=True)


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    return sum(t.numel() * t.element_size() for s in optimizer.state.values()
               for t in s.values() if torch.is_tensor(t))


def make_step(model: torch.nn.Module, loss_fn: Callable[[], torch.Tensor]
              ) -> tuple[Callable[[], None], torch.optim.Optimizer]:
    optimizer = build_optimizer(model, TrainConfig(lr=1e-4))

    def step() -> None:
        loss = loss_fn()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step, optimizer


def interleaved(steps: dict[str, Callable[[], None]], rounds: int) -> dict[str, float]:
    for step in steps.values():
        step()  # warm-up (and the optimizer state's allocation)
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def decoder_lora(rounds: int, seq: int) -> None:
    cfg = ModelConfig.from_preset("gpt2-124m", vocab_size=50304)
    tokens = torch.randint(0, 50304, (1, seq + 1))
    steps, optimizers, counts = {}, {}, {}
    for mode in ("full", "lora"):
        torch.manual_seed(0)
        model = cfg.build()
        if mode == "lora":
            apply_trainable(model, TrainableConfig(mode="lora", lora_rank=8))
        counts[mode] = sum(p.numel() for p in model.parameters() if p.requires_grad)

        def loss(model=model) -> torch.Tensor:
            return causal_lm_loss(model(tokens[:, :-1]), tokens[:, 1:])

        steps[mode], optimizers[mode] = make_step(model, loss)
    medians = interleaved(steps, rounds)
    full, lora = (state_bytes(optimizers[m]) for m in ("full", "lora"))
    bench("lora_optimizer_memory_ratio", lora / full, "<= 0.05", lora_bytes=lora,
          full_bytes=full, trainable_lora=counts["lora"], trainable_full=counts["full"])
    bench("lora_step_time_ratio", medians["lora"] / medians["full"], "<= 1.0",
          lora_s=round(medians["lora"], 4), full_s=round(medians["full"], 4),
          batch=1, seq_len=seq, rounds=rounds)


def encoder_classify(rounds: int, seq: int, batch: int) -> None:
    cfg = ModelConfig.from_preset("bert-base", num_labels=2, dropout=0.0)
    ids = torch.randint(5, cfg.vocab_size, (batch, seq))
    labels = torch.randint(0, 2, (batch,))
    steps, counts = {}, {}
    for mode in ("full", "head_only", "lora"):
        torch.manual_seed(0)
        model = cfg.build()
        apply_trainable(model, TrainableConfig(mode=mode))
        counts[mode] = sum(p.numel() for p in model.parameters() if p.requires_grad)

        def loss(model=model) -> torch.Tensor:
            return F.cross_entropy(model(ids, head="classify").float(), labels)

        steps[mode] = make_step(model, loss)[0]
    medians = interleaved(steps, rounds)
    for mode in ("head_only", "lora"):
        bench(f"classify_{mode}_step_time_ratio", medians[mode] / medians["full"], "report",
              s=round(medians[mode], 4), full_s=round(medians["full"], 4),
              trainable=counts[mode], trainable_full=counts["full"], batch=batch, seq_len=seq,
              rounds=rounds)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="fewer rounds, shorter rows")
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    rounds = 3 if args.quick else 10
    decoder_lora(rounds, seq=128 if args.quick else 256)
    encoder_classify(rounds, seq=64 if args.quick else 128, batch=4 if args.quick else 8)


if __name__ == "__main__":
    main()
