"""The losses of the training objectives: causal LM and masked LM (BERT), plain or chunked.

Every loss is computed in fp32 whatever the logits' dtype, and averaged over the
tokens whose label is not `ignore_index`.

`chunked_lm_loss` is the same cross-entropy from the final hidden states instead of the
logits: the output projection runs inside a loop over chunks of the predicted positions,
each chunk under non-reentrant checkpointing, so at most one chunk's logits (and their
gradient) exist at a time, in the forward and in the backward alike. With a 128,256-token
vocabulary the plain loss's (B, T, V) fp32 logits are the largest tensor of a step
(16 GB at batch 8 x 4,096); chunked, they are `chunk_tokens` x V. The price is one more
forward of the projection per chunk in the backward (the recomputation).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint


def causal_lm_loss(logits: Tensor, labels: Tensor, ignore_index: int = -100) -> Tensor:
    """Mean next-token cross-entropy in fp32.

    Args:
        logits: (B, T, V) scores.
        labels: (B, T) targets already aligned with `logits` (labels[:, t] is the token
            that follows input t; the caller shifts, e.g. inputs = x[:, :-1],
            labels = x[:, 1:]). Positions equal to `ignore_index` do not count.
        ignore_index: label value to skip (document boundaries, padding).

    Returns:
        Scalar fp32 loss (NaN if every label is ignored).
    """
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1),
                           ignore_index=ignore_index)


def masked_lm_loss(logits: Tensor, labels: Tensor, ignore_index: int = -100) -> Tensor:
    """Masked-LM cross-entropy in fp32 over the selected positions.

    Args:
        logits: (B, T, V) encoder MLM logits.
        labels: (B, T) original token at selected positions, `ignore_index` elsewhere (as
            produced by `masked_lm_inputs`).
        ignore_index: label value of unselected positions.

    Returns:
        Scalar fp32 loss.
    """
    return causal_lm_loss(logits, labels, ignore_index)


def _chunk_loss_sum(head: Callable[[Tensor], Tensor], vocab_size: int, hidden: Tensor,
                    labels: Tensor) -> Tensor:
    """Summed fp32 cross-entropy of one chunk: (N, d) hidden states, (N,) labels."""
    logits = head(hidden)[..., :vocab_size].float()  # (N, V); padding columns dropped
    return F.cross_entropy(logits, labels, reduction="sum")


def chunked_lm_loss(
    hidden: Tensor,
    head: Callable[[Tensor], Tensor],
    labels: Tensor,
    vocab_size: int,
    chunk_tokens: int,
    ignore_index: int = -100,
) -> Tensor:
    """`causal_lm_loss(head(hidden)[..., :vocab_size], labels)` without all the logits at once.

    Only positions whose label is not `ignore_index` are projected (masked LM predicts
    ~15% of them, SFT only the responses), `chunk_tokens` of them at a time; each chunk is
    checkpointed, so its logits are freed after its forward and recomputed in the
    backward. `head` is called once per chunk (and again per chunk in the backward): pass
    the model's `lm_head` module itself, so that hooks on it (ZeRO-3 gathering its weight,
    LoRA adapters) run as they do in the model's own forward.

    Args:
        hidden: (B, T, d) final hidden states, what the model feeds its output projection.
        head: the output projection, (N, d) -> (N, padded vocabulary).
        labels: (B, T) targets aligned with `hidden` (as for `causal_lm_loss`).
        vocab_size: real vocabulary; logits past it (vocabulary padding) are dropped.
        chunk_tokens: predicted positions per chunk (> 0).
        ignore_index: label value to skip.

    Returns:
        Scalar fp32 mean loss; if every label is ignored, a zero connected to the head and
        everything before it (so every parameter still gets a gradient).
    """
    if chunk_tokens <= 0:
        raise ValueError(f"chunk_tokens: must be positive, got {chunk_tokens}")
    flat_labels = labels.reshape(-1)
    keep = flat_labels != ignore_index
    count = keep.sum()
    kept_hidden = hidden.reshape(-1, hidden.shape[-1])[keep]  # (N, d)
    kept_labels = flat_labels[keep]
    total = hidden.new_zeros((), dtype=torch.float32)
    for part, target in zip(kept_hidden.split(chunk_tokens), kept_labels.split(chunk_tokens),
                            strict=True):
        total = total + checkpoint(_chunk_loss_sum, head, vocab_size, part, target,
                                   use_reentrant=False)
    if kept_hidden.shape[0] == 0:  # nothing to predict: a zero that still reaches every grad
        return head(hidden.reshape(-1, hidden.shape[-1])[:1]).float().sum() * 0.0
    return total / count
