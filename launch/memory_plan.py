"""The memory plan ``lmforge run|train|submit … --dry-run`` prints: per rank, what the
parameters, gradients, optimizer state, activations and the loss's logits take, against
the memory the rank will run on.

The formulas are functions of the model config in ``model/memory.py`` (ZeRO paper's 16
bytes per parameter, Korthikanti et al. 2022's activations); this module picks their
arguments from the run config (ZeRO stage, offload, world size, micro batch, sequence
length, checkpointing, precision, ``train.loss_chunk_tokens``) and prints them.
"""

from __future__ import annotations

import dataclasses
import os

from lmforge.launch.config import RunConfig
from lmforge.launch.config.deepspeed import build_deepspeed_config
from lmforge.model import parameter_count
from lmforge.model.memory import MemoryPlan, plan_memory, state_bytes_per_param

GiB = 2**30


ALLREDUCE_BUCKET = 500_000_000  # DeepSpeed's default allreduce_bucket_size (elements)
# Not counted: DeepSpeed's CPU shared-memory workspace (ops/csrc/cpu/comm/shm.cpp, 66 MiB per
# local rank) is created only when LOCAL_SIZE equals the world size (shm_interface.cpp), which
# the deepspeed launcher sets and lmforge's launchers (local processes, srun, Ray Train) do not;
# lmforge's ranks map none of it (RssShmem 0, benchmarks/RESULTS.md 2026-12-07), and it only
# serves inference_all_reduce, not training.


def engine_buffers(cfg: RunConfig) -> tuple[float, float]:
    """(resident, after-backward) bytes of DeepSpeed's own buffers per rank, from the
    bucket sizes of the generated DeepSpeed JSON: stage 0 all-reduces a flattened copy of
    the gradients (up to ``allreduce_bucket_size``) after the backward. Stages 1-2 allocate
    the contiguous gradient bucket (``reduce_bucket_size``) afresh at each backward
    (``stage_1_and_2.py`` ``setup_buckets``) and fill it as the backward frees activations,
    then build the partition's fp32 gradient for the master copy (``step``:
    ``flatten(averaged_gradients).to(fp32)``): both after the loss's peak. Stage 3 allocates
    its bucket once (``stage3.py`` ``_setup_for_real_optimizer``: ``ipg_buckets``, touched up
    to the gradients it holds) and keeps the weights gathered for the layers in flight (up to
    ``stage3_prefetch_bucket_size``): resident. Its gradient partition
    (``grad_partitions_flat_buffer``, in the model's dtype unless ``data_types.grad_accum_dtype``
    says otherwise) is the plan's gradients row, not a buffer. NCCL's and gloo's own buffers
    are not counted."""
    ds_json = build_deepspeed_config(cfg.train, cfg.deepspeed, cfg.world_size, "gloo")
    zero = ds_json.get("zero_optimization", {})
    stage, n = cfg.deepspeed.zero_stage, cfg.world_size
    psi = parameter_count(cfg.model)
    weight_b, grad_b, _ = state_bytes_per_param(cfg.train.precision, stage)
    if stage == 0:
        return 0.0, min(psi, zero.get("allreduce_bucket_size", ALLREDUCE_BUCKET)) * grad_b
    bucket = min(psi, zero.get("reduce_bucket_size", ALLREDUCE_BUCKET)) * grad_b
    if stage < 3:
        return 0.0, bucket + 4 * psi / n
    prefetch = min(psi, zero.get("stage3_prefetch_bucket_size", psi)) * weight_b
    return bucket + prefetch, 0.0


def run_memory_plan(cfg: RunConfig) -> MemoryPlan:
    """The per-rank plan of ``cfg``'s training step (``model.vocab_size`` must be known)."""
    train, ds = cfg.train, cfg.deepspeed
    resident, transient = engine_buffers(cfg)
    plan = plan_memory(
        cfg.model, micro_batch=train.micro_batch_size, seq_len=cfg.data.seq_len,
        precision=train.precision, zero_stage=ds.zero_stage, world_size=cfg.world_size,
        activation_checkpointing=train.activation_checkpointing,
        checkpoint_every_n_layers=train.checkpoint_every_n_layers,
        offload_optimizer=ds.offload_optimizer != "none",
        offload_params=ds.offload_params != "none",
        loss_chunk_tokens=train.loss_chunk_tokens,
    )
    return dataclasses.replace(plan, buffers=resident, transient=transient)


def device_memory() -> tuple[float, str]:
    """(bytes, what) of the memory one rank runs on: this machine's first GPU, or else its
    physical memory (shared by the ranks of a node)."""
    import torch

    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        return float(props.total_memory), f"GPU 0 of this machine ({props.name})"
    total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return float(total), "host memory of this machine (no GPU here)"


def _gib(n: float) -> str:
    return f"{n / GiB:10.3f} GiB"


def format_memory_plan(cfg: RunConfig, capacity: tuple[float, str] | None = None) -> str:
    """The plan as the lines ``--dry-run`` prints (``capacity``: default `device_memory()`)."""
    if cfg.model.vocab_size is None:
        return "# memory plan: unknown until the tokenizer is loaded (model.vocab_size unset)"
    plan = run_memory_plan(cfg)
    train, ds = cfg.train, cfg.deepspeed
    per_node = cfg.launch.nproc_per_node
    lines = [
        f"# memory plan per rank ({cfg.world_size} ranks, {per_node} per node): ZeRO stage "
        f"{ds.zero_stage}, {train.precision}, micro batch {train.micro_batch_size} x "
        f"seq_len {cfg.data.seq_len}, checkpointing {train.activation_checkpointing}, "
        f"offload optimizer {ds.offload_optimizer} / params {ds.offload_params}, "
        f"loss_chunk_tokens {train.loss_chunk_tokens}",
    ]
    lines += [f"#   {name:<18}{_gib(value)}" for name, value in plan.rows()]
    total, what = capacity or device_memory()
    on_host = "no GPU" in what  # the ranks of a node share it, offloaded state included
    need = (plan.device_total + plan.host) * per_node if on_host else plan.device_total
    verdict = "fits" if need <= total else "DOES NOT FIT"
    scope = f"{per_node} ranks" if on_host else "one rank"
    if on_host:
        lines.append("#   (live tensor bytes, what a GPU's allocator would count; a CPU rank's "
                     "resident memory is higher by the interpreter and the freed memory the "
                     "C allocator keeps: benchmarks/RESULTS.md, memory_plan_error_max)")
    lines.append(f"#   against {what}: {_gib(total).strip()}; needs {_gib(need).strip()} "
                 f"({scope}): {verdict}")
    if plan.host and not on_host:
        host = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        lines.append(f"#   offloaded to host: {_gib(plan.host * per_node).strip()} per node "
                     f"of {_gib(host).strip()}")
    if cfg.trainable.mode != "all":
        lines.append(f"#   (gradients and optimizer state counted for every parameter; "
                     f"trainable.mode={cfg.trainable.mode} trains fewer)")
    if verdict != "fits":
        lines.append("#   to fit: raise deepspeed.zero_stage, turn on "
                     "train.activation_checkpointing, lower train.micro_batch_size, set "
                     "train.loss_chunk_tokens, or offload (deepspeed.offload_optimizer)")
    return "\n".join(lines)
