"""Scoring eval tasks as lm-evaluation-harness scores them, on any log-likelihood function.

A request is a (context, continuation) pair of strings. It becomes token ids the way the
harness makes them (``TemplateLM._encode_pair``): whitespace at the end of the context moves
to the start of the continuation; a decoder encodes ``context + continuation`` whole and
takes the ids past those of the context alone as the continuation (so a word is split as it
is in running text); an encoder-decoder encodes the two apart. An empty context becomes the
tokenizer's prefix token (BOS, else EOS).

The model is one function over token ids, :data:`LoglikelihoodFn`: for each (context ids,
continuation ids) the summed log-probability of the continuation and whether greedy decoding
yields it. ``loglikelihood.py`` builds one from a logits function (transformers, or the
engine in the training loop).

Metrics per task (means over examples):

- multiple choice (each choice scored as ``target_delimiter + choice``): ``acc``, the choice
  with the highest summed log-likelihood; ``acc_norm``, the highest log-likelihood divided by
  the choice's length in characters (the harness's ``acc_norm``); ``acc_bytes``, divided by
  its length in UTF-8 bytes. Ties go to the first choice (``numpy.argmax``).
- cloze: ``acc``, whether the greedy continuation is exactly the target's tokens;
  ``loglikelihood``, the target's mean log-likelihood; ``perplexity``,
  ``exp(-loglikelihood)`` (the harness's aggregation).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

from lmforge.launch.eval.tasks import ClozeExample, EvalTask, MultipleChoiceExample

TokenIds = list[int]
LoglikelihoodFn = Callable[[Sequence[tuple[TokenIds, TokenIds]]], list[tuple[float, bool]]]
"""(context ids, continuation ids) pairs → (summed continuation log-probability, greedy)."""
EncodeFn = Callable[[str, "bool | None"], TokenIds]
"""(text, add_special_tokens) → ids; None: the tokenizer's own default, as ``encode(text)``."""


@dataclass(frozen=True)
class PairEncoder:
    """Turns (context, continuation) strings into token ids as lm-evaluation-harness does.

    Args:
        encode: The tokenizer; see :data:`EncodeFn`.
        prefix_token_id: Conditions an empty context (the harness: BOS, else EOS).
        backend: ``causal`` (decoder) or ``seq2seq`` (encoder-decoder).
    """

    encode: EncodeFn
    prefix_token_id: int
    backend: Literal["causal", "seq2seq"] = "causal"

    def __call__(self, context: str, continuation: str) -> tuple[TokenIds, TokenIds]:
        if not context:
            cont = self.encode(continuation, False)
            if cont and cont[0] == self.prefix_token_id:
                return cont[:1], cont[1:]
            return [self.prefix_token_id], cont
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        if self.backend == "seq2seq":
            return self.encode(context, None), self.encode(continuation, False)
        whole = self.encode(context + continuation, None)
        ctx = self.encode(context, None)
        return ctx, whole[len(ctx):]


@dataclass
class TaskScore:
    """Sums over the examples scored so far; ranks add theirs before :meth:`metrics`."""

    kind: Literal["multiple_choice", "cloze"]
    count: int = 0
    sums: dict[str, float] = field(default_factory=dict)
    loglikelihoods: list[list[float]] = field(default_factory=list)
    """Per example: each choice's (or the target's) summed log-likelihood, in order."""

    def add(self, values: dict[str, float]) -> None:
        self.count += 1
        for key, value in values.items():
            self.sums[key] = self.sums.get(key, 0.0) + value

    def metrics(self) -> dict[str, float]:
        """The task's metrics (see the module docstring); empty when nothing was scored."""
        if not self.count:
            return {}
        means = {k: v / self.count for k, v in self.sums.items()}
        if self.kind == "cloze":
            means["perplexity"] = math.exp(-means["loglikelihood"])
        return means


def _argmax(values: Sequence[float]) -> int:
    best = 0
    for i, value in enumerate(values):
        if value > values[best]:  # the first of equal maxima, as numpy.argmax
            best = i
    return best


def requests_of(task: EvalTask) -> list[tuple[str, str]]:
    """Every (context, continuation) string pair the task asks, example by example."""
    delim = task.target_delimiter
    out: list[tuple[str, str]] = []
    for example in task.examples:
        if isinstance(example, MultipleChoiceExample):
            out.extend((example.context, delim + choice) for choice in example.choices)
        else:
            out.append((example.context, delim + example.target))
    return out


def score_task(task: EvalTask, encoder: PairEncoder, loglikelihood: LoglikelihoodFn,
               limit: int | None = None, shard: tuple[int, int] = (0, 1)) -> TaskScore:
    """Scores a task's examples with one call of ``loglikelihood``.

    Args:
        task: The task.
        encoder: Makes token ids from the strings.
        loglikelihood: The model.
        limit: Score the first ``limit`` examples only.
        shard: ``(rank, world)``: score examples ``rank, rank + world, ...`` of them (the
            caller sums the ranks' :class:`TaskScore`).

    Returns:
        The sums (and per-example log-likelihoods) of the examples scored.
    """
    rank, world = shard
    examples = task.limited(limit).examples[rank::world]
    part = EvalTask(task.name, task.kind, examples, task.target_delimiter, task.source)
    pairs = [encoder(context, continuation) for context, continuation in requests_of(part)]
    results = loglikelihood(pairs) if pairs else []
    score = TaskScore(task.kind)
    at = 0
    for example in examples:
        if isinstance(example, MultipleChoiceExample):
            n = len(example.choices)
            lls = [ll for ll, _ in results[at:at + n]]
            at += n
            chars = [ll / len(c) for ll, c in zip(lls, example.choices, strict=True)]
            size = [ll / len(c.encode("utf-8")) for ll, c in zip(lls, example.choices,
                                                                   strict=True)]
            score.add({"acc": float(_argmax(lls) == example.gold),
                       "acc_norm": float(_argmax(chars) == example.gold),
                       "acc_bytes": float(_argmax(size) == example.gold)})
        else:
            assert isinstance(example, ClozeExample)
            ll, greedy = results[at]
            lls = [ll]
            at += 1
            score.add({"acc": float(greedy), "loglikelihood": ll})
        score.loglikelihoods.append(lls)
    return score
