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
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from mlflow_server import free_port

from lmforge.launch.config import load_config
from lmforge.launch.submit.slurm import SlurmJob, render_script

REPO = Path(__file__).resolve().parents[3]
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
    from lmforge.launch.stages.graph import GraphResult, print_summary

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    print_summary(GraphResult(tmp_path, uri, "r", [], 0, single=True))
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


# -- training: the rendezvous store, the ranks' process group ---------------------------

TRAIN_CONFIG = """\
name: bind
data:
  datasets: [{{name: d, paths: [unused.txt]}}]
  output_dir: {data}
  seq_len: 16
tokenizer: {{vocab_size: 1000}}
model: {{preset: tiny, n_layers: 1, d_model: 32, n_heads: 2, n_kv_heads: 1, d_ff: 64}}
train: {{micro_batch_size: 2, max_steps: {steps}, checkpoint_every: 0, eval_every: 0,
         eval_batches: 1, log_every: 1, warmup_steps: 1, precision: fp32}}
deepspeed: {{zero_stage: 1}}
tracking: {{enabled: false}}
"""


def socket_inodes(pid: int) -> set[str]:
    """The inodes of the sockets ``pid`` holds open (from /proc/PID/fd)."""
    inodes = set()
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:  # exited (or not ours to read)
        return inodes
    for fd in fds:
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:["):-1])
    return inodes


def _address(hex_address: str) -> str:
    """A /proc/net/tcp{,6} local address (kernel byte order) as text."""
    raw = bytes.fromhex(hex_address)
    if len(raw) == 4:
        return socket.inet_ntop(socket.AF_INET, raw[::-1])
    words = b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4))  # 4 host-order words
    return socket.inet_ntop(socket.AF_INET6, words)


def kernel_listening(inodes: set[str]) -> list[tuple[str, int, str]]:
    """(address, port, inode) of every listening TCP socket among ``inodes``, from the
    kernel's socket tables (IPv4 and IPv6)."""
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # 0A: TCP_LISTEN
                address, port = fields[1].rsplit(":", 1)
                found.append((_address(address), int(port, 16), fields[9]))
    return found


def test_the_socket_table_reader_sees_what_a_socket_binds():
    for family, host in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::"),
                         (socket.AF_INET6, "::1"), (socket.AF_INET, "0.0.0.0")):
        with socket.socket(family) as sock:
            sock.bind((host, 0))
            sock.listen()
            port = sock.getsockname()[1]
            assert (host, port) in [(a, p) for a, p, _ in kernel_listening(socket_inodes(
                os.getpid()))]


def _environ(pid: int) -> dict[str, str]:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}
    return dict(item.split("=", 1) for item in raw.decode(errors="replace").split("\0")
                if "=" in item)


