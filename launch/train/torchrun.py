"""Starts the training processes on this machine with torchrun (``lmforge train``/``run``,
``lmforge submit local``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from lmforge.launch.config import LaunchConfig
from lmforge.launch.rundir import RunDir
from lmforge.launch.train.exit_codes import REQUEUE_EXIT_CODE
from lmforge.launch.train.rendezvous import (
    check_local_address,
    single_machine_env,
    torchrun_args,
)


def worker_env(launch: LaunchConfig) -> dict[str, str]:
    """The environment of every training process (and of torchrun's agent): gloo and NCCL
    listen on the interface of ``launch.master_addr`` (loopback by default) only."""
    env = single_machine_env(dict(os.environ), check_local_address(launch.master_addr))
    env["OMP_NUM_THREADS"] = str(launch.omp_num_threads)
    env.setdefault("PYTHONUNBUFFERED", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    # No torch here: importing it costs this process ~1.5 s before the agent starts; the
    # agent sets DS_ACCELERATOR (see rendezvous.main).
    return env


def torchrun_command(
    launch: LaunchConfig, run_dir: Path, resume: str | None, run_id: str | None
) -> list[str]:
    """The torchrun command line that runs ``lmforge.launch.train.worker`` on every local rank.

    torchrun's own rendezvous stores (``--standalone``, ``--rdzv-backend=static``) listen on
    every interface; this one's store listens on ``launch.master_addr`` (127.0.0.1 by
    default) only, on ``launch.master_port`` or, unset, a free port the kernel picks when
    the socket is bound (see :mod:`lmforge.launch.train.rendezvous`)."""
    address = check_local_address(launch.master_addr)
    command = [
        sys.executable, "-m", "lmforge.launch.train.rendezvous",
        *torchrun_args(launch.nproc_per_node, address, launch.master_port),
        "-m", "lmforge.launch.train.worker",
        "--run-dir", str(run_dir),
    ]
    if resume:
        command += ["--resume", resume]
    if run_id:
        command += ["--run-id", run_id]
    return command


def launch_training(
    launch: LaunchConfig, run_dir: Path, resume: str | None = None, run_id: str | None = None
) -> int:
    """Runs training across ``launch.nproc_per_node`` local processes; returns the exit code.

    Args:
        launch: The launch section (processes, rendezvous, threads).
        run_dir: The run directory; the workers read its ``config.yaml``.
        resume: ``None``, ``"auto"`` or a checkpoint folder.
        run_id: The MLflow run the workers attach to.
    """
    if launch.nnodes != 1:
        raise ValueError(
            "launch.nnodes: a local run uses one machine; submit multi-node runs with "
            "`lmforge submit slurm` or `lmforge submit ray`"
        )
    command = torchrun_command(launch, run_dir, resume, run_id)
    summary = RunDir.of(run_dir).train_summary
    summary.unlink(missing_ok=True)
    code = subprocess.call(command, env=worker_env(launch))
    # torchrun reports any non-zero worker exit as its own failure (1); the workers'
    # summary tells a preemption (checkpointed, requeue me) from a crash.
    if code != 0 and summary.exists() and json.loads(summary.read_text()).get("preempted"):
        return REQUEUE_EXIT_CODE
    return code
