"""The training loop on a DeepSpeed engine; everything around the step is a callback.

One process per rank runs :class:`Trainer`. The step itself is short (the objective's
forward and loss, the bad-loss check, backward, optimizer step for each micro-batch);
objectives live in ``train/objectives.py``, the bad-loss policy in ``train/loss_guard.py``,
and logging, evaluation, sampling and preemption handling hang off the step as
:class:`~lmforge.launch.train.callbacks.Callback` objects (``train/callbacks.py``).
``train/build.py`` wires a trainer together from the run config's sections.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from lmforge.launch.config import TrainConfig
from lmforge.launch.train import checkpoint as ckpt
from lmforge.launch.train.callbacks import Callback
from lmforge.launch.train.collectives import all_reduce, all_reduce_values
from lmforge.launch.train.loss_guard import LossGuard, skip_loss
from lmforge.launch.train.objectives import Objective, corruption_generator
from lmforge.launch.train.resume import load_resume
from lmforge.pipeline.loader.shard_loader import ShardLoader

if TYPE_CHECKING:
    from lmforge.launch.eval.in_loop import LoopEval

log = logging.getLogger("lmforge.train")


@dataclass
class TrainState:
    """What the loop has done so far; saved in every checkpoint's client state."""

    step: int = 0
    tokens_seen: int = 0  # summed over ranks at logging steps and checkpoints
    samples_seen: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class StepResult:
    """One optimizer step, as the callbacks see it."""

    loss: float  # mean over this rank's micro-batches (not yet averaged across ranks)
    tokens: int  # tokens with a label on this rank
    seconds: float
    lr: float = 0.0  # the learning rate this step's update used (the scheduler then moves on)


