"""Applied to the single-device model from outside: ``train.compile``, each block compiled.

Each transformer block's ``forward`` is replaced by a ``torch.compile`` of it (one graph per
block shape, not one of the whole model: the blocks of a stack are alike, so the compiled
code is reused and a graph break in the embedding or loss costs nothing). It is applied
before activation checkpointing, so a checkpointed block recomputes the compiled code: a
part that cannot be traced (the CPU's per-document attention, ``model/document_masks.py``)
is then a graph break, not a region dynamo gives up on (a graph break inside
``torch.utils.checkpoint`` makes it run the whole block eagerly).

Like activation checkpointing, only the instance's ``forward`` changes: the module tree and
the parameter names stay as they are (no ``_orig_mod.`` prefix as ``torch.compile(module)``
would add), so checkpoints, resume into an eager model, export and the LoRA merge are
unaffected. The compiled code runs in training only; evaluation and KV-cache decoding
(other shapes, a cache object) call the eager forward, so they never recompile.
"""

from __future__ import annotations

import functools
import logging
import time
from typing import Any

import torch
from torch import nn

from lmforge.model.document_masks import keep_segments_eager
from lmforge.model.layers import LayerCache

log = logging.getLogger("lmforge.train")


def _compiled(module: nn.Module, report: bool) -> None:
    inner = module.forward  # the class's forward
    # dynamic=False: one static graph per input shape; training rows all have seq_len.
    compiled = torch.compile(inner, dynamic=False)
    first = [report]

    @functools.wraps(inner)
    def forward(*args: Any, **kwargs: Any) -> Any:
        if not module.training or any(
                isinstance(a, LayerCache) for a in (*args, *kwargs.values())):
            return inner(*args, **kwargs)
        if not first[0]:
            return compiled(*args, **kwargs)
        first[0] = False
        start = time.perf_counter()
        out = compiled(*args, **kwargs)
        graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        log.info("train.compile: the first block's forward compiled in %.1f s (%d graphs so "
                 "far; backward compiles in the first backward)",
                 time.perf_counter() - start, graphs)
        return out

    module.forward = forward  # instance attribute shadows the class method


def compile_blocks(model: nn.Module, enabled: bool) -> int:
    """Compiles every block of ``model`` (``blocks()``) in place for training.

    Args:
        model: A model from ``lmforge.model`` exposing ``blocks()``, after LoRA and
            before activation checkpointing were applied.
        enabled: ``train.compile``; False leaves the model as it is.

    Returns:
        How many blocks were compiled.
    """
    if not enabled:
        return 0
    keep_segments_eager()  # per-document attention stays a graph break (its lengths vary)
    blocks = model.blocks()
    # Blocks whose guards differ (LoRA adapters, every n-th checkpointed) each take one of
    # the per-function recompilations: enough of them that no block is left eager.
    limit = torch._dynamo.config.recompile_limit
    torch._dynamo.config.recompile_limit = max(limit, len(blocks) + 8)
    for index, block in enumerate(blocks):
        _compiled(block, report=index == 0)
    log.info("train.compile: %d blocks compiled with torch.compile (the first step includes "
             "the compile time)", len(blocks))
    return len(blocks)

