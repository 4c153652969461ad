"""A Hugging Face `config.json` as a `ModelConfig` (torch-free: `--dry-run` and the config
loader read it before any process starts).

Every field lmforge cannot represent exactly is refused, naming its config.json key: an
unknown `model_type`, a sliding window, a rope type other than default/linear/llama3/yarn,
biases on some projections only, and so on.
The weight mapping is in hf.py (GPT-2), hf_llama.py (Llama, Mistral, Qwen2, Qwen3) and
hf_seq.py (BERT, BART).
"""

from __future__ import annotations

from typing import Any

from lmforge.model.config import ModelConfig
from lmforge.model.rope import ROPE_TYPES

LLAMA_LIKE = ("llama", "mistral", "qwen2", "qwen3")
"""Model types with Llama's layout (pre-RMSNorm, RoPE, SwiGLU, GQA) and weight names."""
MODEL_TYPES = (*LLAMA_LIKE, "gpt2", "bert", "bart")
"""Every `model_type` lmforge imports."""

ACT_FROM_HF = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh",
               "relu": "relu"}


def _get(config: dict[str, Any], key: str) -> Any:
    if key not in config:
        raise ValueError(f"{key}: missing from config.json; is this a complete Hugging Face "
                         "model folder?")
    return config[key]


def _activation(config: dict[str, Any], key: str) -> str:
    act = ACT_FROM_HF.get(config.get(key))
    if act is None:
        raise ValueError(f"{key}: {config.get(key)!r} is not supported; lmforge implements "
                         f"{', '.join(sorted(ACT_FROM_HF))}")
    return act


def _std(config: dict[str, Any], key: str) -> float:
    """The source's initialiser std (kept in the export; 0.02 when absent)."""
    value = config.get(key)
    return float(value) if isinstance(value, (int, float)) and value > 0 else 0.02


def _refuse_if(condition: bool, key: str, value: Any, why: str) -> None:
    if condition:
        raise ValueError(f"{key}: {value!r} — {why}; lmforge cannot import this model")


