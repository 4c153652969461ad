"""Encoder-decoder model (the 2017 Transformer, BART): a bidirectional encoder, a causal
decoder with cross-attention, teacher forcing through `decoder_input_ids`."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from lmforge.model.layers import (
    MLP,
    Attention,
    Block,
    KVCache,
    LayerCache,
    build_attention_mask,
    init_weights,
    make_norm,
    rope_cos_sin,
    sinusoidal_embedding,
)

if TYPE_CHECKING:
    from lmforge.model.config import ModelConfig  # annotations only: config.build() imports us


class CrossBlock(nn.Module):
    """Causal self-attention, cross-attention to the encoder output, feed-forward."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.pre_norm = cfg.norm_position == "pre"
        self.attn_norm = make_norm(cfg)
        self.attn = Attention(cfg)
        self.cross_norm = make_norm(cfg)
        self.cross_attn = Attention(cfg, cross=True)
        self.mlp_norm = make_norm(cfg)
        self.mlp = MLP(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor, cos: Tensor | None, sin: Tensor | None, mask: Tensor | None,
                is_causal: bool, memory: Tensor, memory_mask: Tensor | None,
                cache: LayerCache | None = None, cross_cache: LayerCache | None = None) -> Tensor:
        def cross(h: Tensor) -> Tensor:
            return self.cross_attn(h, None, None, memory_mask, False, cross_cache, memory)

        if self.pre_norm:
            x = x + self.drop(self.attn(self.attn_norm(x), cos, sin, mask, is_causal, cache))
            x = x + self.drop(cross(self.cross_norm(x)))
            return x + self.drop(self.mlp(self.mlp_norm(x)))
        x = self.attn_norm(x + self.drop(self.attn(x, cos, sin, mask, is_causal, cache)))
        x = self.cross_norm(x + self.drop(cross(x)))
        return self.mlp_norm(x + self.drop(self.mlp(x)))


