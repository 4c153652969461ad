"""Evaluation inside training: what ``Trainer.evaluate`` adds to the validation loss.

At every evaluation (every ``train.eval_every`` steps and at the end of each stage), on all
ranks at once, in the engine (ZeRO 0-3; the model is never consolidated):

- ``val/<dataset>/bpb`` for each validation dataset (``bpb.py``): from the pooled validation
  pass when there is one dataset, else from one pass per dataset (``train.eval_batches``
  micro-batches each);
- ``eval/<task>/<metric>`` for each task of ``eval.tasks`` (``scoring.py``'s metrics; plus
  ``eval/<task>/chance``, the ``acc`` of guessing, for multiple choice): each rank scores
  its share of the examples, every rank makes the same number of forward passes (ZeRO-3
  gathers parameters in each) and one collective adds the sums (``distributed.py``).

Scores use the engine's precision: with ``train.precision: fp32`` they equal
``lmforge eval`` on the export of the same step; in bf16 the log-likelihoods differ by
bf16's rounding.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

import torch

from lmforge.launch.config import EvalConfig
from lmforge.launch.eval.bpb import bits_per_byte, target_bytes
from lmforge.launch.eval.distributed import SumValues, score_tasks_on_ranks
from lmforge.launch.eval.scoring import PairEncoder
from lmforge.launch.eval.task_files import read_task
from lmforge.launch.eval.tasks import EvalTask, EvalTaskError

if TYPE_CHECKING:
    from lmforge.pipeline.contract.dataset_tokenizer import DatasetTokenizer

log = logging.getLogger("lmforge.train")
ValSums = Callable[[Iterable[dict[str, torch.Tensor]]], tuple[float, float, float]]
"""A validation pass over batches → this rank's (summed nats, targets, target bytes)."""


def read_eval_tasks(config: EvalConfig) -> list[EvalTask]:
    """The tasks of ``eval.tasks``, each cut to its ``limit``.

    Raises:
        EvalTaskError: ``eval.tasks.<name>: <file:line>: what is wrong``.
    """
    tasks = []
    for name, spec in config.task_specs().items():
        try:
            tasks.append(read_task(spec.path, name).limited(spec.limit))
        except EvalTaskError as err:
            raise EvalTaskError(f"eval.tasks.{name}: {err}") from None
    return tasks


def dataset_encoder(tokenizer: DatasetTokenizer, backend: str) -> PairEncoder:
    """A :class:`PairEncoder` from the dataset's tokenizer: the ids its Hugging Face export's
    ``AutoTokenizer`` gives (``lmforge eval``), the prefix of an empty context BOS, else
    EOS."""
    info = tokenizer.info

    def encode(text: str, add_special_tokens: bool | None) -> list[int]:
        return tokenizer.encode(text, True if add_special_tokens is None else add_special_tokens)

    prefix = info.bos_id if info.bos_id >= 0 else info.eos_id
    return PairEncoder(encode, prefix, backend)  # type: ignore[arg-type]


