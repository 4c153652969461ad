"""A real Ray cluster (head + worker node) runs `lmforge submit ray` jobs: prepare, then train.

Training goes through Ray Train with DeepSpeed in each worker; one worker is killed part way,
Ray Train restarts the group from the last checkpoint, and the losses must still equal those
of the same job run with `lmforge submit local` (torchrun), step for step.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cluster_helpers import STEPS, TINY, lmforge, metrics, tiny_overrides, write_corpus

pytestmark = pytest.mark.slow

JOB_TIMEOUT_S = 600
CHECKPOINT = 10


def submit(cluster, tmp: Path, *args: str) -> tuple[str, str]:
    proc = lmforge("submit", "ray", str(TINY), "--address", cluster.dashboard,
                   "--python", sys.executable, *tiny_overrides(tmp), *args, cwd=tmp)
    match = re.search(r"submitted Ray job (\S+):", proc.stdout)
    assert match, proc.stdout
    return match.group(1), proc.stdout


def wait_for_job(cluster, job_id: str) -> str:
    """Polls `ray job status` until the job ends; returns its final status and the logs."""
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while time.monotonic() < deadline:
        out = subprocess.run(
            [str(cluster.ray_bin), "job", "status", job_id, "--address", cluster.dashboard],
            capture_output=True, text=True, env=cluster.env,
        ).stdout
        for state in ("SUCCEEDED", "FAILED", "STOPPED"):
            if f"Job '{job_id}' {state.lower()}" in out or f"status: {state}" in out:
                return state
        time.sleep(2)
    return "TIMEOUT"


def job_logs(cluster, job_id: str, tail: int | None = 4000) -> str:
    out = subprocess.run(
        [str(cluster.ray_bin), "job", "logs", job_id, "--address", cluster.dashboard],
        capture_output=True, text=True, env=cluster.env,
    ).stdout
    return out if tail is None else out[-tail:]


@pytest.fixture(scope="module")
def prepared_on_ray(ray_cluster, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ray")
    write_corpus(tmp)
    job_id, stdout = submit(ray_cluster, tmp, "--job", "prepare", f"--run_dir={tmp / 'run'}")
    state = wait_for_job(ray_cluster, job_id)
    return {"tmp": tmp, "job": job_id, "stdout": stdout, "state": state}


def test_prepare_job_writes_the_dataset(ray_cluster, prepared_on_ray):
    job_id, tmp = prepared_on_ray["job"], prepared_on_ray["tmp"]
    assert prepared_on_ray["state"] == "SUCCEEDED", job_logs(ray_cluster, job_id)
    out = prepared_on_ray["stdout"]
    assert f"ray job status {job_id} --address {ray_cluster.dashboard}" in out
    assert f"ray job logs --follow {job_id}" in out
    manifest = json.loads((tmp / "data" / "manifest.json").read_text())
    splits = manifest["datasets"]["shakespeare"]["splits"]
    assert splits["train"]["tokens"] > 50_000 and splits["train"]["shards"]


def test_ray_train_survives_a_lost_worker_and_matches_a_local_run(ray_cluster, prepared_on_ray):
    from mlflow.tracking import MlflowClient

    tmp = prepared_on_ray["tmp"]
    assert prepared_on_ray["state"] == "SUCCEEDED"
    on_ray = tmp / "on-ray"
    job_id, stdout = submit(ray_cluster, tmp, "--job", "train", "--num-workers", "2",
                            "--max-failures", "2", f"--run_dir={on_ray}",
                            f"--train.checkpoint_every={CHECKPOINT}")
    # Once the first checkpoint exists, kill one training worker: Ray Train must restart
    # the group (FailureConfig), which resumes from that checkpoint.
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while not any(step > CHECKPOINT + 1 for step in metrics(on_ray)):
        assert time.monotonic() < deadline, job_logs(ray_cluster, job_id)
        time.sleep(0.1)
    victims = ray_cluster.processes("RayTrainWorker")
    assert victims, "no Ray Train worker process found"
    os.kill(victims[0], signal.SIGKILL)
    state = wait_for_job(ray_cluster, job_id)
    logs = job_logs(ray_cluster, job_id, tail=None)
    assert state == "SUCCEEDED", logs[-4000:]
    # Steps after the checkpoint were trained twice (killed attempt, then the retry), steps
    # up to it once: the retry resumed from the checkpoint rather than from scratch.
    logged = [json.loads(line)["step"] for line in (on_ray / "metrics.jsonl").open()
              if "train/loss" in line]
    assert {logged.count(s) for s in range(1, CHECKPOINT + 1)} == {1}, logged
    assert logged.count(CHECKPOINT + 1) == 2, logged
    ray_loss = metrics(on_ray)  # the retry's lines win for steps logged twice
    assert sorted(ray_loss) == list(range(1, STEPS + 1))
    # the job is the one runner, as `lmforge run`: it ends with a verified export
    assert "export verified: " in logs
    assert (on_ray / "export" / "model.safetensors").is_file()

    run_id = (on_ray / "mlflow_run_id").read_text().strip()
    assert f"experiment 'cluster'  run {run_id}" in stdout
    client = MlflowClient(tracking_uri=f"sqlite:///{on_ray / 'mlflow.db'}")
    assert client.get_run(run_id).info.status == "FINISHED"

    here = tmp / "local"
    lmforge("submit", "local", str(TINY), "--job", "train", f"--run_dir={here}",
            *tiny_overrides(tmp), cwd=tmp)
    local_loss = metrics(here)
    # Same ranks, data order and seeds, exact resume: Ray Train changes none of the numbers.
    assert [ray_loss[s] for s in sorted(ray_loss)] == [local_loss[s] for s in sorted(ray_loss)]
