"""The hooks lmforge provides by name: ``export``, ``register``, ``submit_next``.

Each is a :class:`~lmforge.launch.stages.callback.StageCallback` like a user's hook; the
runner knows none of them by name (``register`` is only added to a stage's hooks when
``tracking.registered_model`` is set).
"""

from __future__ import annotations

import dataclasses
import logging
import subprocess
import sys
from collections.abc import Sequence

from lmforge.launch.redact import redact_text
from lmforge.launch.stages.callback import StageCallback, StageContext

log = logging.getLogger("lmforge.hooks")


class ExportHook(StageCallback):
    """``export``: at the end of a stage, writes its Hugging Face export if the stage did not
    (``export.enabled: false``); the stage's hooks then hear ``on_export``."""

    def on_stage_end(self, context: StageContext) -> None:
        if context.export_dir is not None:
            return
        from lmforge.launch.commands import export

        cfg = context.config
        if not cfg.export.enabled:  # export() needs nothing else of the flag
            cfg = dataclasses.replace(cfg, export=dataclasses.replace(cfg.export, enabled=True))
        context.export_dir = export(cfg)


class RegisterHook(StageCallback):
    """``register``: on ``on_export``, logs the export folder as an MLflow model of the
    stage's run and registers it as a new version of ``tracking.registered_model``."""

    def on_export(self, context: StageContext) -> None:
        if context.export_dir is None:
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


class SubmitNextHook(StageCallback):
    """``submit_next``: when the stage ends, ``lmforge submit TARGET CONFIG FLAGS...
    OVERRIDES...``. Overrides may name ``{export_dir}``, ``{checkpoint}``, ``{run_dir}``,
    ``{stage}``. Runs as an argument list (no shell); the submit command checks every value
    that goes into a job script."""

    def __init__(self, target: str = "local", config: str = "", flags: Sequence[str] = (),
                 overrides: Sequence[str] = ()) -> None:
        self.target = target
        self.config = config
        self.flags = list(flags)
        self.overrides = list(overrides)

    def on_stage_end(self, context: StageContext) -> None:
        values = {"export_dir": context.export_dir or "", "checkpoint": context.checkpoint or "",
                  "run_dir": context.run_dir, "stage": context.stage}
        filled = [o.format_map({k: str(v) for k, v in values.items()}) for o in self.overrides]
        command = [sys.executable, "-m", "lmforge.launch.cli", "submit", self.target,
                   self.config, *self.flags, *filled]
        print(redact_text(f"submit_next: lmforge submit {self.target} {self.config} "
                          f"{' '.join([*self.flags, *filled])}"), flush=True)
        proc = subprocess.run(command, capture_output=True, text=True)
        sys.stdout.write(redact_text(proc.stdout))
        if proc.returncode != 0:
            raise RuntimeError(f"lmforge submit {self.target} exited with {proc.returncode}: "
                               f"{redact_text(proc.stderr.strip()[-2000:])}")


BUILTINS: dict[str, type[StageCallback]] = {
    "export": ExportHook,
    "register": RegisterHook,
    "submit_next": SubmitNextHook,
}
"""Built-in hooks by config name (``BUILTIN_HOOKS`` in ``launch/config/stages.py``)."""
