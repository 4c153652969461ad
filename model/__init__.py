"""lmforge.model: single-device PyTorch transformers (decoder, encoder, encoder-decoder).

The names below load on first use (PEP 562): `lmforge.model.config` (ModelConfig, the
`model` section of a run config) is plain Python, and a command that only reads configs
(`lmforge prepare`) must not pay for importing torch (~2 s).

Plain single-device PyTorch: no DeepSpeed, Ray, MLflow or torch.distributed.
May import: torch
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import nn

    from lmforge.model.config import ModelConfig

# name -> the submodule that defines it
_EXPORTS = {
    "ModelConfig": "config",
    "DecoderLM": "decoder",
    "segment_positions": "decoder",
    "EncoderModel": "encoder",
    "EncoderDecoderModel": "encoder_decoder",
    "estimate_flops": "estimates",
    "estimate_hardware_flops": "estimates",
    "mfu": "estimates",
    "MemoryPlan": "memory",
    "plan_memory": "memory",
    "parameter_count": "estimates",
    "generate": "generation",
    "generate_seq2seq": "generation",
    "sample_next": "generation",
    "from_hf": "hf",
    "hf_architecture": "hf_classes",
    "hf_mismatch": "hf_classes",
    "to_hf": "hf",
    "KVCache": "layers",
    "causal_lm_loss": "losses",
    "chunked_lm_loss": "losses",
    "denoising_inputs": "objective_inputs",
    "masked_lm_inputs": "objective_inputs",
    "masked_lm_loss": "losses",
    "shift_right": "objective_inputs",
    "PRESETS": "presets",
}


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f"lmforge.model.{_EXPORTS[name]}"), name)
        globals()[name] = value  # found once; later lookups do not come here
        return value
    raise AttributeError(f"module 'lmforge.model' has no attribute {name!r}")


def build_model(cfg: ModelConfig) -> nn.Module:
    """Build and initialise the model `cfg` describes (same as `cfg.build()`)."""
    return cfg.build()


__all__ = sorted([*_EXPORTS, "build_model"])
