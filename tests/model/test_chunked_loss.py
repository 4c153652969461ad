"""The chunked vocabulary loss equals the plain one, and never saves whole logits."""

from __future__ import annotations

import pytest
import torch

from lmforge.model import ModelConfig, causal_lm_loss, chunked_lm_loss

VOCAB = 97  # not a multiple of the chunk or of the padding: every edge is exercised
TINY = {"n_layers": 2, "d_model": 32, "n_heads": 4, "n_kv_heads": 2, "d_ff": 64}


def _model(family: str, **overrides: object) -> torch.nn.Module:
    torch.manual_seed(0)
    return ModelConfig.from_preset("tiny", family=family, vocab_size=VOCAB, **TINY,
                                   **overrides).build()


def _inputs(family: str, B: int = 2, T: int = 11) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randint(5, VOCAB, (B, T), generator=g)
    if family == "encoder_decoder":
        return {"input_ids": x, "decoder_input_ids": torch.randint(5, VOCAB, (B, T), generator=g)}
    return {"input_ids": x}


def _labels(B: int = 2, T: int = 11) -> torch.Tensor:
    labels = torch.randint(0, VOCAB, (B, T), generator=torch.Generator().manual_seed(2))
    labels[0, :4] = -100  # a prompt, masked positions: ignored labels
    labels[1, -1] = -100
    return labels


def _loss_and_grads(model: torch.nn.Module, inputs: dict, labels: torch.Tensor,
                    chunk: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad()
    if chunk:
        hidden = model(**inputs, return_hidden=True)
        loss = chunked_lm_loss(hidden, model.lm_head, labels, model.cfg.vocab_size, chunk)
    else:
        loss = causal_lm_loss(model(**inputs), labels)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                           if p.grad is not None}


@pytest.mark.parametrize("family,overrides", [
    ("decoder", {}),
    ("decoder", {"tie_embeddings": False, "pad_vocab_to_multiple_of": 64}),
    ("encoder", {}),
    ("encoder_decoder", {"pad_vocab_to_multiple_of": 64}),
])
@pytest.mark.parametrize("chunk", [1, 5, 1000])
def test_chunked_loss_and_gradients_equal_the_plain_loss(family, overrides, chunk):
    model = _model(family, **overrides)
    inputs, labels = _inputs(family), _labels()
    plain, plain_grads = _loss_and_grads(model, inputs, labels, 0)
    chunked, chunked_grads = _loss_and_grads(model, inputs, labels, chunk)
    torch.testing.assert_close(chunked, plain, atol=1e-5, rtol=0)
    assert chunked_grads.keys() == plain_grads.keys()
    for name, grad in plain_grads.items():
        torch.testing.assert_close(chunked_grads[name], grad, atol=1e-5, rtol=1e-5, msg=name)


def test_nothing_to_predict_gives_a_connected_zero():
    model = _model("decoder", tie_embeddings=False)
    hidden = model(**_inputs("decoder"), return_hidden=True)
    loss = chunked_lm_loss(hidden, model.lm_head, torch.full((2, 11), -100), VOCAB, 4)
    loss.backward()
    assert loss.item() == 0.0 and model.lm_head.weight.grad is not None


def test_no_saved_tensor_holds_more_than_one_chunk_of_logits():
    """What autograd keeps for the backward: at most chunk x V logits, never B x T x V."""
    model = _model("decoder")
    inputs, labels = _inputs("decoder", B=4, T=32), torch.randint(0, VOCAB, (4, 32))
    largest: list[int] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.dim() >= 1 and t.shape[-1] == VOCAB:
            largest.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        hidden = model(**inputs, return_hidden=True)
        loss = chunked_lm_loss(hidden, model.lm_head, labels, VOCAB, 32)
    loss.backward()
    assert max(largest, default=0) <= 32 * VOCAB  # one chunk, or the (d, V) head weight
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        causal_lm_loss(model(**inputs), labels)  # the plain loss does save all of them
    assert max(largest) >= 4 * 32 * VOCAB


def test_chunk_tokens_must_be_positive():
    with pytest.raises(ValueError, match="chunk_tokens"):
        chunked_lm_loss(torch.zeros(1, 2, 4), torch.nn.Linear(4, 5), torch.zeros(1, 2).long(),
                        5, 0)
