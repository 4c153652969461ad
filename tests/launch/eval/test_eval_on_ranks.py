"""Tasks scored on several ranks at once (for evaluation inside training): the ranks' shares
add up to the single-process scores, and every rank makes the same number of forward passes
(ZeRO-3 gathers parameters in each). Ranks are threads here, the collective a barrier."""

from __future__ import annotations

import threading

import pytest
import torch
from transformers import AutoModelForCausalLM

from lmforge.launch.eval.distributed import forward_passes, score_tasks_on_ranks
from lmforge.launch.eval.on_export import load_export
from lmforge.launch.eval.scoring import score_task
from lmforge.launch.eval.tasks import read_jsonl_task


class ThreadRanks:
    """``sum_values`` for ``world`` threads: each posts its list, all get the element-wise sum."""

    def __init__(self, world: int) -> None:
        self.posted: list[list[float] | None] = [None] * world
        self.barrier = threading.Barrier(world)

    def sum_values(self, rank: int):
        def collective(values: list[float]) -> list[float]:
            self.posted[rank] = values
            self.barrier.wait()
            lengths = {len(v) for v in self.posted}
            assert lengths == {len(values)}, "every rank sends as many values"
            return [sum(column) for column in zip(*self.posted, strict=True)]
        return collective


@pytest.mark.parametrize("world", [2, 3])
def test_ranks_add_up_to_the_whole_with_equal_forward_passes(world, llama_export,
                                                             eval_task_files):
    tasks = [read_jsonl_task(path, name) for name, path in eval_task_files.items()]
    encoder, loglikelihood = load_export(llama_export, batch_size=4)
    whole = {t.name: score_task(t, encoder, loglikelihood).metrics() for t in tasks}
    model = AutoModelForCausalLM.from_pretrained(str(llama_export), dtype=torch.float32).eval()
    ranks = ThreadRanks(world)
    passes = [0] * world
    results: list[dict | None] = [None] * world

    def run(rank: int) -> None:
        def logits_of(ids: torch.Tensor) -> torch.Tensor:
            passes[rank] += 1
            return model(ids).logits

        results[rank] = score_tasks_on_ranks(tasks, encoder, logits_of, 64, rank, world,
                                             ranks.sum_values(rank), batch_size=4)

    threads = [threading.Thread(target=run, args=(rank,)) for rank in range(world)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    shares = [forward_passes(tasks, rank, world, 4) for rank in range(world)]
    if world == 2:
        assert len(set(shares)) > 1  # the shares differ, so one rank had to pad
    assert passes == [max(shares)] * world
    for result in results:
        assert result.keys() == whole.keys()
        for name, metrics in whole.items():
            assert result[name] == pytest.approx(metrics, rel=1e-5), name  # batches differ
            assert result[name]["acc"] == metrics["acc"]


def test_an_encoder_decoder_on_two_ranks(bart_export, eval_task_files):
    """Context → encoder, continuation → decoder; the padding passes take three inputs."""
    from transformers import AutoModelForSeq2SeqLM

    tasks = [read_jsonl_task(path, name) for name, path in eval_task_files.items()]
    encoder, loglikelihood = load_export(bart_export, batch_size=4)
    assert encoder.backend == "seq2seq"
    whole = {t.name: score_task(t, encoder, loglikelihood).metrics() for t in tasks}
    model = AutoModelForSeq2SeqLM.from_pretrained(str(bart_export), dtype=torch.float32).eval()
    ranks = ThreadRanks(2)
    passes = [0, 0]
    results: list[dict | None] = [None, None]

    def run(rank: int) -> None:
        def logits_of(ids, mask, labels):
            passes[rank] += 1
            return model(input_ids=ids, attention_mask=mask, labels=labels).logits

        results[rank] = score_tasks_on_ranks(tasks, encoder, logits_of, 64, rank, 2,
                                             ranks.sum_values(rank), batch_size=4)

    threads = [threading.Thread(target=run, args=(rank,)) for rank in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert passes[0] == passes[1] == max(forward_passes(tasks, r, 2, 4) for r in range(2))
    for result in results:
        for name, metrics in whole.items():
            assert result[name] == pytest.approx(metrics, rel=1e-5), name
