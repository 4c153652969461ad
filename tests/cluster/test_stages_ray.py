"""A stage graph as one Ray Job on a real Ray cluster (head + worker): `lmforge submit ray`
of a pretrain → anneal config prepares the data inside the job and trains each stage through
Ray Train, to the same losses as `lmforge run` of the same graph on this machine; submitting
it again finds both stages complete."""

from __future__ import annotations

import sys

import pytest
from cluster_helpers import TINY, lmforge, metrics
from test_ray_jobs import job_logs, wait_for_job

pytestmark = pytest.mark.slow


def test_ray_job_runs_the_graph(ray_cluster, stage_graph, tmp_path):
    common = stage_graph.args_with_own_data(tmp_path)
    local = stage_graph.reference  # the same graph, run locally
    run_dir = tmp_path / "ray"
    submit = ["submit", "ray", str(TINY), "--address", ray_cluster.dashboard, "--python",
              sys.executable, f"--run_dir={run_dir}", *common]
    out = lmforge(*submit, cwd=tmp_path).stdout
    job_id = out.split("submitted Ray job ")[1].split(":")[0]
    assert wait_for_job(ray_cluster, job_id) == "SUCCEEDED", job_logs(ray_cluster, job_id)
    for stage in ("00-pretrain", "01-anneal"):
        got, want = metrics(run_dir / "stages" / stage), metrics(local / "stages" / stage)
        assert [got[s] for s in sorted(got)] == [want[s] for s in sorted(want)], stage
        assert (run_dir / "stages" / stage / "STAGE_COMPLETE").exists()

    out = lmforge(*submit, cwd=tmp_path).stdout  # a retry of a finished graph
    job_id = out.split("submitted Ray job ")[1].split(":")[0]
    assert wait_for_job(ray_cluster, job_id) == "SUCCEEDED", job_logs(ray_cluster, job_id)
    logs = job_logs(ray_cluster, job_id, tail=None)
    assert "stage 0 'pretrain': complete, skipped" in logs
    assert "stage 1 'anneal': complete, skipped" in logs
