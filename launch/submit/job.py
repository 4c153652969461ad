"""The small steps a submitted job runs around training, on the cluster side.

    python -m lmforge.launch.submit.job setup --config RUN_DIR/submit/train-config.yaml
    python -m lmforge.launch.submit.job finish --run-dir RUN_DIR --status FINISHED

``setup`` turns the submitted config into the run's ``config.yaml`` (the vocabulary size
comes from the prepared tokenizer, which may not have existed at submit time) and makes
sure the job's MLflow run exists. ``finish`` ends that run with the job's outcome. Both are
idempotent, so a requeued job simply runs them again.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lmforge.launch.config import RunConfig, load_config
from lmforge.launch.rundir import RunDir
from lmforge.launch.submit.spec import ensure_mlflow_run


def setup_run(config: Path | RunConfig, run_id: str | None = None) -> RunConfig:
    """Writes ``<run_dir>/config.yaml`` for the workers from the submitted config.

    Args:
        config: The submitted config, or the path of its YAML.
        run_id: The MLflow run created at submit time, when the submit side could not
            record it in the run directory itself (Ray Jobs on another machine).

    Returns:
        The config the workers train with (vocabulary size from the prepared tokenizer).

    Raises:
        FileNotFoundError: The dataset has not been prepared (names the manifest path).
    """
    from lmforge.launch.commands import config_for_training

    cfg = config_for_training(load_config(config) if isinstance(config, Path) else config)
    run = RunDir.of(cfg.run_dir)
    if run_id and run.read_run_id() is None:
        run.write_run_id(run_id)
    ensure_mlflow_run(cfg, run.path)
    return cfg


def finish_run(run_dir: Path, status: str) -> None:
    """Ends the job's MLflow run (recorded in the run directory) with ``status``."""
    from lmforge.launch.config import load_resolved
    from lmforge.launch.tracking import Tracker

    run_id = RunDir.of(run_dir).read_run_id()
    cfg = load_resolved(run_dir)
    if not cfg.tracking.enabled or run_id is None:
        return
    tracker = Tracker(cfg.tracking, run_dir)
    tracker.start(run_id=run_id, system_metrics=False)
    tracker.close(status=status)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lmforge.launch.submit.job")
    sub = parser.add_subparsers(dest="action", required=True)
    setup = sub.add_parser("setup", help="write RUN_DIR/config.yaml and the MLflow run id")
    setup.add_argument("--config", type=Path, required=True)
    finish = sub.add_parser("finish", help="end the job's MLflow run")
    finish.add_argument("--run-dir", type=Path, required=True)
    finish.add_argument("--status", choices=["FINISHED", "FAILED", "KILLED"], required=True)
    args = parser.parse_args(argv)
    try:
        if args.action == "setup":
            setup_run(args.config)
        else:
            finish_run(args.run_dir, args.status)
    except (FileNotFoundError, ValueError) as err:
        print(f"lmforge: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
