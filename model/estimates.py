"""Functions of the config alone: parameter count and training FLOPs (MFU/HFU); the memory
plan per rank is `model/memory.py` (`plan_memory`).

FLOPs follow PaLM appendix B: 6N + 12·L·H·Q·T per token for a forward and backward pass,
where N counts the parameters that take part in matrix multiplies (a tied embedding is
counted once, as the output projection; untied input embeddings, position and token-type
tables are lookups and excluded), H the query heads (grouped-query attention shrinks N,
not the attention term), Q the head dim and T the attended length. Causal masking is not
discounted, as in PaLM.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch.overrides import TorchFunctionMode

from lmforge.model.config import ModelConfig

Checkpointing = Literal["none", "full", "selective"]


# The random initialisers a module's constructor calls. On the meta device their kernels are
# Python decompositions behind `torch._disable_dynamo`, whose first call imports
# `torch._dynamo` and inductor (~2 s of every training start, for values that do not exist).
_INITIALISERS = frozenset({
    torch.Tensor.normal_, torch.Tensor.uniform_, torch.nn.init.normal_,
    torch.nn.init.uniform_, torch.nn.init.trunc_normal_, torch.nn.init.kaiming_uniform_,
    torch.nn.init.kaiming_normal_, torch.nn.init.xavier_uniform_, torch.nn.init.xavier_normal_,
})


class _SkipInitialisers(TorchFunctionMode):
    """Returns the tensor untouched for the random initialisers; every other call runs."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _INITIALISERS:
            return args[0] if args else kwargs["tensor"]
        return func(*args, **kwargs)


def _meta_model(cfg: ModelConfig) -> torch.nn.Module:
    with torch.device("meta"), _SkipInitialisers():
        return cfg.build()


def parameter_count(cfg: ModelConfig) -> int:
    """Number of distinct parameters of the model `cfg` builds (tied matrices count once).

    Built on the meta device, so it costs no memory and always agrees with `build()`.
    Vocabulary padding rows, if any, are counted (they exist in the model).
    """
    return sum(p.numel() for p in _meta_model(cfg).parameters())


@dataclass
class _Groups:
    source: int = 0  # matmul parameters applied to every source/encoder token
    target: int = 0  # ... to every target/decoder token (all tokens of one-stack models)
    block_fwd_source: int = 0  # block parameters (recomputed under full checkpointing)
    block_fwd_target: int = 0
    self_attn_source: int = 0  # block.attn parameters (recomputed under selective)
    self_attn_target: int = 0


def _groups(cfg: ModelConfig) -> _Groups:
    g = _Groups()
    lookups = ("pos_emb.", "enc_pos_emb.", "dec_pos_emb.", "type_emb.")
    for name, p in _meta_model(cfg).named_parameters():
        n = p.numel()
        if name.startswith(lookups) or (name.startswith("tok_emb.") and not cfg.tie_embeddings):
            continue
        if name.startswith(("pooler.", "classifier.")):
            continue  # applied once per sequence, not per token
        source = name.startswith(("encoder.", "enc_")) or ".cross_attn.kv." in name
        if source:
            g.source += n
        else:
            g.target += n
        top = name.split(".")[0]
        if top in ("layers", "encoder", "decoder"):
            if source:  # encoder blocks, and decoder cross-attention k/v over the source
                g.block_fwd_source += n
            else:
                g.block_fwd_target += n
            if ".attn." in name:  # self-attention only (cross-attention is `.cross_attn.`)
                if top == "encoder":
                    g.self_attn_source += n
                else:
                    g.self_attn_target += n
    return g


def _attention_flops(cfg: ModelConfig, S: int, T: int, factor: int) -> float:
    """`factor`·L·H·Q summed over every (query, key) pair of every attention layer."""
    hq = cfg.n_heads * cfg.head_size
    if cfg.family == "encoder_decoder":
        pairs = cfg.encoder_layers * S * S + cfg.decoder_layers * (T * T + T * S)
    else:
        pairs = cfg.n_layers * T * T
    return factor * hq * pairs


def _tokens(cfg: ModelConfig, seq_len: int, tgt_len: int | None) -> tuple[int, int, int]:
    if cfg.family == "encoder_decoder":
        T = seq_len if tgt_len is None else tgt_len
        return seq_len, T, seq_len + T
    return 0, seq_len, seq_len


def estimate_flops(cfg: ModelConfig, seq_len: int, tgt_len: int | None = None) -> float:
    """Model FLOPs per token of one training step (forward + backward), for MFU.

    Args:
        cfg: model config.
        seq_len: tokens per sequence (the source length of an encoder-decoder).
        tgt_len: target length of an encoder-decoder (default `seq_len`).

    Returns:
        FLOPs per token; for an encoder-decoder a "token" is a source or target token:
        FLOPs of one (source, target) pair divided by seq_len + tgt_len.
    """
    S, T, tokens = _tokens(cfg, seq_len, tgt_len)
    g = _groups(cfg)
    total = 6 * (g.source * S + g.target * T) + _attention_flops(cfg, S, T, 12)
    return total / tokens


def estimate_hardware_flops(cfg: ModelConfig, seq_len: int, activation_checkpointing: Checkpointing,
                            tgt_len: int | None = None) -> float:
    """Hardware FLOPs per token (for HFU): model FLOPs plus recomputed forwards.

    "full" re-runs every block's forward (2N_blocks + 4·L·H·Q·T per token); "selective"
    re-runs each block's self-attention submodule (`block.attn`: its projections and the
    4·L·H·Q·T score/value products). Embeddings and the output head are never recomputed.
    """
    S, T, tokens = _tokens(cfg, seq_len, tgt_len)
    extra = 0.0
    if activation_checkpointing != "none":
        g = _groups(cfg)
        if activation_checkpointing == "full":
            extra = 2 * (g.block_fwd_source * S + g.block_fwd_target * T) \
                + _attention_flops(cfg, S, T, 4)
        else:
            self_pairs = _attention_flops(cfg, S, T, 4)
            if cfg.family == "encoder_decoder":  # cross-attention is not in block.attn
                self_pairs -= 4 * cfg.n_heads * cfg.head_size * cfg.decoder_layers * T * S
            extra = 2 * (g.self_attn_source * S + g.self_attn_target * T) + self_pairs
    return estimate_flops(cfg, seq_len, tgt_len) + extra / tokens


def mfu(tokens_per_second: float, flops_per_token: float, peak_flops: float) -> float:
    """Model (or hardware) FLOPs utilisation: achieved FLOP/s ÷ peak FLOP/s.

    Args:
        tokens_per_second: training throughput per device.
        flops_per_token: `estimate_flops` (MFU) or `estimate_hardware_flops` (HFU).
        peak_flops: the device's dense peak, e.g. 989e12 for H100 SXM bf16.
    """
    return tokens_per_second * flops_per_token / peak_flops
