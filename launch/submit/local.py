"""``lmforge submit local``: run a submitted job on this machine, in the foreground.

The job goes through the same steps as on a cluster (the submitted config in
``<run_dir>/submit/config.yaml``, one MLflow run per job recorded in the run directory,
``--resume auto``), with torchrun for training and a local Ray for the data pipeline. Run
it again after an interruption and it continues from the newest complete checkpoint (a
stage graph: inside the stage it was in).
"""

from __future__ import annotations

import json
from pathlib import Path

from lmforge.launch.config import RunConfig
from lmforge.launch.rundir import RunDir
from lmforge.launch.submit.spec import WORK, mlflow_line
from lmforge.launch.train.exit_codes import REQUEUE_EXIT_CODE
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
    """Runs ``work`` (prepare, train or all) here; returns the job's exit status.

    Training exits with 75 when it was stopped by SIGTERM/SIGUSR1 after a checkpoint; the
    MLflow run then stays open for the next ``submit local``, which resumes.
    """
    if work not in WORK:
        raise ValueError(f"--job: '{work}' is not one of {', '.join(WORK)}")
    if dry_run:
        print(json.dumps(describe(cfg, work), indent=2))
        print("# dry run: nothing started")
        return 0
    from lmforge.launch.commands import prepare_data

    if cfg.stages and work != "prepare":  # the graph prepares each stage's data itself
        from lmforge.launch.stages import run_stages

        return run_stages(cfg, resume="auto").exit_code
    if work in ("prepare", "all"):
        print(f"manifest: {prepare_data(cfg)}", flush=True)
    if work == "prepare":
        return 0
    from lmforge.launch.submit.job import finish_run, setup_run
    from lmforge.launch.train.torchrun import launch_training

    run = RunDir.of(cfg.run_dir)
    cfg.save(run.job_config("train"))
    cfg = setup_run(cfg)
    run_id = run.read_run_id()
    print(f"local job: train on {cfg.world_size} process(es); run directory {run.path}")
    print(f"  MLflow : {mlflow_line(cfg, run.path, run_id)}", flush=True)
    code = launch_training(cfg.launch, run.path, resume="auto", run_id=run_id)
    if code == 0:
        finish_run(run.path, "FINISHED")
    elif code != REQUEUE_EXIT_CODE:
        finish_run(run.path, "FAILED")
    return code
