"""The ``eval:`` section: downstream tasks scored inside training, and bits per byte.

    eval:
      tasks:
        next_line: configs/eval/eval_next_line.jsonl            # name → task file
        last_word: {path: configs/eval/eval_last_word.jsonl, limit: 100}
        harness: configs/eval/eval_next_line.yaml               # an lm-evaluation-harness YAML
      batch_size: 16
      bpb: true

Every ``train.eval_every`` steps and at the end of each stage, every rank scores its share of
each task's examples with the engine (``launch/eval/in_loop.py``). Here the section checks
only what needs no parsing of the files (names, files present, suffixes, limits); the task
files themselves are read and checked by ``lmforge train``/``run`` before any process starts.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

TASK_SUFFIXES = (".jsonl", ".json", ".yaml", ".yml")
"""A JSONL task file (``.jsonl``, ``.json``) or an lm-evaluation-harness task YAML."""
_TASK_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,100}$")  # a piece of MLflow's `eval/<task>/acc`


@dataclass
class EvalTaskSpec:
    """One task of ``eval.tasks`` (the long form; a bare path is ``{path: ...}``)."""

    path: str
    """The task file: JSONL (one example a line, see the README's "Evaluating") or an
    lm-evaluation-harness task YAML pointing at a local file. A relative path is read from
    the folder of the config file that names it (from the current directory when given as a
    ``--eval.tasks...`` override) and stored absolute in the resolved config."""
    limit: int | None = None
    """Score the first ``limit`` examples only; None: all of them."""

    def __post_init__(self) -> None:
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit: must be at least 1, got {self.limit}; or leave it "
                             "unset to score every example")


@dataclass
class EvalConfig:
    """Downstream evaluation in the training loop (``eval:``)."""

    tasks: dict[str, EvalTaskSpec | str] = field(default_factory=dict)
    """Task name → task file (or ``{path, limit}``); each logs ``eval/<name>/<metric>``.
    Names may hold letters, digits, ``_``, ``-`` and ``.``. Empty: no tasks."""
    batch_size: int = 16
    """Sequences per forward pass when scoring tasks."""
    bpb: bool = True
    """Log ``val/<dataset>/bpb`` (bits per byte) for each validation dataset."""

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size: must be at least 1, got {self.batch_size}")
        specs: dict[str, EvalTaskSpec] = {}
        for name, spec in self.tasks.items():
            if not _TASK_NAME.match(name):
                raise ValueError(f"tasks.{name}: a task name may hold only letters, digits, "
                                 "'_', '-' and '.' (it names MLflow metrics eval/<name>/acc); "
                                 "rename it")
            if isinstance(spec, str):
                spec = EvalTaskSpec(spec)
            path = Path(spec.path).expanduser()
            if path.suffix not in TASK_SUFFIXES:
                raise ValueError(f"tasks.{name}: {spec.path!r} is not a task file; give a "
                                 ".jsonl file (one example a line) or an lm-evaluation-harness "
                                 "task .yaml")
            if not path.is_file():
                raise ValueError(f"tasks.{name}: no such file {str(path.absolute())!r}; fix the "
                                 "path (relative to the config file's folder, or to the current "
                                 "directory in an override) or remove the task")
            specs[name] = EvalTaskSpec(str(path.resolve()), spec.limit)
        self.tasks = dict(specs)

    def task_specs(self) -> dict[str, EvalTaskSpec]:
        """The tasks, each in the long form."""
        return {name: spec if isinstance(spec, EvalTaskSpec) else EvalTaskSpec(spec)
                for name, spec in self.tasks.items()}


def anchor_task_paths(data: dict[str, Any], folder: Path,
                      overridden: set[tuple[str, ...]]) -> dict[str, Any]:
    """``data`` (a YAML file's mapping) with the relative ``eval.tasks`` paths it holds, also
    in ``stages[i].eval``, made relative to ``folder`` (the file's); values set by an
    override (a key path in ``overridden``) stay relative to the current directory."""
    def given(key: tuple[str, ...]) -> bool:
        return any(key[:n] in overridden for n in range(1, len(key) + 1))

    def anchored(value: Any, key: tuple[str, ...]) -> Any:
        if isinstance(value, str) and value and not given(key) \
                and not Path(value).expanduser().is_absolute():
            return str(folder / value)
        return value

    def fix(section: Any, prefix: tuple[str, ...]) -> Any:
        tasks = section.get("tasks") if isinstance(section, dict) else None
        if not isinstance(tasks, dict):
            return section
        fixed = {}
        for name, spec in tasks.items():
            key = (*prefix, "tasks", str(name))
            if isinstance(spec, dict) and "path" in spec:
                spec = {**spec, "path": anchored(spec["path"], (*key, "path"))}
            fixed[name] = anchored(spec, key)
        return {**section, "tasks": fixed}

    out = dict(data)
    if "eval" in out:
        out["eval"] = fix(out["eval"], ("eval",))
    if isinstance(out.get("stages"), list):
        out["stages"] = [{**stage, "eval": fix(stage["eval"], ("stages", str(i), "eval"))}
                         if isinstance(stage, dict) and "eval" in stage else stage
                         for i, stage in enumerate(out["stages"])]
    return out
