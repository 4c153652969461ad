"""Weight and config mapping of the Llama-layout decoders: `LlamaForCausalLM`,
`MistralForCausalLM`, `Qwen2ForCausalLM` (q/k/v biases) and `Qwen3ForCausalLM` (per-head q/k
RMSNorm). They share Hugging Face weight names; dispatched from `hf.to_hf` / `hf.from_hf`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from lmforge.model.config import ModelConfig

MODEL_TYPE_OF = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral",
                 "Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3"}
"""The Llama-layout classes lmforge exports, with their model_type."""


def _need(sd: dict[str, Tensor], key: str) -> Tensor:
    if key not in sd:
        raise ValueError(f"state_dict: weight {key!r} is missing; was the checkpoint saved "
                         "from a model built with this config?")
    return sd[key]


def _suffixes(cfg: ModelConfig) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(suffixes of q/k/v, suffixes of o_proj and the MLP)."""
    rest = ("weight", "bias") if cfg.bias else ("weight",)
    qkv_bias = cfg.bias if cfg.qkv_bias is None else cfg.qkv_bias
    return (("weight", "bias") if qkv_bias else ("weight",)), rest


def _pairs(cfg: ModelConfig, i: int) -> list[tuple[str, str]]:
    """(lmforge name, HF name) of layer i's one-to-one tensors."""
    src, dst = f"layers.{i}.", f"model.layers.{i}."
    qkv, rest = _suffixes(cfg)
    pairs = [(src + "attn_norm.weight", dst + "input_layernorm.weight"),
             (src + "mlp_norm.weight", dst + "post_attention_layernorm.weight")]
    pairs += [(f"{src}attn.out.{s}", f"{dst}self_attn.o_proj.{s}") for s in rest]
    pairs += [(f"{src}mlp.down.{s}", f"{dst}mlp.down_proj.{s}") for s in rest]
    if cfg.qk_norm:
        pairs += [(f"{src}attn.{n}_norm.weight", f"{dst}self_attn.{n}_norm.weight") for n in "qk"]
    return pairs


def llama_to_hf(cfg: ModelConfig, sd: dict[str, Tensor], arch: str
                ) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """lmforge decoder -> config and state dict of `arch` (a key of `MODEL_TYPE_OF`); the
    config starts from `cfg.hf_config` (an imported model's) so its other fields are kept."""
    V, q_dim, kv_dim = cfg.vocab_size, cfg.n_heads * cfg.head_size, cfg.kv_heads * cfg.head_size
    out = {"model.embed_tokens.weight": _need(sd, "tok_emb.weight")[:V],
           "model.norm.weight": _need(sd, "final_norm.weight")}
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = _need(sd, "lm_head.weight")[:V]
    qkv, rest = _suffixes(cfg)
    for i in range(cfg.n_layers):
        src, dst = f"layers.{i}.", f"model.layers.{i}."
        for ours, theirs in _pairs(cfg, i):
            out[theirs] = _need(sd, ours)
        for s in qkv:
            q, k, v = _need(sd, f"{src}attn.qkv.{s}").split((q_dim, kv_dim, kv_dim))
            out.update({f"{dst}self_attn.q_proj.{s}": q, f"{dst}self_attn.k_proj.{s}": k,
                        f"{dst}self_attn.v_proj.{s}": v})
        for s in rest:
            gate, up = _need(sd, f"{src}mlp.gate_up.{s}").chunk(2)
            out[f"{dst}mlp.gate_proj.{s}"], out[f"{dst}mlp.up_proj.{s}"] = gate, up
    rope = {"rope_theta": cfg.rope_theta, **(cfg.rope_scaling or {"rope_type": "default"})}
    source = dict(cfg.hf_config or {})
    if source.get("architectures", [arch])[0] != arch:
        source = {}  # another class's fields would not apply
    config = {
        **source,
        "model_type": MODEL_TYPE_OF[arch], "vocab_size": V, "hidden_size": cfg.d_model,
        "intermediate_size": cfg.ffn_dim, "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.kv_heads,
        "head_dim": cfg.head_size, "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta, "rope_parameters": rope,
        "tie_word_embeddings": cfg.tie_embeddings, "attention_dropout": cfg.dropout,
    }
    if source.get("rope_scaling"):  # an older config.json: keep both spellings in agreement
        config["rope_scaling"] = dict(rope)
    if arch == "LlamaForCausalLM":
        config.update(attention_bias=cfg.bias, mlp_bias=cfg.bias)
    elif arch == "Qwen3ForCausalLM":
        config["attention_bias"] = False
    if arch == "MistralForCausalLM":  # absent, MistralConfig would default to a 4096 window
        config["sliding_window"] = config.get("sliding_window")
    config.setdefault("initializer_range", cfg.init_std)
    return config, out


def llama_from_hf(cfg: ModelConfig, sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """A Llama-layout HF state dict under lmforge names (`cfg` from `model_config_from_hf`)."""
    out = {"tok_emb.weight": _need(sd, "model.embed_tokens.weight"),
           "final_norm.weight": _need(sd, "model.norm.weight")}
    out["lm_head.weight"] = (out["tok_emb.weight"] if cfg.tie_embeddings
                             else _need(sd, "lm_head.weight"))
    qkv, rest = _suffixes(cfg)
    for i in range(cfg.n_layers):
        src, dst = f"model.layers.{i}.", f"layers.{i}."
        for ours, theirs in _pairs(cfg, i):
            out[ours] = _need(sd, theirs)
        for s in qkv:
            out[f"{dst}attn.qkv.{s}"] = torch.cat(
                [_need(sd, f"{src}self_attn.{p}_proj.{s}") for p in "qkv"])
        for s in rest:
            out[f"{dst}mlp.gate_up.{s}"] = torch.cat(
                [_need(sd, f"{src}mlp.{p}_proj.{s}") for p in ("gate", "up")])
    return out
