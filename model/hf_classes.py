"""Which `transformers` class holds a model config's weights exactly (torch-free).

Run configs check this before anything trains (`export.enabled` with a model no class
represents is refused up front), so it must not import torch; the weight mapping itself is
in hf.py.
"""

from __future__ import annotations

from typing import Any

from lmforge.model.config import ModelConfig

_ACTS = ("gelu", "gelu_tanh", "relu")
# Biases and norms inside attention that only the Qwen classes hold.
_PLAIN_ATTENTION = {"qkv_bias": (None,), "qk_norm": (False,), "head_dim": ()}
_LLAMA = {"position": ("rope",), "norm": ("rmsnorm",), "norm_position": ("pre",),
          "activation": ("swiglu",), "embedding_norm": (False,), "scale_embeddings": (False,)}
_MARIAN_LAYOUT = ("MarianMTModel's sinusoidal table puts sin in the first half of the "
                  "features and cos in the second; lmforge's interleaves them")

# Per family: (transformers class, {field: allowed values, or a note when none fits},
# whether lmforge exports to it). A class that is not exported is only ever named as the
# closest one in a refusal. "n_kv_heads" stands for "n_kv_heads equals n_heads", "head_dim"
# for "the heads are d_model / n_heads wide".
_CANDIDATES: dict[str, list[tuple[str, dict[str, Any], bool]]] = {
    "decoder": [
        ("LlamaForCausalLM", {**_LLAMA, "qkv_bias": (None,), "qk_norm": (False,)}, True),
        # Llama's layout without biases; exported as Mistral only when imported from one.
        ("MistralForCausalLM", {**_LLAMA, "bias": (False,), "qkv_bias": (None,),
                                "qk_norm": (False,)}, True),
        ("Qwen2ForCausalLM", {**_LLAMA, "bias": (False,), "qkv_bias": (True,),
                              "qk_norm": (False,)}, True),
        ("Qwen3ForCausalLM", {**_LLAMA, "bias": (False,), "qkv_bias": (None, False),
                              "qk_norm": (True,)}, True),
        ("GPT2LMHeadModel", {"position": ("learned",), "norm": ("layernorm",),
                             "norm_position": ("pre",), "activation": _ACTS, "bias": (True,),
                             "tie_embeddings": (True,), "n_kv_heads": (),
                             "embedding_norm": (False,), "scale_embeddings": (False,),
                             **_PLAIN_ATTENTION}, True),
    ],
    "encoder": [
        ("BertForMaskedLM", {"position": ("learned",), "norm": ("layernorm",),
                             "norm_position": ("post",), "activation": _ACTS, "bias": (True,),
                             "tie_embeddings": (True,), "n_kv_heads": (),
                             "embedding_norm": (True,), "scale_embeddings": (False,),
                             **_PLAIN_ATTENTION}, True),
    ],
    "encoder_decoder": [
        # BART's LayerNorms have a fixed eps of 1e-5.
        ("BartForConditionalGeneration", {
            "position": ("learned",), "norm": ("layernorm",), "norm_position": ("post",),
            "norm_eps": (1e-5,), "activation": _ACTS, "bias": (True,),
            "tie_embeddings": (True,), "n_kv_heads": (), "embedding_norm": (True,),
            **_PLAIN_ATTENTION}, True),
        # The 2017 Transformer's closest relative: sinusoidal positions, scaled embeddings,
        # post-LN, no embedding norm, LayerNorm eps fixed at 1e-5.
        ("MarianMTModel", {
            "position": _MARIAN_LAYOUT, "norm": ("layernorm",), "norm_position": ("post",),
            "norm_eps": (1e-5,), "activation": _ACTS, "bias": (True,),
            "tie_embeddings": (True,), "n_kv_heads": (), "embedding_norm": (False,)}, False),
    ],
}


def _differences(cfg: ModelConfig, required: dict[str, Any]) -> list[str]:
    """`field=value (what the class needs)` for every field of `cfg` the class cannot hold."""
    out = []
    for name, allowed in required.items():
        if name == "n_kv_heads":
            if cfg.kv_heads != cfg.n_heads:
                out.append(f"n_kv_heads={cfg.kv_heads} (needs n_heads={cfg.n_heads})")
            continue
        if name == "head_dim":
            if cfg.head_size * cfg.n_heads != cfg.d_model:
                out.append(f"head_dim={cfg.head_dim} (needs d_model / n_heads = "
                           f"{cfg.d_model // cfg.n_heads})")
            continue
        value = getattr(cfg, name)
        if isinstance(allowed, str):
            out.append(f"{name}={value!r} ({allowed})")
        elif value not in allowed:
            out.append(f"{name}={value!r} (needs {' or '.join(repr(a) for a in allowed)})")
    return out


def hf_mismatch(cfg: ModelConfig) -> tuple[str, list[str]]:
    """The `transformers` class closest to `cfg` and how `cfg` differs from it.

    Returns:
        (class name, ["field=value (needed)", ...]); an empty list means the class holds
        `cfg`'s weights exactly and export maps to it.
    """
    # A model imported from a Hugging Face folder goes back to its own class when it fits.
    imported = ((cfg.hf_config or {}).get("architectures") or [None])[0]
    ranked = []
    for order, (name, required, exported) in enumerate(_CANDIDATES[cfg.family]):
        diffs = _differences(cfg, required)
        if not exported and not diffs:
            diffs = [f"lmforge does not export to {name}"]
        if name == "MistralForCausalLM" and imported != name and not diffs:
            continue  # Llama holds the same model; Mistral only for a Mistral source
        ranked.append((len(diffs), name != imported, order, name, diffs))
    *_, name, diffs = min(ranked, key=lambda item: item[:3])
    if name == "BertForMaskedLM" and cfg.num_labels:
        name = "BertForSequenceClassification"
    return name, diffs


def hf_architecture(cfg: ModelConfig) -> str:
    """The Hugging Face class that can hold `cfg`'s weights exactly.

    Raises:
        ValueError: naming the closest `transformers` class and the fields that differ.
    """
    name, diffs = hf_mismatch(cfg)
    if diffs:
        raise ValueError(
            f"model: no transformers class represents this {cfg.family} exactly; the closest, "
            f"{name}, differs in {'; '.join(diffs)}")
    return name
