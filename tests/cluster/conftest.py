"""Fixtures of the cluster tests: a local Slurm cluster, a local Ray cluster, and the
reference run of the stage graph the Slurm and Ray stage tests submit (each started once
per session and shared by every test that needs it)."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
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


# The session's Ray cluster, and the id of the last test that uses it: the cluster is
# stopped right after that test instead of idling through the rest of the session.
_ray: dict[str, object] = {}


@pytest.fixture(scope="session")
def ray_cluster():
    """A running two-node Ray cluster (head + worker, 1 CPU each), shared by every test that
    uses it (each submits its own jobs and waits for them to end; a killed Ray Train worker
    is replaced by Ray itself) and stopped after the last of them."""
    cluster = RayCluster()
    _ray["cluster"] = cluster
    try:
        yield cluster.start()
    finally:
        cluster.stop()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    users = [item.nodeid for item in items
             if "ray_cluster" in getattr(item, "fixturenames", ())
             and here in Path(item.path).parents]
    _ray["last_user"] = users[-1] if users else None


def pytest_runtest_teardown(item: pytest.Item) -> None:
    if item.nodeid == _ray.get("last_user") and "cluster" in _ray:
        _ray.pop("cluster").stop()


# Pretrain, then an anneal long enough that the Slurm test's pre-kill signal lands inside it.
STAGES = ("--stages=[{name: pretrain, train: {max_steps: 10}}, "
          "{name: anneal, train: {max_steps: 30, lr_schedule: linear, warmup_steps: 0}, "
          "init: {optimizer: keep}}]")


@dataclass(frozen=True)
class StageGraph:
    """The pretrain → anneal graph run uninterrupted with `lmforge run` on this machine."""

    folder: Path  # holds the corpus and the prepared data the cluster jobs reuse
    args: list[str]  # the overrides every run of the graph takes (data, sizes, stages)
    reference: Path  # the run directory of the uninterrupted local run


@pytest.fixture(scope="session")
def stage_graph(tmp_path_factory) -> StageGraph:
    """One reference run of the stage graph for the Slurm and Ray stage tests: each submits
    the same graph (same corpus, same prepared data folder) and compares its losses with
    this run's, step for step."""
    folder = tmp_path_factory.mktemp("graph")
    write_corpus(folder)
    args = [*tiny_overrides(folder), STAGES, "--export.enabled=false"]
    reference = folder / "local"
    lmforge("run", str(TINY), f"--run_dir={reference}", *args, cwd=folder, timeout=900)
    return StageGraph(folder, args, reference)
