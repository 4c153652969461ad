"""The subset of an lm-evaluation-harness task YAML lmforge reads: a local JSONL file and
the simple template forms, resolved the way the harness resolves them.

    task: my_task
    dataset_path: json
    dataset_kwargs: {data_files: {test: data/my_task.jsonl}}   # or a path, or a list
    test_split: test                 # else validation_split; a plain path is split "train"
    output_type: multiple_choice     # or loglikelihood (a cloze)
    doc_to_text: "Question: {{question}}\\nAnswer:"
    doc_to_choice: choices           # a field, "{{field}}", or a YAML list
    doc_to_target: label             # a field, an int, or "{{field}}"
    target_delimiter: " "

A ``doc_to_*`` value is a field name, or text with ``{{ field }}`` placeholders; any other
Jinja (filters, expressions, ``{% %}``), ``!function``, ``process_docs``, few-shot and every
key not listed here is refused, naming the key. Relative ``data_files`` are read from the
current directory, as the harness (``datasets``) reads them. As in the harness, a
``loglikelihood`` task's continuation is ``doc_to_target`` alone (no ``target_delimiter``).
"""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path
from typing import Any

import yaml

from lmforge.launch.eval.tasks import (
    ClozeExample,
    EvalTask,
    EvalTaskError,
    Example,
    MultipleChoiceExample,
    check_task_name,
)

_PLACEHOLDER = re.compile(r"\{\{\s*([A-Za-z_]\w*)\s*\}\}")
_USED = {"task", "dataset_path", "dataset_kwargs", "output_type", "test_split",
         "validation_split", "doc_to_text", "doc_to_choice", "doc_to_target",
         "target_delimiter", "num_fewshot", "description"}
# Keys that do not change a zero-shot score: bookkeeping, metrics lmforge computes anyway.
_IGNORED = {"tag", "task_alias", "metadata", "metric_list", "dataset_name", "training_split",
            "fewshot_split", "fewshot_delimiter", "should_decontaminate",
            "doc_to_decontamination_query", "version"}


def read_harness_task(path: str | Path, name: str | None = None) -> EvalTask:
    """Reads an lm-evaluation-harness task YAML (the subset in the module docstring).

    Args:
        path: The YAML file.
        name: The task's name; its ``task:`` key (else the file's stem) when None.

    Raises:
        EvalTaskError: Naming the file and key (or data file and line) that lmforge cannot
            read, and what to do.
    """
    path = Path(path)
    config = _read_yaml(path)
    where = str(path)
    unknown = sorted(set(config) - _USED - _IGNORED)
    if unknown:
        raise EvalTaskError(f"{where}: {', '.join(unknown)}: not supported by lmforge's "
                            "reader of harness tasks (it reads a local JSONL file with simple "
                            "templates); remove the key, or run the task with "
                            "lm-evaluation-harness itself")
    output_type = config.get("output_type")
    if output_type not in ("multiple_choice", "loglikelihood"):
        raise EvalTaskError(f"{where}: output_type: {output_type!r} is not supported; "
                            "lmforge scores multiple_choice and loglikelihood tasks")
    if config.get("num_fewshot") not in (None, 0):
        raise EvalTaskError(f"{where}: num_fewshot: lmforge scores zero-shot only; remove it")
    if config.get("description") not in (None, ""):
        raise EvalTaskError(f"{where}: description: not supported; put the text into "
                            "doc_to_text")
    name = check_task_name(name or str(config.get("task") or path.stem), where)
    delimiter = config.get("target_delimiter", " ")
    if not isinstance(delimiter, str):
        raise EvalTaskError(f"{where}: target_delimiter: must be a string, got {delimiter!r}")
    for key in ("doc_to_text", "doc_to_target") + (
            ("doc_to_choice",) if output_type == "multiple_choice" else ()):
        if key not in config:
            raise EvalTaskError(f"{where}: {key}: missing; a {output_type} task needs it")
        _check_template(config[key], key, where)
    rows = _read_rows(_data_file(config, where), where)
    features = set().union(*(row.keys() for row, _ in rows))
    examples = [_example(config, row, features, f"{row_where} (read by {where})")
                for row, row_where in rows]
    if output_type == "loglikelihood":
        delimiter = ""  # the harness scores (doc_to_text, doc_to_target) as they are
    kind = "multiple_choice" if output_type == "multiple_choice" else "cloze"
    return EvalTask(name, kind, tuple(examples), delimiter, str(path))


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise EvalTaskError(f"{path}: no such task YAML") from None
    try:
        config = yaml.safe_load(text)
    except yaml.constructor.ConstructorError as err:
        raise EvalTaskError(f"{path}: {err.problem} (line {err.problem_mark.line + 1}); lmforge "
                            "runs no code from task files (!function): use a field or a "
                            "{{ field }} template instead") from None
    except yaml.YAMLError as err:
        raise EvalTaskError(f"{path}: not valid YAML ({err})") from None
    if not isinstance(config, dict):
        raise EvalTaskError(f"{path}: a task YAML must be a mapping of keys (task:, "
                            "dataset_path:, ...)")
    if "include" in config:
        raise EvalTaskError(f"{path}: include: not supported; copy the keys into this file")
    return config


