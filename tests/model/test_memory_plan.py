"""The memory plan (model/memory.py) against hand computations and the papers' rules."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from lmforge.model import ModelConfig
from lmforge.model.memory import (
    activation_bytes,
    layer_activation_bytes,
    plan_memory,
    recompute_bytes,
)

# h=16, 4 heads of 4 (2 kv heads: hkv=8), SwiGLU f=32, RMSNorm, RoPE, 2 layers, V=100
TINY = {"vocab_size": 100, "d_model": 16, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2,
        "d_ff": 32}


def _cfg(**overrides: object) -> ModelConfig:
    return ModelConfig.from_preset("tiny", **{**TINY, **overrides})


def _psi(cfg: ModelConfig) -> int:
    return sum(p.numel() for p in cfg.build().parameters())  # tied matrices once


def test_states_follow_the_16_bytes_per_parameter_rule():
    cfg = _cfg()
    psi = _psi(cfg)
    plan = plan_memory(cfg, micro_batch=2, seq_len=10, precision="bf16", zero_stage=2,
                       world_size=4)
    assert (plan.params, plan.grads, plan.optimizer) == (2 * psi, 2 * psi / 4, 12 * psi / 4)
    z0 = plan_memory(cfg, micro_batch=2, seq_len=10, precision="bf16")
    assert z0.params + z0.grads + z0.optimizer == 16 * psi  # ZeRO paper, Ψ(2 + 2 + K=12)
    fp32 = plan_memory(cfg, micro_batch=2, seq_len=10, precision="fp32")
    assert (fp32.params, fp32.grads, fp32.optimizer) == (4 * psi, 4 * psi, 8 * psi)
    off = plan_memory(cfg, micro_batch=2, seq_len=10, precision="fp32", zero_stage=3,
                      world_size=2, offload_optimizer=True, offload_params=True)
    # DeepSpeed's ZeRO optimizers keep their own fp32 partition even in fp32: 4 + 4 + 4
    assert (off.params, off.grads, off.optimizer) == (0, 4 * psi / 2, 0)
    assert off.host == 4 * psi / 2 + 12 * psi / 2


def test_activations_by_hand():
    """bf16 (e=2), 2 x 10 tokens. Per token and layer: each RMSNorm 16·(4+2)=96; attention
    96 + 2·(16 + (16+2·8) + 16) + 4·4 + RoPE 2·(16+8) = 288; MLP 96 + 2·(16 + 4·32) = 384:
    672. Head: final norm 96 + lm_head input 2·16 = 128."""
    cfg = _cfg()
    tokens = 20
    assert layer_activation_bytes(cfg, 2, 10) == 672
    assert activation_bytes(cfg, 2, 10, "bf16") == 2 * 672 * tokens + 128 * tokens
    # full: each block keeps its input (2·16 per token); one block (672) is recomputed at a
    # time, during its own backward
    assert activation_bytes(cfg, 2, 10, "bf16", "full") == 2 * 32 * tokens + 128 * tokens
    assert recompute_bytes(cfg, 2, 10, "bf16", "full") == 672 * tokens
    # selective: block.attn keeps its input only, dropping qkv out, rotated q/k, SDPA out, lse
    attn_inner = 2 * (32 + 16 + 24) + 16
    assert activation_bytes(cfg, 2, 10, "bf16", "selective") == \
        2 * (672 - attn_inner) * tokens + 128 * tokens
    assert recompute_bytes(cfg, 2, 10, "bf16", "selective") == attn_inner * tokens
    assert recompute_bytes(cfg, 2, 10, "bf16") == 0
    # every second block wrapped: block 1 keeps all 672, block 0 its input
    assert activation_bytes(cfg, 2, 10, "bf16", "full", every_n_layers=2) == \
        (672 + 32 + 128) * tokens
    plan = plan_memory(cfg, micro_batch=2, seq_len=10)
    assert plan.logits == tokens * 100 * 12  # log-softmax out, its grad in and grad out
    chunked = plan_memory(cfg, micro_batch=2, seq_len=10, loss_chunk_tokens=8)
    assert chunked.logits == 8 * 100 * 12
    assert plan.device_total == plan.params + plan.grads + plan.optimizer \
        + plan.activations + plan.logits


def test_recomputed_block_and_logits_do_not_add_up():
    """The loss's backward (logits) ends before the first checkpointed block is recomputed:
    the peak holds the kept activations plus the larger of the two (hand computation:
    bf16, 2 x 10 tokens, V=100: logits 20·100·12 = 24,000 B; one block 672·20 = 13,440 B)."""
    cfg = _cfg()
    full = plan_memory(cfg, micro_batch=2, seq_len=10, activation_checkpointing="full")
    assert (full.logits, full.recompute) == (24_000, 13_440)
    states = full.params + full.grads + full.optimizer
    assert full.device_total == states + full.activations + 24_000
    # a vocabulary of 20 makes the block the larger one (logits 4,800 B)
    small = plan_memory(_cfg(vocab_size=20), micro_batch=2, seq_len=10,
                        activation_checkpointing="full")
    assert small.logits == 4_800
    assert small.device_total == small.params + small.grads + small.optimizer \
        + small.activations + 13_440
    # post-backward transients win only when larger than both
    late = dataclasses.replace(full, transient=10**6)
    assert late.device_total == states + 10**6


def test_gpt_layer_is_korthikanti_34_sbh():
    """Korthikanti et al. 2022, eq. (1): 34·s·b·h + 5·a·s²·b per layer (16-bit, LayerNorm,
    4h GeLU MLP, dropout). lmforge adds only SDPA's log-sum-exp (4 bytes per head)."""
    h, a, s = 64, 4, 32
    cfg = ModelConfig.from_preset("gpt2-124m", vocab_size=100, d_model=h, n_heads=a,
                                  n_layers=2, dropout=0.1)
    assert layer_activation_bytes(cfg, 2, s) == 34 * h + 5 * a * s + 4 * a


@pytest.mark.parametrize("family, extra", [("decoder", {}), ("encoder", {}),
                                           ("decoder", {"head_dim": 32})])  # q width 128
def test_activations_match_what_autograd_saves(family, extra):
    """The formula against the bytes of every distinct storage autograd saves (fp32)."""
    cfg = _cfg(family=family, d_model=64, d_ff=128, vocab_size=64, **extra)
    model = cfg.build()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=torch.randint(0, 64, (2, 64)), return_hidden=True)
    measured = sum(saved.values())
    assert activation_bytes(cfg, 2, 64, "fp32") == pytest.approx(measured, rel=0.05)


def test_bad_stage_is_refused():
    with pytest.raises(ValueError, match="^zero_stage"):
        plan_memory(_cfg(), micro_batch=1, seq_len=8, zero_stage=4)
