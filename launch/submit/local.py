"""``lmforge submit local``: run a submitted stage on this machine, in the foreground.

The job goes through the same steps as on a cluster (the submitted config in
``<run_dir>/submit/config.yaml``, one MLflow run per job recorded in the run directory,
``--resume auto``), with torchrun for training and a local Ray for the data pipeline. Run
it again after an interruption and it continues from the newest complete checkpoint.
"""

from __future__ import annotations

import json

from lmforge.launch.callbacks import REQUEUE_EXIT_CODE
from lmforge.launch.config import RunConfig
from lmforge.launch.submit.spec import RUN_ID_FILE, JobFiles, mlflow_line

STAGES = ("prepare", "train", "all")


def describe(cfg: RunConfig, stage: str) -> dict[str, object]:
    """The job spec shown by ``--dry-run``."""
    from lmforge.launch.run import manifest_of, run_dir_of

    return {
        "target": "local",
        "stage": stage,
        "processes": cfg.world_size if stage != "prepare" else None,
        "run_dir": str(run_dir_of(cfg)),
        "manifest": str(manifest_of(cfg)),
        "resume": "auto" if stage != "prepare" else None,
    }


def run_local(cfg: RunConfig, stage: str, dry_run: bool = False) -> int:
    """Runs ``stage`` (prepare, train or all) of the job here; returns its exit status.

    Training exits with 75 when it was stopped by SIGTERM/SIGUSR1 after a checkpoint; the
    MLflow run then stays open for the next ``submit local``, which resumes.
    """
    if stage not in STAGES:
        raise ValueError(f"--stage: '{stage}' is not one of {', '.join(STAGES)}")
    if dry_run:
        print(json.dumps(describe(cfg, stage), indent=2))
        print("# dry run: nothing started")
        return 0
    from lmforge.launch.run import prepare_stage, run_dir_of

    if stage in ("prepare", "all"):
        print(f"manifest: {prepare_stage(cfg)}", flush=True)
    if stage == "prepare":
        return 0
    from lmforge.launch.local import launch_training
    from lmforge.launch.submit.job import finish_run, setup_run

    run_dir = run_dir_of(cfg)
    cfg.save(JobFiles(run_dir).config("train"))
    cfg = setup_run(cfg)
    id_file = run_dir / RUN_ID_FILE
    run_id = id_file.read_text().strip() if id_file.is_file() else None
    print(f"local job: train on {cfg.world_size} process(es); run directory {run_dir}")
    print(f"  MLflow : {mlflow_line(cfg, run_dir, run_id)}", flush=True)
    code = launch_training(cfg, run_dir, resume="auto", run_id=run_id)
    if code == 0:
        finish_run(run_dir, "FINISHED")
    elif code != REQUEUE_EXIT_CODE:
        finish_run(run_dir, "FAILED")
    return code
