"""DeepSpeed in a training process without two of its parts that lmforge never runs.

Each costs every rank about 1.2 s of CPU at every start (measured with ``-X importtime`` on
the 2-core CI machine; a launch has two ranks, the suite ~100 launches):

- ``deepspeed.autotuning.autotuner`` imports MLflow when DeepSpeed is imported (its
  ``runtime.config`` reads the autotuning section). lmforge never runs DeepSpeed's
  autotuner; a rank that tracks imports MLflow itself.
- ``deepspeed.runtime.zero.muon.muon_optimizer`` / ``original_muon`` are imported by the
  ZeRO and bf16 optimizers on their first step, only to ask
  ``isinstance(optimizer, MuonWithAuxAdam)``; the module decorates its kernels with
  ``torch.compile`` at import, which loads inductor. lmforge builds AdamW or DeepSpeed's
  CPU Adam (``optim.py``), never Muon, so a class nothing is an instance of answers the
  same.

Stand-in modules take their names in ``sys.modules`` before DeepSpeed is imported. Module
paths are DeepSpeed internals, so this happens only for the DeepSpeed versions checked
against (``CHECKED_DEEPSPEED_VERSIONS``); any other version is imported as it is.

One repeated cost is kept once: py-cpuinfo's public ``get_cpu_info()`` answers by running
itself in a new Python process (~0.65 CPU-s), and a rank with CPU Adam (optimizer offload)
asks three times (``DeepSpeedCPUAdam``, and the op builder's ``cpu_arch``/``simd_width`` when
it loads the op). On the checked versions the first answer is kept for the process (the
CPU does not change under it) and each caller gets its own copy.
"""

from __future__ import annotations

import copy
import importlib.metadata
import logging
import sys
from collections.abc import Callable
from types import ModuleType

log = logging.getLogger(__name__)

CHECKED_DEEPSPEED_VERSIONS = ("0.19.8",)

AUTOTUNER = "deepspeed.autotuning.autotuner"
MUON_OPTIMIZER = "deepspeed.runtime.zero.muon.muon_optimizer"
ORIGINAL_MUON = "deepspeed.runtime.zero.muon.original_muon"


class NotUsedByLmforge(RuntimeError):
    """Raised by a stand-in if DeepSpeed ever calls into a part lmforge left out."""


class MuonWithAuxAdam:
    """Stand-in: lmforge never builds DeepSpeed's Muon optimizer, so no optimizer is one."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        raise NotUsedByLmforge("DeepSpeed's Muon optimizer is not available in lmforge")


class Autotuner:
    """Stand-in: lmforge never runs DeepSpeed's autotuner."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        raise NotUsedByLmforge("DeepSpeed's autotuner is not available in lmforge")


def _not_used(*args: object, **kwargs: object) -> None:
    raise NotUsedByLmforge("a Muon update was requested, but lmforge never uses Muon")


def stand_ins() -> dict[str, ModuleType]:
    """The stand-in modules by the name DeepSpeed imports them under."""
    modules = {}
    for name, members in ((AUTOTUNER, {"Autotuner": Autotuner}),
                          (MUON_OPTIMIZER, {"MuonWithAuxAdam": MuonWithAuxAdam}),
                          (ORIGINAL_MUON, {"MuonWithAuxAdam": MuonWithAuxAdam,
                                           "muon_update": _not_used, "adam_update": _not_used})):
        module = ModuleType(name, f"lmforge stand-in for {name} (see {__name__})")
        module.__dict__.update(members)
        modules[name] = module
    return modules


def cpu_info_once(get_cpu_info: Callable[[], dict]) -> Callable[[], dict]:
    """``get_cpu_info`` asked once per process; every call returns a copy of that answer."""
    answer: list[dict] = []

    def once() -> dict:
        if not answer:
            answer.append(get_cpu_info())
        return copy.deepcopy(answer[0])

    once.lmforge_once = True  # type: ignore[attr-defined]
    return once


def keep_cpu_info() -> bool:
    """Makes ``cpuinfo.get_cpu_info`` answer from the process's first answer; False when
    py-cpuinfo is not installed or this was done already."""
    try:
        import cpuinfo
    except ImportError:
        return False
    if getattr(cpuinfo.get_cpu_info, "lmforge_once", False):
        return False
    cpuinfo.get_cpu_info = cpu_info_once(cpuinfo.get_cpu_info)
    return True


def is_checked(deepspeed_version: str | None = None) -> bool:
    """Whether the installed DeepSpeed (or ``deepspeed_version``) is one of
    ``CHECKED_DEEPSPEED_VERSIONS``: the versions lmforge's uses of DeepSpeed internals (the
    stand-ins here; ``source_load``'s partition layout and ``zero.Init`` hook) were checked
    on. Any other version takes the public paths."""
    version = deepspeed_version or importlib.metadata.version("deepspeed")
    return version in CHECKED_DEEPSPEED_VERSIONS


def install(deepspeed_version: str | None = None) -> list[str]:
    """Puts the stand-ins in ``sys.modules`` and keeps py-cpuinfo's first answer if DeepSpeed
    is not imported yet and its version is a checked one; returns the names installed (none
    otherwise).

    Args:
        deepspeed_version: The installed version; read from the package metadata if None.
    """
    if "deepspeed" in sys.modules:
        return []  # too late to stand in for anything: DeepSpeed is already loaded
    if not is_checked(deepspeed_version):
        log.debug("DeepSpeed %s is not one of %s: imported as it is",
                  deepspeed_version or importlib.metadata.version("deepspeed"),
                  ", ".join(CHECKED_DEEPSPEED_VERSIONS))
        return []
    installed = [name for name, module in stand_ins().items()
                 if sys.modules.setdefault(name, module) is module]
    if keep_cpu_info():
        installed.append("cpuinfo.get_cpu_info")
    return installed
