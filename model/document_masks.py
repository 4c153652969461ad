"""Packed-document attention without a T x S tensor: FlexAttention block masks.

`build_attention_mask` (layers.py) returns a `BlockMask` built here from the document ids
when FlexAttention applies: on CUDA, with no ALiBi bias and no attention dropout (only the
dense path has those). torch 2.13 refuses FlexAttention's backward on CPU ("does not
support backward on CPU") and runs its eager forward as the math fallback (T x S scores;
compiling it took ~50 s), so CPU training keeps the dense (B, 1, T, S) bool mask;
`document_mask_backend("flex")` forces the block mask for forward-only checks on CPU.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Literal

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention.flex_attention import BlockMask, flex_attention

if TYPE_CHECKING:
    from lmforge.model.config import ModelConfig

DocumentMaskBackend = Literal["auto", "flex", "dense"]
_document_mask_backend: list[DocumentMaskBackend] = ["auto"]
FLEX_BLOCK = 128  # FlexAttention's sparse block size (its default)
_compiled_flex = None


@contextmanager
def document_mask_backend(backend: DocumentMaskBackend) -> Iterator[None]:
    """Within the block, packed-document masks use `backend`: "auto" (FlexAttention on
    CUDA, dense elsewhere), "flex" (also on CPU: forward only, for tests) or "dense"."""
    previous = _document_mask_backend[0]
    _document_mask_backend[0] = backend
    try:
        yield
    finally:
        _document_mask_backend[0] = previous


def use_flex(cfg: ModelConfig, device: torch.device) -> bool:
    """Whether packed-document masks of `cfg` on `device` take FlexAttention."""
    backend = _document_mask_backend[0]
    if cfg.position == "alibi" or cfg.dropout > 0 or backend == "dense":
        return False  # ALiBi's bias and attention dropout: only the dense path has them
    return backend == "flex" or device.type == "cuda"


def _block_ranges(x: Tensor, n_blocks: int) -> tuple[Tensor, Tensor]:
    """Per-block min and max of (B, L) `x`, L padded to `n_blocks` x FLEX_BLOCK: (B, n)."""
    pad = n_blocks * FLEX_BLOCK - x.shape[-1]
    lo = F.pad(x, (0, pad), value=int(x.max())).view(x.shape[0], n_blocks, FLEX_BLOCK)
    hi = F.pad(x, (0, pad), value=int(x.min())).view(x.shape[0], n_blocks, FLEX_BLOCK)
    return lo.amin(-1), hi.amax(-1)


def document_block_mask(q_pos: Tensor, k_pos: Tensor, q_segments: Tensor, k_segments: Tensor,
                        key_padding: Tensor | None, causal: bool) -> BlockMask:
    """FlexAttention block mask for packed documents, built per 128 x 128 block from
    per-block ranges of the document ids and positions (never a T x S tensor).

    A block pair is skipped when its id ranges (or, causal, its positions) cannot meet, and
    is "full" (no mask_mod call) when both blocks hold one and the same document, every key
    precedes every query (causal) and no key is padding; the rest apply `mask_mod`.
    Arguments as in `build_attention_mask`.
    """
    B, T, S = q_segments.shape[0], q_segments.shape[-1], k_segments.shape[-1]
    nq, nk = -(-T // FLEX_BLOCK), -(-S // FLEX_BLOCK)
    qp, kp = q_pos.expand(B, T), k_pos.expand(B, S)
    q_lo, q_hi = _block_ranges(q_segments, nq)
    k_lo, k_hi = _block_ranges(k_segments, nk)
    meet = (q_lo[:, :, None] <= k_hi[:, None, :]) & (k_lo[:, None, :] <= q_hi[:, :, None])
    full = (q_lo == q_hi)[:, :, None] & (k_lo == k_hi)[:, None, :] \
        & (q_lo[:, :, None] == k_lo[:, None, :])  # (B, nq, nk)
    if causal:
        qp_lo, qp_hi = _block_ranges(qp, nq)
        kp_lo, kp_hi = _block_ranges(kp, nk)
        meet &= kp_lo[:, None, :] <= qp_hi[:, :, None]
        full &= kp_hi[:, None, :] <= qp_lo[:, :, None]
    real = None
    if key_padding is not None:
        real = key_padding.bool()
        k_real, _ = _block_ranges(real.to(torch.int8), nk)
        full &= k_real.bool()[:, None, :]
    # a key block reaching past S is never "full": mask_mod hides its padding keys (query
    # rows past T are computed and dropped, whatever they attend to)
    if S % FLEX_BLOCK:
        full[:, :, -1] = False
    partial = meet & ~full

    def indices(blocks: Tensor) -> tuple[Tensor, Tensor]:  # (B, nq, nk) -> counts, order
        order = blocks.to(torch.int8).argsort(dim=-1, descending=True, stable=True)
        return blocks.sum(-1)[:, None].int(), order[:, None].int()

    def mask_mod(b: Tensor, h: Tensor, q: Tensor, k: Tensor) -> Tensor:
        # indices past T or S (the last block's padding) are clamped and their keys hidden
        q_in, k_in = q.clamp(max=T - 1), k.clamp(max=S - 1)
        allowed = (q_segments[b, q_in] == k_segments[b, k_in]) & (k < S)
        if causal:
            allowed = allowed & (kp[b, k_in] <= qp[b, q_in])
        if real is not None:
            allowed = allowed & real[b, k_in]
        return allowed

    counts, order = indices(partial)
    full_counts, full_order = indices(full)
    return BlockMask.from_kv_blocks(counts, order, full_counts, full_order, FLEX_BLOCK,
                                    mask_mod, seq_lengths=(T, S))


def flex_attention_call(q: Tensor, k: Tensor, v: Tensor, block_mask: BlockMask,
                        enable_gqa: bool) -> Tensor:
    """FlexAttention, compiled once per process on CUDA (its eager form is the math
    fallback, which materialises the scores); eager elsewhere (CPU tests, forward only)."""
    global _compiled_flex
    if q.device.type != "cuda":
        return flex_attention(q, k, v, block_mask=block_mask, enable_gqa=enable_gqa)
    if _compiled_flex is None:
        _compiled_flex = torch.compile(flex_attention, dynamic=False)
    return _compiled_flex(q, k, v, block_mask=block_mask, enable_gqa=enable_gqa)
