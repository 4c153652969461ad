"""Scoring tasks on every rank at once, for evaluation inside training.

Each rank scores its share of every task's examples (``rank, rank + world, ...``) with the
engine's forward pass, and the ranks' sums are added with one collective. Under ZeRO-3 each
forward pass gathers parameters from every rank, so every rank must make the same number of
passes: a rank with fewer requests makes one-token passes until it has made as many as the
busiest rank (all ranks know every share, so no collective is needed to count them).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from lmforge.launch.eval.loglikelihood import (
    CausalLogits,
    Seq2SeqLogits,
    causal_loglikelihood,
    seq2seq_loglikelihood,
)
from lmforge.launch.eval.scoring import PairEncoder, TaskScore, requests_of, score_task
from lmforge.launch.eval.tasks import EvalTask

SUMMED = {"multiple_choice": ("acc", "acc_norm", "acc_bytes"), "cloze": ("acc", "loglikelihood")}
"""The per-example values a :class:`TaskScore` sums, in the order ranks exchange them."""
SumValues = Callable[[list[float]], list[float]]
"""Element-wise sum over ranks (a collective every rank calls with a list of equal length),
e.g. ``lmforge.launch.train.collectives.all_reduce_values``."""


def _share(task: EvalTask, rank: int, world: int, limit: int | None) -> EvalTask:
    examples = task.limited(limit).examples[rank::world]
    return EvalTask(task.name, task.kind, examples, task.target_delimiter, task.source)


def forward_passes(tasks: Sequence[EvalTask], rank: int, world: int, batch_size: int,
                   limit: int | None = None) -> int:
    """How many forward passes ``rank`` needs for its shares of ``tasks``."""
    return sum(math.ceil(len(requests_of(_share(t, rank, world, limit))) / batch_size)
               for t in tasks)


def score_tasks_on_ranks(tasks: Sequence[EvalTask], encoder: PairEncoder,
                         logits_of: CausalLogits | Seq2SeqLogits, max_length: int, rank: int,
                         world: int, sum_values: SumValues, batch_size: int = 16,
                         limit: int | None = None,
                         device: torch.device | str | None = None) -> dict[str, dict[str, float]]:
    """Every rank calls this with the same arguments but its ``rank``; all get the metrics of
    all examples, ``{task: {metric: value}}`` (see ``scoring.py``).

    Args:
        tasks: The tasks, identical on every rank.
        encoder: The tokenizer as a :class:`PairEncoder`.
        logits_of: The model's forward pass in eval mode: a
            :data:`~lmforge.launch.eval.loglikelihood.CausalLogits` when ``encoder.backend``
            is ``causal``, else a ``Seq2SeqLogits`` (context → encoder, continuation →
            decoder).
        max_length: The model's context in tokens.
        rank: This rank.
        world: The number of ranks.
        sum_values: The collective that adds the ranks' sums (see :data:`SumValues`).
        batch_size: Sequences per forward pass.
        limit: Score each task's first ``limit`` examples only.
        device: Where input ids go.
    """
    passes = 0

    def counted(*inputs: torch.Tensor) -> torch.Tensor:
        nonlocal passes
        passes += 1
        return logits_of(*inputs)

    make = causal_loglikelihood if encoder.backend == "causal" else seq2seq_loglikelihood
    loglikelihood = make(counted, max_length, batch_size, device)
    scores = [score_task(t, encoder, loglikelihood, limit, shard=(rank, world)) for t in tasks]
    assert passes == forward_passes(tasks, rank, world, batch_size, limit)
    busiest = max(forward_passes(tasks, r, world, batch_size, limit) for r in range(world))
    # One token (seq2seq: one source token, mask 1, one target token) per padding pass.
    pad = torch.ones(1, 1, dtype=torch.long, device=device)
    pads = (pad,) if encoder.backend == "causal" else (pad, pad, pad)
    with torch.no_grad():
        while passes < busiest:  # the same number of (ZeRO-3: parameter-gathering) passes
            counted(*pads)
    local = [value for t, s in zip(tasks, scores, strict=True)
             for value in (float(s.count), *(s.sums.get(k, 0.0) for k in SUMMED[t.kind]))]
    total = iter(sum_values(local))
    metrics = {}
    for task in tasks:
        count = int(round(next(total)))
        sums = {k: next(total) for k in SUMMED[task.kind]}
        metrics[task.name] = TaskScore(task.kind, count, sums).metrics()
    return metrics
