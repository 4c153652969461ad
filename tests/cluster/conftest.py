"""Fixtures of the cluster tests: a local Slurm cluster, a local Ray cluster, and the
reference run of the stage graph the Slurm and Ray stage tests submit (each started once
per session and shared by every test that needs it)."""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from cluster_helpers import REPO, TINY, lmforge, tiny_overrides, write_corpus
from ray_cluster import RAY, RayCluster

from lmforge.pipeline.folder_lock import LOCK_FILE


def session_shared_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """This session's temporary folder that every xdist worker sees (its own without xdist):
    where the Slurm and the Ray units, on different workers, meet."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


@contextmanager
def session_lock(tmp_path_factory: pytest.TempPathFactory, name: str) -> Iterator[Path]:
    """Holds this session's lock ``name`` (an flock, across xdist workers)."""
    shared = session_shared_dir(tmp_path_factory)
    with open(shared / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield shared


@pytest.fixture(scope="session")
def ray_auth_token(tmp_path_factory) -> None:
    """~/.ray/auth_token exists before any Ray head starts: the test Ray cluster and the Ray
    a Slurm prepare job starts (both in token mode) may start at the same moment on two
    workers, and each creates the token when it is missing; made once, under a lock, by
    Ray's own command."""
    with session_lock(tmp_path_factory, "ray-auth-token"):
        subprocess.run([str(RAY), "get-auth-token", "--generate"], capture_output=True,
                       check=True, timeout=120)


@pytest.fixture(scope="session")
def slurm_cluster(ray_auth_token) -> str:
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
def ray_cluster(ray_auth_token):
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

    def args_with_own_data(self, tmp: Path) -> list[str]:
        """``args`` with a copy of the prepared data in ``tmp`` (its fingerprint matches, so
        the job's prepare step skips it): the Slurm and the Ray job may run at the same time,
        and a job's prepare step takes its data folder exclusively. The folder's lock file
        (which may name the other job's live process) is not copied."""
        shutil.copytree(self.folder / "data", tmp / "data",
                        ignore=shutil.ignore_patterns(LOCK_FILE))
        return [*self.args, f"--data.output_dir={tmp / 'data'}"]


@pytest.fixture(scope="session")
def stage_graph(tmp_path_factory) -> StageGraph:
    """One reference run of the stage graph for the Slurm and Ray stage tests: each submits
    the same graph (same corpus, same prepared data folder) and compares its losses with
    this run's, step for step. The two run on different xdist workers: the first to ask
    makes the run, under a lock in the session's shared temporary folder; the other waits
    for it and reuses it."""
    folder = session_shared_dir(tmp_path_factory) / "cluster-stage-graph"
    args = [*tiny_overrides(folder), STAGES, "--export.enabled=false"]
    reference = folder / "local"
    with session_lock(tmp_path_factory, "cluster-stage-graph"):
        if not (folder / "REFERENCE_DONE").is_file():
            if folder.exists():  # a half-made run of this session's other worker
                shutil.rmtree(folder)
            folder.mkdir()
            write_corpus(folder)
            lmforge("run", str(TINY), f"--run_dir={reference}", *args, cwd=folder,
                    timeout=900)
            (folder / "REFERENCE_DONE").touch()
    return StageGraph(folder, args, reference)
