"""Where the training processes meet (the rendezvous store), and the network interface
they and their communication libraries listen on.

What torch 2.13 does by itself: a ``TCPStore`` server binds ``::`` (every interface)
whatever host it is given, with the libuv and the classic backend alike, and has no
authentication. torchrun ``--standalone`` (the c10d rendezvous) runs two such stores and
``pickle.loads`` the rendezvous state it reads from one every few seconds;
``--rdzv-backend=static`` runs one; ``init_process_group`` (``env://``) on rank 0 runs one.
The only way torch lets a store listen on one address is ``TCPStore(master_listen_fd=)``, a
socket bound beforehand. gloo binds the interface ``GLOO_SOCKET_IFNAME`` names (else the
address the host name resolves to); NCCL's bootstrap the one ``NCCL_SOCKET_IFNAME`` names.

So:

* One machine (``lmforge train``/``run``/``submit local``): :func:`main` is torchrun with the
  ``lmforge-loopback`` rendezvous: the agent's store listens on a socket bound to
  ``launch.master_addr`` (default 127.0.0.1; port ``launch.master_port``, or a free one the
  kernel picks at bind time, so no other process can take it in between), the ranks are
  its clients, and :func:`single_machine_env` points gloo and NCCL at the interface that
  holds that address (``lo``).
* Several machines (Slurm ``srun``): :func:`init_process_group` in every rank; rank 0's store
  listens on the address ``MASTER_ADDR`` resolves to, and gloo/NCCL use the interface that
  reaches it (unless ``GLOO_SOCKET_IFNAME``/``NCCL_SOCKET_IFNAME`` are set). Ray Train builds
  its process group itself: its store listens on every interface. Either way the store has
  no authentication: the network between the nodes must be trusted.
"""

from __future__ import annotations

import datetime
import ipaddress
import logging
import os
import socket
import sys
from pathlib import Path

BACKEND = "lmforge-loopback"
"""The torchrun rendezvous backend :func:`main` registers."""
LOOPBACK = "127.0.0.1"

log = logging.getLogger("lmforge.train")


# -- addresses and interfaces ------------------------------------------------------------


def resolve(host: str) -> str:
    """The IP address ``host`` names (the first the resolver gives; an address as it is)."""
    return socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)[0][4][0]


def interface_of(address: str) -> str | None:
    """The name of the network interface that holds ``address``, or None."""
    import psutil

    wanted = ipaddress.ip_address(address.split("%")[0])
    for name, addrs in psutil.net_if_addrs().items():
        for a in addrs:
            if a.family in (socket.AF_INET, socket.AF_INET6):
                try:
                    if ipaddress.ip_address(a.address.split("%")[0]) == wanted:
                        return name
                except ValueError:
                    continue
    if wanted.is_loopback:
        return loopback_interface()
    return None


def loopback_interface() -> str:
    """The loopback device's name (``lo`` on Linux)."""
    for flags in sorted(Path("/sys/class/net").glob("*/flags")):
        try:
            if int(flags.read_text().strip(), 16) & 0x8:  # IFF_LOOPBACK
                return flags.parent.name
        except (OSError, ValueError):
            continue
    return "lo"


def route_source(address: str) -> str:
    """The local address the kernel would send from to reach ``address`` (a route lookup:
    connecting a UDP socket sends nothing)."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as probe:
        probe.connect((address, 9))
        return probe.getsockname()[0]


def bound_listener(host: str, port: int) -> socket.socket:
    """A TCP socket listening on ``host:port`` only (port 0: a free one, chosen at bind)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(128)
    except OSError as err:
        sock.close()
        raise OSError(err.errno, f"the rendezvous store cannot listen on {host}:{port}: "
                      f"{err.strerror} (launch.master_addr must be an address of this "
                      "machine, 127.0.0.1 by default; launch.master_port a free port, or "
                      "unset for one the kernel picks)") from err
    return sock


def store_server(host: str, port: int, world_size: int | None,
                 timeout: datetime.timedelta, multi_tenant: bool = False):
    """A ``TCPStore`` server listening on ``host:port`` only (its ``.port`` is the port)."""
    from torch.distributed import TCPStore

    sock = bound_listener(host, port)
    port = sock.getsockname()[1]
    # The store owns the descriptor from here on (libuv closes it with the store).
    return TCPStore(host, port, world_size, True, timeout, multi_tenant=multi_tenant,
                    master_listen_fd=sock.detach())


# -- one machine: torchrun with a loopback store ---------------------------------------


def single_machine_env(env: dict[str, str], address: str = LOOPBACK) -> dict[str, str]:
    """``env`` with gloo and NCCL pointed at the interface holding ``address`` (the store's
    IP address on this machine), so that the ranks listen nowhere else."""
    device = interface_of(address) or loopback_interface()
    env["GLOO_SOCKET_IFNAME"] = device
    env["NCCL_SOCKET_IFNAME"] = device
    env["MASTER_ADDR"] = address
    return env


