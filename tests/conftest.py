"""Suite-wide settings: offline Hugging Face, quiet libraries, one thread per process."""

from __future__ import annotations

import os
import sys

import pytest
from deepspeed_ops import clear_stale_locks, use_environment_build_dir

# One compute thread per process, the pytest workers and every process they start alike: the
# suite runs 3 workers on 2 cores, and torch's default (a thread per core in each process)
# oversubscribes them, OpenMP threads spinning while they wait (16% more CPU time measured
# on the fast tests). Training ranks take theirs from launch.omp_num_threads.
os.environ.setdefault("OMP_NUM_THREADS", "1")
# Nothing in the suite may reach a hub; exports and parity tests load local folders only.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# DeepSpeed picks the CPU accelerator without GPUs; saying so skips a warning per process.
os.environ.setdefault("DS_ACCELERATOR", "cpu")
# DeepSpeed's JIT-built ops go into this venv's own folder (tests/deepspeed_ops.py).
use_environment_build_dir()


def pytest_sessionstart(session: pytest.Session) -> None:
    """A run killed while DeepSpeed JIT-built an op left torch's build lock: without this,
    every later DeepSpeed start in the suite would wait on it forever."""
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    clear_stale_locks(say=reporter.write_line if reporter else
                      lambda message: print(message, file=sys.stderr))


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The longest work units first (tests/xdist_groups.py), so short ones end the run."""
    from xdist_groups import longest_first

    items[:] = longest_first(items)


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: object) -> object:
    """Under ``pytest -n`` (``make test``): a module's tests on one worker, the Slurm and
    the Ray cluster tests each on one (tests/xdist_groups.py)."""
    import xdist
    from xdist_groups import make_scheduler

    return make_scheduler(config, log, xdist.__version__)


@pytest.fixture(autouse=True)
def _keep_ray_auth_mode():
    """Ray reads RAY_AUTH_MODE once per process; a test that switches it (the Ray Jobs
    client does, when a token exists) must not leave later in-process Ray starts with a
    GCS that wants a token the driver will not send."""
    before = os.environ.get("RAY_AUTH_MODE")
    yield
    if before is None:
        os.environ.pop("RAY_AUTH_MODE", None)
    else:
        os.environ["RAY_AUTH_MODE"] = before
