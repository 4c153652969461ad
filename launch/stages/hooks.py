"""Stage hooks: one shape, :class:`StageCallback`, for user code and the built-ins.

Events and where they run:

===================  =============================================  ==========================
method               when                                           where
===================  =============================================  ==========================
``on_stage_start``   before a stage prepares its data               the job (the runner)
``on_eval``          after each validation pass                     training processes
``on_checkpoint``    after a checkpoint is complete                 training processes
``on_export``        after the stage's Hugging Face export          the job
``on_stage_end``     after the stage (and its from-scratch run)     the job
===================  =============================================  ==========================

A hook is named in the config (``hooks:`` at the top level for every stage, or in a stage;
a config without ``stages:`` is a graph of one stage and runs its hooks the same way):

- ``package.module:Class`` -- a subclass of :class:`StageCallback` (a training
  :class:`~lmforge.launch.train.callbacks.Callback` that also hears the stage events), made
  with no arguments: the training processes add it to the trainer's callbacks (every rank,
  all training events), the job calls its ``on_stage_start``/``on_stage_end``/``on_export``
  with a :class:`StageContext`;
- ``package.module:function`` -- called as ``function(event, context)`` with the event's
  name and a :class:`StageContext` (wrapped in a :class:`FunctionHook`; its ``on_eval`` and
  ``on_checkpoint`` run on rank 0 only);
- a built-in (``launch/stages/builtin_hooks.py``): ``export`` (export every stage, also with
  ``export.enabled: false``), ``register`` (log each export as an MLflow model and register a
  new version of ``tracking.registered_model``; implied when that is set), ``submit_next``
  (submit a follow-up job when the stage ends: ``{name: submit_next, args: {target: slurm,
  config: next.yaml, flags: [--nodes=2], overrides: ["--init.source={export_dir}"]}}``).

The types (:class:`StageCallback`, :class:`StageContext`, :class:`FunctionHook`) live in
``launch/stages/callback.py`` and are importable from here.

A failing hook is reported by name and event; ``hook_failure: stop`` (default) ends the job
there, ``warn`` logs and goes on.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from lmforge.launch.config.stages import HookSpec, hook_spec
from lmforge.launch.redact import redact_text
from lmforge.launch.rundir import RunDir
from lmforge.launch.stages.builtin_hooks import BUILTINS
from lmforge.launch.stages.callback import FunctionHook, StageCallback, StageContext
from lmforge.launch.train.callbacks import Callback

if TYPE_CHECKING:
    from lmforge.launch.config import RunConfig
    from lmforge.launch.train.trainer import Trainer

log = logging.getLogger("lmforge.hooks")


class HookError(ValueError):
    """A hook failed and ``hook_failure`` is ``stop`` (a ValueError: the CLI prints it as one
    line and exits 1)."""


@dataclass
class Hook:
    """A loaded hook: its config name, the events it wants (empty: all), its callback."""

    name: str
    events: tuple[str, ...]
    callback: StageCallback

    def wants(self, event: str) -> bool:
        return not self.events or event in self.events


def load_hook(entry: str | HookSpec) -> Hook:
    """Resolves a ``hooks:`` entry to a :class:`Hook` (imports the user's module).

    Raises:
        ValueError: ``hooks: '<name>' ...`` when the module or attribute cannot be loaded or
            is neither a function nor a StageCallback subclass.
    """
    spec = hook_spec(entry)
    events = tuple(spec.events)
    if spec.name in BUILTINS:
        return Hook(spec.name, events, BUILTINS[spec.name](**spec.args))
    module_name, _, attribute = spec.name.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as err:  # ImportError, or whatever the module raises when imported
        raise ValueError(f"hooks: '{spec.name}': cannot import {module_name} "
                         f"({type(err).__name__}: {err}); is it installed or on PYTHONPATH?") \
            from err
    target = getattr(module, attribute, None)
    if isinstance(target, type) and issubclass(target, StageCallback):
        return Hook(spec.name, events, target())
    if callable(target) and not isinstance(target, type):
        return Hook(spec.name, events, FunctionHook(target))
    raise ValueError(f"hooks: '{spec.name}': {module_name} has no function or StageCallback "
                     f"subclass named {attribute!r}")


class StageHooks:
    """A stage's hooks, called in config order under ``hook_failure``."""

    def __init__(self, hooks: list[Hook], policy: str = "stop") -> None:
        self.hooks = hooks
        self.policy = policy
        self.failures: list[str] = []
        """One line per hook call that failed (``warn`` goes on after it)."""

    @classmethod
    def from_config(cls, cfg: RunConfig, extra: tuple[str, ...] = ()) -> StageHooks:
        """The hooks of ``cfg`` plus built-ins in ``extra`` not already listed."""
        entries: list[str | HookSpec] = list(cfg.hooks)
        names = {hook_spec(e).name for e in entries}
        entries += [name for name in extra if name not in names]
        return cls([load_hook(e) for e in entries], cfg.hook_failure)

    def on_stage_start(self, context: StageContext) -> None:
        self._each("on_stage_start", context.stage, lambda c: c.on_stage_start(context))

    def on_export(self, context: StageContext) -> None:
        self._each("on_export", context.stage, lambda c: c.on_export(context))

    def on_stage_end(self, context: StageContext) -> None:
        """Calls ``on_stage_end``; when a hook wrote the export (the ``export`` built-in),
        then ``on_export``."""
        exported = context.export_dir
        self._each("on_stage_end", context.stage, lambda c: c.on_stage_end(context))
        if exported is None and context.export_dir is not None:
            self.on_export(context)

    def on_eval(self, trainer: Trainer, metrics: dict[str, float], stage: str) -> None:
        self._each("on_eval", stage, lambda c: c.on_eval(trainer, metrics))

    def on_checkpoint(self, trainer: Trainer, folder: Path, stage: str) -> None:
        self._each("on_checkpoint", stage, lambda c: c.on_checkpoint(trainer, folder))

    def _each(self, event: str, stage: str, call: Callable[[StageCallback], None]) -> None:
        """``call`` on every hook that wants ``event``; a failure as ``hook_failure`` says.

        Raises:
            HookError: A hook failed and the policy is ``stop``.
        """
        for hook in self.hooks:
            if not hook.wants(event):
                continue
            try:
                call(hook.callback)
            except HookError:
                raise
            except Exception as err:
                line = redact_text(f"hook '{hook.name}' failed on {event} of stage '{stage}': "
                                   f"{type(err).__name__}: {err}")
                self.failures.append(line)
                if self.policy == "stop":
                    raise HookError(f"{line} (hook_failure: stop; set hook_failure: warn to "
                                    "go on after failing hooks)") from err
                log.warning("lmforge: %s; going on (hook_failure: warn)", line)


# -- inside the training processes ---------------------------------------------------


class TrainingHooks(Callback):
    """Carries ``on_eval`` and ``on_checkpoint`` to the function hooks, under
    ``hook_failure`` (each :class:`FunctionHook` acts on rank 0 only)."""

    def __init__(self, hooks: StageHooks, stage: str) -> None:
        self.hooks = hooks
        self.stage = stage

    def on_eval(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        self.hooks.on_eval(trainer, metrics, self.stage)

    def on_checkpoint(self, trainer: Trainer, folder: Path) -> None:
        self.hooks.on_checkpoint(trainer, folder, self.stage)


def hook_callbacks(cfg: RunConfig, run_dir: Path) -> list[Callback]:
    """The training callbacks for ``cfg.hooks``: each user StageCallback itself (every rank)
    and one :class:`TrainingHooks` for the function hooks. Empty without hooks; built-ins do
    not run in training."""
    if not cfg.hooks:
        return []
    hooks = StageHooks.from_config(cfg).hooks
    callbacks: list[Callback] = [h.callback for h in hooks if h.name not in BUILTINS
                                 and not isinstance(h.callback, FunctionHook)]
    functions = [h for h in hooks if isinstance(h.callback, FunctionHook)
                 and (h.wants("on_eval") or h.wants("on_checkpoint"))]
    if functions:
        run_dir = Path(run_dir)
        info = RunDir.of(run_dir).read_stage_info()
        context = StageContext(
            stage=info.stage if info else cfg.name, index=info.index if info else 0,
            run_dir=run_dir, job_dir=Path(info.job_dir) if info else run_dir, config=cfg,
            parent_run_id=info.parent_run_id if info else None,
            run_id=info.run_id if info else None,
            tracking_uri=info.tracking_uri if info else None,
        )
        for hook in functions:
            hook.callback.context = context
        callbacks.append(TrainingHooks(StageHooks(functions, cfg.hook_failure), context.stage))
    return callbacks
