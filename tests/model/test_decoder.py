"""Decoder-only model: shapes, packed-document masks, KV-cache generation, sampling."""

from __future__ import annotations

import pytest
import torch

from lmforge.model import ModelConfig, causal_lm_loss, generate, sample_next, segment_positions

VOCAB = 257


def _model(**overrides: object) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = ModelConfig.from_preset("tiny", vocab_size=VOCAB, d_model=64, n_layers=2, **overrides)
    return cfg.build().eval()


def test_tiny_forward_shapes_and_loss() -> None:
    model = _model()
    x = torch.randint(0, VOCAB, (3, 17))
    logits = model(x)
    assert logits.shape == (3, 17, VOCAB) and logits.dtype == torch.float32
    loss = causal_lm_loss(logits[:, :-1], x[:, 1:])
    # Fresh init predicts nearly uniformly: loss close to ln(V).
    assert abs(loss.item() - torch.log(torch.tensor(float(VOCAB))).item()) < 0.5
    assert [type(b).__name__ for b in model.blocks()] == ["Block"] * 2
    assert all(hasattr(b, "attn") for b in model.blocks())


def test_padded_vocab_returns_real_vocab_logits() -> None:
    model = _model(pad_vocab_to_multiple_of=64)
    assert model.tok_emb.weight.shape[0] == 320
    assert model(torch.randint(0, VOCAB, (1, 5))).shape == (1, 5, VOCAB)


def test_causal_lm_loss_ignores_and_upcasts() -> None:
    logits = torch.randn(2, 4, 11, dtype=torch.bfloat16)
    labels = torch.tensor([[1, 2, -100, 3], [-100, -100, 4, 5]])
    loss = causal_lm_loss(logits, labels)
    assert loss.dtype == torch.float32
    kept = labels != -100
    ref = torch.nn.functional.cross_entropy(logits.float()[kept], labels[kept])
    assert torch.allclose(loss, ref)


def test_segment_positions_restart() -> None:
    seg = torch.tensor([[0, 0, 0, 1, 1, 2], [5, 5, 5, 5, 5, 5]])
    assert segment_positions(seg).tolist() == [[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 4, 5]]


@pytest.mark.parametrize("position", ["rope", "learned", "sinusoidal", "alibi"])
def test_packed_documents_equal_separate_runs(position: str) -> None:
    model = _model(position=position)
    lengths = [5, 7, 4]
    docs = [torch.randint(0, VOCAB, (1, n)) for n in lengths]
    packed = torch.cat(docs, dim=1)
    seg = torch.cat([torch.full((1, n), i) for i, n in enumerate(lengths)], dim=1)
    logits = model(packed, segment_ids=seg, position_ids=segment_positions(seg))
    separate = torch.cat([model(d) for d in docs], dim=1)
    assert (logits - separate).abs().max().item() < 1e-5


@pytest.mark.parametrize("overrides", [{}, {"position": "alibi"}, {"n_kv_heads": 1},
                                       {"position": "learned", "norm_position": "post"}])
def test_kv_cache_greedy_matches_full_recompute(overrides: dict) -> None:
    model = _model(**overrides)
    prompt = torch.randint(0, VOCAB, (2, 6))
    cached = generate(model, prompt, max_new_tokens=10, temperature=0.0)
    seq = prompt
    with torch.no_grad():
        for _ in range(10):
            nxt = model(seq)[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], dim=1)
    assert torch.equal(cached, seq)
    # Logits with the cache equal the uncached forward at every step.
    cache = model.new_cache(seq.shape[1])
    with torch.no_grad():
        step_logits = torch.cat([model(seq[:, :6], cache=cache)]
                                + [model(seq[:, t:t + 1], cache=cache) for t in range(6, 16)], 1)
        assert (step_logits - model(seq)).abs().max().item() < 1e-5


def test_generate_stops_at_eos_and_fills() -> None:
    model = _model()
    prompt = torch.randint(0, VOCAB, (2, 4))
    free = generate(model, prompt, max_new_tokens=8, greedy=True)
    eos = int(free[0, 6])  # the third generated token of row 0

    def first(row: torch.Tensor) -> int:  # index of the first generated eos, else the end
        hits = (row[4:] == eos).nonzero()
        return int(hits[0, 0]) + 4 if len(hits) else len(row) - 1

    out = generate(model, prompt, max_new_tokens=8, greedy=True, eos_id=eos)
    assert out.shape[1] == max(first(free[0]), first(free[1])) + 1
    for b in range(2):
        stop = first(free[b])
        assert torch.equal(out[b, : stop + 1], free[b, : stop + 1])
        assert (out[b, stop:] == eos).all() or stop == 11


