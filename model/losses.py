"""The losses of the training objectives: causal LM and masked LM (BERT).

Every loss is computed in fp32 whatever the logits' dtype, and averaged over the
tokens whose label is not `ignore_index`.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


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
