"""A :data:`~lmforge.launch.eval.scoring.LoglikelihoodFn` from a model's logits function.

The same function serves a transformers model on an export and the engine inside training:
only ``logits_of`` differs. Sequences are batched longest first and padded on the right
(a causal model's padding comes after every position that is read, so it needs no mask);
a sequence longer than ``max_length + 1`` loses tokens on the left, as in
lm-evaluation-harness. Log-probabilities are taken in float32.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from lmforge.launch.eval.scoring import LoglikelihoodFn, TokenIds

CausalLogits = Callable[[torch.Tensor], torch.Tensor]
"""(batch, time) input ids → (batch, time, vocab) logits."""
Seq2SeqLogits = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
"""(encoder ids, encoder mask, decoder labels), each (batch, time) → decoder logits
(batch, label time, vocab); the model shifts the labels right itself, as transformers does."""


def _check(pairs: Sequence[tuple[TokenIds, TokenIds]], max_length: int) -> None:
    for context, continuation in pairs:
        if not context or not continuation:
            raise ValueError("eval: a request has an empty context or continuation after "
                             "tokenizing; every choice/target must produce tokens")
        if len(continuation) > max_length:
            raise ValueError(f"eval: a continuation of {len(continuation)} tokens is longer "
                             f"than the model's context ({max_length}); shorten the choice")


def _padded(rows: list[TokenIds], device: torch.device | str | None) -> torch.Tensor:
    ids = torch.zeros(len(rows), max(map(len, rows)), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
    return ids.to(device) if device is not None else ids


def _continuation_score(logprobs: torch.Tensor, continuation: TokenIds) -> tuple[float, bool]:
    """``logprobs`` (len(continuation), vocab) at the continuation's positions."""
    target = torch.tensor(continuation, dtype=torch.long, device=logprobs.device)
    greedy = bool((logprobs.argmax(-1) == target).all())
    return float(logprobs.gather(1, target[:, None]).sum()), greedy


def causal_loglikelihood(logits_of: CausalLogits, max_length: int, batch_size: int = 16,
                         device: torch.device | str | None = None) -> LoglikelihoodFn:
    """A log-likelihood function for a decoder.

    Args:
        logits_of: The model's forward pass (see :data:`CausalLogits`), called under
            ``torch.no_grad``.
        max_length: The model's context in tokens.
        batch_size: Sequences per forward pass.
        device: Where the input ids go (the model's device).
    """

    def score(pairs: Sequence[tuple[TokenIds, TokenIds]]) -> list[tuple[float, bool]]:
        _check(pairs, max_length)
        order = sorted(range(len(pairs)), key=lambda i: -len(pairs[i][0]) - len(pairs[i][1]))
        results: list[tuple[float, bool]] = [(0.0, False)] * len(pairs)
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            # The last token is never an input: its logits would predict past the end.
            rows = [(list(pairs[i][0]) + list(pairs[i][1]))[-(max_length + 1):][:-1]
                    for i in chunk]
            with torch.no_grad():
                logprobs = torch.log_softmax(logits_of(_padded(rows, device)).float(), dim=-1)
            for row, (i, ids) in enumerate(zip(chunk, rows, strict=True)):
                continuation = pairs[i][1]
                end = len(ids)  # (B, T, V): continuation token k is predicted at end - n + k
                results[i] = _continuation_score(logprobs[row, end - len(continuation):end],
                                                 continuation)
        return results

    return score


def seq2seq_loglikelihood(logits_of: Seq2SeqLogits, max_length: int, batch_size: int = 16,
                          device: torch.device | str | None = None) -> LoglikelihoodFn:
    """A log-likelihood function for an encoder-decoder: the context goes to the encoder,
    the continuation is the decoder's target (both cut to ``max_length`` from the left)."""

    def score(pairs: Sequence[tuple[TokenIds, TokenIds]]) -> list[tuple[float, bool]]:
        _check(pairs, max_length)
        order = sorted(range(len(pairs)), key=lambda i: -len(pairs[i][0]) - len(pairs[i][1]))
        results: list[tuple[float, bool]] = [(0.0, False)] * len(pairs)
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            sources = [list(pairs[i][0])[-max_length:] for i in chunk]
            targets = [list(pairs[i][1])[-max_length:] for i in chunk]
            ids = _padded(sources, device)
            mask = (_padded([[1] * len(s) for s in sources], device))
            with torch.no_grad():
                logits = logits_of(ids, mask, _padded(targets, device))
                logprobs = torch.log_softmax(logits.float(), dim=-1)
            for row, target in enumerate(targets):
                results[chunk[row]] = _continuation_score(logprobs[row, : len(target)], target)
        return results

    return score
