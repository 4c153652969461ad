"""DeepSpeed's JIT-built ops for the suite: build them once at set-up, and clear the lock a
killed build leaves behind.

On CPU, DeepSpeed compiles ``deepspeed_shm_comm`` at the first ``deepspeed.initialize`` of a
multi-process run and ``cpu_adam`` at the first ``DeepSpeedCPUAdam`` (optimizer offload),
~100 s and ~80 s on 2 cores, into torch's extension folder. torch guards each build with
``<folder>/lock``, created with ``O_EXCL`` and held open until the build ends; a process
killed mid-build leaves the file, and every later build of that op waits for it forever.

``python tests/deepspeed_ops.py`` (the Makefile runs it after installing) clears stale locks
and builds both ops; ``tests/conftest.py`` clears stale locks at the start of every session.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

# The ops the suite's runs build, by DeepSpeed's op builder names.
OPS = ("ShareMemCommBuilder", "CPUAdamBuilder")


def use_environment_build_dir() -> None:
    """Builds the suite's ops inside the Python environment (``<venv>/torch_extensions``)
    unless ``$TORCH_EXTENSIONS_DIR`` says otherwise. torch's default folder is one per user,
    keyed by op name only: two checkouts (two venvs) would rebuild each op over each other's
    build (its ninja file names the venv's paths), ~100 s at every switch, each waiting on
    the other's lock. Child processes (training ranks, Slurm and Ray jobs) inherit it."""
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions"))


def extension_roots() -> list[Path]:
    """Where torch builds extensions: ``$TORCH_EXTENSIONS_DIR`` or the user cache folder."""
    roots = []
    if os.environ.get("TORCH_EXTENSIONS_DIR"):
        roots.append(Path(os.environ["TORCH_EXTENSIONS_DIR"]))
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    roots.append(Path(cache) / "torch_extensions")
    return roots


def _identity(path: Path) -> tuple[int, int, int] | None:
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino, st.st_ctime_ns


def _holders(identity: tuple[int, int, int]) -> list[int] | None:
    """Pids of processes holding the file ``identity`` (device, inode, ctime) open; None
    when some process could not be read (then nobody can say a lock is stale)."""
    holders = []
    for fd_dir in Path("/proc").glob("[0-9]*/fd"):
        try:
            fds = list(fd_dir.iterdir())
        except FileNotFoundError:
            continue  # the process ended meanwhile
        except PermissionError:
            return None
        for fd in fds:
            try:
                st = fd.stat()
            except OSError:
                continue
            if (st.st_dev, st.st_ino) == identity[:2]:
                holders.append(int(fd_dir.parent.name))
                break
    return holders


def clear_stale_locks(say=print) -> list[Path]:
    """Removes every torch extension build lock that no live process holds open.

    A lock some process holds (a build under way, here or in another session) is left
    alone, and so is every lock when another user's processes cannot be read.

    Args:
        say: Where the message about each removed or unreadable lock goes.

    Returns:
        The locks removed.
    """
    removed = []
    for root in extension_roots():
        for lock in [*root.glob("*/lock"), *root.glob("*/*/lock")]:
            identity = _identity(lock)
            holders = _holders(identity) if identity else []
            if holders is None:
                say(f"{lock}: left in place (cannot read every process's open files to "
                    "tell whether a build holds it); delete it if no build is running")
                continue
            if holders or identity is None or _identity(lock) != identity:
                continue  # held, gone, or released and taken again since it was read
            try:
                lock.unlink()
            except FileNotFoundError:
                continue  # its build just ended
            say(f"{lock}: removed a stale torch extension build lock (no process holds it: "
                "a build was killed); the op is rebuilt when next needed")
            removed.append(lock)
    return removed


def build_ops() -> None:
    """Builds (or loads from torch's cache) every op in OPS for DeepSpeed's CPU accelerator."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # as the suite runs (tests/conftest.py)
    from deepspeed.accelerator import get_accelerator

    for name in OPS:
        builder = get_accelerator().create_op_builder(name)
        if builder is None or not builder.is_compatible():
            print(f"DeepSpeed op {name}: not built (not available on this accelerator)")
            continue
        builder.load(verbose=False)
        print(f"DeepSpeed op {builder.absolute_name()}: built")


if __name__ == "__main__":
    use_environment_build_dir()
    clear_stale_locks()
    build_ops()
    sys.exit(0)
