"""Scoring by hand: the harness's request encoding, acc/acc_norm/acc_bytes and the cloze, and
the log-likelihood function built from a logits function."""

from __future__ import annotations

import math

import pytest
import torch

from lmforge.launch.eval.loglikelihood import causal_loglikelihood
from lmforge.launch.eval.scoring import PairEncoder, TaskScore, score_task
from lmforge.launch.eval.tasks import ClozeExample, EvalTask, MultipleChoiceExample


def byte_encode(text: str, add_special_tokens: bool | None) -> list[int]:
    """A byte-level tokenizer: id = byte + 10; BOS (1) first unless told not to."""
    ids = [b + 10 for b in text.encode("utf-8")]
    return ids if add_special_tokens is False else [1, *ids]


def test_pair_encoding_moves_trailing_whitespace_and_handles_empty_contexts():
    causal = PairEncoder(byte_encode, prefix_token_id=1)
    # "ab \n" + "c": the context keeps "ab", the continuation is " \nc"; the continuation ids
    # are those of the whole text past the context's (the BOS stays with the context)
    assert causal("ab \n", "c") == ([1, 107, 108], [42, 20, 109])
    # an empty context is the prefix token; a continuation starting with it keeps it as context
    assert causal("", " x") == ([1], [42, 130])
    assert PairEncoder(lambda t, s: [7, 8], prefix_token_id=7)("", "y") == ([7], [8])
    seq2seq = PairEncoder(byte_encode, prefix_token_id=1, backend="seq2seq")
    assert seq2seq("ab ", "c") == ([1, 107, 108], [42, 109])


def table_loglikelihood(lls: dict[tuple[int, ...], tuple[float, bool]]):
    """A log-likelihood function that looks each continuation's ids up in a table."""
    return lambda pairs: [lls[tuple(cont)] for _, cont in pairs]


def cont_ids(text: str) -> tuple[int, ...]:
    return tuple(byte_encode(text, False))


def test_acc_acc_norm_acc_bytes_by_hand():
    # choice lengths: "a" 1 char/1 byte, "bbbb" 4/4, "éé" 2 chars/4 bytes
    lls = {cont_ids(" a"): (-1.0, False), cont_ids(" bbbb"): (-2.0, False),
           cont_ids(" éé"): (-1.5, True)}
    examples = tuple(MultipleChoiceExample("q", ("a", "bbbb", "éé"), gold) for gold in range(3))
    task = EvalTask("t", "multiple_choice", examples)
    score = score_task(task, PairEncoder(byte_encode, 1), table_loglikelihood(lls))
    # acc: argmax(-1, -2, -1.5) = 0; acc_norm by characters: (-1, -0.5, -0.75) -> 1;
    # acc_bytes: (-1, -0.5, -0.375) -> 2. Each gold is right for exactly one of the three.
    assert score.metrics() == {"acc": 1 / 3, "acc_norm": 1 / 3, "acc_bytes": 1 / 3}
    assert score.loglikelihoods == [[-1.0, -2.0, -1.5]] * 3
    first = score_task(task, PairEncoder(byte_encode, 1), table_loglikelihood(lls), limit=1)
    assert first.metrics() == {"acc": 1.0, "acc_norm": 0.0, "acc_bytes": 0.0}


def test_ties_go_to_the_first_choice_and_ranks_sum_to_the_whole():
    lls = {cont_ids(" x"): (-1.0, False), cont_ids(" y"): (-1.0, False)}
    examples = (MultipleChoiceExample("c", ("x", "y"), 0), MultipleChoiceExample("c", ("x", "y"),
                                                                                 1)) * 2
    task = EvalTask("t", "multiple_choice", examples)
    fn, enc = table_loglikelihood(lls), PairEncoder(byte_encode, 1)
    whole = score_task(task, enc, fn)
    assert whole.metrics()["acc"] == 0.5
    parts = [score_task(task, enc, fn, shard=(rank, 3)) for rank in range(3)]
    assert [p.count for p in parts] == [2, 1, 1]
    summed = TaskScore("multiple_choice", sum(p.count for p in parts),
                       {k: sum(p.sums[k] for p in parts) for k in whole.sums})
    assert summed.metrics() == whole.metrics()


def test_cloze_acc_loglikelihood_and_perplexity():
    lls = {cont_ids(" be"): (-2.0, True), cont_ids(" go"): (-4.0, False)}
    task = EvalTask("c", "cloze", (ClozeExample("to", "be"), ClozeExample("to", "go")))
    metrics = score_task(task, PairEncoder(byte_encode, 1), table_loglikelihood(lls)).metrics()
    assert metrics == {"acc": 0.5, "loglikelihood": -3.0, "perplexity": math.exp(3.0)}


def test_causal_loglikelihood_reads_the_right_positions_and_truncates_left():
    vocab = 6
    # logits at position t favour token (input[t] + 1) % vocab: a "count up" model
    def logits_of(ids: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.one_hot((ids + 1) % vocab, vocab).float() * 3.0

    def expected(cont: list[int], previous: list[int]) -> float:
        row = torch.log_softmax(torch.tensor([3.0] + [0.0] * (vocab - 1)), -1)
        return sum(float(row[0] if c == (p + 1) % vocab else row[1])
                   for c, p in zip(cont, previous, strict=True))

    score = causal_loglikelihood(logits_of, max_length=8, batch_size=2)
    pairs = [([1, 2], [3, 4]), ([1], [5, 5, 0]), ([0, 1, 2, 3, 4, 5, 0, 1], [2, 3])]
    results = score(pairs)
    assert results[0] == (pytest.approx(expected([3, 4], [2, 3])), True)
    assert results[1] == (pytest.approx(expected([5, 5, 0], [1, 5, 5])), False)
    # 10 tokens > max_length + 1: the first one is dropped, the scores are unchanged
    assert results[2] == (pytest.approx(expected([2, 3], [1, 2])), True)
    with pytest.raises(ValueError, match="longer than the model's context"):
        score([([1], list(range(9)))])
    with pytest.raises(ValueError, match="empty context or continuation"):
        score([([1], [])])
