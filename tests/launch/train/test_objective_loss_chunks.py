"""``train.loss_chunk_tokens``: every objective that predicts the vocabulary gives the plain
loss's value and gradients (fp32, 1e-5) when its loss is computed in chunks; in-process on
tiny models (the DeepSpeed path is the same objective object)."""

from __future__ import annotations

import pytest
import torch

from lmforge.launch.config.sections import TrainConfig
from lmforge.launch.train.objectives import (
    SFT,
    CausalLM,
    Denoising,
    MaskedLM,
    Seq2Seq,
    SpecialIds,
    corruption_generator,
)
from lmforge.model.config import ModelConfig

VOCAB = 61
TINY = {"n_layers": 2, "d_model": 32, "n_heads": 4, "n_kv_heads": 2, "d_ff": 64}
IDS = SpecialIds(pad=0, eos=3, mask=4, never_masked=(0, 1, 2, 3, 4))


def _batch(objective: str) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    x = torch.randint(5, VOCAB, (3, 12), generator=g)
    x[2, 9:] = IDS.pad  # a padded row end
    if objective == "seq2seq":
        target = torch.randint(5, VOCAB, (3, 7), generator=g)
        target[1, 4:] = IDS.pad
        return {"input_ids": x, "attention_mask": (x != IDS.pad).long(), "target_ids": target}
    segments = torch.tensor([[0] * 5 + [1] * 7, [0] * 12, [0] * 3 + [1] * 9])
    labels = torch.randint(5, VOCAB, (3, 12), generator=g)
    labels[0, :3] = labels[2, 3:6] = -100  # prompts (sft) and document ends
    starts = segments != torch.nn.functional.pad(segments, (1, 0), value=-1)[:, :-1]
    index = torch.arange(12).expand(3, 12)
    positions = index - torch.where(starts, index, 0).cummax(-1).values
    return {"input_ids": x, "labels": labels, "segment_ids": segments,
            "position_ids": positions}


def _objective(name: str, chunk: int):
    if name == "causal_lm":
        return "decoder", CausalLM(True, IDS, loss_chunk_tokens=chunk)
    if name == "sft":
        return "decoder", SFT(IDS, loss_chunk_tokens=chunk)
    if name == "masked_lm":
        return "encoder", MaskedLM(IDS, VOCAB, True, mask_prob=0.4, loss_chunk_tokens=chunk)
    if name == "denoising":
        return "encoder_decoder", Denoising(IDS, loss_chunk_tokens=chunk)
    return "encoder_decoder", Seq2Seq(IDS, decode=False, loss_chunk_tokens=chunk)


@pytest.mark.parametrize("name", ["causal_lm", "sft", "masked_lm", "denoising", "seq2seq"])
def test_chunked_objective_equals_the_plain_one(name):
    results = []
    for chunk in (0, 4):
        family, objective = _objective(name, chunk)
        torch.manual_seed(0)
        model = ModelConfig.from_preset("tiny", family=family, vocab_size=VOCAB,
                                        pad_vocab_to_multiple_of=16, **TINY).build()
        out = objective(model, _batch(name), torch.device("cpu"),
                        corruption_generator(1, 2, 0, 0))
        out.loss.backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        results.append((out, grads))
    (plain, plain_grads), (chunked, chunked_grads) = results
    assert plain.targets == chunked.targets > 0 and plain.tokens == chunked.tokens
    torch.testing.assert_close(chunked.loss, plain.loss, atol=1e-5, rtol=0)
    assert chunked_grads.keys() == plain_grads.keys()
    for param, grad in plain_grads.items():
        torch.testing.assert_close(chunked_grads[param], grad, atol=1e-5, rtol=1e-5, msg=param)


def test_sft_without_response_tokens_is_a_connected_zero():
    batch = _batch("sft")
    batch["labels"] = torch.full_like(batch["labels"], -100)
    torch.manual_seed(0)
    model = ModelConfig.from_preset("tiny", vocab_size=VOCAB, **TINY).build()
    out = SFT(IDS, loss_chunk_tokens=4)(model, batch, torch.device("cpu"),
                                        corruption_generator(1, 2, 0, 0))
    out.loss.backward()
    assert (out.loss.item(), out.targets, out.tokens) == (0.0, 0, 0)
    assert all(p.grad is not None for p in model.parameters())


def test_loss_chunk_tokens_must_not_be_negative():
    with pytest.raises(ValueError, match="loss_chunk_tokens"):
        TrainConfig(loss_chunk_tokens=-1)
