"""Eval task files: what an example is, and the JSONL format lmforge reads.

One example a line, every line of a file the same kind:

- multiple choice: ``{"context": str, "choices": [str, ...], "gold": int}``
- cloze (e.g. the last word of a passage): ``{"context": str, "target": str}``

Other keys of a line (an id, a source) are ignored; blank lines are skipped. The continuation
scored is ``target_delimiter + choice`` (or ``+ target``), ``" "`` unless the task says
otherwise. An lm-evaluation-harness task YAML pointing at a local file is read by
``harness_yaml.py`` into the same :class:`EvalTask`.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

TaskKind = Literal["multiple_choice", "cloze"]
_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")  # an MLflow-safe piece of `eval/<task>/<metric>`


class EvalTaskError(ValueError):
    """An eval task file or task spec is wrong; the message names the file, line or key."""


@dataclass(frozen=True)
class MultipleChoiceExample:
    """One multiple-choice question: the choice scored highest is the answer."""

    context: str
    choices: tuple[str, ...]
    gold: int


@dataclass(frozen=True)
class ClozeExample:
    """One cloze: right when the greedy continuation of ``context`` is ``target``."""

    context: str
    target: str


Example = MultipleChoiceExample | ClozeExample


@dataclass(frozen=True)
class EvalTask:
    """A named list of examples of one kind, and how continuations are joined to contexts."""

    name: str
    kind: TaskKind
    examples: tuple[Example, ...]
    target_delimiter: str = " "
    """Put between context and choice/target (lm-evaluation-harness's ``target_delimiter``;
    a harness ``loglikelihood`` task has none: its target carries its own space)."""
    source: str = ""
    """The file the examples came from (for messages)."""

    def limited(self, limit: int | None) -> EvalTask:
        """The first ``limit`` examples (all when None)."""
        if limit is None or limit >= len(self.examples):
            return self
        return EvalTask(self.name, self.kind, self.examples[:limit], self.target_delimiter,
                        self.source)

    @property
    def chance(self) -> float:
        """The expected ``acc`` of guessing: the mean of 1/len(choices); 0 for a cloze."""
        if self.kind != "multiple_choice" or not self.examples:
            return 0.0
        return sum(1 / len(e.choices) for e in self.examples) / len(self.examples)  # type: ignore[union-attr]


def check_task_name(name: str, where: str) -> str:
    """Returns ``name`` if it can name MLflow metrics (``eval/<name>/acc``), else raises."""
    if not _NAME.match(name):
        raise EvalTaskError(f"{where}: task name {name!r} may hold only letters, digits, "
                            "'_', '-' and '.'; rename it")
    return name


def example_from_row(row: object, where: str) -> Example:
    """One JSONL row as an example; ``where`` is ``file:line`` for the message."""
    if not isinstance(row, dict):
        raise EvalTaskError(f"{where}: a line must be a JSON object, got {type(row).__name__}")
    context = row.get("context")
    if not isinstance(context, str):
        raise EvalTaskError(f"{where}: 'context' must be a string (the text before the "
                            f"answer), got {context!r}")
    if "choices" in row and "target" in row:
        raise EvalTaskError(f"{where}: a line has either 'choices' and 'gold' (multiple "
                            "choice) or 'target' (cloze), not both")
    if "choices" in row:
        choices, gold = row["choices"], row.get("gold")
        if (not isinstance(choices, list) or len(choices) < 2
                or not all(isinstance(c, str) and c for c in choices)):
            raise EvalTaskError(f"{where}: 'choices' must be a list of at least 2 non-empty "
                                f"strings, got {choices!r}")
        if isinstance(gold, bool) or not isinstance(gold, int) or not 0 <= gold < len(choices):
            raise EvalTaskError(f"{where}: 'gold' must be the index of the right choice, an "
                                f"integer from 0 to {len(choices) - 1}, got {gold!r}")
        return MultipleChoiceExample(context, tuple(choices), gold)
    if "target" in row:
        target = row["target"]
        if not isinstance(target, str) or not target:
            raise EvalTaskError(f"{where}: 'target' must be a non-empty string, got {target!r}")
        return ClozeExample(context, target)
    raise EvalTaskError(f"{where}: a line needs 'choices' and 'gold' (multiple choice) or "
                        f"'target' (cloze); it has {sorted(row)}")


def read_jsonl_task(path: str | Path, name: str | None = None,
                    target_delimiter: str = " ") -> EvalTask:
    """Reads a JSONL eval task file (see the module docstring).

    Args:
        path: The file.
        name: The task's name; the file's stem when None.
        target_delimiter: Put between context and each choice or target.

    Raises:
        EvalTaskError: Naming the file and line of the first bad row.
    """
    path = Path(path)
    name = check_task_name(name or path.stem, str(path))
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise EvalTaskError(f"{path}: no such eval task file") from None
    except UnicodeDecodeError as err:
        raise EvalTaskError(f"{path}: not UTF-8 text ({err})") from None
    examples: list[Example] = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise EvalTaskError(f"{where}: not valid JSON ({err.msg} at column {err.colno})"
                                ) from None
        example = example_from_row(row, where)
        if examples and type(example) is not type(examples[0]):
            raise EvalTaskError(f"{where}: every line of a task file must be the same kind; "
                                f"this one is {_kind(example)}, the first is "
                                f"{_kind(examples[0])}")
        examples.append(example)
    if not examples:
        raise EvalTaskError(f"{path}: the eval task file has no examples")
    return EvalTask(name, _kind(examples[0]), tuple(examples), target_delimiter, str(path))


def _kind(example: Example) -> TaskKind:
    return "multiple_choice" if isinstance(example, MultipleChoiceExample) else "cloze"

