"""The dashboard agent of a local Ray that `prepare` starts for itself (see local_ray.py).

Ray's raylet starts a dashboard agent (a Python process: event, job, log, health and
metrics modules) and waits until it has published its ports before the node registers.
A prepare job on its own local Ray uses none of those modules, and the agent's start-up
(~1.1 CPU-s importing them) is the largest single cost of `ray.init` on a small machine.
This stand-in publishes what a minimal agent with no modules publishes, "no port" (-1),
for the metrics agent, the metrics export and the agent's HTTP server, then waits for the
raylet to end (it holds the agent's stdin: end of file means the raylet is gone), as the
real agent does.

Run by the raylet as `python -u -m lmforge.pipeline.run.ray_agent <agent.py> --node-id=...`;
used only for Ray versions it was checked against (`local_ray.CHECKED_RAY_VERSIONS`).
"""

from __future__ import annotations

import os
import sys

# The files the raylet waits for, `<session dir>/<name>_<node id>`, each holding a port
# number (what Ray's own `persist_port` writes; the raylet reads them). Written here
# directly: importing `ray` to call `persist_port` would cost this process ~0.45 CPU-s.
# Not `durable.write_atomic`: the files live only as long as the Ray session, which a crash
# ends, so rename (no torn read) is all they need; an fsync would only slow `ray.init`.
PORT_FILES = ("metrics_agent_port", "metrics_export_port", "dashboard_agent_listen_port")


def main(argv: list[str]) -> None:
    options = dict(a[2:].split("=", 1) for a in argv if a.startswith("--") and "=" in a)
    for name in PORT_FILES:
        path = os.path.join(options["session-dir"], f"{name}_{options['node-id']}")
        with open(f"{path}.tmp", "w") as f:
            f.write("-1")
        os.replace(f"{path}.tmp", path)  # the raylet never reads a half-written file
    while sys.stdin.readline():  # the raylet's end of the pipe closes when it exits
        pass


if __name__ == "__main__":
    main(sys.argv[1:])
