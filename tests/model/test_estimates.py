"""FLOP estimates and parameter counts against hand-computed values (the memory plan:
tests/model/test_memory_plan.py)."""

from __future__ import annotations

import pytest

from lmforge.model import (
    ModelConfig,
    estimate_flops,
    estimate_hardware_flops,
    mfu,
    parameter_count,
)


def test_gpt2_flops_palm_formula() -> None:
    cfg = ModelConfig.from_preset("gpt2-124m")
    n = 124_439_808 - 1024 * 768  # tied wte is the output matmul; wpe is a lookup
    assert estimate_flops(cfg, 1024) == 6 * n + 12 * 12 * 12 * 64 * 1024


def test_untied_gqa_flops() -> None:
    # d 64, 2 layers, 4 query heads of 16, 1 kv head, swiglu d_ff 96, vocab 100, untied.
    cfg = ModelConfig.from_preset("tiny", vocab_size=100, d_model=64, n_layers=2, n_heads=4,
                                  n_kv_heads=1, d_ff=96)
    attn = 64 * (64 + 2 * 16) + 64 * 64
    mlp = 3 * 64 * 96
    norms = 2 * 64
    n = 2 * (attn + mlp + norms) + 64 + 100 * 64  # + final norm + lm_head; input emb excluded
    assert estimate_flops(cfg, 32) == 6 * n + 12 * 2 * 4 * 16 * 32
    # Full recompute adds one forward of the blocks; selective only block.attn.
    full = estimate_hardware_flops(cfg, 32, "full")
    assert full == estimate_flops(cfg, 32) + 2 * 2 * (attn + mlp + norms) + 4 * 2 * 64 * 32
    sel = estimate_hardware_flops(cfg, 32, "selective")
    assert sel == estimate_flops(cfg, 32) + 2 * 2 * attn + 4 * 2 * 64 * 32
    assert estimate_hardware_flops(cfg, 32, "none") == estimate_flops(cfg, 32)


def test_explicit_head_dim_flops() -> None:
    # Qwen3-0.6B's shape in small: d 64, 4 query heads of 32 (q width 128), 2 kv heads,
    # q/k norms of 32, swiglu d_ff 96, vocab 100, untied.
    cfg = ModelConfig.from_preset("tiny", vocab_size=100, d_model=64, n_layers=2, n_heads=4,
                                  n_kv_heads=2, d_ff=96, head_dim=32, qk_norm=True)
    attn = 64 * (128 + 2 * 64) + 128 * 64 + 2 * 32
    n = 2 * (attn + 3 * 64 * 96 + 2 * 64) + 64 + 100 * 64
    assert parameter_count(cfg) == n + 100 * 64
    assert estimate_flops(cfg, 32) == 6 * n + 12 * 2 * 4 * 32 * 32


def test_encoder_decoder_flops() -> None:
    # 1 encoder + 1 decoder layer, d 32, 2 heads, relu d_ff 64, vocab 50, tied, sinusoidal.
    cfg = ModelConfig.from_preset("transformer-base", vocab_size=50, d_model=32, n_heads=2,
                                  d_ff=64, n_layers=1)
    attn = 4 * 32 * 32 + 4 * 32
    mlp = 2 * 32 * 64 + 64 + 32
    norm = 2 * 32
    enc = attn + mlp + 2 * norm
    cross_kv = 2 * 32 * 32 + 2 * 32
    dec = 2 * attn - cross_kv + mlp + 3 * norm + 50 * 32  # + tied output projection
    S, T = 20, 10
    total = 6 * ((enc + cross_kv) * S + dec * T) + 12 * 32 * (S * S + T * T + T * S)
    assert estimate_flops(cfg, S, tgt_len=T) == total / (S + T)


def test_mfu_helper() -> None:
    assert mfu(1000.0, 6e9, 1e13) == pytest.approx(0.6)