def _check_template(value: Any, key: str, where: str) -> None:
    if isinstance(value, str):
        rest = _PLACEHOLDER.sub("", value)
        if any(mark in rest for mark in ("{{", "}}", "{%", "{#")):
            raise EvalTaskError(f"{where}: {key}: {value!r} uses Jinja beyond '{{{{ field }}}}' "
                                "placeholders (filters, expressions, blocks); lmforge reads "
                                "only a field name or text with {{ field }} placeholders")
        return
    if key == "doc_to_target" and isinstance(value, int) and not isinstance(value, bool):
        return
    if key == "doc_to_choice" and isinstance(value, list) and all(isinstance(c, str)
                                                                  for c in value):
        return
    raise EvalTaskError(f"{where}: {key}: {value!r} is not a form lmforge reads (a field name, "
                        "a {{ field }} template" + (", a list of strings" if key ==
                                                    "doc_to_choice" else "") + ")")


def _data_file(config: dict[str, Any], where: str) -> Path:
    if config.get("dataset_path") != "json":
        raise EvalTaskError(f"{where}: dataset_path: {config.get('dataset_path')!r}; lmforge "
                            "reads local files only: dataset_path: json with "
                            "dataset_kwargs: {data_files: <file>}")
    kwargs = config.get("dataset_kwargs") or {}
    if not isinstance(kwargs, dict) or set(kwargs) != {"data_files"}:
        raise EvalTaskError(f"{where}: dataset_kwargs: give data_files alone (a path, or "
                            "{split: path}), got " + repr(kwargs))
    files = kwargs["data_files"]
    split = config.get("test_split") or config.get("validation_split")
    if split is None:
        raise EvalTaskError(f"{where}: test_split: missing (and no validation_split); name the "
                            "split to score, e.g. test_split: train for a plain data_files path")
    if isinstance(files, dict):
        if split not in files:
            raise EvalTaskError(f"{where}: test_split/validation_split: {split!r} is not a key "
                                f"of dataset_kwargs.data_files ({sorted(files)})")
        files = files[split]
    elif split != "train":
        raise EvalTaskError(f"{where}: test_split: {split!r}; a plain data_files path is the "
                            "split 'train' (as datasets names it): write test_split: train")
    if isinstance(files, list) and len(files) == 1:
        files = files[0]
    if not isinstance(files, str):
        raise EvalTaskError(f"{where}: dataset_kwargs.data_files: give one file for the split, "
                            f"got {files!r}")
    return Path(files)


def _read_rows(path: Path, where: str) -> list[tuple[dict[str, Any], str]]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise EvalTaskError(f"{where}: dataset_kwargs.data_files: {path} does not exist "
                            "(relative paths are read from the current directory)") from None
    rows = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise EvalTaskError(f"{path}:{number}: not valid JSON ({err.msg}); the data file "
                                "must be JSON Lines, one object a line") from None
        if not isinstance(row, dict):
            raise EvalTaskError(f"{path}:{number}: a line must be a JSON object")
        rows.append((row, f"{path}:{number}"))
    if not rows:
        raise EvalTaskError(f"{path}: the data file of {where} has no rows")
    return rows


def _render(template: str, row: dict[str, Any], key: str, where: str) -> str:
    def value(match: re.Match[str]) -> str:
        field = match.group(1)
        if field not in row:
            raise EvalTaskError(f"{where}: {key}: the row has no field {field!r}")
        return str(row[field])  # what Jinja prints for a str, int or list

    return _PLACEHOLDER.sub(value, template)


def _field_or_template(config: dict[str, Any], key: str, row: dict[str, Any],
                       features: set[str], where: str) -> Any:
    """The harness's resolution: a column name gives the raw value, else a rendered string."""
    spec = config[key]
    if not isinstance(spec, str):
        return spec
    if spec in features:
        if spec not in row:
            raise EvalTaskError(f"{where}: {key}: the row has no field {spec!r}")
        return row[spec]
    return _render(spec, row, key, where)


def _example(config: dict[str, Any], row: dict[str, Any], features: set[str],
             where: str) -> Example:
    text = _field_or_template(config, "doc_to_text", row, features, where)
    if not isinstance(text, str):
        raise EvalTaskError(f"{where}: doc_to_text: gives {text!r}, not a string (tasks with "
                            "several contexts are not supported)")
    target = _field_or_template(config, "doc_to_target", row, features, where)
    if config["output_type"] == "loglikelihood":
        if not isinstance(target, str) or not target:
            raise EvalTaskError(f"{where}: doc_to_target: gives {target!r}, not a non-empty "
                                "string")
        return ClozeExample(text, target)
    choices = _field_or_template(config, "doc_to_choice", row, features, where)
    if isinstance(choices, str):  # a rendered template: the harness reads it as a literal
        try:
            choices = ast.literal_eval(choices)
        except (SyntaxError, ValueError):
            raise EvalTaskError(f"{where}: doc_to_choice: {choices!r} is neither a field of "
                                "the data nor a list") from None
    if (not isinstance(choices, list) or len(choices) < 2
            or not all(isinstance(c, str) and c for c in choices)):
        raise EvalTaskError(f"{where}: doc_to_choice: gives {choices!r}, not a list of at least "
                            "2 non-empty strings")
    if isinstance(target, str) and target.isdigit():
        target = int(target)  # the harness reads a rendered number as an index
    if isinstance(target, str):
        if target not in choices:
            raise EvalTaskError(f"{where}: doc_to_target: {target!r} is not one of the choices")
        target = choices.index(target)
    if isinstance(target, bool) or not isinstance(target, int) or not 0 <= target < len(choices):
        raise EvalTaskError(f"{where}: doc_to_target: gives {target!r}, not the index of a "
                            f"choice (0 to {len(choices) - 1}) or one of the choices")
    return MultipleChoiceExample(text, tuple(choices), target)
