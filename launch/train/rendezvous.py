"""Where the training processes meet (the rendezvous store), and the network interface
they and their communication libraries listen on.

What torch 2.13 does by itself: a ``TCPStore`` server binds ``::`` (every interface)
whatever host it is given, with the libuv and the classic backend alike, and has no
authentication; so do torchrun's rendezvous stores, and ``init_process_group``
(``env://``) on rank 0. The only way torch lets a store listen on one address is
``TCPStore(master_listen_fd=)``, a socket bound beforehand. gloo binds the interface
``GLOO_SOCKET_IFNAME`` names (else the address the host name resolves to); NCCL's bootstrap
the one ``NCCL_SOCKET_IFNAME`` names.

So every rank calls :func:`init_process_group`, and:

* One machine (``lmforge train``/``run``/``submit local``, :mod:`.processes`): the launcher
  binds the store's socket on ``launch.master_addr`` (default 127.0.0.1; port
  ``launch.master_port``, or a free one the kernel picks at bind time, so no other process
  can take it in between) and rank 0 hosts the store on that descriptor
  (``$LMFORGE_STORE_FD``); :func:`single_machine_env` points gloo and NCCL at the interface
  that holds the address (``lo``).
* Several machines (Slurm ``srun``): rank 0's store listens on the address ``MASTER_ADDR``
  resolves to, and gloo/NCCL use the interface that reaches it (unless
  ``GLOO_SOCKET_IFNAME``/``NCCL_SOCKET_IFNAME`` are set). Ray Train builds its process group
  itself: its store listens on every interface. Either way the store has no
  authentication: the network between the nodes must be trusted.
"""

from __future__ import annotations

import datetime
import ipaddress
import logging
import os
import socket
from pathlib import Path

LOOPBACK = "127.0.0.1"
STORE_FD = "LMFORGE_STORE_FD"
"""Rank 0's variable on one machine: the inherited descriptor of the store's bound socket."""

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
                 timeout: datetime.timedelta, fd: int | None = None):
    """A ``TCPStore`` server listening on ``host:port`` only: on the listening socket ``fd``
    (bound by the launcher, see :mod:`.processes`) or on one it binds (port 0: a free one,
    the store's ``.port``)."""
    from torch.distributed import TCPStore

    if fd is None:
        sock = bound_listener(host, port)
        port, fd = sock.getsockname()[1], sock.detach()
    # The store owns the descriptor from here on (libuv closes it with the store).
    return TCPStore(host, port, world_size, True, timeout, master_listen_fd=fd)


# -- one machine -----------------------------------------------------------------------


def single_machine_env(env: dict[str, str], address: str = LOOPBACK) -> dict[str, str]:
    """``env`` with gloo and NCCL pointed at the interface holding ``address`` (the store's
    IP address on this machine), so that the ranks listen nowhere else."""
    device = interface_of(address) or loopback_interface()
    env["GLOO_SOCKET_IFNAME"] = device
    env["NCCL_SOCKET_IFNAME"] = device
    env["MASTER_ADDR"] = address
    return env


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


# -- every rank ------------------------------------------------------------------------


def init_process_group(backend: str) -> bool:
    """Creates the default process group for a rank (``RANK``, ``WORLD_SIZE``,
    ``MASTER_ADDR``, ``MASTER_PORT``): rank 0 hosts the store, on the socket the launcher
    bound (``$LMFORGE_STORE_FD``, one machine) or on one bound to the address ``MASTER_ADDR``
    names (srun); gloo/NCCL use the interface that reaches that address.

    Returns:
        False, doing nothing, when the process group exists (Ray Train builds it):
        ``deepspeed.init_distributed`` takes it from there.
    """
    import torch.distributed as dist
    from torch.distributed import TCPStore

    if dist.is_initialized():
        return False
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    master, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    inherited = os.environ.pop(STORE_FD, None)  # not passed on to this rank's children
    address = resolve(master)
    device = interface_of(route_source(address))
    for variable in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME"):
        if device and not os.environ.get(variable):
            os.environ[variable] = device
    timeout = datetime.timedelta(minutes=30)  # torch's default process-group timeout
    if rank == 0 and inherited is not None:
        store = store_server(address, port, world_size, timeout, fd=int(inherited))
    elif rank == 0:
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
