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


def make_scheduler(config: Any, log: Any, xdist_version: str) -> Any:
    """The scheduler for ``pytest -n N`` (see the module docstring)."""
    from xdist.scheduler import LoadFileScheduling, LoadScopeScheduling

    if not xdist_version.startswith(CHECKED_XDIST_VERSIONS):
        return LoadFileScheduling(config, log)

    class GroupScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return group_of(nodeid)

    return GroupScheduling(config, log)
