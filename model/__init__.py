"""lmforge.model: single-device PyTorch transformers (decoder, encoder, encoder-decoder)."""

from __future__ import annotations

from torch import nn

from lmforge.model.config import ModelConfig
from lmforge.model.decoder import DecoderLM, segment_positions
from lmforge.model.encoder import EncoderModel
from lmforge.model.encoder_decoder import EncoderDecoderModel
from lmforge.model.estimates import (
    MemoryEstimate,
    estimate_flops,
    estimate_hardware_flops,
    estimate_memory,
    mfu,
    parameter_count,
)
from lmforge.model.generate import generate, generate_seq2seq, sample_next
from lmforge.model.hf import from_hf, hf_architecture, hf_mismatch, to_hf
from lmforge.model.layers import KVCache
from lmforge.model.objectives import (
    causal_lm_loss,
    denoising_inputs,
    masked_lm_inputs,
    masked_lm_loss,
    shift_right,
)
from lmforge.model.presets import PRESETS


def build_model(cfg: ModelConfig) -> nn.Module:
    """Build and initialise the model `cfg` describes (same as `cfg.build()`)."""
    return cfg.build()


__all__ = [
    "PRESETS",
    "DecoderLM",
    "EncoderDecoderModel",
    "EncoderModel",
    "KVCache",
    "MemoryEstimate",
    "ModelConfig",
    "build_model",
    "causal_lm_loss",
    "denoising_inputs",
    "estimate_flops",
    "estimate_hardware_flops",
    "estimate_memory",
    "from_hf",
    "generate",
    "generate_seq2seq",
    "hf_architecture",
    "hf_mismatch",
    "masked_lm_inputs",
    "masked_lm_loss",
    "mfu",
    "parameter_count",
    "sample_next",
    "segment_positions",
    "shift_right",
    "to_hf",
]
