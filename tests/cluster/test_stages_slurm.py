"""A stage graph as one Slurm job (real slurmctld/slurmd here): `lmforge submit slurm` of a
pretrain → anneal config runs both stages (each one's data preparation inside the job, each
one's training as an srun step); the pre-kill signal during the anneal makes the ranks
checkpoint, the job requeues itself and resumes inside the anneal, to the same losses as the
same graph run uninterrupted with `lmforge run`."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest
from cluster_helpers import TINY, lmforge, metrics
from test_slurm_jobs import JOB_TIMEOUT_S, job_field, job_log, wait_for_end

pytestmark = pytest.mark.slow


def test_requeued_graph_resumes_inside_the_second_stage(slurm_cluster, stage_graph, tmp_path):
    common = stage_graph.args_with_own_data(tmp_path)
    straight = stage_graph.reference  # the graph, run uninterrupted
    run_dir = tmp_path / "slurm"
    out = lmforge("submit", "slurm", str(TINY), "--nodes", "1", "--tasks-per-node", "2",
                  f"--run_dir={run_dir}", *common, cwd=tmp_path).stdout
    job_id = out.split("submitted Slurm job ")[1].split(":")[0]
    anneal = run_dir / "stages" / "01-anneal"
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while not (anneal / "metrics.jsonl").exists() or max(metrics(anneal), default=0) < 5:
        assert time.monotonic() < deadline, job_log(run_dir)[-3000:]
        state = job_field(job_id, "JobState")
        assert state in ("PENDING", "CONFIGURING", "RUNNING"), (
            f"job {job_id} {state} before its anneal stage:\n{job_log(run_dir)[-3000:]}")
        time.sleep(0.1)
    subprocess.run(["scancel", "--signal=USR1", "--batch", job_id], check=True)
    state = wait_for_end(job_id, run_dir)
    log = job_log(run_dir)
    assert state == "COMPLETED", log[-3000:]
    assert job_field(job_id, "Restarts") == "1" and f"requeueing job {job_id}" in log
    assert "stage 0 'pretrain': complete, skipped" in log  # the requeued job
    for stage in ("00-pretrain", "01-anneal"):
        got, want = metrics(run_dir / "stages" / stage), metrics(straight / "stages" / stage)
        assert sorted(got) == sorted(want) and [got[s] for s in sorted(got)] == [
            want[s] for s in sorted(want)], stage
    assert (anneal / "STAGE_COMPLETE").exists()
    stopped = [int(p.name.split("_")[1]) for p in (anneal / "checkpoints").glob("step_*")]
    assert min(stopped) < 30  # the preemption checkpoint
    assert Path(run_dir / "mlflow_run_id").read_text()
