"""Fixtures of the cluster tests: local Slurm and Ray clusters, a prepared tiny dataset."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from cluster_helpers import REPO, TINY, lmforge, tiny_overrides, write_corpus
from ray_cluster import RayCluster


@pytest.fixture(scope="session")
def slurm_cluster() -> str:
    """A running single-node Slurm cluster (installed with apt-get when missing)."""
    script = REPO / "slurm" / "local-test-cluster.sh"
    proc = subprocess.run(["bash", str(script), "start"], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, f"{script} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


@pytest.fixture(scope="session")
def prepared(tmp_path_factory) -> Path:
    """A folder holding the tiny corpus and its prepared shards (``lmforge prepare``)."""
    tmp = tmp_path_factory.mktemp("cluster-data")
    write_corpus(tmp)
    lmforge("prepare", str(TINY), f"--run_dir={tmp / 'prepare'}", *tiny_overrides(tmp), cwd=tmp)
    assert (tmp / "data" / "manifest.json").is_file()
    return tmp


@pytest.fixture(scope="module")
def ray_cluster():
    """A running two-node Ray cluster (head + worker, 1 CPU each), stopped afterwards."""
    cluster = RayCluster()
    try:
        yield cluster.start()
    finally:
        cluster.stop()