def test_sampling_is_reproducible_and_respects_top_k_top_p() -> None:
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0, -3.0]]).repeat(4000, 1)
    g = torch.Generator().manual_seed(1)
    top2 = sample_next(logits, temperature=1.0, top_k=2, generator=g)
    assert set(top2.tolist()) == {0, 1}
    probs = logits[0].softmax(-1)  # 0.609, 0.224, 0.136, ...: top_p 0.7 keeps two tokens
    nucleus = sample_next(logits, top_p=0.7, generator=torch.Generator().manual_seed(2))
    assert set(nucleus.tolist()) == {0, 1}
    share0 = (nucleus == 0).float().mean().item()
    assert abs(share0 - probs[0] / probs[:2].sum()) < 0.03
    a = sample_next(logits[:8], generator=torch.Generator().manual_seed(3))
    b = sample_next(logits[:8], generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    model = _model()
    prompt = torch.randint(0, VOCAB, (1, 3))
    s1 = generate(model, prompt, 6, temperature=0.8, top_p=0.9,
                  generator=torch.Generator().manual_seed(4))
    s2 = generate(model, prompt, 6, temperature=0.8, top_p=0.9,
                  generator=torch.Generator().manual_seed(4))
    assert torch.equal(s1, s2)


def test_grouped_query_heads_share_keys() -> None:
    """GQA with duplicated kv weights equals multi-head attention with those weights."""
    gqa = _model(n_kv_heads=2)
    mha = _model(n_kv_heads=4)
    sd = gqa.state_dict()
    hd, d = 16, 64
    for i in range(2):
        q, k, v = sd[f"layers.{i}.attn.qkv.weight"].split((d, 2 * hd, 2 * hd))
        rep = [t.view(2, hd, d).repeat_interleave(2, dim=0).reshape(4 * hd, d) for t in (k, v)]
        sd[f"layers.{i}.attn.qkv.weight"] = torch.cat([q, *rep])
    mha.load_state_dict(sd)
    x = torch.randint(0, VOCAB, (2, 9))
    assert (gqa(x) - mha(x)).abs().max().item() < 1e-5


def test_config_errors_name_the_field() -> None:
    with pytest.raises(ValueError, match="^n_kv_heads:"):
        ModelConfig.from_preset("tiny", n_kv_heads=3)
    with pytest.raises(ValueError, match="^d_model:"):
        ModelConfig(d_model=100, n_heads=12)
    with pytest.raises(ValueError, match="^vocab_size:"):
        ModelConfig.from_preset("tiny").build()
    with pytest.raises(ValueError, match="^preset:"):
        ModelConfig.from_preset("nope")
    with pytest.raises(ValueError, match="^max_seq_len:"):
        _model(position="learned", max_seq_len=8)(torch.zeros(1, 9, dtype=torch.long))


def test_blocks_recompute_exactly_under_checkpointing() -> None:
    """Blocks are pure functions of their inputs: wrapping each block's forward in
    activation checkpointing from outside gives bit-identical gradients, dropout included."""
    from torch.utils.checkpoint import checkpoint

    x = torch.randint(0, VOCAB, (2, 12))
    seg = torch.tensor([[0] * 5 + [1] * 7, [0] * 12])

    def grads(wrap: str | None) -> list[torch.Tensor]:
        model = _model(dropout=0.1).train()
        for block in model.blocks():
            target = block.attn if wrap == "selective" else block
            if wrap is not None:
                inner = target.forward
                target.forward = lambda *a, _f=inner: checkpoint(_f, *a, use_reentrant=False)
        torch.manual_seed(7)
        logits = model(x, segment_ids=seg, position_ids=segment_positions(seg))
        causal_lm_loss(logits[:, :-1], x[:, 1:]).backward()
        return [p.grad.clone() for p in model.parameters()]

    plain = grads(None)
    for wrap in ("full", "selective"):
        assert all(torch.equal(a, b) for a, b in zip(plain, grads(wrap), strict=True))


def test_bf16_model_gives_fp32_loss() -> None:
    model = _model().to(torch.bfloat16)
    x = torch.randint(0, VOCAB, (2, 10))
    logits = model(x)
    assert logits.dtype == torch.bfloat16
    loss = causal_lm_loss(logits[:, :-1], x[:, 1:])
    assert loss.dtype == torch.float32
    ref = causal_lm_loss(_model()(x)[:, :-1], x[:, 1:])
    assert abs(loss.item() - ref.item()) < 0.05
