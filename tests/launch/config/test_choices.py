"""Every value of the model-shape, schedule and backend choice keys through the real engine.

Each run combines independent choices (one position, norm, norm placement and activation
per model variant, plus an activation-checkpointing mode, an LR schedule and the backend)
and is checked against a reference computed here: the same model trained by a plain
single-process PyTorch loop (AdamW, global-norm clipping, the schedule written out from
its definition) on the same batches of both ranks. DeepSpeed on 2 gloo processes must
reproduce its losses step for step, and log the learning rate the definition gives.
Values not run here are run by other engine tests (see the README's choice table).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from engine_helpers import REPO, finish, shard_fixtures, train

from lmforge.launch.config.run_config import load_resolved
from lmforge.launch.config.sections import TrainConfig
from lmforge.launch.train.optim import param_groups
from lmforge.pipeline.loader.shard_loader import ShardLoader

STEPS = 6

CONFIG = """\
name: choices
data:
  datasets: [{{name: d, paths: [unused.txt]}}]
  output_dir: {data}
  seq_len: 32
  loader: {{document_masking: false, num_workers: 0}}
tokenizer: {{vocab_size: 1000}}
model: {{preset: tiny, n_layers: 2, d_model: 64, n_heads: 4, n_kv_heads: 2, d_ff: 128}}
train: {{micro_batch_size: 4, max_steps: 6, warmup_steps: 2, lr: 0.01, log_every: 1,
        eval_every: 0, eval_batches: 1, precision: fp32}}
tracking: {{enabled: false}}
export: {{enabled: false}}  # post-norm, ALiBi, ... have no exact transformers class
"""

# One run per model variant; together with tiny's rope/rmsnorm/pre/swiglu (every other
# engine test) each value of position, norm, norm_position and activation runs.
VARIANTS = {
    "gpt-post-ln": ["--model.position=learned", "--model.norm=layernorm",
                    "--model.norm_position=post", "--model.activation=gelu",
                    "--train.activation_checkpointing=selective", "--train.lr_schedule=linear",
                    "--launch.backend=gloo"],
    "sinusoidal-relu": ["--model.position=sinusoidal", "--model.activation=relu",
                        "--train.lr_schedule=wsd", "--train.decay_fraction=0.5"],
    "alibi-gelu-tanh": ["--model.position=alibi", "--model.norm=layernorm",
                        "--model.activation=gelu_tanh", "--train.lr_schedule=cosine"],
}


def lr_by_definition(step: int, train: TrainConfig) -> float:
    """The README's schedules, written out: linear warm-up over ``warmup_steps``, then
    cosine or linear decay to ``min_lr_ratio``, or wsd (flat, then linear decay over the
    final ``decay_fraction`` of ``max_steps``). ``step`` counts updates from 0."""
    floor, warm, total = train.min_lr_ratio, train.warmup_steps, train.max_steps
    if step < warm:
        return train.lr * (step + 1) / warm
    if train.lr_schedule == "wsd":
        start = int(total * (1 - train.decay_fraction))
        return train.lr * (1 - (1 - floor) * max(0, step - start) / (total - start))
    progress = (step - warm) / (total - warm)
    if train.lr_schedule == "linear":
        return train.lr * (1 - (1 - floor) * progress)
    assert train.lr_schedule == "cosine"
    return train.lr * (floor + (1 - floor) * (1 + math.cos(math.pi * progress)) / 2)


def reference_losses(run_dir: Path) -> list[float]:
    """The run's losses from a plain PyTorch loop on one process (no DeepSpeed, no
    activation checkpointing): the rank losses' mean, backward, clip, AdamW step."""
    cfg = load_resolved(run_dir)
    torch.manual_seed(cfg.seed)
    model = cfg.model.build()
    optimizer = torch.optim.AdamW(param_groups(model, cfg.train.weight_decay), lr=1.0,
                                  betas=tuple(cfg.train.betas), eps=cfg.train.eps)
    loaders = [iter(ShardLoader(cfg.data.output_dir, "train", cfg.train.micro_batch_size,
                                rank=r, world_size=2, seed=cfg.seed, config=cfg.data.loader))
               for r in range(2)]
    losses = []
    for step in range(STEPS):
        for group in optimizer.param_groups:
            group["lr"] = lr_by_definition(step, cfg.train)
        per_rank = []
        for loader in loaders:
            batch = next(loader)
            logits = model(input_ids=batch["input_ids"]).float()
            per_rank.append(F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(),
                                            ignore_index=-100))
        loss = torch.stack(per_rank).mean()
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
        optimizer.step()
        losses.append(loss.item())
    return losses


