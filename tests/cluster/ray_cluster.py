"""A real two-node Ray cluster on this machine (``ray start --head`` plus a worker node).

It gets its own temp dir, so ``ray.init()`` elsewhere on the machine never finds it, and
its own ports; it is stopped by killing exactly the processes it started.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from cluster_helpers import free_port_block, ray_node_ports, session_members

RAY = Path(sys.executable).with_name("ray")  # the ray CLI next to this interpreter


class RayCluster:
    """Head (1 CPU, dashboard on 127.0.0.1) and one worker node (1 CPU)."""

    def __init__(self, ray_bin: Path = RAY) -> None:
        self.ray_bin = ray_bin
        # Above the ports a Slurm prepare job's Ray takes (20000-39999, by job id:
        # slurm/ray-prepare.sbatch), which may run at the same time on another worker.
        self.base = free_port_block(100, start=40000)
        self.temp_dir = Path(tempfile.mkdtemp(prefix="lmf-ray-", dir="/tmp"))
        self.gcs = f"127.0.0.1:{self.base}"
        self.dashboard = f"http://127.0.0.1:{self.base + 40}"
        # Clients send the auth token (ray start turns token auth on) only in token mode.
        self.env = {**os.environ, "OMP_NUM_THREADS": "1", "RAY_AUTH_MODE": "token"}
        self.env.pop("RAY_ADDRESS", None)
        self.nodes: list[subprocess.Popen] = []

    def _start(self, args: list[str], log: str) -> None:
        out = open(self.temp_dir / log, "w")  # kept open for the process's life
        self.nodes.append(subprocess.Popen(
            [str(self.ray_bin), "start", "--block", "--num-cpus=1", "--disable-usage-stats",
             *args], env=self.env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        ))

    def start(self, timeout: float = 180) -> RayCluster:
        self._start(["--head", f"--port={self.base}", "--dashboard-host=127.0.0.1",
                     f"--dashboard-port={self.base + 40}",
                     f"--ray-client-server-port={self.base + 41}",
                     f"--temp-dir={self.temp_dir}", *ray_node_ports(self.base)], "head.log")
        self.wait_for_nodes(1, timeout)
        self._start([f"--address={self.gcs}", *ray_node_ports(self.base + 50)], "worker.log")
        self.wait_for_nodes(2, timeout)
        return self

    def wait_for_nodes(self, count: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            proc = subprocess.run([str(self.ray_bin), "status", "--address", self.gcs],
                                  capture_output=True, text=True, env=self.env)
            active = proc.stdout.split("Active:")[-1].split("Pending:")[0]
            if proc.returncode == 0 and active.count("node_") >= count:
                return
            if any(node.poll() is not None for node in self.nodes):
                break
            time.sleep(1)
        logs = "\n".join(p.read_text()[-2000:] for p in self.temp_dir.glob("*.log"))
        raise RuntimeError(f"Ray cluster did not reach {count} node(s):\n{logs}")

    def processes(self, name: str) -> list[int]:
        """Pids of this cluster's processes whose command line contains ``name``."""
        pids = []
        for node in self.nodes:
            for pid in session_members(node.pid):
                try:
                    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
                except OSError:
                    continue
                if name.encode() in cmdline:
                    pids.append(pid)
        return pids

    def stop(self, grace: float = 10) -> None:
        """Stops the cluster (a second call does nothing): SIGTERM to both `ray start
        --block` (each stops its node's processes), up to ``grace`` seconds for them, then
        SIGKILL to whatever is left of them, by pid."""
        for node in reversed(self.nodes):
            if node.poll() is None:
                node.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace
        for node in self.nodes:
            try:
                node.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        for node in self.nodes:  # whatever outlived its `ray start`, by pid
            for pid in session_members(node.pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        self.nodes = []
        shutil.rmtree(self.temp_dir, ignore_errors=True)
