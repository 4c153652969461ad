"""Stopping on a scheduler's signal: checkpoint at a step boundary, then exit "requeue me"."""

from __future__ import annotations

import logging
import signal
import threading

import torch

from lmforge.launch.train.callbacks import Callback
from lmforge.launch.train.collectives import MAX, all_reduce
from lmforge.launch.train.exit_codes import REQUEUE_EXIT_CODE

log = logging.getLogger("lmforge.train")

class PreemptionHandler(Callback):
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
        flag = all_reduce(torch.tensor(0 if self.received is None else 1), trainer.device, MAX)
        if flag.item() and trainer.state.step < trainer.config.max_steps:
            trainer.stop_requested = True
            self.stopped = True
            if trainer.rank == 0:
                log.warning(
                    "stop signal received: checkpointing at step %d and exiting with %d "
                    "so the job can be requeued",
                    trainer.state.step,
                    REQUEUE_EXIT_CODE,
                )
