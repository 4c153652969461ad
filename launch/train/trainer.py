"""The training loop on a DeepSpeed engine; everything around the step is a callback.

One process per rank runs :class:`Trainer`. The step itself is short (the objective's
forward and loss, the bad-loss check, backward, optimizer step for each micro-batch);
objectives live in ``launch/objectives.py``, the bad-loss policy in ``launch/loss_guard.py``,
and logging, evaluation, sampling, checkpointing and preemption handling hang off the step
as callbacks (``launch/callbacks.py``).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import deepspeed
import torch
import torch.distributed as dist

from lmforge.launch import checkpoint as ckpt
from lmforge.launch.config import RunConfig
from lmforge.launch.ds_config import build_deepspeed_config
from lmforge.launch.loss_guard import LossGuard, skip_loss
from lmforge.launch.objectives import build_objective, corruption_generator
from lmforge.launch.optim import build_optimizer, build_scheduler
from lmforge.launch.parallelize import apply_activation_checkpointing
from lmforge.pipeline.loader import ShardLoader

log = logging.getLogger("lmforge.train")


@dataclass
class TrainState:
    """What the loop has done so far; saved in every checkpoint's client state."""

    step: int = 0
    tokens_seen: int = 0
    samples_seen: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class StepResult:
    """One optimizer step, as the callbacks see it."""

    loss: float  # mean over this rank's micro-batches (not yet averaged across ranks)
    tokens: int  # tokens with a label on this rank
    seconds: float


class Trainer:
    """Builds model, engine and loaders for one rank and runs the loop.

    Args:
        cfg: The resolved run config.
        run_dir: The run directory (checkpoints go to ``run_dir/checkpoints``).
        manifest: The prepared dataset's ``manifest.json``.
        callbacks: Objects with any of ``on_train_start(trainer)``,
            ``on_step_end(trainer, result)``, ``on_train_end(trainer)``.
    """

    def __init__(
        self, cfg: RunConfig, run_dir: Path, manifest: Path, callbacks: list[Any] = ()
    ) -> None:
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.manifest = Path(manifest)
        self.callbacks = list(callbacks)
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        self.state = TrainState()
        self.stop_requested = False

        torch.manual_seed(cfg.seed)  # identical init on every rank
        model = cfg.model.build()
        apply_activation_checkpointing(
            model, cfg.train.activation_checkpointing, cfg.train.checkpoint_every_n_layers
        )
        optimizer = build_optimizer(model, cfg.train)
        scheduler = build_scheduler(optimizer, cfg.train)
        self.ds_config = build_deepspeed_config(cfg)
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=self.ds_config
        )
        self.train_loader = self._loader("train", infinite=True)
        self.objective = build_objective(
            cfg.train.objective, self.manifest, cfg.model.vocab_size or cfg.tokenizer.vocab_size,
            cfg.data.loader.document_masking,
        )
        self.loss_guard = LossGuard(cfg.train)

    def _loader(self, split: str, infinite: bool) -> ShardLoader:
        return ShardLoader(
            self.manifest,
            split,
            self.cfg.train.micro_batch_size,
            rank=self.rank,
            world_size=self.world_size,
            seed=self.cfg.seed,
            config=self.cfg.data.loader,
            infinite=infinite,
        )

    # -- state -----------------------------------------------------------------------

    def client_state(self) -> dict[str, Any]:
        return {
            "train_state": vars(self.state).copy(),
            "loader": self.train_loader.state_dict(),
            "world_size": self.world_size,
            "loss_guard": self.loss_guard.state_dict(),
        }

    def save(self) -> Path:
        root = self.run_dir / "checkpoints"
        folder = ckpt.save_checkpoint(
            self.engine, root, self.state.step, self.client_state(), self.cfg.train.keep_checkpoints
        )
        self._emit("on_checkpoint", folder)
        return folder

    def resume(self, resume: str | None) -> Path | None:
        """Restores engine, RNG, loader position and counters from a checkpoint."""
        folder = ckpt.find_resume(self.run_dir / "checkpoints", resume)
        if folder is None:
            if resume not in (None, "none") and self.rank == 0:
                log.info("no checkpoint to resume from; starting at step 0")
            return None
        client = ckpt.load_checkpoint(self.engine, folder)
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
        return corruption_generator(self.cfg.seed, step, self.rank, micro)

    def train_step(self, batches) -> StepResult:
        """One optimizer step over ``grad_accum_steps`` micro-batches."""
        start = time.perf_counter()
        losses, tokens = [], 0
        for micro in range(self.cfg.train.grad_accum_steps):
            out = self.objective(self.engine, next(batches), self.engine.device,
                                 self.generator(micro))
            loss = out.loss
            if self.loss_guard.check(loss, self.state.step + 1):
                loss = skip_loss(loss, self.engine.module, self.cfg.deepspeed.zero_stage)
            self.engine.backward(loss)
            self.engine.step()
            losses.append(out.loss.detach())
            tokens += out.tokens
        loss_value = float(torch.stack(losses).float().mean())
        self.loss_guard.end_step()
        return StepResult(loss_value, tokens, time.perf_counter() - start)

    def fit(self) -> TrainState:
        """Trains until ``train.max_steps`` (or a stop request) and checkpoints at the end."""
        self.engine.train()
        batches = iter(self.train_loader)
        self._emit("on_train_start")
        saved_at = -1
        while self.state.step < self.cfg.train.max_steps and not self.stop_requested:
            result = self.train_step(batches)
            self.state.step += 1
            self.state.tokens_seen += self.all_sum(result.tokens)
            self.state.samples_seen += self.cfg.global_batch_size
            self._emit("on_step_end", result)
            every = self.cfg.train.checkpoint_every
            if every and self.state.step % every == 0:
                self.save()
                saved_at = self.state.step
        if saved_at != self.state.step:
            self.save()
        self._emit("on_train_end")
        return self.state

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Validation loss and perplexity, averaged over tokens across all ranks."""
        self.engine.eval()
        limit = self.cfg.train.eval_batches or None
        loss_sum = torch.zeros((), dtype=torch.float64)
        count = torch.zeros((), dtype=torch.float64)
        for index, batch in enumerate(self._loader("val", infinite=False)):
            if limit is not None and index >= limit:
                break
            # A fixed step (-1) for corruption: every pass scores the same masked positions.
            out = self.objective(self.engine, batch, self.engine.device,
                                 self.generator(index, step=-1))
            if out.targets:
                loss_sum += float(out.loss) * out.targets
                count += out.targets
        totals = torch.stack([loss_sum, count])
        dist.all_reduce(totals)
        self.engine.train()
        loss = float(totals[0] / totals[1].clamp(min=1))
        return {"val_loss": loss, "val_ppl": float(torch.exp(torch.tensor(min(loss, 50.0))))}

    # -- helpers ---------------------------------------------------------------------

    def all_sum(self, value: float) -> float:
        tensor = torch.tensor(value, dtype=torch.float64)
        dist.all_reduce(tensor)
        return tensor.item() if isinstance(value, float) else int(tensor.item())

    def all_mean(self, value: float) -> float:
        return self.all_sum(float(value)) / self.world_size

    def _emit(self, event: str, *args: Any) -> None:
        for callback in self.callbacks:
            handler = getattr(callback, event, None)
            if handler is not None:
                handler(self, *args)
