"""Hooks the stage tests name by import path (tests/launch is on sys.path under pytest;
the training processes get it through PYTHONPATH)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from lmforge.launch.stages.hooks import StageCallback, StageContext

CALLS: list[tuple[str, str]] = []


def record(event: str, context: StageContext) -> None:
    """Appends the event to $STAGE_HOOK_LOG (one JSON line) and to CALLS."""
    CALLS.append((event, context.stage))
    log = os.environ.get("STAGE_HOOK_LOG")
    if log:
        with open(log, "a", encoding="utf-8") as f:
            f.write(json.dumps({"event": event, "stage": context.stage, "step": context.step,
                                "metrics": context.metrics, "run_id": context.run_id,
                                "parent": context.parent_run_id}) + "\n")


def fail(event: str, context: StageContext) -> None:
    raise RuntimeError(f"failing on purpose at {event}")


def stop_in_stage(event: str, context: StageContext) -> None:
    """Fails at the first checkpoint of stage $STAGE_STOP (a job killed mid-stage)."""
    if (event == "on_checkpoint" and context.stage == os.environ.get("STAGE_STOP")
            and context.checkpoint is not None):
        Path(os.environ["STAGE_STOP_MARK"]).write_text(str(context.step))
        raise RuntimeError(f"stopping stage {context.stage} at step {context.step}")


class Counter(StageCallback):
    seen: list[str] = []

    def on_stage_start(self, context: StageContext) -> None:
        Counter.seen.append(f"start:{context.stage}")

    def on_stage_end(self, context: StageContext) -> None:
        Counter.seen.append(f"end:{context.stage}")
