"""The trainer's own collectives (token counts, evaluation totals, the stop flag, logged
means, the bad-loss check), on the engine's device.

NCCL reduces only CUDA tensors: a CPU tensor fails with "No backend type associated with
device type cpu", while gloo accepts both, so every reduction lmforge makes goes through
:func:`all_reduce` with the engine's device (``engine.device``), never the default CPU.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor

SUM = dist.ReduceOp.SUM
MAX = dist.ReduceOp.MAX


def all_reduce(tensor: Tensor, device: torch.device, op: dist.ReduceOp = SUM) -> Tensor:
    """``tensor`` reduced over every rank, on ``device``.

    Args:
        tensor: What this rank contributes; copied to ``device`` when it lies elsewhere
            (reduced in place when it is already there).
        device: The engine's device (``engine.device``).
        op: The reduction (``SUM`` or ``MAX``).

    Returns:
        The reduced tensor on ``device``; without a process group, ``tensor`` there.
    """
    out = tensor.to(device)
    if dist.is_initialized():
        dist.all_reduce(out, op=op)
    return out


def all_reduce_values(
    values: Sequence[float], device: torch.device, op: dist.ReduceOp = SUM
) -> list[float]:
    """Python numbers reduced over every rank in one collective (float64 on ``device``)."""
    tensor = torch.tensor(list(values), dtype=torch.float64, device=device)
    return all_reduce(tensor, device, op).tolist()
