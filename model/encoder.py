"""Encoder-only model (BERT style): bidirectional blocks, a masked-LM head and an optional
sequence-classification head."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmforge.model.layers import (
    Block,
    build_attention_mask,
    init_weights,
    make_norm,
    rope_cos_sin,
    sinusoidal_embedding,
)

if TYPE_CHECKING:
    from lmforge.model.config import ModelConfig  # annotations only: config.build() imports us


def _head_activation(cfg: ModelConfig, x: Tensor) -> Tensor:
    if cfg.activation == "relu":
        return F.relu(x)
    if cfg.activation == "gelu_tanh":
        return F.gelu(x, approximate="tanh")
    return F.gelu(x)  # gelu, and swiglu configs (a gated head has no BERT counterpart)


class EncoderModel(nn.Module):
    """Bidirectional encoder; `forward` returns masked-LM logits, `classify` class scores.

    State-dict names: `tok_emb`, `pos_emb`, `type_emb`, `emb_norm`, `layers.{i}.*` (as in
    `DecoderLM`), `final_norm` (pre-norm only), `mlm_dense`, `mlm_norm`, `lm_head`
    (weight shared with `tok_emb` when tied, plus a bias), and with `num_labels > 0`
    `pooler` and `classifier`.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.padded_vocab_size, cfg.d_model)
        if cfg.position == "learned":
            self.pos_emb = nn.Embedding(cfg.max_seq_len, cfg.d_model)
        self.type_emb = nn.Embedding(cfg.type_vocab_size, cfg.d_model) \
            if cfg.type_vocab_size else None
        self.emb_norm = make_norm(cfg) if cfg.embedding_norm else None
        self.drop = nn.Dropout(cfg.dropout)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.final_norm = make_norm(cfg) if cfg.norm_position == "pre" else None
        self.mlm_dense = nn.Linear(cfg.d_model, cfg.d_model, bias=cfg.bias)
        self.mlm_norm = make_norm(cfg)
        self.lm_head = nn.Linear(cfg.d_model, cfg.padded_vocab_size, bias=True)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
            self.lm_head.tied_to_embedding = True
        self.pooler = self.classifier = None
        if cfg.num_labels:
            self.pooler = nn.Linear(cfg.d_model, cfg.d_model)
            self.classifier = nn.Linear(cfg.d_model, cfg.num_labels)
        init_weights(self, cfg)

    def blocks(self) -> list[nn.Module]:
        """Transformer blocks, for activation checkpointing applied from outside."""
        return list(self.layers)

    def encode(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        token_type_ids: Tensor | None = None,
        position_ids: Tensor | None = None,
        segment_ids: Tensor | None = None,
    ) -> Tensor:
        """Final hidden states (B, T, d_model).

        Args:
            input_ids: (B, T) token ids.
            attention_mask: (B, T) 1 for real tokens, 0 for padding (padding keys hidden).
            token_type_ids: (B, T) sentence A/B ids (needs `type_vocab_size > 0`).
            position_ids: (B, T) positions; default 0..T-1.
            segment_ids: (B, T) document ids of packed rows (attention stays inside a doc).
        """
        cfg = self.cfg
        B, T = input_ids.shape
        index = torch.arange(T, device=input_ids.device)[None]
        positions = index if position_ids is None else position_ids
        if cfg.position == "learned" and T > cfg.max_seq_len:
            raise ValueError(f"max_seq_len: sequence of {T} tokens exceeds the learned position "
                             f"table ({cfg.max_seq_len}); shorten the input")
        x = self.tok_emb(input_ids)
        if cfg.scale_embeddings:
            x = x * cfg.d_model ** 0.5
        if cfg.position == "learned":
            x = x + self.pos_emb(positions)
        elif cfg.position == "sinusoidal":
            x = x + sinusoidal_embedding(positions, cfg.d_model, x.dtype)
        if self.type_emb is not None:
            types = torch.zeros_like(input_ids) if token_type_ids is None else token_type_ids
            x = x + self.type_emb(types)
        if self.emb_norm is not None:
            x = self.emb_norm(x)
        x = self.drop(x)
        cos = sin = None
        if cfg.position == "rope":
            cos, sin = rope_cos_sin(cfg, positions, x.dtype)
        mask, is_causal = build_attention_mask(
            cfg, index, index, causal=False, q_segments=segment_ids, k_segments=segment_ids,
            key_padding=attention_mask, dtype=x.dtype)
        for block in self.layers:
            x = block(x, cos, sin, mask, is_causal)
        return x if self.final_norm is None else self.final_norm(x)

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        token_type_ids: Tensor | None = None,
        position_ids: Tensor | None = None,
        segment_ids: Tensor | None = None,
        head: str = "mlm",
        return_hidden: bool = False,
    ) -> Tensor:
        """Masked-LM logits (B, T, vocab_size); arguments as in `encode`. `head="classify"`
        returns `classify`'s class scores instead (so a wrapper such as a DeepSpeed engine,
        which only calls `forward`, can train the classification head); `return_hidden`
        what `lm_head` would read, (B, T, d_model) (for `losses.chunked_lm_loss`)."""
        if head == "classify":
            return self.classify(input_ids, attention_mask, token_type_ids)
        h = self.encode(input_ids, attention_mask, token_type_ids, position_ids, segment_ids)
        h = self.mlm_norm(_head_activation(self.cfg, self.mlm_dense(h)))
        if return_hidden:
            return h
        logits = self.lm_head(h)
        if self.cfg.padded_vocab_size != self.cfg.vocab_size:
            logits = logits[..., : self.cfg.vocab_size]
        return logits

    def classify(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        token_type_ids: Tensor | None = None,
    ) -> Tensor:
        """Sequence-classification scores (B, num_labels) from the first ([CLS]) token."""
        if self.classifier is None:
            raise ValueError("num_labels: this encoder has no classification head; "
                             "set model.num_labels to the number of classes")
        h = self.encode(input_ids, attention_mask, token_type_ids)
        pooled = torch.tanh(self.pooler(h[:, 0]))
        return self.classifier(self.drop(pooled))
