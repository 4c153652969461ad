"""The hook API's types: what a stage hook is (:class:`StageCallback`) and what it receives
(:class:`StageContext`); a plain ``function(event, context)`` becomes a :class:`FunctionHook`.
Loading hooks and calling them: ``launch/stages/hooks.py``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lmforge.launch.train.callbacks import Callback

if TYPE_CHECKING:
    from lmforge.launch.config import RunConfig
    from lmforge.launch.train.trainer import Trainer


@dataclass
class StageContext:
    """What a hook receives. Hooks may read everything; they may set ``export_dir``."""

    stage: str
    """The stage's name (the job's name for a config without stages)."""
    index: int
    """The stage's position in ``stages:`` (0 for a config without stages)."""
    run_dir: Path
    """The stage's run directory (``<job run dir>/stages/<ii>-<name>``; the job's run
    directory for a config without stages)."""
    job_dir: Path
    """The job's run directory."""
    config: RunConfig
    """The stage's resolved config."""
    checkpoint: Path | None = None
    """The newest complete checkpoint (on_checkpoint: the one just written; at the stage's
    end: its final checkpoint)."""
    export_dir: Path | None = None
    """The stage's Hugging Face export, once written."""
    metrics: dict[str, float] = field(default_factory=dict)
    """Validation metrics: of this pass (on_eval) or the stage's final ones (on_stage_end)."""
    step: int | None = None
    """Training step (on_eval, on_checkpoint) or the stage's final step."""
    parent_run_id: str | None = None
    """The job's MLflow run (None for a config without stages: ``run_id`` is the job's)."""
    run_id: str | None = None
    """The stage's MLflow run (a child of ``parent_run_id``)."""
    tracking_uri: str | None = None
    """Where those runs live."""


class StageCallback(Callback):
    """A training :class:`Callback` that also receives the stage events (override what you
    need). Training events run in every training process on every rank; stage events in the
    job, with a :class:`StageContext`."""

    def on_stage_start(self, context: StageContext) -> None:
        """Before the stage prepares its data."""

    def on_stage_end(self, context: StageContext) -> None:
        """After the stage, with its final checkpoint, export and metrics. Setting
        ``context.export_dir`` here (the ``export`` built-in) fires ``on_export``."""

    def on_export(self, context: StageContext) -> None:
        """After the stage's Hugging Face export (``context.export_dir``)."""


class FunctionHook(StageCallback):
    """A hook written as ``function(event, context)``, as a :class:`StageCallback`.

    In the training processes it needs the stage's context (``context``, from the stage
    directory's ``stage.json``) and calls the function on rank 0 only.
    """

    def __init__(self, function: Callable[[str, StageContext], Any],
                 context: StageContext | None = None) -> None:
        self.function = function
        self.context = context

    def on_stage_start(self, context: StageContext) -> None:
        self.function("on_stage_start", context)

    def on_stage_end(self, context: StageContext) -> None:
        self.function("on_stage_end", context)

    def on_export(self, context: StageContext) -> None:
        self.function("on_export", context)

    def on_eval(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        if trainer.rank == 0 and self.context is not None:
            self.function("on_eval", dataclasses.replace(
                self.context, metrics=dict(metrics), step=trainer.state.step))

    def on_checkpoint(self, trainer: Trainer, folder: Path) -> None:
        if trainer.rank == 0 and self.context is not None:
            self.function("on_checkpoint", dataclasses.replace(
                self.context, checkpoint=Path(folder), step=trainer.state.step))
