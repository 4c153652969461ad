"""Which tests share a pytest-xdist worker (``make test`` runs 2): every test of a module
on one worker, so a module-scoped fixture (a trained reference run, a prepared dataset) is
built once; and all of tests/cluster on one worker (there is one Slurm on the machine, and
its modules share one Ray cluster and one reference stage-graph run).

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


def group_of(nodeid: str) -> str:
    """The work unit of a test: its module, or tests/cluster for the cluster tests."""
    path = nodeid.split("::", 1)[0]
    return CLUSTER if path.startswith(CLUSTER) else path


def longest_first(items: list[Any]) -> list[Any]:
    """``items`` with the longest work units first, each unit's tests in their own order:
    tests/cluster (~11 minutes on one worker), then the modules holding ``slow`` tests (most
    slow tests first), then the rest. The scheduler hands units out in this order, so the
    many short modules fill both workers at the end instead of one long module running
    alone there (xdist's own order, by test count, put the few-test end-to-end modules
    last: one worker idled for minutes)."""
    slow: dict[str, int] = {}
    for item in items:
        unit = group_of(item.nodeid)
        slow[unit] = slow.get(unit, 0) + (item.get_closest_marker("slow") is not None)

    def rank(unit: str) -> tuple[int, int]:
        return (0, 0) if unit == CLUSTER else (1, -slow[unit]) if slow[unit] else (2, 0)

    return sorted(items, key=lambda item: rank(group_of(item.nodeid)))  # stable


def make_scheduler(config: Any, log: Any, xdist_version: str) -> Any:
    """The scheduler for ``pytest -n N`` (see the module docstring); units are handed out in
    collection order (``longest_first``), not re-sorted by test count."""
    from xdist.scheduler import LoadFileScheduling, LoadScopeScheduling

    if hasattr(config, "option"):
        config.option.loadscopereorder = False

    if not xdist_version.startswith(CHECKED_XDIST_VERSIONS):
        return LoadFileScheduling(config, log)

    class GroupScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return group_of(nodeid)

    return GroupScheduling(config, log)
