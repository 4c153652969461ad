"""RoPE scaling (model/rope.py) against transformers' own inverse frequencies and attention
factors (`modeling_rope_utils.ROPE_INIT_FUNCTIONS`) for every rope type lmforge implements."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from lmforge.model import ModelConfig
from lmforge.model.rope import rope_frequencies

SCALINGS = {
    "linear": {"rope_type": "linear", "factor": 4.0},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64},
    "yarn-mscale": {"rope_type": "yarn", "factor": 3.0, "original_max_position_embeddings": 48,
                    "beta_fast": 16, "beta_slow": 2, "mscale": 1.0, "mscale_all_dim": 0.5,
                    "truncate": False},
}


@pytest.mark.parametrize("name", sorted(SCALINGS))
def test_frequencies_match_transformers(name):
    scaling = SCALINGS[name]
    hf = LlamaConfig(hidden_size=128, num_attention_heads=2, max_position_embeddings=256,
                     rope_parameters={**scaling, "rope_theta": 50000.0})
    expected, expected_scale = ROPE_INIT_FUNCTIONS[scaling["rope_type"]](hf)
    cfg = ModelConfig(d_model=128, n_heads=2, position="rope", rope_theta=50000.0,
                      max_seq_len=256, rope_scaling=dict(scaling))
    inv_freq, scale = rope_frequencies(cfg)
    torch.testing.assert_close(inv_freq, expected, rtol=0, atol=0)
    assert scale == pytest.approx(expected_scale, rel=1e-12)
    if scaling["rope_type"] != "linear":
        assert not torch.equal(inv_freq, rope_frequencies(
            ModelConfig(d_model=128, n_heads=2, position="rope", rope_theta=50000.0))[0])


@pytest.mark.parametrize("scaling, key", [
    ({"rope_type": "dynamic", "factor": 2.0}, "rope_scaling.rope_type: 'dynamic'"),
    ({"rope_type": "longrope", "short_factor": [1.0]}, "rope_scaling.rope_type: 'longrope'"),
    ({"rope_type": "llama3", "factor": 8.0}, "rope_scaling.high_freq_factor"),
    ({"rope_type": "linear", "factor": 2.0, "beta_fast": 3}, "rope_scaling.beta_fast"),
])
def test_unknown_or_incomplete_rope_refused(scaling, key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        ModelConfig(position="rope", rope_scaling=scaling)


def test_rope_scaling_needs_rope_position():
    with pytest.raises(ValueError, match="rope_scaling: needs position: rope"):
        ModelConfig(position="learned", rope_scaling={"rope_type": "linear", "factor": 2.0})