def rope_scaling_from_hf(config: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """(rope_theta, ModelConfig.rope_scaling) from `rope_parameters` (transformers 5) or
    `rope_scaling` + `rope_theta` (older config.json files)."""
    params = config.get("rope_parameters") or config.get("rope_scaling") or {}
    key = "rope_parameters" if config.get("rope_parameters") else "rope_scaling"
    if not isinstance(params, dict) or any(isinstance(v, dict) for v in params.values()):
        raise ValueError(f"{key}: per-layer-type RoPE parameters are not supported")
    theta = float(params.get("rope_theta", config.get("rope_theta", 10000.0)))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise ValueError(f"{key}.rope_type: {rope_type!r} is not supported; lmforge "
                         f"implements {', '.join(ROPE_TYPES)} exactly")
    partial = params.get("partial_rotary_factor", config.get("partial_rotary_factor", 1.0))
    _refuse_if(partial not in (None, 1, 1.0), "partial_rotary_factor", partial,
               "lmforge rotates the whole head")
    if rope_type == "default":
        return theta, None
    scaling = {k: v for k, v in params.items()
               if k not in ("rope_theta", "type", "partial_rotary_factor")}
    scaling["rope_type"] = rope_type
    if rope_type in ("llama3", "yarn"):  # transformers' default for a missing value
        scaling.setdefault("original_max_position_embeddings",
                           config.get("original_max_position_embeddings",
                                      config.get("max_position_embeddings")))
    if rope_type == "yarn":
        scaling = {k: v for k, v in scaling.items() if v is not None or k == "attention_factor"}
        if scaling.get("attention_factor") is None:
            scaling.pop("attention_factor", None)
    return theta, scaling


def _llama_like(config: dict[str, Any]) -> ModelConfig:
    kind = config["model_type"]
    _refuse_if(config.get("hidden_act", "silu") != "silu", "hidden_act",
               config.get("hidden_act"), "lmforge's SwiGLU uses silu")
    d_model, heads = _get(config, "hidden_size"), _get(config, "num_attention_heads")
    head_dim = config.get("head_dim")  # Qwen3 and Mistral Nemo: wider than hidden / heads
    _refuse_if(head_dim is not None and (not isinstance(head_dim, int) or head_dim < 1),
               "head_dim", head_dim, "not a positive integer")
    if head_dim == d_model // heads and d_model % heads == 0:
        head_dim = None  # the derived width: the model section need not repeat it
    max_pos = _get(config, "max_position_embeddings")
    window = config.get("sliding_window")
    if kind in ("qwen2", "qwen3"):
        _refuse_if(bool(config.get("use_sliding_window")), "use_sliding_window", True,
                   "lmforge has no sliding-window attention")
    elif window is not None:
        _refuse_if(window < max_pos, "sliding_window", window,
                   f"lmforge has no sliding-window attention (the window is shorter than "
                   f"max_position_embeddings={max_pos})")
    layer_types = config.get("layer_types") or []
    other = sorted(set(layer_types) - {"full_attention"})
    _refuse_if(bool(other) and not (kind in ("qwen2", "qwen3")
                                    and not config.get("use_sliding_window")),
               "layer_types", other, "lmforge has full attention in every layer")
    attention_bias = bool(config.get("attention_bias", False))
    bias, qkv_bias = False, None
    if kind == "llama":
        mlp_bias = bool(config.get("mlp_bias", False))
        _refuse_if(mlp_bias != attention_bias, "mlp_bias", mlp_bias,
                   f"lmforge's `bias` covers attention and MLP alike (attention_bias="
                   f"{attention_bias})")
        bias = attention_bias
    elif kind == "qwen2":
        qkv_bias = True  # Qwen2Attention: q/k/v with bias, o_proj and MLP without
    elif kind == "qwen3":
        _refuse_if(attention_bias, "attention_bias", True,
                   "Qwen3 biases q/k/v/o but not the MLP; lmforge's `bias` covers both")
    theta, scaling = rope_scaling_from_hf(config)
    return ModelConfig(
        family="decoder", vocab_size=_get(config, "vocab_size"), d_model=d_model,
        n_layers=_get(config, "num_hidden_layers"), n_heads=heads,
        n_kv_heads=config.get("num_key_value_heads") or heads, head_dim=head_dim,
        d_ff=_get(config, "intermediate_size"), max_seq_len=max_pos, position="rope",
        rope_theta=theta, rope_scaling=scaling, norm="rmsnorm", norm_position="pre",
        norm_eps=float(config.get("rms_norm_eps", 1e-6)), activation="swiglu", bias=bias,
        qkv_bias=qkv_bias, qk_norm=kind == "qwen3",
        tie_embeddings=bool(config.get("tie_word_embeddings", False)), init="llama",
        init_std=_std(config, "initializer_range"), hf_config=dict(config))


def _gpt2(config: dict[str, Any]) -> ModelConfig:
    _refuse_if(config.get("scale_attn_weights", True) is not True, "scale_attn_weights",
               config.get("scale_attn_weights"), "lmforge scales attention by 1/sqrt(head_dim)")
    _refuse_if(bool(config.get("scale_attn_by_inverse_layer_idx")),
               "scale_attn_by_inverse_layer_idx", True, "lmforge has no per-layer scaling")
    _refuse_if(bool(config.get("add_cross_attention")), "add_cross_attention", True,
               "lmforge's decoder has no cross-attention")
    return ModelConfig(
        family="decoder", vocab_size=_get(config, "vocab_size"), d_model=_get(config, "n_embd"),
        n_layers=_get(config, "n_layer"), n_heads=_get(config, "n_head"),
        d_ff=config.get("n_inner"), max_seq_len=_get(config, "n_positions"), position="learned",
        norm="layernorm", norm_position="pre", norm_eps=_get(config, "layer_norm_epsilon"),
        activation=_activation(config, "activation_function"), bias=True, tie_embeddings=True,
        init="gpt2", init_std=_std(config, "initializer_range"), hf_config=dict(config))


def _bert(config: dict[str, Any], num_labels: int | None) -> ModelConfig:
    pos = config.get("position_embedding_type", "absolute")
    _refuse_if(pos != "absolute", "position_embedding_type", pos,
               "lmforge's BERT has absolute learned positions")
    _refuse_if(bool(config.get("is_decoder")), "is_decoder", True,
               "lmforge's encoder is bidirectional")
    if num_labels is None:
        classifier = (config.get("architectures") or [""])[0].endswith("SequenceClassification")
        num_labels = len(config.get("id2label") or {}) if classifier else 0
    return ModelConfig(
        family="encoder", vocab_size=_get(config, "vocab_size"),
        d_model=_get(config, "hidden_size"), n_layers=_get(config, "num_hidden_layers"),
        n_heads=_get(config, "num_attention_heads"), d_ff=_get(config, "intermediate_size"),
        max_seq_len=_get(config, "max_position_embeddings"),
        position="learned", norm="layernorm", norm_position="post",
        norm_eps=_get(config, "layer_norm_eps"), activation=_activation(config, "hidden_act"),
        bias=True, tie_embeddings=True, type_vocab_size=_get(config, "type_vocab_size"),
        embedding_norm=True, init="bert", num_labels=num_labels,
        init_std=_std(config, "initializer_range"), hf_config=dict(config))


def _bart(config: dict[str, Any]) -> ModelConfig:
    for key in ("normalize_before", "add_final_layer_norm"):
        _refuse_if(bool(config.get(key)), key, True, "lmforge's BART is post-norm (mBART is not)")
    _refuse_if(config.get("encoder_ffn_dim") != config.get("decoder_ffn_dim"), "decoder_ffn_dim",
               config.get("decoder_ffn_dim"), "lmforge uses one width for encoder and decoder")
    _refuse_if(config.get("encoder_attention_heads") != config.get("decoder_attention_heads"),
               "decoder_attention_heads", config.get("decoder_attention_heads"),
               "lmforge uses one head count for encoder and decoder")
    return ModelConfig(
        family="encoder_decoder", vocab_size=_get(config, "vocab_size"),
        d_model=_get(config, "d_model"), n_layers=_get(config, "encoder_layers"),
        n_encoder_layers=config["encoder_layers"], n_decoder_layers=_get(config, "decoder_layers"),
        n_heads=_get(config, "encoder_attention_heads"), d_ff=_get(config, "encoder_ffn_dim"),
        max_seq_len=_get(config, "max_position_embeddings"), position="learned",
        norm="layernorm", norm_position="post", norm_eps=1e-5,
        activation=_activation(config, "activation_function"), bias=True, tie_embeddings=True,
        embedding_norm=True, scale_embeddings=bool(config.get("scale_embedding", False)),
        init="bert", init_std=_std(config, "init_std"), hf_config=dict(config))


def model_config_from_hf(config: dict[str, Any], *, num_labels: int | None = None
                         ) -> ModelConfig:
    """The `ModelConfig` whose model computes what `transformers` computes from `config`.

    Args:
        config: a `config.json` mapping.
        num_labels: a BERT classifier's classes (default: from its architectures/id2label).

    Returns:
        The config, with `hf_config` holding `config` (the export writes its class back).

    Raises:
        ValueError: `"<config.json key>: value — why"` for anything lmforge cannot represent.
    """
    kind = config.get("model_type")
    if kind in LLAMA_LIKE:
        return _llama_like(config)
    if kind == "gpt2":
        return _gpt2(config)
    if kind == "bert":
        return _bert(config, num_labels)
    if kind == "bart":
        return _bart(config)
    raise ValueError(f"model_type: {kind!r} is not supported; lmforge imports "
                     f"{', '.join(MODEL_TYPES)}")
