"""Hooks: loading by import path, built-ins by name, the failure policy (fast, in-process),
and one real hook inside the training processes (tests/launch/stages/test_stages_graph.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import stage_hooks

from lmforge.launch.config import load_config
from lmforge.launch.config.stages import HookSpec
from lmforge.launch.stages.hooks import (
    HookError,
    StageContext,
    StageHooks,
    hook_callbacks,
    load_hook,
)

TINY = Path(__file__).resolve().parents[3] / "configs" / "tiny.yaml"


def context(tmp_path: Path) -> StageContext:
    return StageContext("sft", 2, tmp_path, tmp_path, load_config(TINY))


def test_function_and_callback_hooks(tmp_path):
    stage_hooks.CALLS.clear()
    stage_hooks.Counter.seen.clear()
    hooks = StageHooks([load_hook("stage_hooks:record"), load_hook("stage_hooks:Counter")])
    hooks.on_stage_start(context(tmp_path))
    hooks.on_stage_end(context(tmp_path))
    assert stage_hooks.CALLS == [("on_stage_start", "sft"), ("on_stage_end", "sft")]
    assert stage_hooks.Counter.seen == ["start:sft", "end:sft"]


def test_events_filter(tmp_path):
    stage_hooks.CALLS.clear()
    hook = load_hook(HookSpec(name="stage_hooks:record", events=["on_stage_end"]))
    StageHooks([hook]).on_stage_start(context(tmp_path))
    assert stage_hooks.CALLS == []


def test_failure_policy(tmp_path):
    failing = [load_hook("stage_hooks:fail"), load_hook("stage_hooks:record")]
    with pytest.raises(HookError, match=r"hook 'stage_hooks:fail' failed on on_stage_end of "
                                        r"stage 'sft': RuntimeError: failing on purpose"):
        StageHooks(failing, "stop").on_stage_end(context(tmp_path))
    stage_hooks.CALLS.clear()
    hooks = StageHooks(failing, "warn")
    hooks.on_stage_end(context(tmp_path))
    assert len(hooks.failures) == 1 and "stage_hooks:fail" in hooks.failures[0]
    assert stage_hooks.CALLS == [("on_stage_end", "sft")]  # the next hook still ran


@pytest.mark.parametrize("name,message", [
    ("no_such_module:f", "cannot import no_such_module"),
    ("stage_hooks:missing", "has no function or StageCallback subclass named 'missing'"),
])
def test_load_errors_name_the_hook(name, message):
    with pytest.raises(ValueError, match=message) as err:
        load_hook(name)
    assert f"hooks: '{name}'" in str(err.value)


def test_training_callbacks(tmp_path):
    cfg = load_config(TINY, ["--hooks=[stage_hooks:record, stage_hooks:Counter, export]"])
    kinds = sorted(type(c).__name__ for c in hook_callbacks(cfg, tmp_path))
    assert kinds == ["Counter", "TrainingHooks"]  # built-ins do not run in training
    assert hook_callbacks(load_config(TINY), tmp_path) == []


def test_submit_next_runs_lmforge_submit(tmp_path, capsys):
    config = TINY
    hook = load_hook(HookSpec(name="submit_next", args={
        "target": "local", "config": str(config), "flags": ["--dry-run"],
        "overrides": ["--run_dir={run_dir}/next", "--name=next-{stage}"]}))
    StageHooks([hook]).on_stage_end(context(tmp_path))
    out = capsys.readouterr().out
    assert f'"run_dir": "{tmp_path}/next"' in out and "dry run: nothing started" in out
