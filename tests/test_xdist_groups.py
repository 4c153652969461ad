"""The suite's pytest-xdist work units (tests/xdist_groups.py): modules whole, tests/cluster
together, and xdist's public file scheduling on an xdist version not checked."""

from __future__ import annotations

import pytest

xdist = pytest.importorskip("xdist")
from xdist.scheduler import LoadFileScheduling  # noqa: E402
from xdist_groups import group_of, make_scheduler  # noqa: E402


class TwoWorkers:
    """The options xdist's schedulers read from pytest's config (`-n 2`)."""

    def getvalue(self, name: str) -> object:
        return {"numprocesses": 2, "tx": ["2*popen"], "maxschedchunk": None}.get(name)

    def getoption(self, name: str, default: object = None) -> object:
        return self.getvalue(name) if self.getvalue(name) is not None else default


def test_a_module_is_one_unit_and_the_cluster_tests_are_one():
    assert group_of("tests/launch/train/test_engine.py::test_a[2-fp32]") == (
        "tests/launch/train/test_engine.py")
    assert group_of("tests/cluster/test_slurm_jobs.py::test_x") == group_of(
        "tests/cluster/test_stages_ray.py::test_y") == "tests/cluster/"


def test_the_checked_version_schedules_by_group():
    scheduler = make_scheduler(TwoWorkers(), None, xdist.__version__)
    assert xdist.__version__.startswith("3.8.")  # the version the override was checked on
    assert scheduler._split_scope("tests/cluster/test_ray_jobs.py::t") == "tests/cluster/"
    assert scheduler._split_scope("tests/model/test_decoder.py::t[1]") == (
        "tests/model/test_decoder.py")


def test_another_xdist_version_gets_the_public_file_scheduling():
    scheduler = make_scheduler(TwoWorkers(), None, "4.0.0")
    assert type(scheduler) is LoadFileScheduling
