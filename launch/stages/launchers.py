"""What starts a stage's training processes: a process per rank on this machine, ``srun`` in
a Slurm job, Ray Train in a Ray job. A :data:`Launcher` is called as ``launcher(cfg, run_dir,
resume, run_id)`` once the stage's ``config.yaml`` is written, and returns the processes'
exit status (75: they checkpointed and stopped, to be resumed).
"""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from lmforge.launch.rundir import RunDir
from lmforge.launch.train.exit_codes import REQUEUE_EXIT_CODE
from lmforge.launch.train.processes import launch_training

if TYPE_CHECKING:
    from lmforge.launch.config import RunConfig
    from lmforge.launch.submit.ray_train import RayTrainJob

log = logging.getLogger("lmforge")

Launcher = Callable[["RunConfig", Path, "str | None", "str | None"], int]
"""Starts a run's training processes and returns their exit status (75: preempted)."""


def local_launcher(cfg: RunConfig, run_dir: Path, resume: str | None,
                      run_id: str | None) -> int:
    """``launch.nproc_per_node`` processes on this machine (see :mod:`..train.processes`)."""
    return launch_training(cfg.launch, run_dir, resume=resume, run_id=run_id)


def srun_command(run_dir: Path, resume: str | None, run_id: str | None) -> list[str]:
    """The Slurm step that runs ``lmforge.launch.train.worker`` once per task of the job."""
    command = ["srun", "--wait=120", "bash", "-c",
               'export RANK=$SLURM_PROCID WORLD_SIZE=$SLURM_NTASKS LOCAL_RANK=$SLURM_LOCALID;'
               ' exec "$0" "$@"',
               sys.executable, "-m", "lmforge.launch.train.worker", "--run-dir", str(run_dir),
               "--resume", resume or "none"]
    if run_id:
        command += ["--run-id", run_id]
    return command


def slurm_launcher(cfg: RunConfig, run_dir: Path, resume: str | None,
                   run_id: str | None) -> int:
    """The training as one Slurm step: ``srun`` starts a worker per task (ranks from
    ``SLURM_PROCID``/``SLURM_NTASKS``/``SLURM_LOCALID``; the batch script exports
    ``MASTER_ADDR``/``MASTER_PORT``). USR1 sent to this process (the batch shell forwards
    the pre-kill signal) goes on to the step: the ranks checkpoint and exit 75."""
    run = RunDir.of(run_dir)
    run.train_summary.unlink(missing_ok=True)
    step = subprocess.Popen(srun_command(run.path, resume, run_id))
    previous = signal.signal(signal.SIGUSR1, lambda *_: step.send_signal(signal.SIGUSR1))
    try:
        code = step.wait()
    finally:
        signal.signal(signal.SIGUSR1, previous)
    print(f"lmforge: training step exited with {code}", flush=True)
    summary = run.read_train_summary()
    if code != 0 and summary is not None and summary.preempted:
        return REQUEUE_EXIT_CODE
    return code


def ray_train_launcher(job: RayTrainJob) -> Launcher:
    """Training through Ray Train on the cluster this Ray job runs on, with ``job``'s workers
    and retries (each retry resumes from the newest complete checkpoint)."""

    def launch(cfg: RunConfig, run_dir: Path, resume: str | None, run_id: str | None) -> int:
        # The job driver may run where there is no GPU: the workers' resources decide.
        backend = cfg.launch.resolved_backend(cuda=job.gpus_per_worker > 0)
        try:
            fit(run_dir, job, run_id, backend)
        except Exception as err:  # Ray Train gave up after max_failures restarts
            log.error("lmforge: Ray Train failed: %s", err)
            return 1
        return 0

    return launch


def _train_loop(config: dict) -> None:
    """Runs on every Ray Train worker: one DeepSpeed rank, resuming from the newest complete
    checkpoint (``--resume auto``) so that a restarted group continues."""
    from lmforge.launch.train.worker import train_main

    code = train_main(Path(config["run_dir"]), "auto", config["run_id"])
    if code != 0:  # preempted or failed: let FailureConfig restart the group
        raise RuntimeError(f"training rank exited with status {code}; restarting from the "
                           "newest complete checkpoint")


def fit(run_dir: Path, job: RayTrainJob, run_id: str | None, backend: str) -> None:
    """Trains the run in ``run_dir`` (its ``config.yaml`` is ready) with Ray Train's
    TorchTrainer: Ray creates the process group (gloo or NCCL) and places the workers; each
    runs :func:`lmforge.launch.train.worker.train_main`, which keeps that group. A failed
    worker fails the attempt; ``FailureConfig(max_failures)`` restarts the whole group.
    Checkpoints live in the run directory: shared storage when workers span machines.

    Raises:
        RuntimeError: Training still failed after ``job.max_failures`` restarts.
    """
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    resources = {"CPU": job.cpus_per_worker}
    if job.gpus_per_worker:
        resources["GPU"] = job.gpus_per_worker
    trainer = TorchTrainer(
        _train_loop,
        train_loop_config={"run_dir": str(run_dir), "run_id": run_id},
        torch_config=TorchConfig(backend=backend),
        scaling_config=ScalingConfig(
            num_workers=job.num_workers,
            use_gpu=job.gpus_per_worker > 0,
            resources_per_worker=resources,
        ),
        run_config=RunConfig(
            name="ray_train",
            storage_path=str(run_dir),
            failure_config=FailureConfig(max_failures=job.max_failures),
        ),
    )
    trainer.fit()
