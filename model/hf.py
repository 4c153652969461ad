"""Weight and config mapping to and from Hugging Face `transformers` (plain tensor renames;
no `transformers` import). Export and the parity tests use the same functions.

Supported: llama-style decoders <-> `LlamaForCausalLM`, GPT-2-style decoders <->
`GPT2LMHeadModel`, BERT-style encoders <-> `BertForMaskedLM` (or
`BertForSequenceClassification` with `num_labels`) and BART-style
encoder-decoders <-> `BartForConditionalGeneration` (see `hf_seq.py`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from lmforge.model.config import ModelConfig
from lmforge.model.hf_classes import hf_architecture

_DTYPES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
_GPT2_ACT = {"gelu_tanh": "gelu_new", "gelu": "gelu", "relu": "relu"}


def _strip(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    # DeepSpeed / DDP wrappers prefix every key with "module.".
    if state_dict and all(k.startswith("module.") for k in state_dict):
        return {k[len("module."):]: v for k, v in state_dict.items()}
    return dict(state_dict)


def _rows(t: Tensor, n: int) -> Tensor:
    return t[:n]


def to_hf(
    cfg: ModelConfig,
    state_dict: dict[str, Tensor],
    *,
    bos_token_id: int | None = None,
    eos_token_id: int | None = None,
    pad_token_id: int | None = None,
    decoder_start_token_id: int | None = None,
    dtype: torch.dtype | None = None,
    labels: list[str] | None = None,
) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """Hugging Face `config.json` contents and state dict for an lmforge model.

    Args:
        cfg: the model's config.
        state_dict: the lmforge state dict (a "module." prefix is dropped).
        bos_token_id: tokenizer's BOS id, written into the config.
        eos_token_id: tokenizer's EOS id.
        pad_token_id: tokenizer's padding id.
        decoder_start_token_id: first decoder input of an encoder-decoder (BART uses EOS).
        dtype: cast every tensor to this dtype; default keeps the tensors' dtype.
        labels: class names in id order for a classifier's `id2label`/`label2id` (default
            `LABEL_i`).

    Returns:
        (config dict, {HF name: contiguous tensor}); vocab padding rows are dropped and a
        tied output matrix is stored once (as `transformers.save_pretrained` does).

    Raises:
        ValueError: the config has no HF counterpart, or a weight is missing.
    """
    arch = hf_architecture(cfg)
    sd = _strip(state_dict)
    ids = {"bos_token_id": bos_token_id, "eos_token_id": eos_token_id,
           "pad_token_id": pad_token_id}
    if cfg.family == "encoder_decoder":
        ids["decoder_start_token_id"] = decoder_start_token_id
    if arch == "LlamaForCausalLM":
        config, out = _llama_to_hf(cfg, sd)
    elif arch == "GPT2LMHeadModel":
        config, out = _gpt2_to_hf(cfg, sd)
    else:
        from lmforge.model.hf_seq import bart_to_hf, bert_to_hf

        config, out = bart_to_hf(cfg, sd) if arch.startswith("Bart") else bert_to_hf(
            cfg, sd, labels)
    if dtype is not None:
        out = {k: v.to(dtype) for k, v in out.items()}
    out_dtype = _DTYPES.get(next(iter(out.values())).dtype, "float32")
    config.update(ids, architectures=[arch], torch_dtype=out_dtype, dtype=out_dtype)
    return config, {k: v.detach().contiguous().clone() for k, v in out.items()}


def from_hf(config: dict[str, Any], state_dict: dict[str, Tensor]
            ) -> tuple[ModelConfig, dict[str, Tensor]]:
    """Inverse of `to_hf`: an lmforge config and state dict from HF ones.

    Args:
        config: a `config.json` dict (e.g. `hf_model.config.to_dict()`).
        state_dict: the HF model's state dict.

    Returns:
        (ModelConfig, lmforge state dict) ready for `cfg.build().load_state_dict(...)`.

    Raises:
        ValueError: unsupported `model_type`.
    """
    kind = config.get("model_type")
    if kind == "llama":
        return _llama_from_hf(config, state_dict)
    if kind == "gpt2":
        return _gpt2_from_hf(config, state_dict)
    if kind in ("bert", "bart"):
        from lmforge.model.hf_seq import bart_from_hf, bert_from_hf

        return (bert_from_hf if kind == "bert" else bart_from_hf)(config, state_dict)
    raise ValueError(f"model_type: {kind!r} is not supported; use llama, gpt2, bert or bart")


def _need(sd: dict[str, Tensor], key: str) -> Tensor:
    if key not in sd:
        raise ValueError(f"state_dict: weight {key!r} is missing; was the checkpoint saved "
                         "from a model built with this config?")
    return sd[key]


# ---- Llama ------------------------------------------------------------------------------
def _llama_to_hf(cfg: ModelConfig, sd: dict[str, Tensor]) -> tuple[dict, dict[str, Tensor]]:
    V, q_dim, kv_dim = cfg.vocab_size, cfg.n_heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim
    out = {"model.embed_tokens.weight": _rows(_need(sd, "tok_emb.weight"), V),
           "model.norm.weight": _need(sd, "final_norm.weight")}
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = _rows(_need(sd, "lm_head.weight"), V)
    suffixes = ("weight", "bias") if cfg.bias else ("weight",)
    for i in range(cfg.n_layers):
        src, dst = f"layers.{i}.", f"model.layers.{i}."
        out[dst + "input_layernorm.weight"] = _need(sd, src + "attn_norm.weight")
        out[dst + "post_attention_layernorm.weight"] = _need(sd, src + "mlp_norm.weight")
        for s in suffixes:
            q, k, v = _need(sd, f"{src}attn.qkv.{s}").split((q_dim, kv_dim, kv_dim))
            out[f"{dst}self_attn.q_proj.{s}"] = q
            out[f"{dst}self_attn.k_proj.{s}"] = k
            out[f"{dst}self_attn.v_proj.{s}"] = v
            out[f"{dst}self_attn.o_proj.{s}"] = _need(sd, f"{src}attn.out.{s}")
            gate, up = _need(sd, f"{src}mlp.gate_up.{s}").chunk(2)
            out[f"{dst}mlp.gate_proj.{s}"] = gate
            out[f"{dst}mlp.up_proj.{s}"] = up
            out[f"{dst}mlp.down_proj.{s}"] = _need(sd, f"{src}mlp.down.{s}")
    config = {
        "model_type": "llama", "vocab_size": V, "hidden_size": cfg.d_model,
        "intermediate_size": cfg.ffn_dim, "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.kv_heads,
        "head_dim": cfg.head_dim, "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "attention_bias": cfg.bias, "mlp_bias": cfg.bias, "attention_dropout": cfg.dropout,
        "tie_word_embeddings": cfg.tie_embeddings, "initializer_range": cfg.init_std,
    }
    return config, out


def _llama_from_hf(config: dict, sd: dict[str, Tensor]) -> tuple[ModelConfig, dict]:
    rope = config.get("rope_parameters") or {}
    cfg = ModelConfig(
        family="decoder", vocab_size=config["vocab_size"], d_model=config["hidden_size"],
        n_layers=config["num_hidden_layers"], n_heads=config["num_attention_heads"],
        n_kv_heads=config.get("num_key_value_heads"), d_ff=config["intermediate_size"],
        max_seq_len=config["max_position_embeddings"], position="rope",
        rope_theta=float(rope.get("rope_theta", config.get("rope_theta", 10000.0))),
        norm="rmsnorm", norm_position="pre", norm_eps=config["rms_norm_eps"],
        activation="swiglu", bias=bool(config.get("attention_bias", False)),
        tie_embeddings=bool(config.get("tie_word_embeddings", False)), init="llama",
    )
    if config.get("head_dim") not in (None, cfg.head_dim):
        raise ValueError(f"head_dim: {config['head_dim']} != hidden_size/heads={cfg.head_dim}; "
                         "lmforge derives head_dim and cannot load this model")
    out = {"tok_emb.weight": _need(sd, "model.embed_tokens.weight"),
           "final_norm.weight": _need(sd, "model.norm.weight")}
    out["lm_head.weight"] = (out["tok_emb.weight"] if cfg.tie_embeddings
                             else _need(sd, "lm_head.weight"))
    suffixes = ("weight", "bias") if cfg.bias else ("weight",)
    for i in range(cfg.n_layers):
        src, dst = f"model.layers.{i}.", f"layers.{i}."
        out[dst + "attn_norm.weight"] = _need(sd, src + "input_layernorm.weight")
        out[dst + "mlp_norm.weight"] = _need(sd, src + "post_attention_layernorm.weight")
        for s in suffixes:
            out[f"{dst}attn.qkv.{s}"] = torch.cat(
                [_need(sd, f"{src}self_attn.{p}_proj.{s}") for p in "qkv"])
            out[f"{dst}attn.out.{s}"] = _need(sd, f"{src}self_attn.o_proj.{s}")
            out[f"{dst}mlp.gate_up.{s}"] = torch.cat(
                [_need(sd, f"{src}mlp.{p}_proj.{s}") for p in ("gate", "up")])
            out[f"{dst}mlp.down.{s}"] = _need(sd, f"{src}mlp.down_proj.{s}")
    return cfg, out


# ---- GPT-2 (Conv1D stores weights as (in, out): transpose) ------------------------------
_GPT2_LINEARS = (("attn.qkv", "attn.c_attn"), ("attn.out", "attn.c_proj"),
                 ("mlp.up", "mlp.c_fc"), ("mlp.down", "mlp.c_proj"))
_GPT2_NORMS = (("attn_norm", "ln_1"), ("mlp_norm", "ln_2"))


def _gpt2_to_hf(cfg: ModelConfig, sd: dict[str, Tensor]) -> tuple[dict, dict[str, Tensor]]:
    out = {"transformer.wte.weight": _rows(_need(sd, "tok_emb.weight"), cfg.vocab_size),
           "transformer.wpe.weight": _need(sd, "pos_emb.weight"),
           "transformer.ln_f.weight": _need(sd, "final_norm.weight"),
           "transformer.ln_f.bias": _need(sd, "final_norm.bias")}
    for i in range(cfg.n_layers):
        src, dst = f"layers.{i}.", f"transformer.h.{i}."
        for ours, theirs in _GPT2_LINEARS:
            out[f"{dst}{theirs}.weight"] = _need(sd, f"{src}{ours}.weight").t()
            out[f"{dst}{theirs}.bias"] = _need(sd, f"{src}{ours}.bias")
        for ours, theirs in _GPT2_NORMS:
            for s in ("weight", "bias"):
                out[f"{dst}{theirs}.{s}"] = _need(sd, f"{src}{ours}.{s}")
    config = {
        "model_type": "gpt2", "vocab_size": cfg.vocab_size, "n_positions": cfg.max_seq_len,
        "n_embd": cfg.d_model, "n_layer": cfg.n_layers, "n_head": cfg.n_heads,
        "n_inner": cfg.ffn_dim, "activation_function": _GPT2_ACT[cfg.activation],
        "resid_pdrop": cfg.dropout, "embd_pdrop": cfg.dropout, "attn_pdrop": cfg.dropout,
        "layer_norm_epsilon": cfg.norm_eps, "initializer_range": cfg.init_std,
        "scale_attn_weights": True, "tie_word_embeddings": True,
    }
    return config, out


def _gpt2_from_hf(config: dict, sd: dict[str, Tensor]) -> tuple[ModelConfig, dict]:
    activation = {v: k for k, v in _GPT2_ACT.items()}.get(config.get("activation_function"))
    if activation is None:
        raise ValueError(f"activation_function: {config.get('activation_function')!r} is not "
                         f"supported; use one of {sorted(_GPT2_ACT.values())}")
    cfg = ModelConfig(
        family="decoder", vocab_size=config["vocab_size"], d_model=config["n_embd"],
        n_layers=config["n_layer"], n_heads=config["n_head"], d_ff=config.get("n_inner"),
        max_seq_len=config["n_positions"], position="learned", norm="layernorm",
        norm_position="pre", norm_eps=config["layer_norm_epsilon"], activation=activation,
        bias=True, tie_embeddings=True, init="gpt2",
    )
    out = {"tok_emb.weight": _need(sd, "transformer.wte.weight"),
           "pos_emb.weight": _need(sd, "transformer.wpe.weight"),
           "final_norm.weight": _need(sd, "transformer.ln_f.weight"),
           "final_norm.bias": _need(sd, "transformer.ln_f.bias")}
    out["lm_head.weight"] = out["tok_emb.weight"]
    for i in range(cfg.n_layers):
        src, dst = f"transformer.h.{i}.", f"layers.{i}."
        for ours, theirs in _GPT2_LINEARS:
            out[f"{dst}{ours}.weight"] = _need(sd, f"{src}{theirs}.weight").t()
            out[f"{dst}{ours}.bias"] = _need(sd, f"{src}{theirs}.bias")
        for ours, theirs in _GPT2_NORMS:
            for s in ("weight", "bias"):
                out[f"{dst}{ours}.{s}"] = _need(sd, f"{src}{theirs}.{s}")
    return cfg, out
