"""Weight and config mapping to and from Hugging Face `transformers` (plain tensor renames;
no `transformers` import). Export and the parity tests use the same functions.

Supported: Llama-layout decoders <-> `LlamaForCausalLM`, `MistralForCausalLM`,
`Qwen2ForCausalLM`, `Qwen3ForCausalLM` (see `hf_llama.py`), GPT-2-style decoders <->
`GPT2LMHeadModel`, BERT-style encoders <-> `BertForMaskedLM` (or
`BertForSequenceClassification` with `num_labels`) and BART-style encoder-decoders <->
`BartForConditionalGeneration` (see `hf_seq.py`). `hf_config.py` reads a `config.json` into
a `ModelConfig`, refusing what lmforge cannot represent; a model imported from a folder
(`cfg.hf_config`) is written back as the same class with the source's other fields kept.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from lmforge.model.config import ModelConfig
from lmforge.model.hf_classes import hf_architecture
from lmforge.model.hf_config import LLAMA_LIKE, model_config_from_hf
from lmforge.model.hf_llama import MODEL_TYPE_OF, llama_from_hf, llama_to_hf

_DTYPES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
_GPT2_ACT = {"gelu_tanh": "gelu_new", "gelu": "gelu", "relu": "relu"}
# config.json keys that describe the saved file, not the model: never carried from a source.
_FILE_KEYS = ("transformers_version", "_name_or_path", "torch_dtype", "dtype")


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
    # A tokenizer without the piece says -1; transformers wants None (or an id in the vocab).
    ids = {k: None if v is not None and v < 0 else v for k, v in ids.items()}
    if arch in MODEL_TYPE_OF:
        config, out = llama_to_hf(cfg, sd, arch)
    elif arch == "GPT2LMHeadModel":
        config, out = _gpt2_to_hf(cfg, sd)
    else:
        from lmforge.model.hf_seq import bart_to_hf, bert_to_hf

        config, out = bart_to_hf(cfg, sd) if arch.startswith("Bart") else bert_to_hf(
            cfg, sd, labels)
    source = cfg.hf_config or {}
    if source.get("model_type") == config["model_type"]:  # the imported model's other fields
        config = {**{k: v for k, v in source.items() if k not in _FILE_KEYS}, **config}
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
        ValueError: a config.json field lmforge cannot represent (named), or a missing weight.
    """
    kind = config.get("model_type")
    if kind in ("bert", "bart"):
        from lmforge.model.hf_seq import bart_from_hf, bert_from_hf

        return (bert_from_hf if kind == "bert" else bart_from_hf)(config, state_dict)
    cfg = model_config_from_hf(config)  # refuses what lmforge cannot represent
    if kind in LLAMA_LIKE:
        return cfg, llama_from_hf(cfg, state_dict)
    return cfg, _gpt2_from_hf(cfg, state_dict)


def _need(sd: dict[str, Tensor], key: str) -> Tensor:
    if key not in sd:
        raise ValueError(f"state_dict: weight {key!r} is missing; was the checkpoint saved "
                         "from a model built with this config?")
    return sd[key]


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


def _gpt2_from_hf(cfg: ModelConfig, sd: dict[str, Tensor]) -> dict[str, Tensor]:
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
    return out