class LoopEval:
    """Bits per byte and downstream tasks for ``Trainer.evaluate`` (one per rank).

    Args:
        tasks: The tasks (each already cut to its limit), identical on every rank.
        encoder: Makes token ids from the tasks' strings.
        max_length: The model's context in tokens (``model.max_seq_len``).
        batch_size: Sequences per forward pass (``eval.batch_size``).
        byte_table: Bytes of each token id (``bpb.token_bytes``); None: no bpb.
        val_datasets: Each validation dataset's name → a fresh one-pass loader of it.
        decoder_start_id: An encoder-decoder's first decoder input (lmforge's: EOS, as the
            export's ``decoder_start_token_id``).
    """

    def __init__(self, tasks: Sequence[EvalTask], encoder: PairEncoder, max_length: int,
                 batch_size: int, byte_table: torch.Tensor | None,
                 val_datasets: dict[str, Callable[[], Iterable[dict[str, torch.Tensor]]]],
                 decoder_start_id: int = -1) -> None:
        self.tasks = list(tasks)
        self.encoder = encoder
        self.max_length = max_length
        self.batch_size = batch_size
        self.byte_table = byte_table
        self.val_datasets = dict(val_datasets)
        self.decoder_start_id = decoder_start_id

    def target_bytes(self, labels: torch.Tensor | None) -> int:
        """UTF-8 bytes of a micro-batch's targets (0 without bpb or labels)."""
        if self.byte_table is None or labels is None:
            return 0
        if self.byte_table.device != labels.device:
            self.byte_table = self.byte_table.to(labels.device)
        return target_bytes(labels, self.byte_table)

    def evaluate(self, engine: Any, val_sums: ValSums, pooled: tuple[float, float],
                 sum_values: SumValues, rank: int, world: int) -> dict[str, float]:
        """Every rank calls this at once, the engine in eval mode.

        Args:
            engine: The DeepSpeed engine (its forward pass scores the tasks).
            val_sums: The trainer's validation pass (see :data:`ValSums`).
            pooled: (nats, bytes) of the pooled validation pass, summed over ranks.
            sum_values: Element-wise sum over ranks (a collective).
            rank: This rank.
            world: The number of ranks.

        Returns:
            ``val/<dataset>/bpb`` and ``eval/<task>/<metric>`` values.
        """
        metrics: dict[str, float] = {}
        if self.byte_table is not None and self.val_datasets:
            metrics.update(self._bpb(val_sums, pooled, sum_values))
        if self.tasks:
            began = time.perf_counter()
            metrics.update(self._tasks(engine, sum_values, rank, world))
            if rank == 0:  # what evaluation costs the run (benchmarks/eval.py reads it)
                log.info("eval.tasks: %d examples scored in %.2f s",
                         sum(len(t.examples) for t in self.tasks), time.perf_counter() - began)
        return metrics

    def _bpb(self, val_sums: ValSums, pooled: tuple[float, float],
             sum_values: SumValues) -> dict[str, float]:
        names = list(self.val_datasets)
        if len(names) == 1:  # the pooled pass read exactly this dataset
            return {f"val/{names[0]}/bpb": bits_per_byte(*pooled)}
        local: list[float] = []
        for name in names:
            nats, _, n_bytes = val_sums(self.val_datasets[name]())
            local += [nats, n_bytes]
        total = sum_values(local)
        return {f"val/{name}/bpb": bits_per_byte(total[2 * i], total[2 * i + 1])
                for i, name in enumerate(names)}

    def _tasks(self, engine: Any, sum_values: SumValues, rank: int,
               world: int) -> dict[str, float]:
        if self.encoder.backend == "causal":
            def logits_of(ids: torch.Tensor) -> torch.Tensor:
                return engine(input_ids=ids)
        else:
            def logits_of(ids: torch.Tensor, mask: torch.Tensor,  # type: ignore[misc]
                          labels: torch.Tensor) -> torch.Tensor:
                # Teacher forcing as transformers does it: the decoder reads the labels
                # shifted right behind the start id (BART, and lmforge's denoising: EOS).
                start = torch.full_like(labels[:, :1], self.decoder_start_id)
                decoder_input = torch.cat([start, labels[:, :-1]], dim=1)
                return engine(input_ids=ids, attention_mask=mask,
                              decoder_input_ids=decoder_input)
        scores = score_tasks_on_ranks(self.tasks, self.encoder, logits_of, self.max_length,
                                      rank, world, sum_values, self.batch_size,
                                      device=engine.device)
        metrics = {f"eval/{task}/{name}": value
                   for task, values in scores.items() for name, value in values.items()}
        for task in self.tasks:
            if task.kind == "multiple_choice":
                metrics[f"eval/{task.name}/chance"] = task.chance
        return metrics
