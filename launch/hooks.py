"""Stage hooks: user code and built-ins called at the events of a stage graph.

Events and where they run:

===================  =============================================  ==========================
event                when                                           where
===================  =============================================  ==========================
``on_stage_start``   before a stage prepares its data               the job (``lmforge run``)
``on_eval``          after each validation pass                     training process, rank 0
``on_checkpoint``    after a checkpoint is complete                 training process, rank 0
``on_export``        after the stage's Hugging Face export          the job
``on_stage_end``     after the stage (and its from-scratch run)     the job
===================  =============================================  ==========================

A hook is named in the config (``hooks:`` at the top level for every stage, or in a stage):

- ``package.module:function`` -- called as ``function(event, context)`` with the event's
  name and a :class:`StageContext`;
- ``package.module:Class`` -- a subclass of :class:`StageCallback` (a training
  :class:`~lmforge.launch.train.callbacks.Callback` that also hears the stage events),
  made with no arguments: the training processes add it to the trainer's callbacks (every
  rank, all training events), the job calls its ``on_stage_start``/``on_stage_end``/
  ``on_export`` methods with the context;
- a built-in: ``export`` (export every stage, also with ``export.enabled: false``),
  ``register`` (log each export as an MLflow model and register a new version of
  ``tracking.registered_model``; implied when that is set), ``submit_next`` (submit a
  follow-up job when the stage ends: ``{name: submit_next, args: {target: slurm, config:
  next.yaml, flags: [--nodes=2], overrides: ["--init.source={export_dir}"]}}``).

A failing hook is reported by name and event; ``hook_failure: stop`` (default) ends the job
there, ``warn`` logs and goes on.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import logging
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lmforge.launch.config.stages import HookSpec, hook_spec
from lmforge.launch.rundir import RunDir
from lmforge.launch.train.callbacks import Callback

if TYPE_CHECKING:
    from lmforge.launch.config import RunConfig

log = logging.getLogger("lmforge.hooks")


class HookError(ValueError):
    """A hook failed and ``hook_failure`` is ``stop`` (a ValueError: the CLI prints it as one
    line and exits 1)."""


@dataclass
class StageContext:
    """What a hook receives. Hooks may read everything; they may set ``export_dir``."""

    stage: str
    """The stage's name (the job's name for a run without stages)."""
    index: int
    """The stage's position in ``stages:`` (0 for a run without stages)."""
    run_dir: Path
    """The stage's run directory (``<job run dir>/stages/<ii>-<name>``)."""
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
    """The job's MLflow run."""
    run_id: str | None = None
    """The stage's MLflow run (a child of ``parent_run_id``)."""
    tracking_uri: str | None = None
    """Where those runs live."""
    emit: Callable[[str, StageContext], None] | None = field(default=None, repr=False)
    """Fires another event to every hook (the built-in ``export`` fires ``on_export``)."""


class StageCallback(Callback):
    """A training :class:`Callback` that also receives the stage events (override what you
    need). Training events run in every training process on every rank; stage events in the
    job, with a :class:`StageContext`."""

    def on_stage_start(self, context: StageContext) -> None:
        """Before the stage prepares its data."""

    def on_stage_end(self, context: StageContext) -> None:
        """After the stage, with its final checkpoint, export and metrics."""

    def on_export(self, context: StageContext) -> None:
        """After the stage's Hugging Face export (``context.export_dir``)."""


@dataclass
class Hook:
    """A loaded hook: its config name, the events it wants, and what to call."""

    name: str
    events: tuple[str, ...]
    function: Callable[[str, StageContext], Any] | None = None
    callback: StageCallback | None = None

    def wants(self, event: str) -> bool:
        return not self.events or event in self.events

    def __call__(self, event: str, context: StageContext) -> None:
        if self.function is not None:
            self.function(event, context)
        elif self.callback is not None and event in ("on_stage_start", "on_stage_end",
                                                     "on_export"):
            getattr(self.callback, event)(context)


def load_hook(entry: str | HookSpec) -> Hook:
    """Resolves a ``hooks:`` entry to something callable (imports the user's module).

    Raises:
        ValueError: ``hooks: '<name>' ...`` when the module or attribute cannot be loaded or
            is neither a function nor a StageCallback subclass.
    """
    spec = hook_spec(entry)
    events = tuple(spec.events)
    if spec.name in BUILTINS:
        function = functools.partial(BUILTINS[spec.name], **spec.args)
        return Hook(spec.name, events, function=function)
    module_name, _, attribute = spec.name.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as err:  # ImportError, or whatever the module raises when imported
        raise ValueError(f"hooks: '{spec.name}': cannot import {module_name} "
                         f"({type(err).__name__}: {err}); is it installed or on PYTHONPATH?") \
            from err
    target = getattr(module, attribute, None)
    if isinstance(target, type) and issubclass(target, Callback):
        return Hook(spec.name, events, callback=target())
    if callable(target):
        return Hook(spec.name, events, function=target)
    raise ValueError(f"hooks: '{spec.name}': {module_name} has no function or Callback "
                     f"subclass named {attribute!r}")


