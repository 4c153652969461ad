"""Which reader a task file needs: JSONL (``tasks.py``) or an lm-evaluation-harness YAML
(``harness_yaml.py``), by its suffix; and the ``name=path`` specs of ``--tasks``."""

from __future__ import annotations

from pathlib import Path

from lmforge.launch.eval.harness_yaml import read_harness_task
from lmforge.launch.eval.tasks import EvalTask, EvalTaskError, read_jsonl_task


def read_task(path: str | Path, name: str | None = None) -> EvalTask:
    """The task in ``path``: a ``.yaml``/``.yml`` harness task (named by its ``task:`` key
    when ``name`` is None), else a JSONL task file (named by its stem)."""
    if Path(path).suffix in (".yaml", ".yml"):
        return read_harness_task(path, name)
    return read_jsonl_task(path, name)


def task_from_spec(spec: str) -> EvalTask:
    """A task from a command-line spec: ``name=path`` or a bare path."""
    name, sep, path = spec.partition("=")
    if not sep:
        return read_task(spec)
    if not name or not path:
        raise EvalTaskError(f"--tasks {spec!r}: give name=path (both non-empty) or a path")
    return read_task(path, name)