class EncoderDecoderModel(nn.Module):
    """Sequence-to-sequence model; one token embedding shared by encoder, decoder and
    (when `tie_embeddings`) the output projection.

    State-dict names: `tok_emb`, `enc_pos_emb`/`dec_pos_emb` (learned positions),
    `enc_emb_norm`/`dec_emb_norm`, `encoder.{i}.*` (`Block`), `decoder.{i}.*` (`CrossBlock`:
    `attn`, `cross_attn.q`, `cross_attn.kv`, ...), `enc_final_norm`/`dec_final_norm`
    (pre-norm only), `lm_head`.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.padded_vocab_size, cfg.d_model)
        if cfg.position == "learned":
            self.enc_pos_emb = nn.Embedding(cfg.max_seq_len, cfg.d_model)
            self.dec_pos_emb = nn.Embedding(cfg.max_seq_len, cfg.d_model)
        self.enc_emb_norm = make_norm(cfg) if cfg.embedding_norm else None
        self.dec_emb_norm = make_norm(cfg) if cfg.embedding_norm else None
        self.drop = nn.Dropout(cfg.dropout)
        self.encoder = nn.ModuleList(Block(cfg) for _ in range(cfg.encoder_layers))
        self.decoder = nn.ModuleList(CrossBlock(cfg) for _ in range(cfg.decoder_layers))
        pre = cfg.norm_position == "pre"
        self.enc_final_norm = make_norm(cfg) if pre else None
        self.dec_final_norm = make_norm(cfg) if pre else None
        self.lm_head = nn.Linear(cfg.d_model, cfg.padded_vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
            self.lm_head.tied_to_embedding = True
        init_weights(self, cfg)

    def blocks(self) -> list[nn.Module]:
        """Encoder then decoder blocks, for activation checkpointing applied from outside."""
        return [*self.encoder, *self.decoder]

    def new_cache(self, max_len: int) -> KVCache:
        """Empty decoder cache (self- and cross-attention) for up to `max_len` target tokens."""
        return KVCache(len(self.decoder), max_len, cross=True)

    def _embed(self, ids: Tensor, positions: Tensor, pos_emb: str, norm: nn.Module | None
               ) -> Tensor:
        cfg = self.cfg
        if cfg.position == "learned" and int(positions.max()) >= cfg.max_seq_len:
            raise ValueError(f"max_seq_len: position {int(positions.max())} exceeds the learned "
                             f"position table ({cfg.max_seq_len}); shorten the input")
        x = self.tok_emb(ids)
        if cfg.scale_embeddings:
            x = x * cfg.d_model ** 0.5
        if cfg.position == "learned":
            x = x + getattr(self, pos_emb)(positions)
        elif cfg.position == "sinusoidal":
            x = x + sinusoidal_embedding(positions, cfg.d_model, x.dtype)
        if norm is not None:
            x = norm(x)
        return self.drop(x)

    def encode(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Encoder output (B, S, d_model); `attention_mask` (B, S) is 1 for real tokens."""
        B, S = input_ids.shape
        index = torch.arange(S, device=input_ids.device)[None]
        x = self._embed(input_ids, index, "enc_pos_emb", self.enc_emb_norm)
        cos = sin = None
        if self.cfg.position == "rope":
            cos, sin = rope_cos_sin(self.cfg, index, x.dtype)
        mask, is_causal = build_attention_mask(self.cfg, index, index, causal=False,
                                               key_padding=attention_mask, dtype=x.dtype)
        for block in self.encoder:
            x = block(x, cos, sin, mask, is_causal)
        return x if self.enc_final_norm is None else self.enc_final_norm(x)

    def decode(
        self,
        decoder_input_ids: Tensor,
        memory: Tensor,
        attention_mask: Tensor | None = None,
        cache: KVCache | None = None,
        return_hidden: bool = False,
    ) -> Tensor:
        """Decoder logits (B, T, vocab_size) given the encoder output `memory` (B, S, d).

        Args:
            decoder_input_ids: (B, T) target tokens shifted right (teacher forcing).
            memory: encoder output.
            attention_mask: (B, S) source padding mask, 1 for real tokens.
            cache: KV cache from `new_cache` for incremental decoding; filled in place.
            return_hidden: return what `lm_head` would read, (B, T, d_model), instead of
                the logits (for `losses.chunked_lm_loss`).
        """
        cfg = self.cfg
        B, T = decoder_input_ids.shape
        offset = cache.length if cache is not None else 0
        index = torch.arange(offset, offset + T, device=decoder_input_ids.device)[None]
        x = self._embed(decoder_input_ids, index, "dec_pos_emb", self.dec_emb_norm)
        cos = sin = None
        if cfg.position == "rope":
            cos, sin = rope_cos_sin(cfg, index, x.dtype)
        k_index = torch.arange(offset + T, device=x.device)[None]
        mask, is_causal = build_attention_mask(cfg, index, k_index, causal=True, dtype=x.dtype)
        memory_mask = None
        if attention_mask is not None:
            memory_mask = attention_mask[:, None, None, :].bool()  # (B, 1, 1, S)
        for i, block in enumerate(self.decoder):
            layer_cache = cross_cache = None
            if cache is not None:
                layer_cache, cross_cache = cache.layers[i], cache.cross[i]
            x = block(x, cos, sin, mask, is_causal, memory, memory_mask, layer_cache, cross_cache)
        if self.dec_final_norm is not None:
            x = self.dec_final_norm(x)
        if return_hidden:
            return x
        logits = self.lm_head(x)
        if cfg.padded_vocab_size != cfg.vocab_size:
            logits = logits[..., : cfg.vocab_size]
        return logits

    def forward(
        self,
        input_ids: Tensor,
        decoder_input_ids: Tensor,
        attention_mask: Tensor | None = None,
        return_hidden: bool = False,
    ) -> Tensor:
        """Teacher-forced logits (B, T, vocab_size) for `decoder_input_ids` given the source
        (`return_hidden`: the decoder's (B, T, d_model) hidden states `lm_head` would read).

        Args:
            input_ids: (B, S) source tokens.
            decoder_input_ids: (B, T) targets shifted right (see `objectives.shift_right`).
            attention_mask: (B, S) source padding mask, 1 for real tokens.
        """
        return self.decode(decoder_input_ids, self.encode(input_ids, attention_mask),
                           attention_mask, return_hidden=return_hidden)
