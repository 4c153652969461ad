"""Fixtures of the cluster tests: a local Slurm cluster and a local Ray cluster."""

from __future__ import annotations

import subprocess

import pytest
from cluster_helpers import REPO
from ray_cluster import RayCluster


@pytest.fixture(scope="session")
def slurm_cluster() -> str:
    """A running single-node Slurm cluster (installed with apt-get when missing)."""
    script = REPO / "slurm" / "local-test-cluster.sh"
    proc = subprocess.run(["bash", str(script), "start"], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, f"{script} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


@pytest.fixture(scope="module")
def ray_cluster():
    """A running two-node Ray cluster (head + worker, 1 CPU each), stopped afterwards."""
    cluster = RayCluster()
    try:
        yield cluster.start()
    finally:
        cluster.stop()
