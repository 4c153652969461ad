"""Which tests share a pytest-xdist worker (``make test`` runs 3), and in what order the work
units are handed out.

A unit is a module, so a module-scoped fixture (a trained reference run, a prepared dataset)
is built once; except in tests/cluster, where the modules that run jobs on the one local
Slurm form one unit and those that run jobs on the session's Ray cluster another (each
cluster's fixtures live on one worker; the reference stage-graph run both compare with is
built once, under a file lock: tests/cluster/conftest.py).

Units are handed out longest first: the two cluster units (several minutes each, mostly
waiting on a scheduler), then the modules holding ``slow`` tests (most first), then the
rest, so that many short modules end the run instead of one long one running alone.

xdist's own ``--dist loadgroup`` would say this with marks, but it renames ``item._nodeid``,
which pytest 9 no longer reads (nodes keep ``_id``), so its groups are silently ignored.
This module overrides ``LoadScopeScheduling._split_scope`` instead, a private method, for the
xdist versions checked here only; any other version gets xdist's public ``loadfile``
scheduling (a module per worker; the cluster modules may then run side by side).
"""

from __future__ import annotations

from typing import Any

CHECKED_XDIST_VERSIONS = ("3.8.",)
CLUSTER = "tests/cluster/"
SLURM_JOBS = CLUSTER + "[slurm jobs]"
RAY_JOBS = CLUSTER + "[ray jobs]"
_CLUSTER_UNITS = {
    "test_slurm_jobs.py": SLURM_JOBS,
    "test_stages_slurm.py": SLURM_JOBS,
    "test_ray_jobs.py": RAY_JOBS,
    "test_stages_ray.py": RAY_JOBS,
}


def group_of(nodeid: str) -> str:
    """The work unit of a test: its module, or one of the two cluster units."""
    path = nodeid.split("::", 1)[0]
    if path.startswith(CLUSTER):
        return _CLUSTER_UNITS.get(path[len(CLUSTER):], path)
    return path


def longest_first(items: list[Any]) -> list[Any]:
    """``items`` with the longest work units first (see the module docstring), each unit's
    tests in their own order."""
    slow: dict[str, int] = {}
    for item in items:
        unit = group_of(item.nodeid)
        slow[unit] = slow.get(unit, 0) + (item.get_closest_marker("slow") is not None)

    def rank(unit: str) -> tuple[int, int]:
        if unit in (SLURM_JOBS, RAY_JOBS):
            return (0, 0)
        return (1, -slow[unit]) if slow[unit] else (2, 0)

    return sorted(items, key=lambda item: rank(group_of(item.nodeid)))  # stable


def make_scheduler(config: Any, log: Any, xdist_version: str) -> Any:
    """The scheduler for ``pytest -n N`` (see the module docstring); units are handed out in
    collection order (``longest_first``), not re-sorted by test count."""
    from xdist.scheduler import LoadFileScheduling, LoadScopeScheduling

    if not xdist_version.startswith(CHECKED_XDIST_VERSIONS):
        return LoadFileScheduling(config, log)
    config.option.loadscopereorder = False

    class GroupScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return group_of(nodeid)

    return GroupScheduling(config, log)
