"""Parity with Hugging Face `transformers` for the decoder families, through the same
`to_hf`/`from_hf` mapping that export uses (config.json + safetensors on disk)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
)

from lmforge.model import ModelConfig, from_hf, generate, to_hf

TOL = 1e-5


def _export(cfg: ModelConfig, model: torch.nn.Module, folder: Path) -> torch.nn.Module:
    config, tensors = to_hf(cfg, model.state_dict(), bos_token_id=1, eos_token_id=2)
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    save_file(tensors, str(folder / "model.safetensors"))
    return AutoModelForCausalLM.from_pretrained(folder, attn_implementation="sdpa").eval()


def _check(ours: torch.nn.Module, theirs: torch.nn.Module, vocab: int) -> None:
    torch.manual_seed(1)
    x = torch.randint(0, vocab, (2, 24))
    with torch.no_grad():
        a, b = ours(x), theirs(x).logits
    assert a.shape == b.shape
    assert (a - b).abs().max().item() < TOL
    prompt = x[:, :5]
    mine = generate(ours, prompt, max_new_tokens=12, greedy=True)
    hf = theirs.generate(prompt, max_new_tokens=12, do_sample=False, eos_token_id=None,
                         pad_token_id=0, attention_mask=torch.ones_like(prompt))
    assert torch.equal(mine, hf)


@pytest.mark.parametrize("tied", [False, True])
def test_tiny_llama_export_matches_llama_for_causal_lm(tmp_path: Path, tied: bool) -> None:
    torch.manual_seed(0)
    cfg = ModelConfig.from_preset("tiny", vocab_size=300, n_layers=2, tie_embeddings=tied,
                                  pad_vocab_to_multiple_of=64)
    ours = cfg.build().eval()
    theirs = _export(cfg, ours, tmp_path / "hf")
    assert type(theirs).__name__ == "LlamaForCausalLM"
    assert theirs.config.num_key_value_heads == 2 and theirs.config.vocab_size == 300
    _check(ours, theirs, 300)


def test_llama_from_hf_random_weights() -> None:
    torch.manual_seed(0)
    hf_cfg = LlamaConfig(vocab_size=200, hidden_size=64, intermediate_size=160,
                         num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2,
                         max_position_embeddings=64, rope_parameters={
                             "rope_type": "default", "rope_theta": 500.0}, rms_norm_eps=1e-6,
                         attention_bias=True, mlp_bias=True)
    theirs = LlamaForCausalLM(hf_cfg).eval()
    with torch.no_grad():  # biases start at zero; make them matter
        for name, p in theirs.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    cfg, sd = from_hf(theirs.config.to_dict(), theirs.state_dict())
    assert cfg.rope_theta == 500.0 and cfg.kv_heads == 2 and cfg.bias
    ours = cfg.build().eval()
    ours.load_state_dict(sd)
    _check(ours, theirs, 200)


def test_gpt2_style_export_matches_gpt2_lm_head_model(tmp_path: Path) -> None:
    torch.manual_seed(0)
    cfg = ModelConfig.from_preset("gpt2-124m", vocab_size=500, d_model=64, n_layers=2,
                                  n_heads=4, max_seq_len=64)
    ours = cfg.build().eval()
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    theirs = _export(cfg, ours, tmp_path / "hf")
    assert type(theirs).__name__ == "GPT2LMHeadModel"
    _check(ours, theirs, 500)


def test_gpt2_from_hf_random_weights() -> None:
    torch.manual_seed(0)
    theirs = GPT2LMHeadModel(GPT2Config(vocab_size=300, n_positions=48, n_embd=48, n_layer=2,
                                        n_head=4, activation_function="gelu_new")).eval()
    cfg, sd = from_hf(theirs.config.to_dict(), theirs.state_dict())
    assert cfg.activation == "gelu_tanh" and cfg.ffn_dim == 192
    ours = cfg.build().eval()
    ours.load_state_dict(sd)
    _check(ours, theirs, 300)


def test_unrepresentable_config_is_refused() -> None:
    cfg = ModelConfig.from_preset("tiny", vocab_size=100, norm="layernorm")
    with pytest.raises(ValueError, match=r"^model: no transformers class represents this decoder "
                       r"exactly; the closest, LlamaForCausalLM, differs in norm='layernorm' "
                       r"\(needs 'rmsnorm'\)$"):
        to_hf(cfg, cfg.build().state_dict())
