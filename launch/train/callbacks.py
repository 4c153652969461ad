"""What hangs off the training step: progress and metrics, evaluation, preemption.

A callback is any object with some of ``on_train_start(trainer)``,
``on_step_end(trainer, result)``, ``on_checkpoint(trainer, folder)`` and
``on_train_end(trainer)``. Collective calls (``all_mean``) happen on every rank at the
same steps, so each callback runs on every rank and only rank 0 prints or logs.
"""

from __future__ import annotations

import json
import logging
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from tqdm import tqdm

from lmforge.launch.tracking import Tracker

log = logging.getLogger("lmforge.train")

# Exit status of a run stopped by SIGTERM/SIGUSR1 after checkpointing: EX_TEMPFAIL, so a
# job script can tell "requeue me" from success (0) and failure (anything else).
REQUEUE_EXIT_CODE = 75


class MetricsLogger:
    """Progress bar, console lines and MLflow metrics (loss, lr, grad norm, tokens/s,
    MFU and HFU where a peak is known, bad steps)."""

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

    def on_train_start(self, trainer) -> None:
        if trainer.rank == 0:
            self.bar = tqdm(
                total=trainer.cfg.train.max_steps, initial=trainer.state.step, desc="train",
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
        if step % trainer.cfg.train.log_every and step != trainer.cfg.train.max_steps:
            if self.bar is not None:
                self.bar.update(1)
            return
        loss = trainer.all_mean(sum(self.window_losses) / len(self.window_losses))
        tokens = trainer.all_sum(self.window_tokens)
        seconds = max(self.window_seconds, 1e-9)
        steps = len(self.window_losses)
        metrics = {
            "train/loss": loss,
            "train/lr": trainer.scheduler.get_last_lr()[0],
            "train/grad_norm": _float(trainer.engine.get_global_grad_norm()),
            "train/tokens_per_s": tokens / seconds,
            "train/samples_per_s": trainer.cfg.global_batch_size * steps / seconds,
            "train/step_time_s": seconds / steps,
            "train/tokens_seen": trainer.state.tokens_seen,
            "train/bad_steps": trainer.loss_guard.bad_steps,
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

    def on_train_end(self, trainer) -> None:
        if self.bar is not None:
            self.bar.close()

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


class Evaluator:
    """Validation loss/perplexity every ``train.eval_every`` steps and at the end."""

    def __init__(self, tracker: Tracker, logger: MetricsLogger):
        self.tracker = tracker
        self.logger = logger
        self.history: list[tuple[int, float]] = []
        self._last_step = -1

    def on_step_end(self, trainer, result) -> None:
        every = trainer.cfg.train.eval_every
        if every and trainer.state.step % every == 0:
            self._run(trainer)

    def on_train_end(self, trainer) -> None:
        if self._last_step != trainer.state.step:
            self._run(trainer)

    def _run(self, trainer) -> None:
        metrics = trainer.evaluate()
        self._last_step = trainer.state.step
        self.history.append((trainer.state.step, metrics["val_loss"]))
        if trainer.rank == 0:
            record = {"val/loss": metrics["val_loss"], "val/ppl": metrics["val_ppl"]}
            self.tracker.log_metrics(record, step=trainer.state.step)
            self.logger._append({"step": trainer.state.step, **record})
            self.logger._write(
                f"step {trainer.state.step}: val_loss {metrics['val_loss']:.4f} "
                f"ppl {metrics['val_ppl']:.2f}"
            )


class Sampler:
    """Every ``train.sample_every`` steps rank 0 continues ``sample.prompts`` and logs the
    texts to MLflow (``samples/step_XXXXXXXX.txt``) and ``samples.jsonl``.

    Decoder models only (``RunConfig`` checks). Under ZeRO-3 every rank holds a shard of
    the parameters, so generating on rank 0 alone is impossible; sampling is skipped there
    (the ``sample`` stage after training still works).
    """

    def __init__(self, tracker: Tracker, jsonl: Path | None = None) -> None:
        self.tracker = tracker
        self.jsonl = jsonl
        self._sp = None

    def on_step_end(self, trainer, result) -> None:
        every = trainer.cfg.train.sample_every
        if not every or trainer.state.step % every or trainer.rank != 0:
            return
        if trainer.cfg.deepspeed.zero_stage == 3:
            if trainer.state.step == every:
                log.info("train.sample_every: no samples during training under ZeRO-3 "
                         "(parameters are partitioned); use the sample stage afterwards")
            return
        module = trainer.engine.module
        module.eval()
        try:
            texts = self._generate(trainer.cfg, module, trainer.manifest)
        finally:
            module.train()
        step = trainer.state.step
        prompts = trainer.cfg.sample.prompts
        lines = [f"--- prompt: {p!r}\n{t}\n" for p, t in zip(prompts, texts, strict=True)]
        self.tracker.log_text("\n".join(lines), f"samples/step_{step:08d}.txt")
        if self.jsonl is not None:
            with open(self.jsonl, "a", encoding="utf-8") as f:
                f.write(json.dumps({"step": step, "texts": texts}) + "\n")

    @torch.no_grad()
    def _generate(self, cfg, module: torch.nn.Module, manifest: Path) -> list[str]:
        import sentencepiece as spm

        from lmforge.model import generate

        info = json.loads(manifest.read_text(encoding="utf-8"))["tokenizer"]
        if self._sp is None:
            self._sp = spm.SentencePieceProcessor(model_file=str(manifest.parent / info["file"]))
        device = next(module.parameters()).device
        # Its own generator: sampling must not consume the training RNG (exact resume).
        generator = torch.Generator(device=device).manual_seed(cfg.seed)
        texts = []
        for prompt in cfg.sample.prompts:
            ids = torch.tensor([self._sp.encode(prompt)], dtype=torch.long, device=device)
            out = generate(module, ids, cfg.sample.max_new_tokens, cfg.sample.temperature,
                           cfg.sample.top_k, cfg.sample.top_p, eos_id=info["eos_id"],
                           generator=generator)
            texts.append(self._sp.decode(out[0].tolist()))
        return texts


class PreemptionHandler:
    """SIGTERM/SIGUSR1 (Slurm's pre-kill signal): finish the step, checkpoint, exit 75.

    The signal may reach only some ranks, so the flag is max-reduced each step and every
    rank stops at the same step.
    """

    def __init__(self) -> None:
        self.received: int | None = None
        self.stopped = False

    def on_train_start(self, trainer) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # Ray Train runs the loop in a thread; Ray handles node loss and retries
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.received = signum

    def on_step_end(self, trainer, result) -> None:
        flag = torch.tensor(0 if self.received is None else 1)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() and trainer.state.step < trainer.cfg.train.max_steps:
            trainer.stop_requested = True
            self.stopped = True
            if trainer.rank == 0:
                log.warning(
                    "stop signal received: checkpointing at step %d and exiting with %d "
                    "so the job can be requeued",
                    trainer.state.step,
                    REQUEUE_EXIT_CODE,
                )


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
