"""How ``lmforge submit ray`` spreads training over a Ray cluster (its flags).

The job body trains each stage through Ray Train with these settings
(:func:`lmforge.launch.stages.launchers.ray_train_launcher`).
"""

from __future__ import annotations

from dataclasses import dataclass


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
