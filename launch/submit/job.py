"""The body of a submitted training job, on the cluster side: the one runner.

    python -m lmforge.launch.submit.job run --config RUN_DIR/submit/train-config.yaml \\
        --launcher slurm --resume auto
    python -m lmforge.launch.submit.job finish --run-dir RUN_DIR --exit-code N

``run`` runs the submitted config's stage graph (a config without ``stages:`` is a graph of
one stage), with ``--resume auto`` in every submitted job, exactly as ``lmforge run`` does:
each stage prepares its data (skipped when an identical prepared dataset exists), trains
through the launcher, exports and verifies, registers with ``tracking.registered_model``; a
requeued or resubmitted job continues inside the stage it was in. ``finish`` is the batch
script's safety net: it ends the job's MLflow run by the exit status when the body died
without ending it. Both are idempotent.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from pathlib import Path

from lmforge.launch.config import RunConfig, load_config
from lmforge.launch.redact import redact_text
from lmforge.launch.rundir import RunDir
from lmforge.launch.stages.launchers import Launcher, local_launcher, slurm_launcher
from lmforge.launch.stages.mlflow_runs import end_recorded_run
from lmforge.launch.stages.runner import run_graph
from lmforge.pipeline.folder_lock import FolderLocked

log = logging.getLogger("lmforge")

LAUNCHERS: dict[str, Launcher] = {"local": local_launcher, "slurm": slurm_launcher}
"""Launchers by ``--launcher`` name (a Ray job passes Ray Train's itself)."""


def run_job(cfg: RunConfig, launcher: Launcher, run_id: str | None = None,
            resume: str | None = "auto") -> int:
    """Runs the submitted config; returns the job's exit status.

    Args:
        cfg: The submitted config (``<run_dir>/submit/train-config.yaml``).
        launcher: Starts each stage's training processes.
        run_id: The MLflow run created at submit time, when the submit side could not record
            it in the run directory itself (Ray Jobs on another machine).
        resume: ``auto`` (what every submitted job uses: a requeue or retry continues inside
            its stage) or None.
    """
    run = RunDir.of(cfg.run_dir)
    if run_id and run.read_run_id() is None:
        run.write_run_id(run_id)
    return run_graph(cfg, resume=resume, launcher=launcher).exit_code


def finish_run(run_dir: Path, exit_code: int) -> None:
    """Ends the job's MLflow run by ``exit_code`` (FINISHED, KILLED for 75, else FAILED) if
    the job body left it RUNNING; nothing when the run directory holds no resolved config."""
    from lmforge.launch.config import load_resolved

    if not RunDir.of(run_dir).config.is_file():
        return
    end_recorded_run(load_resolved(run_dir), run_dir, exit_code)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lmforge.launch.submit.job")
    sub = parser.add_subparsers(dest="action", required=True)
    run = sub.add_parser("run", help="run the submitted config's stage graph")
    run.add_argument("--config", type=Path, required=True)
    run.add_argument("--launcher", choices=sorted(LAUNCHERS), default="local")
    run.add_argument("--resume", choices=["auto", "none"], default="auto")
    finish = sub.add_parser("finish", help="end the job's MLflow run if it is still open")
    finish.add_argument("--run-dir", type=Path, required=True)
    finish.add_argument("--exit-code", type=int, required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        if args.action == "finish":
            finish_run(args.run_dir, args.exit_code)
            return 0
        # The pre-kill signal reaches this process while no training step runs (prepare,
        # export): it must not end it. The srun launcher forwards it while training runs.
        signal.signal(signal.SIGUSR1, lambda *_: log.warning(
            "lmforge: USR1 outside training: the job goes on (no checkpoint to write yet)"))
        resume = None if args.resume == "none" else args.resume
        return run_job(load_config(args.config), LAUNCHERS[args.launcher], resume=resume)
    except (FileNotFoundError, ValueError, FolderLocked) as err:  # ConfigError too: exit 1
        print(f"lmforge: {redact_text(str(err))}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
