"""lmforge's decoder against Hugging Face `GPT2LMHeadModel` (SDPA attention) on the CPU.

Both models hold the same weights (mapped with `lmforge.model.to_hf`) and run forward +
backward on the same batch, with the same fp32 loss; timings alternate between the two
so load from other processes hits both alike. Prints

- ``model_vs_hf_gpt2``: HF median step time ÷ lmforge median step time (goal >= 1.0).

Usage: ``.venv/bin/python benchmarks/model.py [--quick] [--steps N] [--batch B]``
(default: gpt2-124m, seq 1024; --quick: 4 layers, seq 512).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from lmforge.model import ModelConfig, causal_lm_loss, parameter_count, to_hf


def step_seconds(model: torch.nn.Module, batch: torch.Tensor, hf: bool) -> tuple[float, float]:
    """One forward + backward; returns (wall seconds, process CPU seconds).

    CPU seconds are reported as well because other processes on a shared machine stretch
    wall time but not the work done."""
    model.zero_grad(set_to_none=True)
    start, cpu_start = time.perf_counter(), time.process_time()
    logits = model(batch[:, :-1]).logits if hf else model(batch[:, :-1])
    causal_lm_loss(logits, batch[:, 1:]).backward()
    return time.perf_counter() - start, time.process_time() - cpu_start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="4 layers, seq 512, 3 steps")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per model")
    parser.add_argument("--batch", type=int, default=1, help="sequences per step")
    args = parser.parse_args()
    torch.set_num_threads(2)
    torch.manual_seed(0)

    overrides = {"n_layers": 4} if args.quick else {}
    seq = 512 if args.quick else 1024
    steps = args.steps or (3 if args.quick else 5)
    cfg = ModelConfig.from_preset("gpt2-124m", dropout=0.0, **overrides)
    ours = cfg.build().train()
    hf_config, tensors = to_hf(cfg, ours.state_dict())
    hf_fields = {k: v for k, v in hf_config.items()
                 if k not in ("architectures", "dtype", "torch_dtype")}
    theirs = GPT2LMHeadModel(GPT2Config(**hf_fields, attn_implementation="sdpa")).train()
    missing, unexpected = theirs.load_state_dict(tensors, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    theirs.tie_weights()

    batch = torch.randint(0, cfg.vocab_size, (args.batch, seq + 1))
    with torch.no_grad():  # same weights, same logits: the comparison is like for like
        diff = (ours(batch[:, :-1]) - theirs(batch[:, :-1]).logits).abs().max().item()
    step_seconds(ours, batch, hf=False)  # warm-up (allocator, kernels)
    step_seconds(theirs, batch, hf=True)
    times: dict[str, list[tuple[float, float]]] = {"lmforge": [], "hf": []}
    for _ in range(steps):
        times["lmforge"].append(step_seconds(ours, batch, hf=False))
        times["hf"].append(step_seconds(theirs, batch, hf=True))
    med = {k: statistics.median(w for w, _ in v) for k, v in times.items()}
    cpu = {k: statistics.median(c for _, c in v) for k, v in times.items()}
    tokens = args.batch * seq
    print(f"{'model':10} {'median s/step':>14} {'cpu s/step':>11} {'tokens/s':>10}")
    for name, t in med.items():
        print(f"{name:10} {t:14.3f} {cpu[name]:11.3f} {tokens / t:10.0f}")
    detail = {"params": parameter_count(cfg), "n_layers": cfg.n_layers, "seq_len": seq,
              "batch": args.batch, "steps": steps, "threads": torch.get_num_threads(),
              "lmforge_s": round(med["lmforge"], 4), "hf_s": round(med["hf"], 4),
              "cpu_ratio": round(cpu["hf"] / cpu["lmforge"], 3),
              "max_logit_diff": diff, "hf_attention": theirs.config._attn_implementation,
              "quick": args.quick}
    print("BENCH " + json.dumps({"metric": "model_vs_hf_gpt2",
                                 "value": round(med["hf"] / med["lmforge"], 3),
                                 "goal": 1.0, "detail": detail}))


if __name__ == "__main__":
    main()
