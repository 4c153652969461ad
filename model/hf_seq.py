"""Hugging Face mappings of the encoder (BERT) and encoder-decoder (BART) families;
dispatched from `hf.to_hf` / `hf.from_hf`."""

from __future__ import annotations

import torch
from torch import Tensor

from lmforge.model.config import ModelConfig
from lmforge.model.hf_config import model_config_from_hf

_ACT = {"gelu": "gelu", "gelu_tanh": "gelu_new", "relu": "relu"}
_BART_POS_OFFSET = 2  # BartLearnedPositionalEmbedding keeps two unused rows in front


def _need(sd: dict[str, Tensor], key: str) -> Tensor:
    if key not in sd:
        raise ValueError(f"state_dict: weight {key!r} is missing; was the checkpoint saved "
                         "from a model built with this config?")
    return sd[key]


def _copy(out: dict, sd: dict, pairs: list[tuple[str, str]], reverse: bool) -> None:
    """Copy weight and bias of each (ours, theirs) module pair in the chosen direction."""
    for ours, theirs in pairs:
        for s in ("weight", "bias"):
            if reverse:
                out[f"{ours}.{s}"] = _need(sd, f"{theirs}.{s}")
            else:
                out[f"{theirs}.{s}"] = _need(sd, f"{ours}.{s}")


# ---- BERT -------------------------------------------------------------------------------
def _bert_pairs(cfg: ModelConfig) -> list[tuple[str, str]]:
    pairs = [("emb_norm", "bert.embeddings.LayerNorm")]
    for i in range(cfg.n_layers):
        o, t = f"layers.{i}.", f"bert.encoder.layer.{i}."
        pairs += [(o + "attn.out", t + "attention.output.dense"),
                  (o + "attn_norm", t + "attention.output.LayerNorm"),
                  (o + "mlp.up", t + "intermediate.dense"), (o + "mlp.down", t + "output.dense"),
                  (o + "mlp_norm", t + "output.LayerNorm")]
    if cfg.num_labels:
        pairs += [("pooler", "bert.pooler.dense"), ("classifier", "classifier")]
    else:
        pairs += [("mlm_dense", "cls.predictions.transform.dense"),
                  ("mlm_norm", "cls.predictions.transform.LayerNorm")]
    return pairs


def bert_to_hf(cfg: ModelConfig, sd: dict[str, Tensor], labels: list[str] | None = None
               ) -> tuple[dict, dict[str, Tensor]]:
    """BERT-style encoder -> `BertForMaskedLM` (or `BertForSequenceClassification` when
    `num_labels > 0`, which has no MLM head; `labels` name its classes in id order)."""
    V, d = cfg.vocab_size, cfg.d_model
    out = {"bert.embeddings.word_embeddings.weight": _need(sd, "tok_emb.weight")[:V],
           "bert.embeddings.position_embeddings.weight": _need(sd, "pos_emb.weight"),
           # HF always has a token-type table; one zero row adds nothing to the sum.
           "bert.embeddings.token_type_embeddings.weight":
               sd["type_emb.weight"] if cfg.type_vocab_size else torch.zeros(1, d)}
    _copy(out, sd, _bert_pairs(cfg), reverse=False)
    for i in range(cfg.n_layers):
        for s in ("weight", "bias"):
            q, k, v = _need(sd, f"layers.{i}.attn.qkv.{s}").chunk(3)
            for name, t in zip(("query", "key", "value"), (q, k, v), strict=True):
                out[f"bert.encoder.layer.{i}.attention.self.{name}.{s}"] = t
    if not cfg.num_labels:
        out["cls.predictions.bias"] = _need(sd, "lm_head.bias")[:V]
    config = {
        "model_type": "bert", "vocab_size": V, "hidden_size": d,
        "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
        "intermediate_size": cfg.ffn_dim, "hidden_act": _ACT[cfg.activation],
        "hidden_dropout_prob": cfg.dropout, "attention_probs_dropout_prob": cfg.dropout,
        "max_position_embeddings": cfg.max_seq_len,
        "type_vocab_size": max(cfg.type_vocab_size, 1), "layer_norm_eps": cfg.norm_eps,
        "initializer_range": cfg.init_std, "tie_word_embeddings": True,
    }
    if cfg.num_labels:
        names = list(labels or [f"LABEL_{i}" for i in range(cfg.num_labels)])
        if len(names) != cfg.num_labels or len(set(names)) != len(names):
            raise ValueError(f"labels: {len(names)} names {names[:8]} for num_labels="
                             f"{cfg.num_labels}; give one distinct name per class")
        config["id2label"] = {str(i): name for i, name in enumerate(names)}
        config["label2id"] = {name: i for i, name in enumerate(names)}
        config["problem_type"] = "single_label_classification"
    return config, out


def bert_from_hf(config: dict, sd: dict[str, Tensor]) -> tuple[ModelConfig, dict[str, Tensor]]:
    """`BertForMaskedLM` / `BertForSequenceClassification` -> lmforge encoder."""
    num_labels = 0 if "cls.predictions.bias" in sd else len(config.get("id2label") or {})
    cfg = model_config_from_hf(config, num_labels=num_labels)
    out = {"tok_emb.weight": _need(sd, "bert.embeddings.word_embeddings.weight"),
           "pos_emb.weight": _need(sd, "bert.embeddings.position_embeddings.weight"),
           "type_emb.weight": _need(sd, "bert.embeddings.token_type_embeddings.weight")}
    _copy(out, sd, _bert_pairs(cfg), reverse=True)
    for i in range(cfg.n_layers):
        for s in ("weight", "bias"):
            out[f"layers.{i}.attn.qkv.{s}"] = torch.cat(
                [_need(sd, f"bert.encoder.layer.{i}.attention.self.{n}.{s}")
                 for n in ("query", "key", "value")])
    out["lm_head.weight"] = out["tok_emb.weight"]
    if num_labels:
        # No MLM head in a classifier checkpoint: keep the freshly built one.
        return cfg, out
    out["lm_head.bias"] = _need(sd, "cls.predictions.bias")
    return cfg, out