class Trainer:
    """Runs the loop for one rank.

    Args:
        engine: The DeepSpeed engine (model, optimizer and LR scheduler inside).
        train: The train section.
        objective: Turns a loader batch into the loss (``train/objectives.py``).
        train_loader: This rank's training batches (infinite).
        val_loader: Makes a fresh one-pass validation loader for each evaluation.
        checkpoints: The run's checkpoints folder.
        seed: The run's seed (corruption streams of masked LM and denoising).
        callbacks: What hangs off the loop, called in this order.
        loop_eval: Bits per byte and downstream tasks added to each evaluation
            (``launch/eval/in_loop.py``, from the ``eval:`` section); None: none.
    """

    def __init__(
        self,
        engine: Any,
        train: TrainConfig,
        objective: Objective,
        train_loader: ShardLoader,
        val_loader: Callable[[], Iterable[dict[str, torch.Tensor]]],
        checkpoints: Path,
        seed: int,
        callbacks: list[Callback] = (),
        loop_eval: LoopEval | None = None,
    ) -> None:
        self.engine = engine
        self.scheduler = engine.lr_scheduler
        self.config = train
        self.objective = objective
        self.train_loader = train_loader
        self.val_loader = val_loader
        self.checkpoints = Path(checkpoints)
        self.seed = seed
        self.callbacks = list(callbacks)
        self.loop_eval = loop_eval
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        self.global_batch_size = train.sequences_per_step(self.world_size)
        self.zero_stage = engine.zero_optimization_stage()
        self.device = engine.device  # where collectives run (NCCL: CUDA tensors only)
        self.state = TrainState()
        self.stop_requested = False
        self.loss_guard = LossGuard(train, self.device)
        self.unreduced_tokens = 0  # this rank's tokens not yet in state.tokens_seen
        self.reduced_at = -1  # the step they were last reduced at

    # -- state -----------------------------------------------------------------------

    def client_state(self) -> dict[str, Any]:
        return {
            "train_state": vars(self.state).copy(),
            "loader": self.train_loader.state_dict(),
            "world_size": self.world_size,
            "loss_guard": self.loss_guard.state_dict(),
        }

    def save(self) -> Path:
        self.reduce_counters()
        folder = ckpt.save_checkpoint(
            self.engine, self.checkpoints, self.state.step, self.client_state(),
            self.config.keep_checkpoints,
        )
        for callback in self.callbacks:
            callback.on_checkpoint(self, folder)
        return folder

    def resume(self, resume: str | None) -> Path | None:
        """Restores engine, RNG, loader position and counters from a checkpoint."""
        folder, client = load_resume(self.engine, self.checkpoints, resume)
        if folder is None:
            if resume not in (None, "none") and self.rank == 0:
                log.info("no checkpoint to resume from; starting at step 0")
            return None
        self.state = TrainState(**client["train_state"])
        self.train_loader.load_state_dict(client["loader"])
        if "loss_guard" in client:  # absent from checkpoints of older versions
            self.loss_guard.load_state_dict(client["loss_guard"])
        if self.rank == 0:
            log.info("resumed from %s at step %d", folder, self.state.step)
        return folder

    # -- the loop --------------------------------------------------------------------

    def generator(self, micro: int, step: int | None = None) -> torch.Generator:
        """Corruption randomness for one micro-batch (masked LM, denoising); see objectives."""
        step = self.state.step if step is None else step
        return corruption_generator(self.seed, step, self.rank, micro)

    def train_step(self, batches) -> StepResult:
        """One optimizer step over ``grad_accum_steps`` micro-batches."""
        start = time.perf_counter()
        lr = self.scheduler.get_last_lr()[0]
        losses, tokens = [], 0
        for micro in range(self.config.grad_accum_steps):
            out = self.objective(self.engine, next(batches), self.engine.device,
                                 self.generator(micro))
            loss = out.loss
            if self.loss_guard.check(loss, self.state.step + 1):
                loss = skip_loss(loss, self.engine.module, self.zero_stage)
            self.engine.backward(loss)
            self.engine.step()
            losses.append(out.loss.detach())
            tokens += out.tokens
        loss_value = float(torch.stack(losses).float().mean())
        self.loss_guard.end_step()
        return StepResult(loss_value, tokens, time.perf_counter() - start, lr)

    def fit(self) -> TrainState:
        """Trains until ``train.max_steps`` (or a stop request), evaluating every
        ``train.eval_every`` steps and checkpointing every ``train.checkpoint_every`` steps;
        the last step is always evaluated and checkpointed.

        Each step's events reach the callbacks in this order: ``on_step_end``, then
        ``on_eval`` and ``on_checkpoint`` when due; at the end ``on_train_end``.
        """
        self.engine.train()
        batches = iter(self.train_loader)
        for callback in self.callbacks:
            callback.on_train_start(self)
        evaluated_at = saved_at = -1
        while self.state.step < self.config.max_steps and not self.stop_requested:
            result = self.train_step(batches)
            self.state.step += 1
            self.unreduced_tokens += result.tokens  # reduced when logged or saved
            self.state.samples_seen += self.global_batch_size
            if self.state.step == self.config.max_steps or _due(
                    self.state.step, self.config.log_every):
                self.reduce_counters()
            for callback in self.callbacks:
                callback.on_step_end(self, result)
            if _due(self.state.step, self.config.eval_every):
                self.evaluate()
                evaluated_at = self.state.step
            if _due(self.state.step, self.config.checkpoint_every):
                self.save()
                saved_at = self.state.step
        if saved_at != self.state.step:
            self.save()
        if evaluated_at != self.state.step:
            self.evaluate()
        for callback in self.callbacks:
            callback.on_train_end(self)
        return self.state

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Validation loss (and perplexity for language-model objectives), averaged over
        targets across all ranks, plus a task objective's metrics over every rank's
        predictions (accuracy and F1, exact match and BLEU) and, with ``loop_eval``, bits per
        byte per validation dataset and the ``eval.tasks`` scores; every callback's
        ``on_eval`` receives them."""
        self.engine.eval()
        predictions, references = [], []
        loss_sum, count, n_bytes = self.validation_sums(self.val_loader(), predictions,
                                                        references)
        loss_sum, count, n_bytes = all_reduce_values([loss_sum, count, n_bytes], self.device)
        loss = loss_sum / max(count, 1.0)
        metrics = {"val_loss": loss}
        if self.objective.language_model:
            metrics["val_ppl"] = float(torch.exp(torch.tensor(min(loss, 50.0))))
        if hasattr(self.objective, "metrics"):
            predictions, references = gather_lists(predictions, references)
            if references:
                metrics.update(self.objective.metrics(predictions, references))
        if self.loop_eval is not None:
            metrics.update(self.loop_eval.evaluate(
                self.engine, self.validation_sums, (loss_sum, n_bytes),
                lambda values: all_reduce_values(values, self.device), self.rank,
                self.world_size))
        self.engine.train()
        for callback in self.callbacks:
            callback.on_eval(self, metrics)
        return metrics

    def validation_sums(self, batches: Iterable[dict[str, torch.Tensor]],
                        predictions: list | None = None, references: list | None = None
                        ) -> tuple[float, float, float]:
        """This rank's summed loss (nats), targets and targets' UTF-8 bytes (0 without
        ``loop_eval``) over the first ``train.eval_batches`` batches (all when 0); a task
        objective's predictions and references are appended to the lists given."""
        limit = self.config.eval_batches or None
        loss_sum = count = n_bytes = 0.0
        for index, batch in enumerate(batches):
            if limit is not None and index >= limit:
                break
            # A fixed step (-1) for corruption: every pass scores the same masked positions.
            out = self.objective(self.engine, batch, self.engine.device,
                                 self.generator(index, step=-1))
            if out.targets:
                loss_sum += float(out.loss) * out.targets
                count += out.targets
                if self.loop_eval is not None:
                    n_bytes += self.loop_eval.target_bytes(out.labels)
            if out.predictions is not None and predictions is not None:
                predictions += out.predictions
                references += out.references
        return loss_sum, count, n_bytes

    # -- helpers ---------------------------------------------------------------------

    def reduce_counters(self) -> None:
        """Adds every rank's unreduced tokens to ``state.tokens_seen`` (a collective; every
        rank reduces at the same steps, so all skip a second call at one step alike)."""
        if self.reduced_at == self.state.step:
            return
        tokens = torch.tensor(self.unreduced_tokens, dtype=torch.int64)
        self.state.tokens_seen += int(all_reduce(tokens, self.device).item())
        self.unreduced_tokens, self.reduced_at = 0, self.state.step

    def all_sum(self, value: float) -> float:
        """``value`` summed over ranks, reduced on the engine's device (a collective)."""
        (total,) = all_reduce_values([value], self.device)
        return total if isinstance(value, float) else int(total)

    def all_mean(self, value: float) -> float:
        return self.all_sum(float(value)) / self.world_size


def gather_lists(*local: list) -> tuple[list, ...]:
    """Each list concatenated over all ranks in rank order (a collective)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return tuple(list(x) for x in local)
    gathered: list[tuple | None] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, tuple(local))
    return tuple([item for part in gathered for item in part[i]] for i in range(len(local)))


def _due(step: int, every: int) -> bool:
    """Whether an every-``every``-steps event falls on ``step`` (0 means never)."""
    return every > 0 and step % every == 0
