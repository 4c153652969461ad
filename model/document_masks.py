"""Packed-document attention without a T x S tensor.

`build_attention_mask` (layers.py) returns, for packed documents, one of two descriptors
built here from the document ids, instead of the dense (B, 1, T, S) bool mask:

- `DocumentSegments` ("varlen by segments", every device): each row's documents are cut
  out of q, k and v and attend only to themselves through SDPA, `is_causal=True` for a
  decoder and no mask for an encoder (a (1, L) key mask where padding is mixed in), so
  PyTorch's flash kernel applies and memory stays O(T). Documents of equal length, across
  the whole batch, share one SDPA call. It needs self-attention over aligned positions
  (no KV cache, T == S) and document ids that never decrease along a row (the loader's).
- A FlexAttention `BlockMask` ("auto" on CUDA): torch 2.13 refuses FlexAttention's
  backward on CPU ("does not support backward on CPU") and runs its eager forward as the
  math fallback (T x S scores), so it is CUDA's path; `document_mask_backend("flex")`
  forces it for forward-only checks on CPU.

The dense mask stays where neither applies: ALiBi's bias, a causal mask with key padding,
or `document_mask_backend("dense")`. FlexAttention also leaves attention dropout to the
segments path (SDPA's dropout, its math kernel per document).
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention.flex_attention import BlockMask, flex_attention

if TYPE_CHECKING:
    from lmforge.model.config import ModelConfig

DocumentMaskBackend = Literal["auto", "flex", "segments", "dense"]
_document_mask_backend: list[DocumentMaskBackend] = ["auto"]
FLEX_BLOCK = 128  # FlexAttention's sparse block size (its default)
_compiled_flex = None


@contextmanager
def document_mask_backend(backend: DocumentMaskBackend) -> Iterator[None]:
    """Within the block, packed-document masks use `backend`: "auto" (FlexAttention on
    CUDA, `DocumentSegments` elsewhere), "flex" (also on CPU: forward only, for tests),
    "segments" (also on CUDA) or "dense"; each falls back to dense where it cannot apply."""
    previous = _document_mask_backend[0]
    _document_mask_backend[0] = backend
    try:
        yield
    finally:
        _document_mask_backend[0] = previous


def use_flex(cfg: ModelConfig, device: torch.device) -> bool:
    """Whether packed-document masks of `cfg` on `device` take FlexAttention."""
    backend = _document_mask_backend[0]
    if cfg.position == "alibi" or cfg.dropout > 0 or backend in ("dense", "segments"):
        return False  # ALiBi's bias and attention dropout: FlexAttention has neither
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


# ---- varlen by segments: one SDPA call per group of equal-length documents ----------------
@dataclass(frozen=True)
class _Group:
    index: Tensor  # (n, L) flat token indices (row * T + t) of n documents of length L
    key_mask: Tensor | None  # (n, 1, 1, L) bool, True = a real key; None where all are real


@dataclass(frozen=True)
class DocumentSegments:
    """Packed documents as separate attention problems, the mask `build_attention_mask`
    returns on devices without FlexAttention (see the module docstring).

    `groups` hold the documents of the (B, T) batch by length; `inverse` puts the
    concatenated group outputs back in (row, token) order; `causal` is SDPA's `is_causal`
    within each document (a document's local index is its sequence index).
    """

    groups: tuple[_Group, ...]
    inverse: Tensor  # (B * T,)
    causal: bool

    def attend(self, q: Tensor, k: Tensor, v: Tensor, dropout_p: float,
               enable_gqa: bool) -> Tensor:
        """SDPA of (B, H, T, D) queries over (B, K, T, D) keys/values, each document
        attending only to itself; returns (B, H, T, D) as SDPA would.

        Eager under `torch.compile` once `keep_segments_eager` ran (a graph break): traced,
        every new set of document lengths would be a new graph, where a compiled block
        keeps one per input shape."""
        B, H, T, D = q.shape

        def tokens(x: Tensor) -> Tensor:  # (B, heads, T, D) -> (B * T, heads, D)
            return x.transpose(1, 2).reshape(B * T, x.shape[1], D)

        qf, kf, vf = tokens(q), tokens(k), tokens(v)
        outs = []
        for group in self.groups:
            n, length = group.index.shape
            y = F.scaled_dot_product_attention(
                qf[group.index].transpose(1, 2), kf[group.index].transpose(1, 2),
                vf[group.index].transpose(1, 2), attn_mask=group.key_mask,
                is_causal=self.causal, dropout_p=dropout_p, enable_gqa=enable_gqa)
            outs.append(y.transpose(1, 2).reshape(n * length, H, D))
        y = outs[0] if len(outs) == 1 else torch.cat(outs)
        return y[self.inverse].view(B, T, H, D).transpose(1, 2)


def keep_segments_eager() -> None:
    """Makes `DocumentSegments.attend` a graph break for `torch.compile` (idempotent); whoever
    compiles blocks calls it first. Not a decorator: `torch.compiler.disable` imports
    torch._dynamo (~1.5 s), which a process that only builds or evaluates a model skips."""
    if not getattr(DocumentSegments.attend, "_lmforge_eager", False):
        plain = DocumentSegments.attend
        eager = torch.compiler.disable(plain)
        eager._lmforge_eager = True
        eager._lmforge_plain = plain  # for tests that need the method as written
        DocumentSegments.attend = eager


def document_segments(cfg: ModelConfig, q_pos: Tensor, k_pos: Tensor, q_segments: Tensor,
                      k_segments: Tensor, key_padding: Tensor | None,
                      causal: bool) -> DocumentSegments | None:
    """`DocumentSegments` for packed documents (arguments as in `build_attention_mask`), or
    None where they cannot give the dense mask's result: a "dense"/"flex" backend, ALiBi,
    cross-attention or a KV cache (q and k positions differ), document ids that decrease
    along a row (a document split in two runs), or key padding under a causal mask.

    A document is a run of equal ids; reads the ids on the host once per forward.
    """
    if _document_mask_backend[0] in ("dense", "flex") or cfg.position == "alibi":
        return None
    if q_segments.shape != k_segments.shape or q_pos.shape[-1] != k_pos.shape[-1]:
        return None
    if not torch.equal(q_pos, k_pos) or not torch.equal(q_segments, k_segments):
        return None
    if causal and key_padding is not None:
        return None  # SDPA takes is_causal or a mask, not both
    if bool((q_segments[:, 1:] < q_segments[:, :-1]).any()):
        return None
    B, T = q_segments.shape
    device = q_segments.device
    start = torch.ones(B, T, dtype=torch.bool, device=device)
    start[:, 1:] = q_segments[:, 1:] != q_segments[:, :-1]
    starts = start.flatten().nonzero().squeeze(1)  # each row's first token starts a run
    lengths = torch.diff(starts, append=torch.tensor([B * T], device=device))
    real = None if key_padding is None else key_padding.bool().flatten()
    groups, order = [], []
    for length in lengths.unique().tolist():
        index = starts[lengths == length, None] + torch.arange(length, device=device)
        key_mask = None
        if real is not None and not bool(real[index].all()):
            key_mask = real[index][:, None, None, :]
        groups.append(_Group(index, key_mask))
        order.append(index.flatten())
    perm = torch.cat(order)
    inverse = torch.empty_like(perm)
    inverse[perm] = torch.arange(B * T, device=device)
    return DocumentSegments(tuple(groups), inverse, causal)