@pytest.fixture(scope="module")
def config(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("choices")
    shard_fixtures().write_shards(tmp / "data", {"d": {"train": [8], "val": [8]}}, seq_len=32)
    path = tmp / "choices.yaml"
    path.write_text(CONFIG.format(data=tmp / "data"))
    return path


@pytest.mark.slow
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_choice_runs_through_the_engine_like_a_plain_loop(config, tmp_path, variant):
    run_dir = tmp_path / variant
    finish(train(config, run_dir, *VARIANTS[variant]))
    cfg = load_resolved(run_dir)
    for override in VARIANTS[variant]:  # the resolved config carries every choice
        key, value = override[2:].split("=")
        section, name = key.split(".")
        assert str(getattr(getattr(cfg, section), name)) == value
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    records = {r["step"]: r for r in records if "train/loss" in r}
    assert sorted(records) == list(range(1, STEPS + 1))
    engine = [records[s]["train/loss"] for s in range(1, STEPS + 1)]
    reference = reference_losses(run_dir)
    assert engine == pytest.approx(reference, rel=2e-5, abs=2e-5)
    assert engine[-1] < engine[0] - 0.1  # it learns (8 samples, seen every step)
    # Step s's update used lr_by_definition(s - 1) (as in the reference); that is logged.
    lrs = [records[s]["train/lr"] for s in range(1, STEPS + 1)]
    assert lrs == pytest.approx([lr_by_definition(s, cfg.train) for s in range(STEPS)],
                                rel=1e-6)


@pytest.mark.skipif(torch.cuda.is_available(), reason="with CUDA nccl is a valid choice")
def test_nccl_without_cuda_is_refused_before_any_process_starts(config, tmp_path):
    run_dir = tmp_path / "nccl"
    proc = subprocess.run(
        [sys.executable, "-m", "lmforge.launch.cli", "train", str(config),
         f"--run_dir={run_dir}", "--launch.backend=nccl"],
        capture_output=True, text=True, timeout=300, cwd=REPO,
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip() == ("lmforge: config error: launch.backend: nccl needs CUDA "
                                   "GPUs (NCCL reduces only CUDA tensors); use auto or gloo here")
    assert not (run_dir / "config.yaml").exists()


def test_nccl_on_a_cpu_cluster_job_is_refused_at_submit(config):
    from lmforge.launch.config import load_config
    from lmforge.launch.submit.ray_jobs import RayJob, submit_ray
    from lmforge.launch.submit.ray_train import RayTrainJob
    from lmforge.launch.submit.slurm import SlurmJob, render_script

    cfg = load_config(config, ["--launch.backend=nccl"])
    expected = r"launch.backend: nccl needs GPUs \(NCCL reduces only CUDA tensors\); give --"
    with pytest.raises(ValueError, match=expected + "gpus-per-node"):
        render_script(cfg, SlurmJob(nodes=1, tasks_per_node=2))
    assert "NCCL" in render_script(cfg, SlurmJob(nodes=1, gpus_per_node=2))
    job = RayJob("http://127.0.0.1:8265", train=RayTrainJob(num_workers=2, gpus_per_worker=0))
    with pytest.raises(ValueError, match=expected + "gpus-per-worker"):
        submit_ray(cfg, job, dry_run=True)