# ---- BART -------------------------------------------------------------------------------
def _bart_pairs(cfg: ModelConfig) -> list[tuple[str, str]]:
    pairs = [("enc_emb_norm", "model.encoder.layernorm_embedding"),
             ("dec_emb_norm", "model.decoder.layernorm_embedding")]
    for side, ours, n in (("encoder", "encoder", cfg.encoder_layers),
                          ("decoder", "decoder", cfg.decoder_layers)):
        for i in range(n):
            o, t = f"{ours}.{i}.", f"model.{side}.layers.{i}."
            pairs += [(o + "attn.out", t + "self_attn.out_proj"),
                      (o + "attn_norm", t + "self_attn_layer_norm"),
                      (o + "mlp.up", t + "fc1"), (o + "mlp.down", t + "fc2"),
                      (o + "mlp_norm", t + "final_layer_norm")]
            if side == "decoder":
                pairs += [(o + "cross_attn.q", t + "encoder_attn.q_proj"),
                          (o + "cross_attn.out", t + "encoder_attn.out_proj"),
                          (o + "cross_norm", t + "encoder_attn_layer_norm")]
    return pairs


def _bart_fused(cfg: ModelConfig) -> list[tuple[str, list[str]]]:
    """(our fused matrix, HF matrices it concatenates) for every layer."""
    fused = []
    for side, n in (("encoder", cfg.encoder_layers), ("decoder", cfg.decoder_layers)):
        for i in range(n):
            t = f"model.{side}.layers.{i}."
            fused.append((f"{side}.{i}.attn.qkv", [t + f"self_attn.{p}_proj" for p in "qkv"]))
            if side == "decoder":
                fused.append((f"{side}.{i}.cross_attn.kv",
                              [t + f"encoder_attn.{p}_proj" for p in "kv"]))
    return fused


def bart_to_hf(cfg: ModelConfig, sd: dict[str, Tensor]) -> tuple[dict, dict[str, Tensor]]:
    """BART-style encoder-decoder -> `BartForConditionalGeneration`."""
    V, d = cfg.vocab_size, cfg.d_model
    pad = torch.zeros(_BART_POS_OFFSET, d)
    out = {"model.shared.weight": _need(sd, "tok_emb.weight")[:V],
           "model.encoder.embed_positions.weight": torch.cat([pad, sd["enc_pos_emb.weight"]]),
           "model.decoder.embed_positions.weight": torch.cat([pad, sd["dec_pos_emb.weight"]]),
           "final_logits_bias": torch.zeros(1, V)}
    _copy(out, sd, _bart_pairs(cfg), reverse=False)
    for ours, theirs in _bart_fused(cfg):
        for s in ("weight", "bias"):
            parts = _need(sd, f"{ours}.{s}").chunk(len(theirs))
            out.update({f"{t}.{s}": p for t, p in zip(theirs, parts, strict=True)})
    config = {
        "model_type": "bart", "vocab_size": V, "d_model": d,
        "max_position_embeddings": cfg.max_seq_len,
        "encoder_layers": cfg.encoder_layers, "decoder_layers": cfg.decoder_layers,
        "encoder_attention_heads": cfg.n_heads, "decoder_attention_heads": cfg.n_heads,
        "encoder_ffn_dim": cfg.ffn_dim, "decoder_ffn_dim": cfg.ffn_dim,
        "activation_function": _ACT[cfg.activation], "dropout": cfg.dropout,
        "attention_dropout": cfg.dropout, "activation_dropout": 0.0,
        "init_std": cfg.init_std, "scale_embedding": cfg.scale_embeddings,
        "is_encoder_decoder": True, "tie_word_embeddings": True,
        "forced_eos_token_id": None, "forced_bos_token_id": None,
    }
    return config, out


def bart_from_hf(config: dict, sd: dict[str, Tensor]) -> tuple[ModelConfig, dict[str, Tensor]]:
    """`BartForConditionalGeneration` -> lmforge encoder-decoder."""
    cfg = model_config_from_hf(config)
    if "final_logits_bias" in sd and bool(sd["final_logits_bias"].any()):
        raise ValueError("final_logits_bias: non-zero logit bias has no lmforge counterpart")
    out = {"tok_emb.weight": _need(sd, "model.shared.weight"),
           "enc_pos_emb.weight": _need(sd, "model.encoder.embed_positions.weight")[2:],
           "dec_pos_emb.weight": _need(sd, "model.decoder.embed_positions.weight")[2:]}
    out["lm_head.weight"] = out["tok_emb.weight"]
    _copy(out, sd, _bart_pairs(cfg), reverse=True)
    for ours, theirs in _bart_fused(cfg):
        for s in ("weight", "bias"):
            out[f"{ours}.{s}"] = torch.cat([_need(sd, f"{t}.{s}") for t in theirs])
    return cfg, out
