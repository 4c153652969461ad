"""Encoder-decoder family: BART parity, teacher forcing vs cached decoding, greedy and beam
search, the denoising objective."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoModelForSeq2SeqLM, BartConfig, BartForConditionalGeneration

from lmforge.model import (
    ModelConfig,
    causal_lm_loss,
    denoising_inputs,
    from_hf,
    generate_seq2seq,
    to_hf,
)

TOL = 1e-5
V = 60


def _bart_cfg(**overrides: object) -> ModelConfig:
    fields = {"vocab_size": V, "d_model": 32, "n_heads": 4, "d_ff": 64, "n_layers": 2,
              "n_decoder_layers": 1, "max_seq_len": 64, "dropout": 0.0, **overrides}
    return ModelConfig.from_preset("bart-small", **fields)


def _perturb(model: torch.nn.Module) -> None:
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name.lower():
                p.add_(torch.randn_like(p) * 0.1)


def _hf_greedy(theirs: torch.nn.Module, src: torch.Tensor, mask: torch.Tensor, n: int,
               **kw: object) -> torch.Tensor:
    return theirs.generate(src, attention_mask=mask, max_new_tokens=n, min_new_tokens=0,
                           do_sample=False, decoder_start_token_id=2, eos_token_id=None,
                           forced_eos_token_id=None, forced_bos_token_id=None, pad_token_id=1,
                           no_repeat_ngram_size=0, **kw)


def test_bart_export_matches_bart_for_conditional_generation(tmp_path: Path) -> None:
    torch.manual_seed(0)
    cfg = _bart_cfg()
    ours = cfg.build().eval()
    _perturb(ours)
    config, tensors = to_hf(cfg, ours.state_dict(), bos_token_id=0, pad_token_id=1,
                            eos_token_id=2, decoder_start_token_id=2)
    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    save_file(tensors, str(folder / "model.safetensors"))
    theirs = AutoModelForSeq2SeqLM.from_pretrained(folder, attn_implementation="sdpa").eval()
    assert type(theirs).__name__ == "BartForConditionalGeneration"
    src = torch.randint(3, V, (2, 14))
    mask = torch.ones_like(src)
    mask[1, 10:] = 0
    tgt = torch.randint(3, V, (2, 9))
    with torch.no_grad():
        a = ours(src, tgt, attention_mask=mask)
        b = theirs(input_ids=src, attention_mask=mask, decoder_input_ids=tgt).logits
    assert (a - b).abs().max().item() < TOL
    mine = generate_seq2seq(ours, src, 10, decoder_start_id=2, attention_mask=mask)
    assert torch.equal(mine, _hf_greedy(theirs, src, mask, 10))


def test_bart_from_hf_and_beam_search_match_transformers() -> None:
    torch.manual_seed(0)
    theirs = BartForConditionalGeneration(BartConfig(
        vocab_size=V, d_model=32, encoder_layers=1, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=48, decoder_ffn_dim=48,
        max_position_embeddings=40, scale_embedding=True, dropout=0.0)).eval()
    _perturb(theirs)
    with torch.no_grad():
        theirs.final_logits_bias.zero_()
    cfg, sd = from_hf(theirs.config.to_dict(), theirs.state_dict())
    assert cfg.scale_embeddings and cfg.decoder_layers == 2
    ours = cfg.build().eval()
    ours.load_state_dict(sd)
    src = torch.randint(3, V, (2, 12))
    mask = torch.ones_like(src)
    tgt = torch.randint(3, V, (2, 7))
    with torch.no_grad():
        diff = ours(src, tgt) - theirs(input_ids=src, decoder_input_ids=tgt).logits
    assert diff.abs().max().item() < TOL
    # Without EOS every beam runs to the end; the best total log-probability wins.
    mine = generate_seq2seq(ours, src, 6, decoder_start_id=2, num_beams=3, length_penalty=0.0)
    hf = _hf_greedy(theirs, src, mask, 6, num_beams=3, length_penalty=0.0)
    assert torch.equal(mine, hf)


def _sequence_logprob(model: torch.nn.Module, src: torch.Tensor, seq: torch.Tensor) -> float:
    with torch.no_grad():
        logp = torch.log_softmax(model(src, seq[:, :-1]).float(), -1)
    return logp.gather(-1, seq[:, 1:, None]).sum().item()


def test_beam_search_finds_exhaustive_optimum() -> None:
    torch.manual_seed(3)
    cfg = _bart_cfg(vocab_size=5, d_model=16, n_heads=2, d_ff=32)
    model = cfg.build().eval()
    _perturb(model)
    src = torch.randint(0, 5, (1, 6))
    # 25 beams over a 5-token vocabulary keep every prefix of length 2: exact search.
    beam = generate_seq2seq(model, src, 3, decoder_start_id=0, num_beams=25,
                            length_penalty=0.0)
    best = max(itertools.product(range(5), repeat=3), key=lambda t: _sequence_logprob(
        model, src, torch.tensor([[0, *t]])))
    assert beam[0, 1:].tolist() == list(best)
    greedy = generate_seq2seq(model, src, 3, decoder_start_id=0)
    one_beam = generate_seq2seq(model, src, 3, decoder_start_id=0, num_beams=1)
    assert torch.equal(greedy, one_beam)
    assert _sequence_logprob(model, src, beam) >= _sequence_logprob(model, src, greedy) - 1e-6


@pytest.mark.parametrize("preset", ["transformer-base", "bart-small"])
def test_cached_decoding_equals_teacher_forcing(preset: str) -> None:
    torch.manual_seed(0)
    cfg = ModelConfig.from_preset(preset, vocab_size=V, d_model=32, n_heads=4, d_ff=64,
                                  n_layers=2, dropout=0.0)
    model = cfg.build().eval()
    src, tgt = torch.randint(0, V, (2, 11)), torch.randint(0, V, (2, 8))
    with torch.no_grad():
        full = model(src, tgt)
        memory = model.encode(src)
        cache = model.new_cache(8)
        steps = torch.cat([model.decode(tgt[:, t:t + 1], memory, cache=cache)
                           for t in range(8)], dim=1)
    assert (full - steps).abs().max().item() < TOL
    assert [type(b).__name__ for b in model.blocks()] == ["Block"] * 2 + ["CrossBlock"] * 2


def test_generation_stops_at_eos() -> None:
    torch.manual_seed(0)
    model = _bart_cfg().build().eval()
    src = torch.randint(3, V, (2, 9))
    free = generate_seq2seq(model, src, 6, decoder_start_id=2)
    eos = int(free[0, 2])

    def first(row: torch.Tensor) -> int:  # index of the first generated eos, else the end
        hits = (row[1:] == eos).nonzero()
        return int(hits[0, 0]) + 1 if len(hits) else len(row) - 1

    out = generate_seq2seq(model, src, 6, decoder_start_id=2, eos_id=eos)
    assert out.shape[1] == max(first(free[0]), first(free[1])) + 1
    for b in range(2):
        stop = first(free[b])
        assert torch.equal(out[b, : stop + 1], free[b, : stop + 1])
        assert (out[b, stop:] == eos).all() or stop == 6
    beams = generate_seq2seq(model, src, 6, decoder_start_id=2, eos_id=eos, num_beams=2)
    assert beams[:, 0].tolist() == [2, 2] and beams.shape[1] <= 7


def test_denoising_objective_reconstructs_original() -> None:
    ids = torch.randint(5, 500, (8, 64))
    ids[3, 40:] = 1  # a padded row
    g = torch.Generator().manual_seed(0)
    batch = denoising_inputs(ids, mask_id=4, pad_id=1, decoder_start_id=2, generator=g)
    labels, src = batch["labels"], batch["input_ids"]
    assert torch.equal(labels[ids != 1], ids[ids != 1]) and (labels[ids == 1] == -100).all()
    assert batch["decoder_input_ids"][:, 0].eq(2).all()
    assert torch.equal(batch["decoder_input_ids"][:, 1:40], ids[:, :39])
    assert torch.equal(batch["attention_mask"], (src != 1).long())
    for b in range(8):
        n_real = int((ids[b] != 1).sum())
        source = src[b][src[b] != 1]
        assert (source == 4).any()
        # The source keeps ~70% of the tokens in order; every mask stands for one span.
        kept = source[source != 4]
        assert 0.6 * n_real <= len(kept) <= 0.75 * n_real
        it = iter(ids[b, :n_real].tolist())
        assert all(tok in it for tok in kept.tolist())  # a subsequence of the original
    again = denoising_inputs(ids, mask_id=4, pad_id=1, decoder_start_id=2,
                             generator=torch.Generator().manual_seed(0))
    assert torch.equal(again["input_ids"], src)
    model = _bart_cfg(vocab_size=500).build()
    loss = causal_lm_loss(model(src, batch["decoder_input_ids"], batch["attention_mask"]),
                          labels)
    loss.backward()
    assert abs(loss.item() - torch.log(torch.tensor(500.0)).item()) < 1.0


@pytest.mark.parametrize("seed", [3, 5])
def test_beam_search_with_eos_matches_transformers(seed: int) -> None:
    torch.manual_seed(seed)
    theirs = BartForConditionalGeneration(BartConfig(
        vocab_size=12, d_model=32, encoder_layers=1, decoder_layers=1,
        encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=48,
        decoder_ffn_dim=48, max_position_embeddings=40, dropout=0.0)).eval()
    with torch.no_grad():
        for p in theirs.parameters():
            p.mul_(8)  # sharper distributions, so beams end at different steps
        theirs.final_logits_bias.zero_()
    cfg, sd = from_hf(theirs.config.to_dict(), theirs.state_dict())
    ours = cfg.build().eval()
    ours.load_state_dict(sd)
    src = torch.randint(3, 12, (3, 8))
    eos = int(generate_seq2seq(ours, src, 4, decoder_start_id=2)[0, 3])
    for length_penalty in (0.0, 1.0, 2.0):
        mine = generate_seq2seq(ours, src, 8, decoder_start_id=2, eos_id=eos, num_beams=3,
                                length_penalty=length_penalty)
        hf = theirs.generate(src, attention_mask=torch.ones_like(src), max_new_tokens=8,
                             min_new_tokens=0, do_sample=False, num_beams=3,
                             decoder_start_token_id=2, eos_token_id=eos, pad_token_id=eos,
                             forced_eos_token_id=None, forced_bos_token_id=None,
                             no_repeat_ngram_size=0, early_stopping=True,
                             length_penalty=length_penalty)
        assert (mine == eos).any()
        assert torch.equal(mine, hf)
