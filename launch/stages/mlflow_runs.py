"""The MLflow runs of a job, start to end, and the one rule from exit status to run status.

A job is one MLflow run, recorded in ``<run_dir>/mlflow_run_id`` so that every attempt
(``--resume auto``, a Slurm requeue, a Ray retry, a resubmission) logs to it. A stage graph
with ``stages:`` adds a child run per stage (tag ``mlflow.parentRunId``, recorded in the
stage directory); a config without stages is a graph of one stage whose run is the job's
run itself (no parent/child split).

How a run ends follows from the exit status of what it ran: 0 FINISHED, 75 (checkpointed
and stopped, to be resumed) KILLED, anything else FAILED (:func:`mlflow_status`, stated once
in ``launch/train/exit_codes.py`` next to the exit codes; the training processes end a run
they own by it too).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lmforge.launch.rundir import RunDir, StageRecord
from lmforge.launch.tracking import Tracker
from lmforge.launch.train.exit_codes import mlflow_status

__all__ = ["end_recorded_run", "end_run", "ended_by", "ensure_mlflow_run", "mlflow_status",
           "start_job_run", "start_stage_run"]

if TYPE_CHECKING:
    from lmforge.launch.config import RunConfig

log = logging.getLogger("lmforge")

PARENT_TAG = "mlflow.parentRunId"


def run_params(cfg: RunConfig) -> dict[str, Any]:
    """What a run logs as params: the resolved config without the graph itself."""
    return {k: v for k, v in cfg.to_dict().items() if k != "stages"}


def start_job_run(cfg: RunConfig, resume: bool, stage_names: list[str] | None = None
                  ) -> tuple[Tracker, str | None]:
    """Starts (or, on resume, re-attaches to) the job's run and records its id.

    Args:
        cfg: The job's config.
        resume: Attach to the run recorded in the run directory, if there is one.
        stage_names: The graph's stages (a tag of the parent run); None for a graph of one.

    Returns:
        The tracker (the caller ends it with :func:`end_run`) and the run id.
    """
    run = RunDir.of(cfg.run_dir)
    tracker = Tracker(cfg.tracking, run.path)
    tags = {"lmforge.stages": ",".join(stage_names)} if stage_names else None
    run_id = tracker.start(run_name=cfg.tracking.run_name or cfg.name,
                           run_id=run.read_run_id() if resume else None, tags=tags,
                           system_metrics=False)  # rank 0 samples them while training runs
    return tracker, _opened(tracker, run, run_id, cfg)


def start_stage_run(cfg: RunConfig, name: str, index: int, parent_id: str | None,
                    resume: bool) -> tuple[Tracker, str | None]:
    """Starts (or re-attaches to) a stage's child run of the job's run ``parent_id``."""
    run = RunDir.of(cfg.run_dir)
    tracker = Tracker(cfg.tracking, run.path)
    tags: dict[str, Any] = {"lmforge.stage": name, "lmforge.stage_index": index}
    if parent_id and not _pending(parent_id):
        tags[PARENT_TAG] = parent_id
    run_id = tracker.start(run_name=name, run_id=run.read_run_id() if resume else None,
                           tags=tags, system_metrics=False)
    return tracker, _opened(tracker, run, run_id, cfg)


def _opened(tracker: Tracker, run: RunDir, run_id: str, cfg: RunConfig) -> str | None:
    if run_id:
        run.write_run_id(run_id)
    tracker.log_params(run_params(cfg))  # secrets redacted; config.yaml keeps the values
    tracker.log_config(cfg.to_dict())
    tracker.flush()
    if tracker.run_id and tracker.run_id != run_id:  # MLflow answered after start() returned
        run_id = tracker.run_id
        run.write_run_id(run_id)
    return run_id or None


def _pending(run_id: str) -> bool:
    """Whether ``run_id`` is a handle of a run MLflow has not created yet."""
    from lmforge.launch.tracking.delivery import PENDING_PREFIX  # imports MLflow

    return run_id.startswith(PENDING_PREFIX)


def end_run(tracker: Tracker, exit_code: int) -> None:
    """Ends a run started here with the status :func:`mlflow_status` gives ``exit_code``."""
    tracker.close(status=mlflow_status(exit_code))


@contextlib.contextmanager
def ended_by(tracker: Tracker | None, outcome: StageRecord) -> Iterator[None]:
    """Ends ``tracker``'s run by ``outcome.exit_code`` when the block is left, by an
    exception too (the exit code becomes 1 then). ``None``: the caller's run, left open."""
    try:
        yield
    except BaseException:
        outcome.exit_code = outcome.exit_code or 1
        raise
    finally:
        if tracker is not None:
            end_run(tracker, outcome.exit_code)


def ensure_mlflow_run(cfg: RunConfig, run_dir: Path) -> str | None:
    """Creates the job's MLflow run at submit time and records its id, left RUNNING.

    The submitted job attaches to the recorded run (``--resume auto``), so one job is one
    MLflow run and its id can be printed before the job starts. Returns None when tracking is
    off; the recorded id when there is one already.
    """
    if not cfg.tracking.enabled:
        return None
    run = RunDir.of(run_dir)
    recorded = run.read_run_id()
    if recorded:
        return recorded
    tracker = Tracker(cfg.tracking, run_dir)
    run_id = tracker.start(run_name=cfg.tracking.run_name or cfg.name, system_metrics=False)
    tracker.log_params(run_params(cfg))
    tracker.close(status="RUNNING")  # the job ends it
    run_id = tracker.run_id or run_id
    run.write_run_id(run_id)
    return run_id


def end_recorded_run(cfg: RunConfig, run_dir: Path, exit_code: int) -> None:
    """Ends the run recorded in ``run_dir`` by :func:`mlflow_status` of ``exit_code`` if it
    is still RUNNING (a job body that died without ending it; a no-op otherwise)."""
    run_id = RunDir.of(run_dir).read_run_id()
    if not cfg.tracking.enabled or run_id is None or _pending(run_id):
        return
    from mlflow.tracking import MlflowClient

    uri = Tracker(cfg.tracking, run_dir).tracking_uri
    try:
        client = MlflowClient(tracking_uri=uri)
        if client.get_run(run_id).info.status == "RUNNING":
            client.set_terminated(run_id, status=mlflow_status(exit_code))
    except Exception as err:  # tracking failures never fail the job
        log.warning("lmforge: could not end MLflow run %s: %s", run_id, err)
