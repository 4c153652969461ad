"""Real Slurm (munge, slurmctld, slurmd on this machine) runs jobs from `lmforge submit slurm`.

A prepare job starts a Ray cluster inside its allocation and runs the data pipeline on it; a
2-task training job queued behind it (--after) trains to the end; a second training job
receives the pre-kill signal part way: it checkpoints, requeues itself, resumes and must end
with exactly the same losses; a third has one task SIGKILLed: the job fails, and resubmitting
it resumes from the last checkpoint to the same losses.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from cluster_helpers import STEPS, TINY, lmforge, metrics, tiny_overrides, write_corpus

pytestmark = pytest.mark.slow

JOB_TIMEOUT_S = 600
# Pending reasons that no amount of waiting fixes on a one-node cluster.
NEVER_RUNS = {"PartitionConfig", "PartitionNodeLimit", "BadConstraints", "ReqNodeNotAvail",
              "DependencyNeverSatisfied"}


def submit(tmp: Path, run_name: str, *args: str, overrides: tuple[str, ...] = ()
           ) -> tuple[str, Path, str]:
    run_dir = tmp / run_name
    proc = lmforge(
        "submit", "slurm", str(TINY), "--nodes", "1", *args,
        f"--run_dir={run_dir}", *tiny_overrides(tmp), *overrides, cwd=tmp,
    )
    match = re.search(r"submitted Slurm job (\d+)", proc.stdout)
    assert match, proc.stdout
    return match.group(1), run_dir, proc.stdout


def job_field(job_id: str, name: str) -> str:
    out = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True,
                         text=True, check=True).stdout
    return re.search(rf"\b{name}=(\S+)", out).group(1)


def wait_for_end(job_id: str, run_dir: Path) -> str:
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while time.monotonic() < deadline:
        state = job_field(job_id, "JobState")
        if state in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"):
            return state
        reason = job_field(job_id, "Reason")
        if reason in NEVER_RUNS:
            subprocess.run(["scancel", job_id])
            pytest.fail(f"job {job_id} can never start here ({reason}): see `scontrol show job`")
        time.sleep(1)
    subprocess.run(["scancel", job_id])
    pytest.fail(f"job {job_id} still {state} after {JOB_TIMEOUT_S}s:\n{job_log(run_dir)[-3000:]}")


def job_log(run_dir: Path) -> str:
    return "\n".join(p.read_text() for p in sorted((run_dir / "logs").glob("*.out")))


@pytest.fixture(scope="module")
def jobs(slurm_cluster, tmp_path_factory):
    """The prepare job and, queued behind it, the uninterrupted training job."""
    tmp = tmp_path_factory.mktemp("slurm")
    write_corpus(tmp)
    prep_id, prep_dir, _ = submit(tmp, "prepare", "--job", "prepare")
    job_id, run_dir, stdout = submit(tmp, "straight", "--tasks-per-node", "2", "--after", prep_id)
    prep_state = wait_for_end(prep_id, prep_dir)
    state = wait_for_end(job_id, run_dir)
    return {"tmp": tmp, "prepare": (prep_id, prep_dir, prep_state),
            "job": job_id, "run_dir": run_dir, "stdout": stdout, "state": state}


def test_prepare_job_runs_the_pipeline_on_a_ray_cluster_in_the_allocation(jobs):
    prep_id, prep_dir, state = jobs["prepare"]
    log = job_log(prep_dir)
    assert state == "COMPLETED", log[-3000:]
    assert "Ray head on" in log and "prepare exited with 0" in log
    manifest = jobs["tmp"] / "data" / "manifest.json"
    assert manifest.is_file()
    # The pipeline's Ray driver connected to the job's own Ray cluster (its logs are there).
    ray_tmp = Path(f"/tmp/lmforge-ray-{prep_id}")
    assert list((ray_tmp / "session_latest" / "logs").glob("python-core-driver-*.log"))
    shutil.rmtree(ray_tmp, ignore_errors=True)


def test_two_task_job_runs_to_completion(jobs):
    run_dir, job_id = jobs["run_dir"], jobs["job"]
    assert jobs["state"] == "COMPLETED", job_log(run_dir)[-3000:]
    assert job_field(job_id, "ExitCode") == "0:0"
    log = job_log(run_dir)
    assert f"lmforge: job {job_id} on" in log and "2 tasks" in log
    loss = metrics(run_dir)
    assert sorted(loss) == list(range(1, STEPS + 1))
    assert loss[STEPS] < loss[1] - 0.5
    assert (run_dir / "checkpoints" / f"step_{STEPS:08d}").is_dir()
    # the job is the one runner, as `lmforge run`: it ends with a verified export
    assert "export verified: " in log
    assert (run_dir / "export" / "model.safetensors").is_file()


def test_submit_says_how_to_follow_the_job_and_mlflow_run_finishes(jobs):
    from mlflow.tracking import MlflowClient

    out, run_dir, job_id = jobs["stdout"], jobs["run_dir"], jobs["job"]
    run_id = (run_dir / "mlflow_run_id").read_text().strip()
    assert f"squeue -j {job_id}" in out and f"sacct -j {job_id}" in out
    assert f"tail -f {run_dir}/logs/lmforge-tiny-{job_id}.out" in out
    assert f"sqlite:///{run_dir / 'mlflow.db'}  experiment 'cluster'  run {run_id}" in out
    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir / 'mlflow.db'}")
    mlrun = client.get_run(run_id)
    assert mlrun.info.status == "FINISHED"
    history = {m.step: m.value for m in client.get_metric_history(run_id, "train/loss")}
    assert history == pytest.approx(metrics(run_dir), rel=1e-12)


def test_pre_kill_signal_checkpoints_requeues_and_resumes_to_the_same_loss(jobs):
    job_id, run_dir, _ = submit(jobs["tmp"], "preempted", "--tasks-per-node", "2")
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while not any(step >= 5 for step in metrics(run_dir)):  # some steps done: preempt now
        assert time.monotonic() < deadline, job_log(run_dir)[-3000:]
        time.sleep(0.1)
    subprocess.run(["scancel", "--signal=USR1", "--batch", job_id], check=True)
    state = wait_for_end(job_id, run_dir)
    log = job_log(run_dir)
    assert state == "COMPLETED", log[-3000:]
    assert job_field(job_id, "Restarts") == "1"
    assert "restart 1," in log and f"requeueing job {job_id}" in log
    stopped = [int(p.name.split("_")[1]) for p in (run_dir / "checkpoints").glob("step_*")]
    assert min(stopped) < STEPS  # the preemption checkpoint, before the end
    resumed = metrics(run_dir)
    straight_loss = metrics(jobs["run_dir"])
    assert sorted(resumed) == list(range(1, STEPS + 1))
    # Resume is exact on CPU: every loss after the restart equals the uninterrupted run's.
    assert [resumed[s] for s in range(1, STEPS + 1)] == [straight_loss[s] for s in
                                                         range(1, STEPS + 1)]


def _slurm_rank(run_dir: Path, rank: int):
    import psutil

    for proc in psutil.process_iter():
        try:
            cmd = " ".join(proc.cmdline())
            if ("lmforge.launch.train.worker" in cmd and str(run_dir) in cmd
                    and proc.environ().get("SLURM_PROCID") == str(rank)):
                return proc
        except psutil.Error:
            continue
    return None


def test_sigkill_of_one_task_fails_the_job_and_a_resubmission_resumes_exactly(jobs):
    """Issue 14 item 5(b): one srun task SIGKILLed between checkpoints."""
    import psutil

    every = ("--train.checkpoint_every=10",)  # after tiny_overrides' checkpoint_every=0
    job_id, run_dir, _ = submit(jobs["tmp"], "killed", "--tasks-per-node", "2", overrides=every)
    deadline = time.monotonic() + JOB_TIMEOUT_S
    latest = run_dir / "checkpoints" / "latest"
    while not (latest.exists() and max(metrics(run_dir)) % 10 in (2, 3, 4, 5)):
        assert time.monotonic() < deadline, job_log(run_dir)[-3000:]
        time.sleep(0.05)
    victim, other = _slurm_rank(run_dir, 1), _slurm_rank(run_dir, 0)
    assert victim is not None and other is not None
    killed_at = time.monotonic()
    victim.send_signal(9)
    psutil.wait_procs([other], timeout=60)
    assert not other.is_running(), "rank 0 still running a minute after rank 1 was killed"
    assert time.monotonic() - killed_at < 60
    state = wait_for_end(job_id, run_dir)
    log = job_log(run_dir)
    assert state == "FAILED", log[-3000:]  # no requeue: only exit 75 requeues
    assert job_field(job_id, "Restarts") == "0"
    assert job_field(job_id, "ExitCode") == "137:0"  # srun passes on the SIGKILL (128 + 9)
    assert "task 1: Killed" in log
    assert "training step exited with 137" in log
    crashed = metrics(run_dir)
    saved = int(latest.read_text().strip().split("_")[1])
    assert saved < max(crashed) < STEPS

    # The same run_dir: the job's workers always run with --resume auto.
    job_id, _, _ = submit(jobs["tmp"], "killed", "--tasks-per-node", "2", overrides=every)
    assert wait_for_end(job_id, run_dir) == "COMPLETED", job_log(run_dir)[-3000:]
    resumed, straight = metrics(run_dir), metrics(jobs["run_dir"])
    assert sorted(resumed) == list(range(1, STEPS + 1))
    assert [resumed[s] for s in range(1, STEPS + 1)] == [straight[s] for s in
                                                         range(1, STEPS + 1)]
