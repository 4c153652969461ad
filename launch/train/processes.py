"""Starts and supervises the training processes on this machine (``lmforge train``/``run``,
``lmforge submit local``): one process per rank, started and watched by this process.

This module imports no torch. The launcher binds the rendezvous store's socket on
``launch.master_addr`` (127.0.0.1 by default; port ``launch.master_port``, or a free one the
kernel picks at bind time) and hands the listening descriptor to rank 0, which hosts the
store on it (:func:`lmforge.launch.train.rendezvous.init_process_group`); the other ranks
connect to it, their connections queued by the kernel until rank 0 accepts. So nothing
listens beyond that address, no port can be taken between choosing and binding it, and no
third process (torchrun's agent: a torch import, ~1.2 CPU-s and ~300 MB per launch) sits
between the launcher and the ranks.

Supervision, as torchrun's: a rank that fails (an exit status other than 0 and 75, or a
signal) stops the run: the other ranks get SIGTERM, and SIGKILL after
:data:`STOP_GRACE_S`; the run's status is then 1. A rank that exits 75 (it checkpointed and
stopped, see ``preemption.py``) does not stop the others: the stop is collective. SIGTERM,
SIGINT and SIGUSR1 sent to this process go on to every rank. Each rank dies with this
process (``PR_SET_PDEATHSIG``, see :func:`die_with_launcher`), so a killed launcher leaves
no rank behind.
"""

from __future__ import annotations

import json
import logging
import os
import select
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from lmforge.launch.config import LaunchConfig
from lmforge.launch.rundir import RunDir
from lmforge.launch.train.exit_codes import REQUEUE_EXIT_CODE
from lmforge.launch.train.rendezvous import (
    STORE_FD,
    bound_listener,
    check_local_address,
    single_machine_env,
)

log = logging.getLogger("lmforge.train")

LAUNCHER_PID = "LMFORGE_LAUNCHER_PID"
"""Every rank's variable: the process that started it (see :func:`die_with_launcher`)."""
STOP_GRACE_S = 30.0
"""How long the other ranks of a failed run get between SIGTERM and SIGKILL (torchrun's)."""
FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


