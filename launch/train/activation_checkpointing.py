"""Applied to the single-device model from outside: activation checkpointing.

The model code stays plain PyTorch; this wraps the ``forward`` of chosen blocks (or of
their attention only) in ``torch.utils.checkpoint`` so activations are recomputed in
backward. Parameter names do not change, so checkpoints and exports are unaffected.
"""

from __future__ import annotations

import functools
from typing import Literal

from torch import nn
from torch.utils.checkpoint import checkpoint


def _checkpointed(module: nn.Module) -> None:
    inner = module.forward

    @functools.wraps(inner)
    def forward(*args, **kwargs):
        if not module.training:
            return inner(*args, **kwargs)
        return checkpoint(inner, *args, use_reentrant=False, **kwargs)

    module.forward = forward  # instance attribute shadows the class method


def apply_activation_checkpointing(
    model: nn.Module, mode: Literal["none", "full", "selective"], every_n_layers: int = 1
) -> int:
    """Wraps every ``every_n_layers``-th block (full) or its attention (selective).

    Args:
        model: A model from ``lmforge.model`` exposing ``blocks()``.
        mode: ``none``, ``full`` (whole blocks) or ``selective`` (attention only).
        every_n_layers: Apply to blocks 0, n, 2n, ...

    Returns:
        How many modules were wrapped.
    """
    if mode == "none":
        return 0
    wrapped = 0
    for index, block in enumerate(model.blocks()):
        if index % every_n_layers:
            continue
        target = block if mode == "full" else block.attn
        _checkpointed(target)
        wrapped += 1
    return wrapped
