"""RoPE inverse frequencies and attention scaling for the rope types lmforge implements:
`default`, `linear` (position interpolation), `llama3` (Llama 3.1's band-wise scaling) and
`yarn` (YaRN, arXiv 2309.00071), computed as Hugging Face `transformers` computes them
(`modeling_rope_utils`), so imported weights give the same logits.

`check_rope_scaling` is plain Python (`ModelConfig` validates with it and must not import
torch); `rope_frequencies` imports torch when called.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from lmforge.model.config import ModelConfig

ROPE_TYPES = ("default", "linear", "llama3", "yarn")
"""Rope types lmforge implements exactly."""

# rope type -> (required keys, optional keys); rope_theta lives in ModelConfig.rope_theta.
_KEYS: dict[str, tuple[set[str], set[str]]] = {
    "default": (set(), set()),
    "linear": ({"factor"}, set()),
    "llama3": ({"factor", "low_freq_factor", "high_freq_factor",
                "original_max_position_embeddings"}, set()),
    "yarn": ({"factor", "original_max_position_embeddings"},
             {"beta_fast", "beta_slow", "attention_factor", "mscale", "mscale_all_dim",
              "truncate"}),
}


def check_rope_scaling(scaling: dict[str, Any]) -> None:
    """Raises ValueError naming the key when `scaling` is not one lmforge computes exactly.

    Args:
        scaling: `{rope_type: ..., <its parameters>}` (see `ModelConfig.rope_scaling`).
    """
    if not isinstance(scaling, dict):
        raise ValueError(f"rope_scaling: must be a mapping with rope_type, got {scaling!r}")
    rope_type = scaling.get("rope_type")
    if rope_type not in _KEYS:
        raise ValueError(f"rope_scaling.rope_type: {rope_type!r} is not supported; lmforge "
                         f"implements {', '.join(ROPE_TYPES)} exactly")
    required, optional = _KEYS[rope_type]
    missing = sorted(required - set(scaling))
    if missing:
        raise ValueError(f"rope_scaling.{missing[0]}: rope_type {rope_type} needs it")
    unknown = sorted(set(scaling) - required - optional - {"rope_type"})
    if unknown:
        raise ValueError(f"rope_scaling.{unknown[0]}: not a parameter of rope_type "
                         f"{rope_type} that lmforge implements; remove it")
    for key in required | (optional & set(scaling)):
        value = scaling[key]
        if key == "truncate":
            if not isinstance(value, bool):
                raise ValueError(f"rope_scaling.truncate: must be true or false, got {value!r}")
        elif value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                    or value <= 0):
            raise ValueError(f"rope_scaling.{key}: must be a positive number, got {value!r}")
    if rope_type == "llama3" and scaling["high_freq_factor"] <= scaling["low_freq_factor"]:
        raise ValueError("rope_scaling.high_freq_factor: must exceed low_freq_factor")


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    # YaRN paper eq. 21: 0.1 * mscale * ln(s) + 1, and 1 when not extending.
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def rope_frequencies(cfg: ModelConfig, device: torch.device | None = None
                     ) -> tuple[torch.Tensor, float]:
    """Inverse frequencies (head_dim/2,) fp32 and the factor cos/sin are multiplied by.

    Args:
        cfg: the model config (`head_dim`, `rope_theta`, `rope_scaling`).
        device: where the frequencies are made.
    """
    import torch

    d, base = cfg.head_size, cfg.rope_theta
    inv_freq = 1.0 / (base ** (torch.arange(0, d, 2, device=device, dtype=torch.float32) / d))
    scaling = cfg.rope_scaling or {"rope_type": "default"}
    rope_type = scaling["rope_type"]
    if rope_type == "default":
        return inv_freq, 1.0
    factor = float(scaling["factor"])
    if rope_type == "linear":  # position interpolation: positions / factor
        return inv_freq / factor, 1.0
    if rope_type == "llama3":
        old_len = scaling["original_max_position_embeddings"]
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        wavelen = 2 * math.pi / inv_freq
        # Long wavelengths (> old_len / low) are interpolated by `factor`, short ones
        # (< old_len / high) kept, the band between blended linearly in old_len / wavelen.
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        blended = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        return torch.where(medium, blended, scaled), 1.0
    # yarn: per-dimension blend of interpolated and extrapolated frequencies by a linear
    # ramp between the dimensions that make beta_fast and beta_slow rotations over the
    # original context; cos/sin scaled by the attention factor (mscale).
    old_len = scaling["original_max_position_embeddings"]
    attention = scaling.get("attention_factor")
    if attention is None:
        mscale, mscale_all = scaling.get("mscale"), scaling.get("mscale_all_dim")
        attention = (_yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all)
                     if mscale and mscale_all else _yarn_mscale(factor))
    beta_fast = scaling.get("beta_fast") or 32
    beta_slow = scaling.get("beta_slow") or 1

    def dim_of(rotations: float) -> float:
        return d * math.log(old_len / (rotations * 2 * math.pi)) / (2 * math.log(base))

    lo, hi = dim_of(beta_fast), dim_of(beta_slow)
    if scaling.get("truncate", True):
        lo, hi = math.floor(lo), math.ceil(hi)
    lo, hi = max(lo, 0), min(hi, d - 1)
    if lo == hi:
        hi += 0.001  # a zero-width ramp
    ramp = ((torch.arange(d // 2, dtype=torch.float32, device=device) - lo) / (hi - lo)
            ).clamp(0, 1)
    extrapolate = 1 - ramp  # 1 keeps the original frequency, 0 interpolates it
    pos_freqs = base ** (torch.arange(0, d, 2, device=device, dtype=torch.float32) / d)
    interpolated = 1.0 / (factor * pos_freqs)
    inv_freq = interpolated * (1 - extrapolate) + (1.0 / pos_freqs) * extrapolate
    return inv_freq, float(attention)
