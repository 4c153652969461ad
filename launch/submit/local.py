"""``lmforge submit local``: run a submitted job on this machine, in the foreground.

The job goes through the same steps as on a cluster: the submitted config in
``<run_dir>/submit/train-config.yaml``, the one runner with ``--resume auto`` (each stage
prepares, trains with local processes, exports and verifies; a config without ``stages:`` is one
stage), one MLflow run per job recorded in the run directory. Run it again after an
interruption and it continues inside the stage it was in, from the newest complete checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path

from lmforge.launch.config import RunConfig
from lmforge.launch.rundir import RunDir
from lmforge.launch.submit.spec import WORK, mlflow_line
from lmforge.pipeline.contract.dataset_manifest import DatasetManifest


def describe(cfg: RunConfig, work: str) -> dict[str, object]:
    """The job spec shown by ``--dry-run``."""
    return {
        "target": "local",
        "job": work,
        "processes": cfg.world_size if work != "prepare" else None,
        "run_dir": str(RunDir.of(cfg.run_dir).path),
        "manifest": str(DatasetManifest.path_in(Path(cfg.data.output_dir).resolve())),
        "resume": "auto" if work != "prepare" else None,
    }


def run_local(cfg: RunConfig, work: str, dry_run: bool = False) -> int:
    """Runs ``work`` here: ``prepare``, or ``train``/``all`` (the whole graph, which prepares
    each stage's data itself); returns the job's exit status.

    Training exits with 75 when it was stopped by SIGTERM/SIGUSR1 after a checkpoint (the
    MLflow run is KILLED then); the next ``submit local`` resumes into the same run.
    """
    if work not in WORK:
        raise ValueError(f"--job: '{work}' is not one of {', '.join(WORK)}")
    if dry_run:
        print(json.dumps(describe(cfg, work), indent=2))
        print("# dry run: nothing started")
        return 0
    from lmforge.launch.commands import prepare_data

    if work == "prepare":
        print(f"manifest: {prepare_data(cfg)}", flush=True)
        return 0
    from lmforge.launch.stages.launchers import local_launcher
    from lmforge.launch.submit.job import run_job

    run = RunDir.of(cfg.run_dir)
    cfg.save(run.job_config("train"))
    print(f"local job: every stage on {cfg.world_size} process(es); run directory {run.path}")
    print(f"  MLflow : {mlflow_line(cfg, run.path, run.read_run_id())}", flush=True)
    return run_job(cfg, local_launcher)  # its stages prepare their data (all: the same)