def create_handler(params):
    """torchrun's rendezvous handler for :data:`BACKEND`: a static rendezvous whose store
    listens on the endpoint's address only."""
    from torch.distributed import PrefixStore
    from torch.distributed.elastic.rendezvous import RendezvousInfo, RendezvousStoreInfo
    from torch.distributed.elastic.rendezvous.static_tcp_rendezvous import (
        StaticTCPRendezvous,
    )
    from torch.distributed.elastic.rendezvous.utils import parse_rendezvous_endpoint

    class BoundRendezvous(StaticTCPRendezvous):
        def get_backend(self) -> str:
            return BACKEND

        def next_rendezvous(self) -> RendezvousInfo:
            if not self._store:
                self._store = store_server(self.master_addr, self.master_port,
                                           self.world_size, self.timeout, multi_tenant=True)
                self.master_port = self._store.port
            store = PrefixStore(self.run_id, self._store)
            info = RendezvousStoreInfo(self.master_addr, self.master_port)
            return RendezvousInfo(store, self.rank, self.world_size, info)

    if params.max_nodes != 1:
        raise ValueError(f"the {BACKEND} rendezvous runs on one machine (--nnodes=1)")
    host, port = parse_rendezvous_endpoint(params.endpoint, default_port=0)
    timeout = int(params.config.get("timeout", 600))
    return BoundRendezvous(host, port, 0, 1, params.run_id, timeout)


def check_local_address(master_addr: str) -> str:
    """The IP address ``launch.master_addr`` names, checked to belong to this machine.

    Raises:
        ValueError: It does not resolve, or no interface of this machine holds it.
    """
    try:
        address = resolve(master_addr)
    except OSError as err:
        raise ValueError(f"launch.master_addr: {master_addr!r} does not resolve ({err}); a "
                         "run on one machine listens on 127.0.0.1 (the default)") from err
    if interface_of(address) is None:
        raise ValueError(f"launch.master_addr: {master_addr} ({address}) is not an address of "
                         "this machine; a run on one machine listens on it (leave it at "
                         "127.0.0.1 so nothing is reachable from the network)")
    return address


def torchrun_args(nproc_per_node: int, address: str, port: int | None) -> list[str]:
    """The rendezvous arguments of :func:`main` for one machine."""
    host = f"[{address}]" if ":" in address else address
    return [f"--nproc_per_node={nproc_per_node}", "--nnodes=1",
            f"--rdzv-backend={BACKEND}", f"--rdzv-endpoint={host}:{port or 0}",
            "--rdzv-id=lmforge"]


def main(argv: list[str] | None = None) -> None:
    """``python -m lmforge.launch.train.rendezvous TORCHRUN_ARGS``: torchrun with the
    :data:`BACKEND` rendezvous available."""
    import torch
    from torch.distributed.elastic.rendezvous import rendezvous_handler_registry
    from torch.distributed.run import main as torchrun

    # Decided here, where torch is imported anyway, and inherited by every worker: DeepSpeed
    # otherwise warns on every rank that it fell back to the CPU.
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    rendezvous_handler_registry.register(BACKEND, create_handler)
    torchrun(sys.argv[1:] if argv is None else argv)


# -- several machines: every rank from srun --------------------------------------------


def init_process_group(backend: str) -> bool:
    """Creates the default process group for a rank a cluster launcher started (``RANK``,
    ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``), with rank 0's store listening on the
    address ``MASTER_ADDR`` names only and gloo/NCCL on the interface that reaches it.

    Returns:
        False, doing nothing, when torchrun's agent hosts the store (one machine) or the
        process group exists (Ray Train): ``deepspeed.init_distributed`` takes it from there.
    """
    import torch.distributed as dist
    from torch.distributed import TCPStore

    if dist.is_initialized() or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        return False
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    master, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    address = resolve(master)
    device = interface_of(route_source(address))
    for variable in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME"):
        if device and not os.environ.get(variable):
            os.environ[variable] = device
    timeout = datetime.timedelta(minutes=30)  # torch's default process-group timeout
    if rank == 0:
        nodes = int(os.environ.get("SLURM_JOB_NUM_NODES") or os.environ.get("SLURM_NNODES") or 1)
        if ipaddress.ip_address(address).is_loopback and nodes > 1:
            # rank 0's node resolves its own name to loopback (/etc/hosts), the others do not
            log.warning("lmforge: MASTER_ADDR %s resolves to %s on rank 0's node; the "
                        "rendezvous store listens on every interface (set MASTER_ADDR to "
                        "the node's IP address to bind one)", master, address)
            store = TCPStore(master, port, world_size, True, timeout)
        else:
            store = store_server(address, port, world_size, timeout)
    else:
        store = TCPStore(master, port, world_size, False, timeout)
    dist.init_process_group(backend, store=store, rank=rank, world_size=world_size,
                            timeout=timeout)
    return True


if __name__ == "__main__":
    main()
