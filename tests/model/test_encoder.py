"""Encoder family: BERT parity (masked LM and classification), padding masks, MLM objective."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import (
    AutoModelForMaskedLM,
    AutoModelForSequenceClassification,
    BertConfig,
    BertForMaskedLM,
)

from lmforge.model import ModelConfig, from_hf, masked_lm_inputs, masked_lm_loss, to_hf

TOL = 1e-5


def _tiny_bert(**overrides: object) -> ModelConfig:
    return ModelConfig.from_preset("bert-base", vocab_size=120, d_model=32, n_layers=2,
                                   n_heads=4, max_seq_len=40, dropout=0.0, **overrides)


def _perturb(model: torch.nn.Module) -> None:
    with torch.no_grad():  # biases and norms start at 0/1: make them matter for parity
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name.lower():
                p.add_(torch.randn_like(p) * 0.1)


def _save(config: dict, tensors: dict, folder: Path) -> Path:
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    save_file(tensors, str(folder / "model.safetensors"))
    return folder


def test_bert_export_matches_bert_for_masked_lm(tmp_path: Path) -> None:
    torch.manual_seed(0)
    cfg = _tiny_bert()
    ours = cfg.build().eval()
    _perturb(ours)
    config, tensors = to_hf(cfg, ours.state_dict(), pad_token_id=0)
    theirs = AutoModelForMaskedLM.from_pretrained(_save(config, tensors, tmp_path / "hf"),
                                                  attn_implementation="sdpa").eval()
    assert type(theirs).__name__ == "BertForMaskedLM"
    x = torch.randint(0, 120, (2, 16))
    types = torch.randint(0, 2, (2, 16))
    pad = torch.ones(2, 16, dtype=torch.long)
    pad[1, 11:] = 0
    with torch.no_grad():
        a = ours(x, attention_mask=pad, token_type_ids=types)
        b = theirs(x, attention_mask=pad, token_type_ids=types).logits
    assert (a - b).abs().max().item() < TOL


def test_bert_from_hf_random_weights() -> None:
    torch.manual_seed(0)
    theirs = BertForMaskedLM(BertConfig(vocab_size=90, hidden_size=48, num_hidden_layers=2,
                                        num_attention_heads=4, intermediate_size=80,
                                        max_position_embeddings=32)).eval()
    _perturb(theirs)
    cfg, sd = from_hf(theirs.config.to_dict(), theirs.state_dict())
    ours = cfg.build().eval()
    ours.load_state_dict(sd)
    x = torch.randint(0, 90, (3, 20))
    with torch.no_grad():
        assert (ours(x) - theirs(x).logits).abs().max().item() < TOL


def test_bert_classifier_export(tmp_path: Path) -> None:
    torch.manual_seed(0)
    cfg = _tiny_bert(num_labels=3)
    ours = cfg.build().eval()
    _perturb(ours)
    config, tensors = to_hf(cfg, ours.state_dict())
    theirs = AutoModelForSequenceClassification.from_pretrained(
        _save(config, tensors, tmp_path / "hf")).eval()
    x = torch.randint(0, 120, (2, 12))
    with torch.no_grad():
        assert (ours.classify(x) - theirs(x).logits).abs().max().item() < TOL
    assert ours.classify(x).shape == (2, 3)


def test_padding_does_not_change_real_positions() -> None:
    torch.manual_seed(0)
    model = _tiny_bert().build().eval()
    x = torch.randint(1, 120, (1, 10))
    padded = torch.cat([x, torch.zeros(1, 5, dtype=torch.long)], dim=1)
    mask = torch.cat([torch.ones(1, 10), torch.zeros(1, 5)], dim=1).long()
    with torch.no_grad():
        assert (model(padded, attention_mask=mask)[:, :10] - model(x)).abs().max() < TOL


def test_masked_lm_inputs_80_10_10() -> None:
    ids = torch.randint(5, 1000, (64, 256))
    ids[:, 0] = 1  # [CLS] is never selected
    g = torch.Generator().manual_seed(0)
    corrupted, labels = masked_lm_inputs(ids, mask_id=4, vocab_size=1000, generator=g,
                                         special_ids=[1])
    selected = labels != -100
    assert not selected[:, 0].any()
    share = selected.float().mean().item()
    assert abs(share - 0.15) < 0.01
    assert torch.equal(labels[selected], ids[selected])
    assert torch.equal(corrupted[~selected], ids[~selected])
    masked = (corrupted[selected] == 4).float().mean().item()
    kept = (corrupted[selected] == ids[selected]).float().mean().item()
    assert abs(masked - 0.8) < 0.02 and abs(kept - 0.1) < 0.02  # random ones rarely collide
    again, _ = masked_lm_inputs(ids, mask_id=4, vocab_size=1000,
                                generator=torch.Generator().manual_seed(0), special_ids=[1])
    assert torch.equal(again, corrupted)
    logits = torch.randn(64, 256, 1000)
    expected = torch.nn.functional.cross_entropy(logits[selected], ids[selected])
    assert torch.allclose(masked_lm_loss(logits, labels), expected)


def test_packed_documents_equal_separate_runs() -> None:
    torch.manual_seed(0)
    model = _tiny_bert(type_vocab_size=0).build().eval()
    docs = [torch.randint(1, 120, (1, n)) for n in (6, 9)]
    seg = torch.tensor([[0] * 6 + [1] * 9])
    pos = torch.tensor([list(range(6)) + list(range(9))])
    with torch.no_grad():
        packed = model(torch.cat(docs, 1), segment_ids=seg, position_ids=pos)
        separate = torch.cat([model(d) for d in docs], 1)
    assert (packed - separate).abs().max().item() < TOL
