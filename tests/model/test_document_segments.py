"""Packed documents through `DocumentSegments` (one SDPA call per document length, no T x S
tensor): losses and gradients equal the dense mask's, and each document trained alone.

The dense (B, 1, T, T) mask of `document_mask_backend("dense")` is the reference; the
per-document check is an independent one (each document run as its own batch row).
"""

from __future__ import annotations

import pytest
import torch

from lmforge.model import ModelConfig, causal_lm_loss, segment_positions
from lmforge.model.document_masks import DocumentSegments, document_mask_backend
from lmforge.model.layers import build_attention_mask

VOCAB = 61
T = 24
# uneven lengths, documents of length 1 (also at a row's start and end), a one-document row,
# and lengths shared across rows (7 in rows 0 and 2: one SDPA call for both)
LENGTHS = [[7, 1, 12, 4], [24], [1, 7, 9, 6, 1]]


def _segments(lengths: list[list[int]] = LENGTHS) -> torch.Tensor:
    return torch.stack([torch.repeat_interleave(torch.arange(len(row)), torch.tensor(row))
                        for row in lengths])


def _config(family: str, kv_heads: int, position: str = "rope") -> ModelConfig:
    return ModelConfig.from_preset("tiny", family=family, vocab_size=VOCAB, n_layers=2,
                                   d_model=32, n_heads=4, n_kv_heads=kv_heads, d_ff=64,
                                   max_seq_len=64, position=position)


def _loss_and_grads(model, inputs: dict, labels: torch.Tensor, backend: str):
    model.zero_grad(set_to_none=True)
    with document_mask_backend(backend):
        loss = causal_lm_loss(model(**inputs), labels)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def _batch(family: str, padded: bool) -> tuple[dict, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    x = torch.randint(0, VOCAB, (3, T), generator=g)
    labels = torch.randint(0, VOCAB, (3, T), generator=g)
    segments = _segments()
    inputs = {"input_ids": x, "segment_ids": segments,
              "position_ids": segment_positions(segments)}
    if padded:  # encoder: padding keys inside a document and a row's padded end
        padding = torch.ones(3, T, dtype=torch.long)
        padding[0, 10:14], padding[1, 20:] = 0, 0
        inputs["attention_mask"] = padding
        labels[padding == 0] = -100
    return inputs, labels


@pytest.mark.parametrize("family,kv_heads,position,padded", [
    ("decoder", 2, "rope", False),     # GQA
    ("decoder", 4, "learned", False),  # MHA
    ("encoder", 4, "rope", False),
    ("encoder", 2, "learned", True),
])
def test_segments_give_the_dense_loss_and_gradients(family, kv_heads, position, padded):
    torch.manual_seed(0)
    model = _config(family, kv_heads, position).build()
    inputs, labels = _batch(family, padded)
    with document_mask_backend("auto"):  # CPU: the segments path, checked here
        mask, _ = build_attention_mask(model.cfg, torch.arange(T)[None], torch.arange(T)[None],
                                       causal=family == "decoder",
                                       q_segments=inputs["segment_ids"],
                                       k_segments=inputs["segment_ids"],
                                       key_padding=inputs.get("attention_mask"))
    assert isinstance(mask, DocumentSegments)
    # one SDPA call per distinct length: 1, 4, 6, 7, 9, 12, 24
    assert sorted(g.index.shape[1] for g in mask.groups) == [1, 4, 6, 7, 9, 12, 24]
    dense_loss, dense_grads = _loss_and_grads(model, inputs, labels, "dense")
    loss, grads = _loss_and_grads(model, inputs, labels, "auto")
    torch.testing.assert_close(loss, dense_loss, atol=1e-5, rtol=0)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, dense_grads[name], atol=1e-5, rtol=0, msg=name)


def test_packed_row_equals_each_document_alone():
    """Independent of the dense mask: a causal LM's packed row gives each document's
    logits and gradients as if that document were a batch of its own."""
    torch.manual_seed(0)
    model = _config("decoder", 2).build()
    lengths = [5, 1, 10]
    x = torch.randint(0, VOCAB, (1, sum(lengths)), generator=torch.Generator().manual_seed(1))
    segments = _segments([lengths])
    packed = model(x, segment_ids=segments, position_ids=segment_positions(segments))
    packed.sum().backward()
    packed_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    alone = torch.cat([model(doc) for doc in x.split(lengths, dim=1)], dim=1)
    alone.sum().backward()
    torch.testing.assert_close(packed, alone, atol=1e-5, rtol=0)
    for name, param in model.named_parameters():
        torch.testing.assert_close(packed_grads[name], param.grad, atol=1e-4, rtol=1e-5,
                                   msg=name)


def test_dense_remains_where_segments_do_not_apply():
    segments, index = _segments(), torch.arange(T)[None]
    padding = torch.ones(3, T, dtype=torch.bool)
    padding[1, 20:] = False

    def mask(position="rope", backend="auto", causal=True, key_padding=None, seg=segments):
        with document_mask_backend(backend):
            return build_attention_mask(_config("decoder", 2, position), index, index,
                                        causal=causal, q_segments=seg, k_segments=seg,
                                        key_padding=key_padding)[0]

    for dense in (mask(backend="dense"), mask(position="alibi"),
                  mask(key_padding=padding),  # causal with key padding: SDPA takes one
                  mask(seg=segments.flip(-1))):  # decreasing ids: a document in two runs
        assert isinstance(dense, torch.Tensor) and dense.shape[-2:] == (T, T)
    assert isinstance(mask(causal=False, key_padding=padding), DocumentSegments)


def test_importing_the_model_does_not_import_dynamo():
    """The graph break for compiled blocks is set up by whoever compiles
    (`keep_segments_eager`): building or evaluating a model (a dry-run's meta build, an
    export check) must not pay for importing torch._dynamo (~1.5 s a process)."""
    import subprocess
    import sys

    code = ("import sys, lmforge.model, lmforge.model.layers, lmforge.model.document_masks; "
            "print('torch._dynamo' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "False"


def test_keep_segments_eager_makes_attend_a_graph_break_once():
    import torch._dynamo as dynamo

    from lmforge.model.document_masks import document_segments, keep_segments_eager

    ids = _segments([[3, 5]])
    pos = torch.arange(8)[None]
    segments = document_segments(_config("decoder", 4), pos, pos, ids, ids, None, True)
    q = torch.randn(1, 4, 8, 8)

    def traced_ops() -> int:  # ops dynamo puts in the graph of a call to attend, then * 2
        dynamo.reset()
        return dynamo.explain(lambda x: segments.attend(x, x, x, 0.0, False) * 2)(q).op_count

    before = DocumentSegments.attend  # already eager if this process compiled blocks
    plain = getattr(before, "_lmforge_plain", before)
    DocumentSegments.attend = plain
    try:
        inlined = traced_ops()
        keep_segments_eager()
        eager = DocumentSegments.attend
        keep_segments_eager()
        assert DocumentSegments.attend is eager and eager is not plain
        assert inlined > 1 and traced_ops() == 1  # only the * 2: attend ran eagerly
    finally:
        DocumentSegments.attend = before
