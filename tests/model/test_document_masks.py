"""Packed-document masks: FlexAttention's block mask gives the dense mask's losses.

torch 2.13 has no FlexAttention backward on CPU, so the comparison runs forward only on CPU
(eager FlexAttention); on CUDA ("auto") the block mask is what training uses.
"""

from __future__ import annotations

import pytest
import torch

from lmforge.model import ModelConfig, causal_lm_loss, segment_positions
from lmforge.model.document_masks import FLEX_BLOCK, document_block_mask, document_mask_backend
from lmforge.model.layers import build_attention_mask

# eager FlexAttention warns that it is the unfused math fallback: here that is the point
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

VOCAB = 89
TINY = {"n_layers": 2, "d_model": 32, "n_heads": 4, "n_kv_heads": 2, "d_ff": 64,
        "max_seq_len": 512}
T = 300  # three blocks of 128, the last one partial; documents straddle block edges


def _segments() -> torch.Tensor:
    lengths = [[40, 200, 60], [300], [129, 127, 1, 43]]
    return torch.stack([torch.repeat_interleave(torch.arange(len(row)), torch.tensor(row))
                        for row in lengths])


def _loss(family: str, backend: str, position: str = "rope") -> torch.Tensor:
    torch.manual_seed(0)
    model = ModelConfig.from_preset("tiny", family=family, vocab_size=VOCAB, position=position,
                                    **TINY).build().eval()
    g = torch.Generator().manual_seed(3)
    x = torch.randint(0, VOCAB, (3, T), generator=g)
    labels = torch.randint(0, VOCAB, (3, T), generator=g)
    segments = _segments()
    inputs = {"input_ids": x, "segment_ids": segments,
              "position_ids": segment_positions(segments)}
    if family == "encoder":
        padding = torch.ones(3, T, dtype=torch.long)
        padding[1, 250:] = 0  # a padded row end
        inputs["attention_mask"] = padding
    with torch.no_grad(), document_mask_backend(backend):
        return causal_lm_loss(model(**inputs), labels)


@pytest.mark.parametrize("family,position", [("decoder", "rope"), ("decoder", "learned"),
                                             ("encoder", "rope")])
def test_flex_block_mask_gives_the_dense_loss(family, position):
    dense, flex = _loss(family, "dense", position), _loss(family, "flex", position)
    torch.testing.assert_close(flex, dense, atol=1e-5, rtol=0)


def test_block_mask_marks_full_partial_and_empty_blocks():
    segments = _segments()
    index = torch.arange(T)[None]
    mask = document_block_mask(index, index, segments, segments, None, causal=True)
    dense = mask.to_dense()  # (B, 1, nq, nk) 1 where a block is computed at all
    # row 1 is one document: causal lower triangle of blocks; in row 0 block 2 (tokens
    # 256-299, document 2 only) never meets block 0 (documents 0 and 1): skipped
    assert dense[1, 0].tolist() == [[1, 0, 0], [1, 1, 0], [1, 1, 1]]
    assert dense[0, 0, 2].tolist() == [0, 1, 1]
    assert mask.full_kv_num_blocks[1, 0].tolist() == [0, 1, 2]  # strictly below the diagonal
    assert FLEX_BLOCK == 128


def test_dense_mask_stays_where_nothing_else_applies():
    segments = _segments()
    index = torch.arange(T)[None]
    for position, backend in (("alibi", "flex"), ("rope", "dense")):
        cfg = ModelConfig.from_preset("tiny", vocab_size=VOCAB, position=position, **TINY)
        with document_mask_backend(backend):  # auto: segments on CPU (test_document_segments)
            mask, _ = build_attention_mask(cfg, index, index, causal=True,
                                           q_segments=segments, k_segments=segments)
        assert isinstance(mask, torch.Tensor) and mask.shape[-2:] == (T, T)


def _blocks(counts: torch.Tensor, order: torch.Tensor, nk: int) -> torch.Tensor:
    """(B, nq, nk) bool from a BlockMask's (counts, indices) pair."""
    out = torch.zeros(*counts.shape[:1], counts.shape[-1], nk, dtype=torch.bool)
    for b in range(out.shape[0]):
        for i in range(out.shape[1]):
            out[b, i, order[b, 0, i, : counts[b, 0, i]].long()] = True
    return out


@pytest.mark.parametrize("causal", [True, False])
def test_block_classes_agree_with_the_dense_mask(causal):
    """Eager FlexAttention (CPU) applies mask_mod everywhere, so the losses above cannot see
    a wrongly skipped or wrongly "full" block: check each class against the dense mask."""
    segments, index = _segments(), torch.arange(T)[None]
    padding = torch.ones(3, T, dtype=torch.bool)
    padding[1, 250:] = padding[2, 100:140] = False
    cfg = ModelConfig.from_preset("tiny", vocab_size=VOCAB, **TINY)
    with document_mask_backend("dense"):
        dense, _ = build_attention_mask(cfg, index, index, causal=causal, q_segments=segments,
                                        k_segments=segments, key_padding=padding)
    mask = document_block_mask(index, index, segments, segments, padding, causal)
    n = -(-T // FLEX_BLOCK)
    padded = torch.zeros(3, n * FLEX_BLOCK, n * FLEX_BLOCK, dtype=torch.bool)
    padded[:, :T, :T] = dense[:, 0]
    per_block = padded.view(3, n, FLEX_BLOCK, n, FLEX_BLOCK).transpose(2, 3)
    any_allowed = per_block.flatten(-2).any(-1)  # (B, nq, nk)
    valid = torch.zeros_like(padded)
    valid[:, :T, :T] = True
    valid_blocks = valid.view(3, n, FLEX_BLOCK, n, FLEX_BLOCK).transpose(2, 3).flatten(-2)
    all_allowed = (per_block.flatten(-2) | ~valid_blocks).all(-1)
    partial = _blocks(mask.kv_num_blocks, mask.kv_indices, n)
    full = _blocks(mask.full_kv_num_blocks, mask.full_kv_indices, n)
    assert not (partial & full).any()
    assert ((partial | full) >= any_allowed).all()  # no block with an allowed pair skipped
    assert (all_allowed >= full).all()  # a "full" block has no hidden pair
    assert full.any() and (~(partial | full)).any()  # both shortcuts are actually taken
