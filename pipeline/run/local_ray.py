"""The Ray a prepare job runs on, and the lean start of a local one.

`ray_session(address)` uses a running Ray, connects to a cluster, or starts a local Ray of
the job's own. That local start is lean: this module is the one place lmforge touches
Ray's private attributes, all listed in `patch_targets()`, and it touches them only for the
Ray versions they were checked against (`CHECKED_RAY_VERSIONS`); any other version starts
a plain `ray.init` with nothing patched (slower by ~1-2 s on 2 cores, otherwise the same).

What `ray.init` (Ray 2.60) starts, with no option to leave it out, and what is patched:
  Node.start_api_server   the dashboard process: with include_dashboard=False it still
                          starts, serving only usage stats (which ray.init turns off);
                          ray.init waits for it to publish its address;
  Node.start_monitor      the autoscaler monitor: nothing to scale on one machine;
  Node.start_log_monitor  streams workers' stdout/stderr to the driver: the job's workers
                          print nothing, their errors reach the driver as exceptions, and
                          the logs stay in the session folder;
each a Python process of ~0.6-1 CPU-s that ray.shutdown then stops one by one: skipped.
The raylet's dashboard agent (event, job, log, health and metrics modules: ~1.1 CPU-s to
start, and the node does not register until it has) is replaced by a stand-in that
publishes "no port" for each of its services, as the minimal agent does (ray_agent.py):
`services._build_python_executable_command_memory_profileable` builds its command, and
`utils.get_dashboard_dependency_error` says the dashboard packages are missing so that
Ray asks for no more of them. Ray's `services.get_node` waits for the node in steps of one
second; the node registers ~0.6 s after the raylet starts, so it is asked every 20 ms
first. What stays: the GCS, the raylet, the runtime-env agent and the worker processes.
Measured on 2 idle cores, whole `lmforge prepare` of a 20 KB corpus: 4.0-7.0 s before the
stand-in agent, the get_node poll and the task events setting, 3.4-4.2 s after (ray.init
1.8-2.9 -> 1.3-1.5 s). A cluster the job connects to (data.ray_address, RAY_ADDRESS) is
used as it is.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from collections.abc import Iterator
from typing import Any

log = logging.getLogger(__name__)

# The Ray versions every patch below (and the private `_system_config` key) was checked
# against. Add a version only after test_executor's lean-start tests pass on it.
CHECKED_RAY_VERSIONS = ("2.60.0",)
SKIPPED_SERVICES = ("start_api_server", "start_monitor", "start_log_monitor")
_POLL_S = 0.02
_NODE_WAIT_S = 30.0

# Ray's own functions the replacements call on, kept while the patches are in place.
_originals: dict[str, Any] = {}


def _skip_service(self: Any, *args: Any, **kwargs: Any) -> None:
    """Stands in for a `Node.start_*` service the job does not use: starts nothing."""
    return None


def _no_dashboard_dependencies() -> ImportError:
    """Stands in for `utils.get_dashboard_dependency_error`: the dashboard is 'missing'."""
    return ImportError("lmforge prepare: a local Ray without the dashboard")


def _agent_command(component: str, session_dir: str, *args: Any, **kwargs: Any) -> list[str]:
    """Stands in for `services._build_python_executable_command_memory_profileable`: the
    dashboard agent becomes lmforge's stand-in (ray_agent.py); other components unchanged."""
    from ray._private import ray_constants

    if component == ray_constants.PROCESS_TYPE_DASHBOARD_AGENT:
        return [sys.executable, "-u", "-m", "lmforge.pipeline.run.ray_agent"]
    return _originals["python_command"](component, session_dir, *args, **kwargs)


def _get_node_soon(gcs_address: str, node_id: str) -> Any:
    """Stands in for `services.get_node`: waits for the node in steps of 20 ms, not 1 s,
    then asks Ray's own function (which then finds it at once)."""
    from ray._private import services
    from ray._private.state import GlobalState

    state = GlobalState()
    state._initialize_global_state(services._get_gcs_client_options(gcs_address))
    deadline = time.monotonic() + _NODE_WAIT_S
    try:
        while time.monotonic() < deadline and not any(
                n["NodeID"] == node_id for n in state.node_table()):
            time.sleep(_POLL_S)
    finally:
        state.disconnect()
    return _originals["get_node"](gcs_address, node_id)


