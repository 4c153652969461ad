"""What the model reads for each objective: BERT 80/10/10 masking, BART text infilling,
decoder inputs shifted right. Random choices come from the `torch.Generator` passed in.
"""

from __future__ import annotations

import torch
from torch import Tensor


def masked_lm_inputs(
    input_ids: Tensor,
    *,
    mask_id: int,
    vocab_size: int,
    generator: torch.Generator,
    mask_prob: float = 0.15,
    special_ids: list[int] | None = None,
    ignore_index: int = -100,
) -> tuple[Tensor, Tensor]:
    """BERT corruption: select `mask_prob` of the tokens; of those 80% become `mask_id`,
    10% a uniformly random token, 10% stay unchanged.

    Args:
        input_ids: (B, T) token ids (not modified).
        mask_id: the [MASK] token id.
        vocab_size: random replacements are drawn from [0, vocab_size).
        generator: random source, so corruption is reproducible.
        mask_prob: share of eligible tokens selected for prediction.
        special_ids: ids never selected (padding, [CLS], [SEP], ...).
        ignore_index: label of positions not selected.

    Returns:
        (corrupted input_ids, labels) where labels hold the original ids at selected
        positions and `ignore_index` elsewhere.
    """
    device = input_ids.device
    eligible = torch.ones_like(input_ids, dtype=torch.bool)
    for special in special_ids or []:
        eligible &= input_ids != special
    draw = torch.rand(input_ids.shape, generator=generator, device=device)
    selected = eligible & (draw < mask_prob)
    labels = torch.where(selected, input_ids, torch.full_like(input_ids, ignore_index))
    action = torch.rand(input_ids.shape, generator=generator, device=device)
    random_ids = torch.randint(0, vocab_size, input_ids.shape, generator=generator,
                               device=device)
    corrupted = torch.where(selected & (action < 0.8), torch.full_like(input_ids, mask_id),
                            input_ids)
    corrupted = torch.where(selected & (action >= 0.8) & (action < 0.9), random_ids, corrupted)
    return corrupted, labels


def shift_right(labels: Tensor, decoder_start_id: int, pad_id: int,
                ignore_index: int = -100) -> Tensor:
    """Teacher-forcing decoder inputs: `decoder_start_id` followed by labels[:, :-1]
    (ignored label positions become `pad_id`)."""
    shifted = labels.new_full(labels.shape, decoder_start_id)
    shifted[:, 1:] = labels[:, :-1]
    return shifted.masked_fill(shifted == ignore_index, pad_id)


def denoising_inputs(
    input_ids: Tensor,
    *,
    mask_id: int,
    pad_id: int,
    decoder_start_id: int,
    generator: torch.Generator,
    mask_ratio: float = 0.3,
    poisson_lambda: float = 3.0,
    ignore_index: int = -100,
) -> dict[str, Tensor]:
    """BART text infilling: spans with Poisson(`poisson_lambda`) lengths (0 allowed: an
    inserted mask) are each replaced by one `mask_id` until about `mask_ratio` of the
    tokens are covered; the decoder reconstructs the original sequence.

    Args:
        input_ids: (B, T) clean token ids; `pad_id` marks padding at the end of a row.
        mask_id: the <mask> token id.
        pad_id: padding id (encoder input padding and ignored labels).
        decoder_start_id: first decoder input (BART uses EOS).
        generator: random source, so corruption is reproducible.
        mask_ratio: share of each row's real tokens to cover with spans.
        poisson_lambda: mean span length.
        ignore_index: label value at padding.

    Returns:
        {"input_ids": (B, T) corrupted source padded with `pad_id`,
         "attention_mask": (B, T) 1 for real source tokens,
         "decoder_input_ids": (B, T) labels shifted right,
         "labels": (B, T) the original ids, `ignore_index` at padding}.
    """
    B, T = input_ids.shape
    source = torch.full_like(input_ids, pad_id)
    for b in range(B):
        row = input_ids[b][input_ids[b] != pad_id].tolist()
        out = _infill_row(row, mask_id, generator, mask_ratio, poisson_lambda)
        source[b, : min(len(out), T)] = torch.tensor(out[:T], dtype=input_ids.dtype)
    labels = input_ids.masked_fill(input_ids == pad_id, ignore_index)
    return {"input_ids": source, "attention_mask": (source != pad_id).long(),
            "decoder_input_ids": shift_right(labels, decoder_start_id, pad_id, ignore_index),
            "labels": labels}


def _infill_row(row: list[int], mask_id: int, generator: torch.Generator, mask_ratio: float,
                poisson_lambda: float) -> list[int]:
    """One row of BART text infilling (see `denoising_inputs`)."""
    n = len(row)
    target = round(mask_ratio * n)
    rate = torch.full((1,), poisson_lambda)
    masked = [False] * n
    span_starts: set[int] = set()
    inserts: set[int] = set()
    covered, attempts = 0, 0
    while covered < target and attempts < 100 * (n + 1):
        attempts += 1
        length = min(int(torch.poisson(rate, generator=generator).item()), target - covered)
        if length == 0:  # a zero-length span inserts a mask between tokens
            inserts.add(int(torch.randint(0, n + 1, (1,), generator=generator).item()))
            covered += 1
            continue
        start = int(torch.randint(0, n - length + 1, (1,), generator=generator).item())
        if any(masked[start:start + length]):
            continue  # keep spans disjoint
        masked[start:start + length] = [True] * length
        span_starts.add(start)
        covered += length
    out: list[int] = []
    for i in range(n + 1):
        if i in inserts:
            out.append(mask_id)
        if i == n:
            break
        if not masked[i]:
            out.append(row[i])
        elif i in span_starts:
            out.append(mask_id)  # one mask per span, however long
    return out
