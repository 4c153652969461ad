"""Fixtures shared by the pipeline tests."""

from __future__ import annotations

import os

import pytest
import ray


@pytest.fixture(scope="module")
def ray_cluster():
    """A real local Ray for one test module (start-up costs ~3 s and 770 MB)."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()