def patch_targets() -> list[tuple[Any, str, Any]]:
    """Every private Ray attribute the lean start replaces: (owner, name, replacement)."""
    from ray._private import node, services, utils

    targets: list[tuple[Any, str, Any]] = [
        (node.Node, name, _skip_service) for name in SKIPPED_SERVICES
    ]
    targets += [
        (utils, "get_dashboard_dependency_error", _no_dashboard_dependencies),
        (services, "_build_python_executable_command_memory_profileable", _agent_command),
        (services, "get_node", _get_node_soon),
    ]
    return targets


def apply_patches(ray_version: str) -> list[tuple[Any, str, Any]]:
    """Replace every `patch_targets()` attribute if `ray_version` is a checked version;
    else patch nothing. Returns (owner, name, original) for `restore_patches`."""
    if ray_version not in CHECKED_RAY_VERSIONS:
        log.info("Ray %s is not one the lean local start was checked against (%s): "
                 "starting a plain local Ray", ray_version, ", ".join(CHECKED_RAY_VERSIONS))
        return []
    from ray._private import services

    targets = patch_targets()
    missing = [name for owner, name, _ in targets if not callable(getattr(owner, name, None))]
    if missing:  # a checked version has them all; be safe if a build differs
        log.warning("Ray %s lacks %s: starting a plain local Ray", ray_version, missing)
        return []
    _originals["python_command"] = services._build_python_executable_command_memory_profileable
    _originals["get_node"] = services.get_node
    saved = [(owner, name, getattr(owner, name)) for owner, name, _ in targets]
    for owner, name, replacement in targets:
        setattr(owner, name, replacement)
    return saved


def restore_patches(saved: list[tuple[Any, str, Any]]) -> None:
    """Put back what `apply_patches` replaced."""
    for owner, name, original in saved:
        setattr(owner, name, original)
    _originals.clear()


def local_init_options(ray_version: str) -> dict[str, Any]:
    """`ray.init` keywords for a local Ray of the job's own."""
    options: dict[str, Any] = {
        # "local": a new instance even when /tmp/ray/ray_current_cluster records a cluster
        # that `ray start` began on this machine (ray.init's default would attach to it, or
        # hang on its address once it is gone); data.ray_address: null promises a Ray of
        # the job's own.
        "address": "local",
        "include_dashboard": False,
        "log_to_driver": False,
        "logging_level": logging.WARNING,
    }
    if ray_version in CHECKED_RAY_VERSIONS:
        # Task events feed the dashboard and the state API (`ray list tasks`), which a
        # local prepare Ray does not run; a task's error still reaches the driver with its
        # result. Without them ray.shutdown does not wait to flush them (~0.25 s).
        options["_system_config"] = {"task_events_report_interval_ms": 0}
    return options


@contextlib.contextmanager
def lean_local_start(ray_version: str) -> Iterator[None]:
    """While `ray.init` starts a local Ray: the patches of `apply_patches(ray_version)`,
    restored afterwards."""
    saved = apply_patches(ray_version)
    try:
        yield
    finally:
        restore_patches(saved)


@contextlib.contextmanager
def ray_session(address: str | None) -> Iterator[None]:
    """Use a running Ray if initialised; else connect to `address`, or start a local Ray.

    A local Ray is started lean (see the module docstring): only what the job uses.
    Connecting to a cluster changes nothing there. Ray is shut down on exit only if this
    function started or connected it.
    """
    import ray

    if ray.is_initialized():
        yield
        return
    try:
        if address is None and not os.environ.get("RAY_ADDRESS"):  # else ray.init connects
            with lean_local_start(ray.__version__):
                ray.init(**local_init_options(ray.__version__))
        else:
            ray.init(address=address, include_dashboard=False,
                     logging_level=logging.WARNING, log_to_driver=True)
    except ConnectionError as err:
        raise ValueError(
            f"ray_address: cannot connect to Ray at {address!r} ({err}); start the cluster "
            "or set data.ray_address to null for a local Ray"
        ) from err
    try:
        yield
    finally:
        ray.shutdown()
