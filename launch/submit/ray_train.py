"""Training on a Ray cluster: Ray Train's TorchTrainer, DeepSpeed inside each worker.

Ray Train creates the process group (gloo or NCCL) and places the workers; each worker
then runs the ordinary per-rank entry point, :func:`lmforge.launch.train.worker.train_main`,
which sees the existing process group and keeps it. A worker that fails (or is stopped
for preemption, exit 75) fails the attempt; ``FailureConfig(max_failures)`` restarts the
whole group, which resumes from the newest complete checkpoint (``--resume auto``).
Checkpoints live in the run directory, so on several machines it must be shared storage.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass
class RayTrainJob:
    """How training is spread over the Ray cluster (the ``submit ray`` flags)."""

    num_workers: int = 2
    """Training processes (ranks)."""
    gpus_per_worker: int = 0
    """GPUs per worker; 0 trains on CPUs with gloo."""
    cpus_per_worker: float = 1.0
    """CPUs Ray reserves per worker."""
    max_failures: int = 2
    """Attempts Ray Train restarts after a failure; each resumes from the last checkpoint."""

    def __post_init__(self) -> None:
        if self.num_workers < 1:
            raise ValueError(f"--num-workers: must be at least 1, got {self.num_workers}")
        if self.gpus_per_worker < 0 or self.cpus_per_worker <= 0:
            raise ValueError("--gpus-per-worker: must be >= 0 (and --cpus-per-worker > 0)")
        if self.max_failures < -1:
            raise ValueError(f"--max-failures: -1 (forever) or >= 0, got {self.max_failures}")


def _train_loop(config: dict) -> None:
    """Runs on every Ray Train worker: one DeepSpeed rank."""
    from lmforge.launch.train.worker import train_main

    code = train_main(Path(config["run_dir"]), "auto", config["run_id"])
    if code != 0:  # preempted or failed: let FailureConfig restart the group
        raise RuntimeError(f"training rank exited with status {code}; restarting from the "
                           "newest complete checkpoint")


def fit(run_dir: Path, job: RayTrainJob, run_id: str | None, backend: str) -> None:
    """Trains the run in ``run_dir`` (its ``config.yaml`` is ready) with Ray Train.

    Args:
        run_dir: The run directory (shared storage when workers span machines).
        job: Workers, resources and retries.
        run_id: The MLflow run the workers log to.
        backend: ``gloo`` or ``nccl``.

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
