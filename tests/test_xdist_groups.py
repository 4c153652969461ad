"""The suite's pytest-xdist work units (tests/xdist_groups.py): modules whole, the Slurm and
the Ray cluster tests each together, handed out longest first, and xdist's public file
scheduling on an xdist version not checked."""

from __future__ import annotations

import pytest

xdist = pytest.importorskip("xdist")
from xdist.scheduler import LoadFileScheduling  # noqa: E402
from xdist_groups import RAY_JOBS, SLURM_JOBS, group_of, longest_first, make_scheduler  # noqa: E402,I001


class TwoWorkers:
    """The options xdist's schedulers read from pytest's config (`-n 2`)."""

    def __init__(self) -> None:
        self.option = type("Option", (), {"loadscopereorder": True})()

    def getvalue(self, name: str) -> object:
        return {"numprocesses": 2, "tx": ["2*popen"], "maxschedchunk": None}.get(name)

    def getoption(self, name: str, default: object = None) -> object:
        return self.getvalue(name) if self.getvalue(name) is not None else default


def test_a_module_is_one_unit_and_each_cluster_has_one():
    assert group_of("tests/launch/train/test_engine.py::test_a[2-fp32]") == (
        "tests/launch/train/test_engine.py")
    assert group_of("tests/cluster/test_slurm_jobs.py::test_x") == group_of(
        "tests/cluster/test_stages_slurm.py::test_y") == SLURM_JOBS
    assert group_of("tests/cluster/test_ray_jobs.py::test_x") == group_of(
        "tests/cluster/test_stages_ray.py::test_y") == RAY_JOBS
    assert group_of("tests/cluster/test_slurm_render.py::t") == (
        "tests/cluster/test_slurm_render.py")


class Item:
    """What ``longest_first`` reads of a collected test: its id and its ``slow`` mark."""

    def __init__(self, nodeid: str, slow: bool = False) -> None:
        self.nodeid, self.slow = nodeid, slow

    def get_closest_marker(self, name: str) -> object:
        return object() if name == "slow" and self.slow else None


def test_units_are_handed_out_longest_first_each_in_its_own_order():
    items = [Item("tests/a.py::fast"), Item("tests/b.py::one", slow=True),
             Item("tests/c.py::x", slow=True), Item("tests/c.py::y", slow=True),
             Item("tests/cluster/test_ray_jobs.py::r1", slow=True),
             Item("tests/cluster/test_slurm_jobs.py::s1", slow=True),
             Item("tests/c.py::z"), Item("tests/cluster/test_stages_ray.py::r2", slow=True)]
    order = [item.nodeid for item in longest_first(items)]
    assert order == ["tests/cluster/test_ray_jobs.py::r1", "tests/cluster/test_slurm_jobs.py::s1",
                     "tests/cluster/test_stages_ray.py::r2", "tests/c.py::x", "tests/c.py::y",
                     "tests/c.py::z", "tests/b.py::one", "tests/a.py::fast"]


def test_the_checked_version_schedules_by_group_in_collection_order():
    config = TwoWorkers()
    scheduler = make_scheduler(config, None, xdist.__version__)
    assert xdist.__version__.startswith("3.8.")  # the version the override was checked on
    assert config.option.loadscopereorder is False  # longest_first's order, not test counts
    assert scheduler._split_scope("tests/cluster/test_ray_jobs.py::t") == RAY_JOBS
    assert scheduler._split_scope("tests/model/test_decoder.py::t[1]") == (
        "tests/model/test_decoder.py")


def test_another_xdist_version_gets_the_public_file_scheduling():
    scheduler = make_scheduler(TwoWorkers(), None, "4.0.0")
    assert type(scheduler) is LoadFileScheduling
