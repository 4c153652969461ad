"""``--dry-run``'s memory plan: the run config's ZeRO stage, world size, offload and
checkpointing reach the formulas, and the verdict compares the right total."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from lmforge.launch.config import load_config
from lmforge.launch.memory_plan import GiB, format_memory_plan, run_memory_plan
from lmforge.model import parameter_count
from lmforge.model.memory import plan_memory

TINY = Path(__file__).resolve().parents[3] / "configs" / "tiny.yaml"


def test_plan_takes_its_arguments_from_the_run_config():
    cfg = load_config(TINY, ["--deepspeed.zero_stage=3", "--deepspeed.offload_optimizer=cpu",
                             "--launch.backend=gloo",
                             "--launch.nproc_per_node=4", "--train.micro_batch_size=2",
                             "--train.global_batch_size=null",
                             "--train.activation_checkpointing=selective",
                             "--train.loss_chunk_tokens=64", "--train.precision=fp32"])
    plan = run_memory_plan(cfg)
    psi = parameter_count(cfg.model)
    # ZeRO-3's resident buffers: the gradient bucket (reduce_bucket_size 5e7 > psi) and the
    # gathered weights (prefetch bucket 5e7 > psi); its gradient partition is the gradients
    # row; no shared-memory workspace: lmforge's launchers do not set LOCAL_SIZE
    assert (plan.buffers, plan.transient) == (4 * psi + 4 * psi, 0)
    assert dataclasses.replace(plan, buffers=0.0) == plan_memory(
        cfg.model, micro_batch=2, seq_len=cfg.data.seq_len, precision="fp32", zero_stage=3,
        world_size=4, activation_checkpointing="selective", offload_optimizer=True,
        loss_chunk_tokens=64)
    assert plan.optimizer == 0 and plan.host > 0
    stage0 = run_memory_plan(load_config(TINY, ["--deepspeed.zero_stage=0",
                                                "--launch.backend=nccl"]))
    assert (stage0.buffers, stage0.transient) == (0, 2 * psi)  # bf16 flattened all-reduce
    stage2 = run_memory_plan(load_config(TINY, ["--deepspeed.zero_stage=2",
                                                "--launch.nproc_per_node=2"]))
    # the bf16 gradient bucket and the partition's fp32 gradient fill after the loss's peak
    assert (stage2.buffers, stage2.transient) == (0, 2 * psi + 4 * psi / 2)
    text = format_memory_plan(cfg, (64 * GiB, "GPU 0 of this machine (test)"))
    assert "ZeRO stage 3" in text and "4 ranks" in text
    assert f"{plan.device_total / GiB:.3f} GiB" in text and text.count(": fits") == 1
    assert "offloaded to host" in text


def test_verdict_on_a_host_counts_every_rank_of_the_node():
    cfg = load_config(TINY, [])
    plan = run_memory_plan(cfg)
    per_node = cfg.launch.nproc_per_node
    need = (plan.device_total + plan.host) * per_node
    fits = format_memory_plan(cfg, (need * 1.01, "host memory of this machine (no GPU here)"))
    short = format_memory_plan(cfg, (need * 0.99, "host memory of this machine (no GPU here)"))
    assert fits.splitlines()[-1].endswith(": fits")
    assert "DOES NOT FIT" in short and "train.loss_chunk_tokens" in short