class HookRunner:
    """Calls the loaded hooks for an event, in config order, applying ``hook_failure``."""

    def __init__(self, hooks: list[Hook], policy: str = "stop") -> None:
        self.hooks = hooks
        self.policy = policy
        self.failures: list[str] = []
        """One line per hook call that failed (``warn`` goes on after it)."""

    @classmethod
    def from_config(cls, cfg: RunConfig, extra: tuple[str, ...] = ()) -> HookRunner:
        """The hooks of ``cfg`` plus built-ins in ``extra`` not already listed."""
        entries: list[str | HookSpec] = list(cfg.hooks)
        names = {hook_spec(e).name for e in entries}
        entries += [name for name in extra if name not in names]
        return cls([load_hook(e) for e in entries], cfg.hook_failure)

    def emit(self, event: str, context: StageContext) -> None:
        """Calls every hook that wants ``event``.

        Raises:
            HookError: A hook failed and the policy is ``stop``.
        """
        context.emit = self.emit
        for hook in self.hooks:
            if not hook.wants(event):
                continue
            try:
                hook(event, context)
            except HookError:
                raise
            except Exception as err:
                line = (f"hook '{hook.name}' failed on {event} of stage '{context.stage}': "
                        f"{type(err).__name__}: {err}")
                self.failures.append(line)
                if self.policy == "stop":
                    raise HookError(f"{line} (hook_failure: stop; set hook_failure: warn to "
                                    "go on after failing hooks)") from err
                log.warning("lmforge: %s; going on (hook_failure: warn)", line)


# -- built-in hooks ------------------------------------------------------------------


def export_hook(event: str, context: StageContext) -> None:
    """``export``: at the end of a stage, writes its Hugging Face export if the stage did not
    (``export.enabled: false``), then fires ``on_export``."""
    if event != "on_stage_end" or context.export_dir is not None:
        return
    from lmforge.launch.commands import export

    cfg = context.config
    if not cfg.export.enabled:  # export() needs nothing else of the flag
        cfg = dataclasses.replace(cfg, export=dataclasses.replace(cfg.export, enabled=True))
    context.export_dir = export(cfg)
    if context.emit is not None:
        context.emit("on_export", context)


def register_hook(event: str, context: StageContext) -> None:
    """``register``: on ``on_export``, logs the export folder as an MLflow model of the
    stage's run and registers it as a new version of ``tracking.registered_model``."""
    if event != "on_export" or context.export_dir is None:
        return
    from lmforge.launch.tracking.registry import register_export

    tracking = context.config.tracking
    if not tracking.enabled or not tracking.registered_model or not context.run_id:
        log.warning("register: nothing registered (tracking off, no run, or no "
                    "tracking.registered_model)")
        return
    version = register_export(tracking, context.tracking_uri, context.run_id,
                              context.export_dir, stage=context.stage)
    print(f"registered {tracking.registered_model} version {version.version} "
          f"(stage {context.stage}, run {context.run_id})", flush=True)


def submit_next_hook(event: str, context: StageContext, target: str = "local",
                     config: str = "", flags: list[str] = (),
                     overrides: list[str] = ()) -> None:
    """``submit_next``: when the stage ends, ``lmforge submit TARGET CONFIG FLAGS...
    OVERRIDES...``. Overrides may name ``{export_dir}``, ``{checkpoint}``, ``{run_dir}``,
    ``{stage}``. Runs as an argument list (no shell); the submit command checks every value
    that goes into a job script."""
    if event != "on_stage_end":
        return
    values = {"export_dir": context.export_dir or "", "checkpoint": context.checkpoint or "",
              "run_dir": context.run_dir, "stage": context.stage}
    filled = [o.format_map({k: str(v) for k, v in values.items()}) for o in overrides]
    command = [sys.executable, "-m", "lmforge.launch.cli", "submit", target, config,
               *flags, *filled]
    print(f"submit_next: lmforge submit {target} {config} {' '.join([*flags, *filled])}",
          flush=True)
    proc = subprocess.run(command, capture_output=True, text=True)
    sys.stdout.write(proc.stdout)
    if proc.returncode != 0:
        raise RuntimeError(f"lmforge submit {target} exited with {proc.returncode}: "
                           f"{proc.stderr.strip()[-2000:]}")


BUILTINS: dict[str, Callable[..., None]] = {
    "export": export_hook,
    "register": register_hook,
    "submit_next": submit_next_hook,
}


# -- inside the training processes ---------------------------------------------------


class TrainingHooks(Callback):
    """Carries ``on_eval`` and ``on_checkpoint`` to function hooks, on rank 0 only."""

    def __init__(self, runner: HookRunner, context: StageContext) -> None:
        self.runner = runner
        self.context = context

    def on_eval(self, trainer, metrics: dict[str, float]) -> None:
        if trainer.rank == 0:
            context = dataclasses.replace(self.context, metrics=dict(metrics),
                                          step=trainer.state.step)
            self.runner.emit("on_eval", context)

    def on_checkpoint(self, trainer, folder: Path) -> None:
        if trainer.rank == 0:
            context = dataclasses.replace(self.context, checkpoint=Path(folder),
                                          step=trainer.state.step)
            self.runner.emit("on_checkpoint", context)


def hook_callbacks(cfg: RunConfig, run_dir: Path) -> list[Callback]:
    """The training callbacks for ``cfg.hooks``: one adapter for the function hooks (rank 0)
    and each user StageCallback itself (every rank). Empty without hooks."""
    if not cfg.hooks:
        return []
    import json

    runner = HookRunner.from_config(cfg)
    functions = [h for h in runner.hooks if h.function is not None and h.name not in BUILTINS
                 and (h.wants("on_eval") or h.wants("on_checkpoint"))]
    callbacks: list[Callback] = [h.callback for h in runner.hooks if h.callback is not None]
    if functions:
        run_dir = Path(run_dir)
        info_file = RunDir.of(run_dir).stage_info
        info = json.loads(info_file.read_text()) if info_file.exists() else {}
        context = StageContext(
            stage=info.get("stage", cfg.name), index=info.get("index", 0), run_dir=run_dir,
            job_dir=Path(info.get("job_dir", run_dir)), config=cfg,
            parent_run_id=info.get("parent_run_id"), run_id=info.get("run_id"),
            tracking_uri=info.get("tracking_uri"),
        )
        callbacks.append(TrainingHooks(HookRunner(functions, cfg.hook_failure), context))
    return callbacks
