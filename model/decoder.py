"""Decoder-only causal LM (GPT-2 and Llama style), built from `layers.py` components."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from lmforge.model.layers import (
    Block,
    KVCache,
    build_attention_mask,
    init_weights,
    make_norm,
    rope_cos_sin,
    sinusoidal_embedding,
)

if TYPE_CHECKING:
    from lmforge.model.config import ModelConfig  # annotations only: config.build() imports us


def segment_positions(segment_ids: Tensor) -> Tensor:
    """Position ids that restart at 0 at every document start of a packed row.

    Args:
        segment_ids: (B, T) integer document ids; a new document starts where the id changes.

    Returns:
        (B, T) long positions.
    """
    T = segment_ids.shape[-1]
    index = torch.arange(T, device=segment_ids.device).expand_as(segment_ids)
    start = torch.ones_like(segment_ids, dtype=torch.bool)
    start[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    doc_start = torch.where(start, index, torch.zeros_like(index)).cummax(dim=-1).values
    return index - doc_start


class DecoderLM(nn.Module):
    """Causal language model; `forward` returns logits over the real vocabulary.

    State-dict names: `tok_emb`, `pos_emb` (learned positions), `layers.{i}.{attn_norm,
    attn.qkv, attn.out, mlp_norm, mlp.gate_up|mlp.up, mlp.down}`, `final_norm` (pre-norm
    only) and `lm_head` (the same Parameter as `tok_emb` when tied). `hf.py` maps these
    to Hugging Face names.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.padded_vocab_size, cfg.d_model)
        if cfg.position == "learned":
            self.pos_emb = nn.Embedding(cfg.max_seq_len, cfg.d_model)
        self.emb_norm = make_norm(cfg) if cfg.embedding_norm else None
        self.drop = nn.Dropout(cfg.dropout)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.final_norm = make_norm(cfg) if cfg.norm_position == "pre" else None
        # A tied head is still a module (sharing the embedding's Parameter) so that ZeRO-3
        # gathers the weight through the head's own hooks.
        self.lm_head = nn.Linear(cfg.d_model, cfg.padded_vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
            self.lm_head.tied_to_embedding = True
        init_weights(self, cfg)

    def blocks(self) -> list[nn.Module]:
        """Transformer blocks, for activation checkpointing applied from outside."""
        return list(self.layers)

    def new_cache(self, max_len: int) -> KVCache:
        """Empty KV cache for up to `max_len` positions (see `generate`)."""
        return KVCache(len(self.layers), max_len)

    def forward(
        self,
        input_ids: Tensor,
        segment_ids: Tensor | None = None,
        position_ids: Tensor | None = None,
        cache: KVCache | None = None,
        return_hidden: bool = False,
    ) -> Tensor:
        """Logits for every position.

        Args:
            input_ids: (B, T) token ids.
            segment_ids: (B, T) document ids of packed rows; attention stays causal within
                equal ids. Give `position_ids` (e.g. `segment_positions(segment_ids)`) too
                if positions should restart per document.
            position_ids: (B, T) positions; default 0..T-1 (offset by the cache length).
            cache: KV cache for incremental decoding; filled in place.
            return_hidden: return what `lm_head` would read, (B, T, d_model), instead of
                the logits (for `losses.chunked_lm_loss`).

        Returns:
            (B, T, vocab_size) logits in the model's dtype (padding columns dropped).
        """
        cfg = self.cfg
        B, T = input_ids.shape
        offset = cache.length if cache is not None else 0
        index = torch.arange(offset, offset + T, device=input_ids.device)[None]  # (1, T)
        positions = index if position_ids is None else position_ids
        if cfg.position == "learned" and offset + T > cfg.max_seq_len:
            raise ValueError(f"max_seq_len: sequence of {offset + T} tokens exceeds the learned "
                             f"position table ({cfg.max_seq_len}); shorten the input")
        x = self.tok_emb(input_ids)
        if cfg.scale_embeddings:
            x = x * cfg.d_model ** 0.5
        if cfg.position == "learned":
            x = x + self.pos_emb(positions)
        elif cfg.position == "sinusoidal":
            x = x + sinusoidal_embedding(positions, cfg.d_model, x.dtype)
        if self.emb_norm is not None:
            x = self.emb_norm(x)
        x = self.drop(x)

        cos = sin = None
        if cfg.position == "rope":
            cos, sin = rope_cos_sin(cfg, positions, x.dtype)
        k_index = torch.arange(offset + T, device=input_ids.device)[None]
        if segment_ids is not None and cache is not None:
            raise ValueError("segment_ids: packed-document masks are for training; "
                             "decode one document per row with a cache")
        mask, is_causal = build_attention_mask(cfg, index, k_index, causal=True,
                                               q_segments=segment_ids, k_segments=segment_ids,
                                               dtype=x.dtype)
        for i, block in enumerate(self.layers):
            x = block(x, cos, sin, mask, is_causal, cache.layers[i] if cache is not None else None)
        if self.final_norm is not None:
            x = self.final_norm(x)
        if return_hidden:
            return x
        logits = self.lm_head(x)
        if cfg.padded_vocab_size != cfg.vocab_size:
            logits = logits[..., : cfg.vocab_size]
        return logits
