"""A Hugging Face folder as `init.source`: one tiny random `transformers` model per
architecture, saved with `transformers`, read through `warm_start.resolve` and
`load_source_weights` (which runs the import gate), and its logits compared with
`transformers` on the same folder; the export mapping writes the source's class back. A
deliberately wrong mapping (rope scaling dropped) is caught by the gate; what lmforge
cannot represent is refused naming the config.json key."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
import transformers

from lmforge.launch.config import InitConfig, TrainableConfig
from lmforge.launch.train.import_gate import ImportGateError, verify_import
from lmforge.launch.train.warm_start import load_source_weights, resolve
from lmforge.model import ModelConfig, to_hf
from lmforge.model.hf_config import model_config_from_hf

V = 96
_LLAMA = dict(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
              initializer_range=0.1, rope_theta=10000.0)
_LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
           "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
SOURCES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(_LLAMA)),
    "llama-linear": ("LlamaConfig", "LlamaForCausalLM",
                     dict(_LLAMA, rope_parameters={"rope_type": "linear", "factor": 4.0})),
    "llama3": ("LlamaConfig", "LlamaForCausalLM", dict(_LLAMA, rope_parameters=_LLAMA3)),
    "llama-yarn": ("LlamaConfig", "LlamaForCausalLM", dict(_LLAMA, rope_parameters={
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32})),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(_LLAMA, sliding_window=None)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(_LLAMA, tie_word_embeddings=True)),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(_LLAMA, head_dim=16)),
    # Qwen3-0.6B's shape in small: heads wider than hidden / heads (q_proj 64 -> 128).
    "qwen3-head-dim": ("Qwen3Config", "Qwen3ForCausalLM", dict(_LLAMA, head_dim=32)),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", dict(
        vocab_size=V, n_embd=64, n_layer=2, n_head=4, n_positions=64, initializer_range=0.1)),
    "bert": ("BertConfig", "BertForMaskedLM", dict(
        vocab_size=V, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=96, max_position_embeddings=64, initializer_range=0.1)),
    "bart": ("BartConfig", "BartForConditionalGeneration", dict(
        vocab_size=V, d_model=64, encoder_layers=2, decoder_layers=2,
        encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=96,
        decoder_ffn_dim=96, max_position_embeddings=64, init_std=0.1)),
}


def save_source(name: str, folder: Path, *, dtype: torch.dtype = torch.float32,
                shard: str | None = None) -> Path:
    """A tiny random `transformers` model of `SOURCES[name]`, saved as a model folder."""
    config_class, model_class, kwargs = SOURCES[name]
    torch.manual_seed(0)
    config = getattr(transformers, config_class)(**kwargs)
    model = getattr(transformers, model_class)(config).to(dtype)
    extra = {"max_shard_size": shard} if shard else {}
    model.save_pretrained(folder, **extra)
    return folder


def reference_logits(folder: Path, ids: torch.Tensor) -> torch.Tensor:
    config = json.loads((folder / "config.json").read_text())
    cls = getattr(transformers, config["architectures"][0])
    model = cls.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        if config["model_type"] == "bart":
            return model(input_ids=ids, decoder_input_ids=ids.flip(1)).logits
        return model(input_ids=ids).logits


def import_source(folder: Path) -> torch.nn.Module:
    """What a training rank does with `init.source: folder` (the gate included)."""
    start = resolve(InitConfig(source=str(folder)), ModelConfig(), TrainableConfig())
    model = start.model.build()
    load_source_weights(model, start)
    return model.eval()


@pytest.mark.parametrize("name", sorted(SOURCES))
def test_import_matches_transformers_and_exports_same_class(name, tmp_path, capsys):
    sharded = name == "qwen2"  # bf16 weights in two shards with an index
    folder = save_source(name, tmp_path / name, dtype=torch.bfloat16 if sharded else
                         torch.float32, shard="100KB" if sharded else None)
    if sharded:
        assert (folder / "model.safetensors.index.json").is_file()
    model = import_source(folder)
    assert "import verified: " + SOURCES[name][1] in capsys.readouterr().out
    ids = torch.randint(0, V, (2, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ours = model(ids, ids.flip(1)) if name == "bart" else model(ids)
    diff = (ours - reference_logits(folder, ids)).abs().max().item()
    assert diff <= 1e-4, f"{name}: max |logit diff| {diff}"

    source = json.loads((folder / "config.json").read_text())
    config, _ = to_hf(model.cfg, model.state_dict())
    assert config["architectures"] == source["architectures"]
    for key in ("rope_parameters", "rope_scaling", "sliding_window", "use_sliding_window",
                "initializer_range", "init_std", "tie_word_embeddings", "layer_types", "head_dim"):
        if key in source and key != "rope_parameters":
            assert config[key] == source[key], key
    if "rope_parameters" in source:
        assert {k: v for k, v in config["rope_parameters"].items() if v is not None} == {
            k: v for k, v in source["rope_parameters"].items() if v is not None}


def test_gate_catches_rope_scaling_dropped(tmp_path):
    folder = save_source("llama3", tmp_path / "llama3")
    model = import_source(folder)
    wrong = dataclasses.replace(model.cfg, rope_scaling=None).build()
    wrong.load_state_dict(model.state_dict())
    with pytest.raises(ImportGateError, match=r"differs from transformers' LlamaForCausalLM "
                                              r"by [0-9.e-]+ in the logits \(> 0.0001\)"):
        verify_import(folder, wrong)


@pytest.mark.parametrize("change, key", [
    ({"model_type": "gemma"}, "model_type: 'gemma' is not supported"),
    ({"rope_parameters": {"rope_type": "dynamic", "factor": 2.0}},
     "rope_parameters.rope_type: 'dynamic' is not supported"),
    ({"rope_parameters": None, "rope_scaling": {"type": "longrope", "short_factor": [1.0]}},
     "rope_scaling.rope_type: 'longrope' is not supported"),
    ({"head_dim": 0}, "head_dim: 0"),
    ({"model_type": "mistral", "sliding_window": 64}, "sliding_window: 64"),
    ({"model_type": "qwen2", "use_sliding_window": True}, "use_sliding_window: True"),
    ({"attention_bias": True, "mlp_bias": False}, "mlp_bias: False"),
    ({"hidden_act": "gelu"}, "hidden_act: 'gelu'"),
])
def test_unrepresentable_config_refused_naming_key(change, key):
    config = {**transformers.LlamaConfig(**_LLAMA).to_dict(), **change}
    with pytest.raises(ValueError, match=key.replace("(", r"\(").replace(".", r"\.")):
        model_config_from_hf(config)


def test_head_dim_refused_where_the_class_derives_it():
    """GPT-2, BERT and BART size their heads as hidden / heads: an explicit other width has
    no export there (Llama-layout classes write `head_dim`)."""
    from lmforge.model.hf_classes import hf_architecture

    cfg = ModelConfig.from_preset("gpt2-124m", vocab_size=V, d_model=64, n_heads=4,
                                  n_layers=2, head_dim=32)
    with pytest.raises(ValueError, match=r"GPT2LMHeadModel, differs in head_dim=32 \(needs "
                                         r"d_model / n_heads = 16\)"):
        hf_architecture(cfg)
    llama = ModelConfig.from_preset("tiny", vocab_size=V, d_model=64, n_heads=4, head_dim=32)
    assert hf_architecture(llama) == "LlamaForCausalLM"