def worker_env(launch: LaunchConfig, address: str, port: int) -> dict[str, str]:
    """The environment every rank shares: the rank layout's world, the store's address and
    port, and gloo and NCCL on the interface that holds the address (loopback by default)."""
    env = single_machine_env(dict(os.environ), address)
    env["MASTER_PORT"] = str(port)
    env["WORLD_SIZE"] = env["LOCAL_WORLD_SIZE"] = str(launch.nproc_per_node)
    env[LAUNCHER_PID] = str(os.getpid())
    env["OMP_NUM_THREADS"] = str(launch.omp_num_threads)
    env.setdefault("PYTHONUNBUFFERED", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.pop(STORE_FD, None)
    return env


def worker_command(run_dir: Path, resume: str | None, run_id: str | None) -> list[str]:
    """The command line of every rank: ``lmforge.launch.train.worker`` on ``run_dir``."""
    command = [sys.executable, "-u", "-m", "lmforge.launch.train.worker",
               "--run-dir", str(run_dir)]
    if resume:
        command += ["--resume", resume]
    if run_id:
        command += ["--run-id", run_id]
    return command


def launch_training(
    launch: LaunchConfig, run_dir: Path, resume: str | None = None, run_id: str | None = None
) -> int:
    """Runs training across ``launch.nproc_per_node`` local processes; returns the exit
    status: 0, 75 (every rank checkpointed and stopped: resume it) or 1 (a rank failed).

    Args:
        launch: The launch section (processes, rendezvous address and port, threads).
        run_dir: The run directory; the workers read its ``config.yaml``.
        resume: ``None``, ``"auto"`` or a checkpoint folder.
        run_id: The MLflow run the workers attach to.
    """
    if launch.nnodes != 1:
        raise ValueError(
            "launch.nnodes: a local run uses one machine; submit multi-node runs with "
            "`lmforge submit slurm` or `lmforge submit ray`"
        )
    address = check_local_address(launch.master_addr)
    RunDir.of(run_dir).train_summary.unlink(missing_ok=True)
    listener = bound_listener(address, launch.master_port or 0)
    env = worker_env(launch, address, listener.getsockname()[1])
    command = worker_command(run_dir, resume, run_id)
    ranks: list[subprocess.Popen] = []
    try:
        with _forwarding_signals(ranks):
            try:
                for rank in range(launch.nproc_per_node):
                    own = {**env, "RANK": str(rank), "LOCAL_RANK": str(rank)}
                    fds: tuple[int, ...] = ()
                    if rank == 0:
                        own[STORE_FD] = str(listener.fileno())
                        fds = (listener.fileno(),)
                    ranks.append(subprocess.Popen(command, env=own, pass_fds=fds))
            finally:
                listener.close()  # rank 0 holds it now (or the start failed)
            return _supervise(ranks, RunDir.of(run_dir).train_summary)
    finally:
        _stop(ranks)  # only ranks still running: a start that failed half way, an error


def _supervise(ranks: list[subprocess.Popen], summary: Path) -> int:
    """Waits for every rank; stops them all at the first failure. Returns 0, 75 or 1."""
    pending = dict(enumerate(ranks))
    exits = _exit_descriptors(ranks)
    requeued = False
    try:
        while pending:
            ended = [(rank, p) for rank, p in pending.items() if p.poll() is not None]
            if not ended:
                _wait_for_an_exit([exits.get(rank) for rank in pending])
            for rank, process in ended:
                del pending[rank]
                if process.returncode == REQUEUE_EXIT_CODE:
                    requeued = True
                elif process.returncode != 0:
                    log.error("lmforge: training rank %d %s; stopping the other ranks",
                              rank, _describe(process.returncode))
                    _stop(ranks)
                    return _failed(summary)
    finally:
        for fd in exits.values():
            os.close(fd)
    return REQUEUE_EXIT_CODE if requeued else 0


def _exit_descriptors(ranks: list[subprocess.Popen]) -> dict[int, int]:
    """A pidfd per rank (readable once it exits), opened once; none where the system has
    no ``pidfd_open`` or the rank is already gone."""
    exits = {}
    for rank, process in enumerate(ranks):
        try:
            exits[rank] = os.pidfd_open(process.pid)
        except (AttributeError, OSError):
            continue
    return exits


def _wait_for_an_exit(descriptors: list[int | None]) -> None:
    """Until one of the processes may have exited: their pidfds, or a 0.1 s poll where a
    process has none. A signal handled meanwhile does not cut the wait short (PEP 475)."""
    if all(fd is not None for fd in descriptors):
        select.select(descriptors, [], [])
    else:
        time.sleep(0.1)


def _failed(summary: Path) -> int:
    # A rank may fail after rank 0 wrote a preempted summary (it checkpointed and stopped,
    # then a peer's teardown crashed): the checkpoint is complete, so resume it.
    if summary.exists() and json.loads(summary.read_text()).get("preempted"):
        return REQUEUE_EXIT_CODE
    return 1


def _describe(code: int) -> str:
    if code < 0:
        return f"was killed by {signal.Signals(-code).name}"
    return f"exited with status {code}"


def _stop(ranks: list[subprocess.Popen]) -> None:
    """SIGTERM to every rank still running, SIGKILL to those left after the grace period."""
    alive = [p for p in ranks if p.poll() is None]
    for p in alive:
        p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + STOP_GRACE_S
    for p in alive:
        try:
            p.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


class _forwarding_signals:
    """While inside: SIGTERM, SIGINT and SIGUSR1 sent to this process go on to every rank
    (in the main thread only, where Python lets a handler be set)."""

    def __init__(self, ranks: list[subprocess.Popen]) -> None:
        self.ranks = ranks
        self.previous: dict[int, object] = {}

    def _forward(self, signum: int, _frame: object) -> None:
        for p in self.ranks:
            if p.poll() is None:
                p.send_signal(signum)

    def __enter__(self) -> None:
        if threading.current_thread() is threading.main_thread():
            for sig in FORWARDED:
                self.previous[sig] = signal.signal(sig, self._forward)

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def die_with_launcher() -> None:
    """In a rank this module started: asks the kernel for SIGTERM when the launcher dies
    (the rank checkpoints and stops, as on a preemption), and exits at once if it already
    has. Does nothing in a rank another launcher started (srun, Ray Train)."""
    launcher = os.environ.get(LAUNCHER_PID)
    if not launcher or not sys.platform.startswith("linux"):
        return
    import ctypes

    pr_set_pdeathsig = 1
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(pr_set_pdeathsig, signal.SIGTERM, 0, 0, 0) != 0:
        log.warning("lmforge: cannot ask to be stopped with the launcher (prctl: %s)",
                    os.strerror(ctypes.get_errno()))
    if os.getppid() != int(launcher):  # it died before the request took effect
        os._exit(1)
