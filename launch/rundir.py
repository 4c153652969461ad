"""The run directory's layout, stated once.

    <run_dir>/
      config.yaml          the resolved config the training processes read
      mlflow_run_id        the job's MLflow run, so every attempt (resume, requeue) logs to it
      mlflow.db            the default sqlite tracking store (tracking.uri unset)
      mlartifacts/         its artifacts
      checkpoints/         step_XXXXXXXX/ folders and `latest` (see launch/train/checkpoint.py)
      export/              the verified Hugging Face folder (export.output_dir unset)
      metrics.jsonl        every logged metric, exact floats, readable without MLflow
      samples.jsonl        texts generated during training (train.sample_every)
      samples.json         texts generated at the end of `lmforge run`
      train_summary.json   how the last training attempt ended (steps, val loss, preempted)
      submit/              submitted jobs' configs and scripts
      logs/                cluster jobs' output
      stages/<ii>-<name>/  each stage of a stage graph: a run directory of its own, plus
        stage.json         the stage's name, index and MLflow runs (for hooks in training)
        STAGE_COMPLETE     written when the stage is done (final checkpoint, export, metrics)
        from_scratch/      the same stage from random weights (compare_from_scratch)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from lmforge.launch.config import CONFIG_FILE
from lmforge.pipeline.durable import write_atomic


@dataclass(frozen=True)
class RunDir:
    """One run's directory (an absolute path); every file in it is named here."""

    path: Path

    @classmethod
    def of(cls, run_dir: str | Path) -> RunDir:
        """The run directory at ``run_dir`` (``cfg.run_dir``), resolved to an absolute path."""
        return cls(Path(run_dir).resolve())

    @property
    def config(self) -> Path:
        return self.path / CONFIG_FILE

    @property
    def run_id_file(self) -> Path:
        return self.path / "mlflow_run_id"

    @property
    def mlflow_db(self) -> Path:
        return self.path / "mlflow.db"

    @property
    def mlflow_artifacts(self) -> Path:
        return self.path / "mlartifacts"

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def export(self) -> Path:
        return self.path / "export"

    @property
    def metrics(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def training_samples(self) -> Path:
        return self.path / "samples.jsonl"

    @property
    def final_samples(self) -> Path:
        return self.path / "samples.json"

    @property
    def train_summary(self) -> Path:
        return self.path / "train_summary.json"

    @property
    def submit(self) -> Path:
        return self.path / "submit"

    @property
    def logs(self) -> Path:
        return self.path / "logs"

    @property
    def stages(self) -> Path:
        return self.path / "stages"

    @property
    def stage_info(self) -> Path:
        return self.path / "stage.json"

    @property
    def stage_complete(self) -> Path:
        return self.path / "STAGE_COMPLETE"

    @property
    def from_scratch(self) -> Path:
        return self.path / "from_scratch"

    def job_config(self, job: str) -> Path:
        """The resolved config a submitted job of ``job`` (prepare, train) starts from."""
        return self.submit / f"{job}-config.yaml"

    def job_script(self, name: str) -> Path:
        return self.submit / name

    def read_run_id(self) -> str | None:
        """The recorded MLflow run id, or None when there is none yet."""
        try:
            text = self.run_id_file.read_text(encoding="utf-8").strip()
        except FileNotFoundError:
            return None
        return text or None

    def write_run_id(self, run_id: str) -> None:
        """Records the job's MLflow run id (atomically: attempts may read it concurrently)."""
        write_atomic(self.run_id_file, run_id)
