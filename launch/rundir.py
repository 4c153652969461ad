"""The run directory's layout, stated once.

    <run_dir>/
      config.yaml          the resolved config the training processes read
      mlflow_run_id        the job's MLflow run, so every attempt (resume, requeue) logs to it
      mlflow.db            the default sqlite tracking store (tracking.uri unset)
      mlartifacts/         its artifacts
      checkpoints/         step_XXXXXXXX/ folders and `latest` (see launch/train/checkpoint.py)
      export/              the verified Hugging Face folder (export.output_dir unset)
      metrics.jsonl        every logged metric, exact floats, readable without MLflow
      curves.png           train/val loss, bits per byte and task scores against tokens seen
      generations.jsonl        texts generated during training (train.generate_every)
      generations.json         texts generated at the end of `lmforge run`
      train_summary.json   how the last training attempt ended (steps, val loss, preempted)
      submit/              submitted jobs' configs and scripts
      logs/                cluster jobs' output
      stages/<ii>-<name>/  each stage of a stage graph: a run directory of its own, plus
        stage.json         the stage's name, index and MLflow runs (for hooks in training)
        STAGE_COMPLETE     written when the stage is done (final checkpoint, export, metrics)
        from_scratch/      the same stage from random weights (compare_from_scratch)
      stage.json, STAGE_COMPLETE   a config without ``stages:`` is a graph of one stage
                           whose directory is the run directory itself
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmforge.launch.config import CONFIG_FILE
from lmforge.launch.config.run_config import CONFIG_FILE_MODE
from lmforge.pipeline.durable import write_atomic, write_json


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
    def curves(self) -> Path:
        return self.path / "curves.png"

    @property
    def training_generations(self) -> Path:
        return self.path / "generations.jsonl"

    @property
    def final_generations(self) -> Path:
        return self.path / "generations.json"

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
    def stage_info(self) -> Path:
        return self.path / "stage.json"

    @property
    def stage_complete(self) -> Path:
        return self.path / "STAGE_COMPLETE"

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

    # -- typed records: stage.json, STAGE_COMPLETE, train_summary.json -------------------

    def write_stage_info(self, info: StageInfo) -> None:
        """Writes ``stage.json`` (durably: the training processes read it; 0o600 like
        config.yaml: its tracking URI may carry a password)."""
        write_json(self.stage_info, info.to_dict(), mode=CONFIG_FILE_MODE)

    def read_stage_info(self) -> StageInfo | None:
        """The stage's ``stage.json``, or None when it has none (plain ``lmforge train``)."""
        data = _read_json(self.stage_info)
        return None if data is None else StageInfo.from_dict(data)

    def write_stage_complete(self, record: StageRecord) -> None:
        """Writes ``STAGE_COMPLETE`` (durably: it vouches for the final checkpoint)."""
        write_json(self.stage_complete, record.to_dict())

    def read_stage_complete(self) -> StageRecord | None:
        """How the stage ended, or None while it is not complete."""
        data = _read_json(self.stage_complete)
        return None if data is None else StageRecord.from_dict(data)

    def write_train_summary(self, summary: TrainSummary) -> None:
        """Writes ``train_summary.json`` (rank 0, at the end of a training attempt)."""
        write_json(self.train_summary, summary.to_dict())

    def read_train_summary(self) -> TrainSummary | None:
        """How the last training attempt ended, or None when it wrote nothing."""
        data = _read_json(self.train_summary)
        return None if data is None else TrainSummary.from_dict(data)


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None


class _Record:
    """A dataclass stored as JSON: unknown keys (from a newer version) are ignored."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls, data: dict[str, Any]):  # returns the subclass
        names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        return cls(**{k: v for k, v in data.items() if k in names})


@dataclass
class StageInfo(_Record):
    """``stage.json``: which stage a run directory is, for hooks inside training."""

    stage: str
    index: int
    job_dir: str
    parent_run_id: str | None = None
    run_id: str | None = None
    tracking_uri: str | None = None


@dataclass
class StageRecord(_Record):
    """``STAGE_COMPLETE``: how a finished stage ended (a rerun with ``--resume auto``
    skips the stage and reads this instead)."""

    name: str
    index: int
    exit_code: int = 0
    step: int | None = None
    checkpoint: str | None = None
    """The stage's final complete checkpoint."""
    export_dir: str | None = None
    val_metrics: dict[str, float] = field(default_factory=dict)
    scratch_metrics: dict[str, float] | None = None
    """The same stage's metrics from random weights (``compare_from_scratch``)."""
    run_id: str | None = None


@dataclass
class TrainSummary(_Record):
    """``train_summary.json``: how the last training attempt ended (rank 0 writes it)."""

    step: int
    tokens_seen: int = 0
    val_loss: list[tuple[int, float]] = field(default_factory=list)
    """``(step, val_loss)`` after each validation pass (lists once read back)."""
    val_metrics: dict[str, float] = field(default_factory=dict)
    """The last validation pass's metrics."""
    preempted: bool = False
    """Stopped by SIGTERM/SIGUSR1 after a checkpoint (exit 75: requeue and resume)."""
    skipped_samples: int = 0
    skipped_shards: dict[str, str] = field(default_factory=dict)
    """Shards replaced in lenient mode: name → reason."""
