"""Fixtures shared by the pipeline tests."""

from __future__ import annotations

import os

import pytest

from lmforge.pipeline.run.executor import ray_session


@pytest.fixture(scope="module")
def ray_cluster():
    """A real local Ray for one test module, started the way `prepare` starts its own
    (lean: see executor.ray_session; ~1.5 s on 2 cores)."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    address = os.environ.pop("RAY_ADDRESS", None)  # a Ray of the tests' own
    try:
        with ray_session(None):
            yield
    finally:
        if address is not None:
            os.environ["RAY_ADDRESS"] = address
