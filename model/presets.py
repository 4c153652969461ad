"""Named model presets: plain data, one place. Use `ModelConfig.from_preset(name, **overrides)`.

`vocab_size` is None where the run's own tokenizer decides it (tiny, llama-*); the
published models keep their published vocabularies so their parameter counts can be
checked against the papers (tests/model/test_counts.py states the exact numbers).
"""

from __future__ import annotations

from typing import Any

_LLAMA: dict[str, Any] = {
    "family": "decoder",
    "position": "rope",
    "norm": "rmsnorm",
    "norm_position": "pre",
    "activation": "swiglu",
    "bias": False,
    "tie_embeddings": False,
    "init": "llama",
    "norm_eps": 1e-5,
    "rope_theta": 10000.0,
}

_POST_NORM_ENCODER: dict[str, Any] = {
    "position": "learned",
    "norm": "layernorm",
    "norm_position": "post",
    "activation": "gelu",
    "bias": True,
    "tie_embeddings": True,
    "embedding_norm": True,
}

_TRANSFORMER_2017: dict[str, Any] = {
    "family": "encoder_decoder",
    # Shared source/target BPE vocabulary of about 37000 tokens (paper, section 5.1).
    "vocab_size": 37000,
    "n_layers": 6,
    "max_seq_len": 1024,
    "position": "sinusoidal",
    "norm": "layernorm",
    "norm_position": "post",
    "norm_eps": 1e-6,
    "activation": "relu",
    "bias": True,
    "tie_embeddings": True,
    "scale_embeddings": True,
    "init": "xavier",
}

PRESETS: dict[str, dict[str, Any]] = {
    # Llama-style and small enough to train a few hundred steps on 2 CPU cores at seq 128.
    "tiny": {**_LLAMA, "d_model": 128, "n_layers": 4, "n_heads": 4, "n_kv_heads": 2,
             "d_ff": 384, "max_seq_len": 512},
    "gpt2-124m": {
        "family": "decoder", "vocab_size": 50257, "d_model": 768, "n_layers": 12,
        "n_heads": 12, "max_seq_len": 1024, "position": "learned", "norm": "layernorm",
        "norm_position": "pre", "norm_eps": 1e-5, "activation": "gelu_tanh", "bias": True,
        "tie_embeddings": True, "init": "gpt2",
    },
    "llama-125m": {**_LLAMA, "d_model": 768, "n_layers": 12, "n_heads": 12, "n_kv_heads": 4,
                   "max_seq_len": 2048},
    "llama-350m": {**_LLAMA, "d_model": 1024, "n_layers": 24, "n_heads": 16, "n_kv_heads": 8,
                   "max_seq_len": 2048},
    # TinyLlama-1.1B shape.
    "llama-1b": {**_LLAMA, "d_model": 2048, "n_layers": 22, "n_heads": 32, "n_kv_heads": 4,
                 "d_ff": 5632, "max_seq_len": 2048},
    "bert-base": {
        **_POST_NORM_ENCODER, "family": "encoder", "vocab_size": 30522, "d_model": 768,
        "n_layers": 12, "n_heads": 12, "max_seq_len": 512, "type_vocab_size": 2,
        "norm_eps": 1e-12, "dropout": 0.1, "init": "bert",
    },
    "transformer-base": {**_TRANSFORMER_2017, "d_model": 512, "n_heads": 8, "d_ff": 2048,
                         "dropout": 0.1},
    "transformer-big": {**_TRANSFORMER_2017, "d_model": 1024, "n_heads": 16, "d_ff": 4096,
                        "dropout": 0.3},
    # BART-like denoising encoder-decoder (bart-base layout at half the width).
    "bart-small": {
        **_POST_NORM_ENCODER, "family": "encoder_decoder", "vocab_size": 50265, "d_model": 512,
        "n_layers": 6, "n_heads": 8, "d_ff": 2048, "max_seq_len": 1024, "dropout": 0.1,
        "init": "bert",
    },
}
