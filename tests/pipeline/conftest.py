"""Fixtures shared by the pipeline tests."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from lmforge.pipeline.run.local_ray import ray_session

# The tests live in folders mirroring pipeline/ (contract/, prepare/, run/, loader/) and import
# the helpers kept here (shard_fixtures) by basename.
sys.path.insert(0, str(Path(__file__).resolve().parent))


@pytest.fixture(scope="module")
def ray_cluster():
    """A real local Ray for one test module, started the way `prepare` starts its own
    (lean: see local_ray.ray_session; ~1.5 s on 2 cores)."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    address = os.environ.pop("RAY_ADDRESS", None)  # a Ray of the tests' own
    try:
        with ray_session(None):
            yield
    finally:
        if address is not None:
            os.environ["RAY_ADDRESS"] = address
