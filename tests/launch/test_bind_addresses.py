"""Services lmforge starts or tells users to start listen on 127.0.0.1 only.

Checked on the real listening sockets (psutil) where the service can be started here: the
`mlflow ui` command `lmforge run` prints, and the local Ray that `lmforge prepare` starts
(no dashboard, i.e. no job server, at all). The Ray head of slurm/ray-prepare.sbatch is
checked in the rendered script (it needs a Slurm allocation to run).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from mlflow_server import free_port

from lmforge.launch.commands import RunResult, print_summary
from lmforge.launch.config import load_config
from lmforge.launch.submit.slurm import SlurmJob, render_script

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "configs" / "tiny.yaml"
LOCAL = {"127.0.0.1", "::1"}


def listening(pids: set[int]) -> list[tuple[str, int, int]]:
    return [(c.laddr.ip, c.laddr.port, c.pid) for c in psutil.net_connections(kind="inet")
            if c.status == psutil.CONN_LISTEN and c.pid in pids]


def tree(pid: int) -> set[int]:
    try:
        root = psutil.Process(pid)
        return {pid, *(p.pid for p in root.children(recursive=True))}
    except psutil.NoSuchProcess:
        return set()


@pytest.mark.slow
def test_the_printed_mlflow_ui_command_listens_on_localhost_only(tmp_path, capsys):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    print_summary(RunResult(tmp_path, tmp_path / "manifest.json", uri, "r", None, [], 0))
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("open the UI"))
    command = shlex.split(line.split(":", 1)[1].split("#")[0])
    assert command[:2] == ["mlflow", "ui"] and "--host" in command
    port = free_port()
    command[command.index("--port") + 1] = str(port)
    command[0] = str(Path(sys.executable).parent / "mlflow")
    proc = subprocess.Popen(command + ["--workers", "1"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline, sockets = time.monotonic() + 120, []
        while time.monotonic() < deadline and not any(p == port for _, p, _ in sockets):
            assert proc.poll() is None, "mlflow ui exited"
            time.sleep(0.5)
            sockets = listening(tree(proc.pid))
        assert any(p == port for _, p, _ in sockets), "mlflow ui did not listen in 120 s"
        assert {ip for ip, _, _ in sockets} <= LOCAL, sockets
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


RAY_PROBE = """
import json, psutil, sys
from lmforge.pipeline.run.local_ray import ray_session
with ray_session(None):
    me = psutil.Process()
    pids = {me.pid, *(p.pid for p in me.children(recursive=True))}
    names = {p.pid: p.name() for p in me.children(recursive=True)}
    print(json.dumps([(c.laddr.ip, c.laddr.port, names.get(c.pid, "driver"))
                      for c in psutil.net_connections(kind="inet")
                      if c.status == psutil.CONN_LISTEN and c.pid in pids]))
"""


@pytest.mark.slow
def test_the_local_ray_of_prepare_runs_no_dashboard(tmp_path):
    dashboard_port = 8265
    proc = subprocess.run([sys.executable, "-c", RAY_PROBE], capture_output=True, text=True,
                          timeout=180, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    sockets = json.loads(proc.stdout.strip().splitlines()[-1])
    assert sockets, "the local Ray listens on nothing?"
    # The dashboard/job server (runs submitted code) is not started at all; what is left is
    # Ray's own gRPC ports, which Ray 2.60 opens on every interface, behind its token auth.
    assert not [s for s in sockets if s[1] == dashboard_port], sockets
    web = [s for s in sockets if re.search(r"dashboard(?!agent)", s[2], re.I)]
    assert not web, web


def test_ray_prepare_sbatch_binds_the_dashboard_to_localhost(tmp_path):
    script = render_script(load_config(TINY), SlurmJob(nodes=2), "prepare", workdir=tmp_path)
    assert "--dashboard-host=127.0.0.1" in script
    assert "0.0.0.0" not in script