@pytest.mark.slow
def test_training_on_one_machine_listens_on_loopback_only(tmp_path):
    """A real 2-process `lmforge train`: every listening socket of the launcher and the
    ranks, read from the kernel's tables while it runs, is on
    127.0.0.1 or ::1, and the ranks' communication libraries are told to use loopback."""
    from engine_helpers import shard_fixtures

    shard_fixtures().write_shards(tmp_path / "data", {"d": {"train": [64], "val": [8]}},
                                  seq_len=16)
    config = tmp_path / "bind.yaml"
    config.write_text(TRAIN_CONFIG.format(data=tmp_path / "data", steps=30))
    log = tmp_path / "train.log"
    with open(log, "w") as sink:  # a file, not a pipe nobody drains while we poll
        proc = subprocess.Popen(
            [sys.executable, "-m", "lmforge.launch.cli", "train", str(config),
             f"--run_dir={tmp_path / 'run'}"],
            stdout=sink, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    seen: dict[tuple[str, int], str] = {}
    rank_env: dict[int, dict[str, str]] = {}
    try:
        deadline = time.monotonic() + 300
        while proc.poll() is None and time.monotonic() < deadline:
            for pid in tree(proc.pid):
                env = _environ(pid)
                if "LOCAL_RANK" in env:
                    rank_env[pid] = env
                for address, port, _ in kernel_listening(socket_inodes(pid)):
                    seen[(address, port)] = "rank" if "LOCAL_RANK" in env else "launcher"
            time.sleep(0.1)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    out = log.read_text()
    assert proc.returncode == 0, out[-3000:]
    # A rank's own children (data loader workers) inherit its variables: count RANKs.
    ranks = {env.get("RANK") for env in rank_env.values()}
    assert ranks == {"0", "1"}, f"saw ranks {ranks}: {seen}\n{out[-3000:]}"
    # The store (the launcher binds it, rank 0 hosts it) and gloo.
    store_ports = {int(env["MASTER_PORT"]) for env in rank_env.values()}
    assert len(store_ports) == 1 and store_ports <= {port for _, port in seen}, (store_ports, seen)
    assert "rank" in seen.values(), seen
    exposed = {k: v for k, v in seen.items() if k[0] not in LOCAL}
    assert not exposed, f"listening beyond loopback: {exposed}"
    for env in rank_env.values():
        assert env.get("MASTER_ADDR") == "127.0.0.1", env.get("MASTER_ADDR")
        assert env.get("GLOO_SOCKET_IFNAME") == "lo" and env.get("NCCL_SOCKET_IFNAME") == "lo"


CLUSTER_RANK = """
import os, sys, torch, torch.distributed as dist
from lmforge.launch.train.rendezvous import init_process_group
assert init_process_group("gloo")
total = torch.ones(1)
dist.all_reduce(total)
print("ready", int(total.item()), os.environ.get("GLOO_SOCKET_IFNAME"), flush=True)
sys.stdin.readline()
dist.barrier()
dist.destroy_process_group()
"""


@pytest.mark.slow
def test_ranks_a_cluster_launcher_starts_listen_on_the_master_address_only(tmp_path):
    """What `srun` starts (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT, no bound socket):
    rank 0's store and every rank's gloo listen on the address MASTER_ADDR names."""
    port = free_port()
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("GLOO_", "NCCL_", "TORCHELASTIC_", "SLURM_"))}
    env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2",
               OMP_NUM_THREADS="1")
    ranks = [subprocess.Popen([sys.executable, "-c", CLUSTER_RANK], env={**env, "RANK": str(r)},
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
             for r in range(2)]
    try:
        for proc in ranks:
            assert proc.stdout.readline().split() == ["ready", "2", "lo"]
        sockets = [s for proc in ranks for s in kernel_listening(socket_inodes(proc.pid))]
        for proc in ranks:
            proc.stdin.write("\n")
            proc.stdin.flush()
        for proc in ranks:
            assert proc.wait(timeout=60) == 0
    finally:
        for proc in ranks:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert port in {p for _, p, _ in sockets}, f"rank 0's store not seen: {sockets}"
    assert {a for a, _, _ in sockets} == {"127.0.0.1"}, sockets


@pytest.mark.parametrize("host,fixed", [("127.0.0.1", False), ("127.0.0.1", True),
                                        ("::1", False)])
def test_the_loopback_rendezvous_store_listens_on_its_address_only(host, fixed):
    """The store of a run on one machine (launch.master_port set or not; IPv6 too): the
    launcher binds its socket, rank 0 hosts the store on that descriptor; one listening
    socket, on the address, and a client of it works."""
    from datetime import timedelta

    from torch.distributed import TCPStore

    from lmforge.launch.train.rendezvous import bound_listener, store_server

    port = free_port() if fixed else 0
    before = {s[2] for s in kernel_listening(socket_inodes(os.getpid()))}
    listener = bound_listener(host, port)  # the launcher (processes.py)
    bound = listener.getsockname()[1]
    store = store_server(host, bound, None, timedelta(seconds=10), fd=listener.detach())
    opened = [s for s in kernel_listening(socket_inodes(os.getpid())) if s[2] not in before]
    assert [(a, p) for a, p, _ in opened] == [(host, bound)]
    assert bound == port if fixed else bound > 0
    store.set("key", "value")
    client = TCPStore(host, bound, None, False, timedelta(seconds=10))
    assert client.get("key") == b"value"


def test_a_single_machine_run_refuses_a_master_addr_of_another_machine():
    from lmforge.launch.train.rendezvous import check_local_address

    assert check_local_address("127.0.0.1") == "127.0.0.1"
    with pytest.raises(ValueError, match=r"launch.master_addr: 192.0.2.77 \(192.0.2.77\) is "
                                         "not an address of this machine"):
        check_local_address("192.0.2.77")  # TEST-NET-1: resolved, never contacted
