"""What hangs off the training step: the :class:`Callback` API and the built-in callbacks
(progress and metrics, validation history, texts generated during training).

The trainer calls every callback's methods directly, in list order, on every rank.
Collective calls (``trainer.all_mean``, ``trainer.evaluate``) must happen on every rank at
the same steps, so each callback runs everywhere and only rank 0 prints or logs.
Preemption handling is in ``train/preemption.py``.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from tqdm import tqdm

from lmforge.launch.tracking import Tracker
from lmforge.launch.train.collectives import all_reduce_values

if TYPE_CHECKING:  # the trainer imports this module
    from lmforge.launch.generate import TextGenerator
    from lmforge.launch.train.trainer import StepResult, Trainer

log = logging.getLogger("lmforge.train")


class Callback:
    """Something that hangs off the training loop; override the events you need.

    Every method receives the :class:`~lmforge.launch.train.trainer.Trainer` (its
    ``state``, ``config`` (the train section), ``engine``, ``rank`` and ``world_size``).
    """

    def on_train_start(self, trainer: Trainer) -> None:
        """Before the first step of this process (after any resume)."""

    def on_step_end(self, trainer: Trainer, result: StepResult) -> None:
        """After each optimizer step; ``trainer.state.step`` is the step just completed."""

    def on_eval(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        """After each validation pass (all ranks), with ``val_loss``, ``val_ppl`` (language
        model objectives) and a task's metrics: classify ``val_accuracy``, ``val_macro_f1``,
        ``val_f1/<label>``; seq2seq ``val_exact_match``, ``val_bleu``; with the ``eval:``
        section ``val/<dataset>/bpb`` and ``eval/<task>/<metric>`` (``launch/eval``)."""

    def on_checkpoint(self, trainer: Trainer, folder: Path) -> None:
        """After a checkpoint is complete and published as ``latest``."""

    def on_train_end(self, trainer: Trainer) -> None:
        """After the last step and its checkpoint."""


class MetricsLogger(Callback):
    """Progress bar, console lines and MLflow metrics (loss, lr, grad norm, tokens/s,
    MFU and HFU where a peak is known, bad steps, rows replaced because a shard was
    unreadable in lenient mode); at the end, which shards were skipped, from every rank."""

    def __init__(
        self,
        tracker: Tracker,
        flops_per_token: float | None,
        peak_flops: float | None,
        jsonl: Path | None = None,
        hardware_flops_per_token: float | None = None,
    ):
        self.tracker = tracker
        self.jsonl = jsonl
        self.flops_per_token = flops_per_token
        self.hardware_flops_per_token = hardware_flops_per_token
        self.peak_flops = peak_flops
        self.bar: tqdm | None = None
        self.window_tokens = 0
        self.window_seconds = 0.0
        self.window_losses: list[float] = []
        self.skipped_samples = 0
        """Rows all ranks received in place of unreadable shards' samples (lenient loader)."""
        self.skipped_shards: dict[str, str] = {}
        """Unreadable shards any rank skipped, with the reason (filled at the end)."""

    def on_train_start(self, trainer) -> None:
        if trainer.rank == 0:
            self.bar = tqdm(
                total=trainer.config.max_steps, initial=trainer.state.step, desc="train",
                unit="step", dynamic_ncols=True, file=sys.stdout, mininterval=1.0,
            )
        self.last = time.perf_counter()

    def on_step_end(self, trainer, result) -> None:
        self.window_losses.append(result.loss)
        now = time.perf_counter()
        self.window_seconds += now - self.last
        self.last = now
        self.window_tokens += result.tokens
        step = trainer.state.step
        if step % trainer.config.log_every and step != trainer.config.max_steps:
            if self.bar is not None:
                self.bar.update(1)
            return
        # One collective on the engine's device for both (trainer.all_sum's reduction).
        local_loss = sum(self.window_losses) / len(self.window_losses)
        loss, tokens, skipped = all_reduce_values(
            [local_loss, self.window_tokens, trainer.train_loader.skipped_samples], trainer.device
        )
        self.skipped_samples = int(skipped)
        loss /= trainer.world_size
        seconds = max(self.window_seconds, 1e-9)
        steps = len(self.window_losses)
        metrics = {
            "train/loss": loss,
            "train/lr": result.lr,  # of the logged step's update, not the next one's
            "train/grad_norm": _float(trainer.engine.get_global_grad_norm()),
            "train/tokens_per_s": tokens / seconds,
            "train/samples_per_s": trainer.global_batch_size * steps / seconds,
            "train/step_time_s": seconds / steps,
            "train/tokens_seen": trainer.state.tokens_seen,
            "train/bad_steps": trainer.loss_guard.bad_steps,
            "train/skipped_samples": skipped,
        }
        per_device = tokens / seconds / trainer.world_size
        if self.flops_per_token and self.peak_flops:
            metrics["train/mfu"] = per_device * self.flops_per_token / self.peak_flops
        if self.hardware_flops_per_token and self.peak_flops:
            metrics["train/hfu"] = per_device * self.hardware_flops_per_token / self.peak_flops
        metrics.update(_memory_metrics())
        self.window_losses, self.window_tokens, self.window_seconds = [], 0, 0.0
        if trainer.rank == 0:
            self.tracker.log_metrics(metrics, step=step)
            self._append({"step": step, **metrics})
            if self.bar is not None:
                speed = metrics["train/tokens_per_s"]
                self.bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{speed:.0f}")
                self.bar.update(1)

    def on_checkpoint(self, trainer, folder: Path) -> None:
        if trainer.rank == 0:
            self.tracker.set_tags({"lmforge.last_checkpoint": str(folder)})
            self._write(f"checkpoint {folder}")

    def on_eval(self, trainer, metrics: dict[str, float]) -> None:
        if trainer.rank != 0:
            return
        step = trainer.state.step
        # `eval/<task>/<metric>` and `val/<dataset>/bpb` (launch/eval) keep their names.
        record = {name if name.startswith(("eval/", "val/")) else
                  "val/" + name.removeprefix("val_"): value for name, value in metrics.items()}
        self.tracker.log_metrics(record, step=step)
        self._append({"step": step, **record})
        shown = [f"val_loss {metrics['val_loss']:.4f}"]
        shown += [f"{name.removeprefix('val_')} {value:.4g}" for name, value in metrics.items()
                  if name != "val_loss" and "/" not in name]
        shown += [f"{name} {value:.4g}" for name, value in metrics.items()
                  if name.endswith(("/acc", "/bpb"))]
        self._write(f"step {step}: {' '.join(shown)}")

    def on_train_end(self, trainer) -> None:
        if self.bar is not None:
            self.bar.close()
        self.skipped_shards = _gather_dicts(trainer.train_loader.bad_shards)
        if trainer.rank == 0 and self.skipped_shards:
            names = ", ".join(sorted(self.skipped_shards))
            log.warning("data.loader.strict=false: skipped unreadable shard(s) %s; %d row(s) "
                        "replaced", names, self.skipped_samples)
            self.tracker.set_tags({"lmforge.skipped_shards": names})
            self.tracker.log_metrics({"train/skipped_shards": len(self.skipped_shards)},
                                     step=trainer.state.step)

    def _append(self, record: dict[str, Any]) -> None:
        """Also keeps metrics in ``metrics.jsonl``: readable without MLflow, exact floats."""
        if self.jsonl is not None:
            with open(self.jsonl, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")

    def _write(self, line: str) -> None:
        if self.bar is not None:
            self.bar.write(line)
        else:
            print(line, flush=True)


class EvalHistory(Callback):
    """Keeps every validation loss with its step, and the last pass's metrics (for the
    run's summary: ``val_loss`` and ``val_metrics``)."""

    def __init__(self) -> None:
        self.history: list[tuple[int, float]] = []
        self.last: dict[str, float] = {}

    def on_eval(self, trainer, metrics: dict[str, float]) -> None:
        self.history.append((trainer.state.step, metrics["val_loss"]))
        self.last = dict(metrics)


class GenerationLogger(Callback):
    """Every ``every`` steps rank 0 continues the generate prompts and logs the texts to
    MLflow (``generations/step_XXXXXXXX.txt``) and ``generations.jsonl``.

    Decoder models only (``RunConfig.check_training`` checks). Under ZeRO-3 every rank holds
    a shard of the parameters, so generating on rank 0 alone is impossible; sampling is
    skipped there (``lmforge generate`` after training still works).
    """

    def __init__(self, tracker: Tracker, texts: TextGenerator, every: int,
                 jsonl: Path | None = None) -> None:
        self.tracker = tracker
        self.texts = texts
        self.every = every
        self.jsonl = jsonl

    def on_step_end(self, trainer, result) -> None:
        if not self.every or trainer.state.step % self.every or trainer.rank != 0:
            return
        if trainer.zero_stage == 3:
            if trainer.state.step == self.every:
                log.info("train.generate_every: no generations during training under ZeRO-3 "
                         "(parameters are partitioned); use `lmforge generate` afterwards")
            return
        module = trainer.engine.module
        module.eval()
        try:
            texts = self.texts(module)
        finally:
            module.train()
        step = trainer.state.step
        prompts = self.texts.settings.prompts
        lines = [f"--- prompt: {p!r}\n{t}\n" for p, t in zip(prompts, texts, strict=True)]
        self.tracker.log_text("\n".join(lines), f"generations/step_{step:08d}.txt")
        if self.jsonl is not None:
            with open(self.jsonl, "a", encoding="utf-8") as f:
                f.write(json.dumps({"step": step, "texts": texts}) + "\n")


def _gather_dicts(local: dict[str, str]) -> dict[str, str]:
    """Every rank's dict merged (a collective: call it on every rank)."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return dict(local)
    gathered: list[dict[str, str] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, dict(local))
    return {k: v for part in gathered for k, v in (part or {}).items()}


def _float(value: Any) -> float:
    if value is None:
        return float("nan")
    return float(value.item() if hasattr(value, "item") else value)


def _memory_metrics() -> dict[str, float]:
    if torch.cuda.is_available():
        return {"system/gpu_mem_gb": torch.cuda.max_memory_allocated() / 2**30}
    try:
        import resource

        rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return {"system/peak_rss_gb": rss_kb / 2**20}
    except ImportError:  # not on every platform
        return {}
