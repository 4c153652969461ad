"""Starts the training processes on this machine with torchrun."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from lmforge.launch.callbacks import REQUEUE_EXIT_CODE
from lmforge.launch.config import RunConfig


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def worker_env(cfg: RunConfig) -> dict[str, str]:
    """The environment of every training process."""
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = str(cfg.launch.omp_num_threads)
    env.setdefault("PYTHONUNBUFFERED", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not _has_cuda():
        env.setdefault("DS_ACCELERATOR", "cpu")  # DeepSpeed otherwise warns on every rank
    return env


def torchrun_command(
    cfg: RunConfig, run_dir: Path, resume: str | None, run_id: str | None
) -> list[str]:
    """The torchrun command line that runs ``lmforge.launch.worker`` on every local rank."""
    if cfg.launch.master_port is None:
        # torchrun binds a free port itself: no window for another process to take it.
        rendezvous = ["--standalone"]
    else:
        rendezvous = ["--nnodes=1", f"--master_addr={cfg.launch.master_addr}",
                      f"--master_port={cfg.launch.master_port}"]
    command = [
        sys.executable, "-m", "torch.distributed.run",
        f"--nproc_per_node={cfg.launch.nproc_per_node}",
        *rendezvous,
        "-m", "lmforge.launch.worker",
        "--run-dir", str(run_dir),
    ]
    if resume:
        command += ["--resume", resume]
    if run_id:
        command += ["--run-id", run_id]
    return command


def launch_training(
    cfg: RunConfig, run_dir: Path, resume: str | None = None, run_id: str | None = None
) -> int:
    """Runs training across ``launch.nproc_per_node`` local processes; returns the exit code.

    Args:
        cfg: The resolved config (already saved as ``run_dir/config.yaml``).
        run_dir: The run directory.
        resume: ``None``, ``"auto"`` or a checkpoint folder.
        run_id: The MLflow run the workers attach to.
    """
    if cfg.launch.nnodes != 1:
        raise ValueError(
            "launch.nnodes: a local run uses one machine; submit multi-node runs with "
            "`lmforge submit slurm` or `lmforge submit ray`"
        )
    command = torchrun_command(cfg, run_dir, resume, run_id)
    summary = run_dir / "train_summary.json"
    summary.unlink(missing_ok=True)
    code = subprocess.call(command, env=worker_env(cfg))
    # torchrun reports any non-zero worker exit as its own failure (1); the workers'
    # summary tells a preemption (checkpointed, requeue me) from a crash.
    if code != 0 and summary.exists() and json.loads(summary.read_text()).get("preempted"):
        return REQUEUE_EXIT_CODE
    return code
