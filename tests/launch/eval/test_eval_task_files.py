"""Eval task files: the JSONL formats, the harness YAML subset, and the errors a user reads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lmforge.launch.eval.harness_yaml import read_harness_task
from lmforge.launch.eval.task_files import read_task, task_from_spec
from lmforge.launch.eval.tasks import (
    ClozeExample,
    EvalTaskError,
    MultipleChoiceExample,
    read_jsonl_task,
)


def write_lines(path: Path, *rows: object) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows),
                    encoding="utf-8")
    return path


def test_jsonl_multiple_choice_and_cloze(tmp_path):
    mc = write_lines(tmp_path / "mc.jsonl", {"context": "a", "choices": ["x", "y", "z"],
                                             "gold": 2, "id": 7}, "",
                     {"context": "b", "choices": ["p", "q"], "gold": 0})
    task = read_jsonl_task(mc)
    assert (task.name, task.kind, task.target_delimiter) == ("mc", "multiple_choice", " ")
    assert task.examples == (MultipleChoiceExample("a", ("x", "y", "z"), 2),
                             MultipleChoiceExample("b", ("p", "q"), 0))
    assert task.chance == pytest.approx((1 / 3 + 1 / 2) / 2)
    assert len(task.limited(1).examples) == 1
    cloze = read_task(write_lines(tmp_path / "c.jsonl", {"context": "to be or not to",
                                                         "target": "be"}), "last")
    assert (cloze.name, cloze.kind, cloze.examples) == ("last", "cloze",
                                                        (ClozeExample("to be or not to", "be"),))


@pytest.mark.parametrize(("row", "says"), [
    ("{not json", "not valid JSON"),
    ('["a"]', "must be a JSON object"),
    ({"choices": ["a", "b"], "gold": 0}, "'context' must be a string"),
    ({"context": "c", "choices": ["a"], "gold": 0}, "at least 2 non-empty strings"),
    ({"context": "c", "choices": ["a", ""], "gold": 0}, "at least 2 non-empty strings"),
    ({"context": "c", "choices": ["a", "b"], "gold": 2}, "from 0 to 1, got 2"),
    ({"context": "c", "choices": ["a", "b"], "gold": True}, "'gold' must be the index"),
    ({"context": "c", "target": ""}, "'target' must be a non-empty string"),
    ({"context": "c", "target": "t", "choices": ["a", "b"], "gold": 0}, "not both"),
    ({"context": "c", "answer": "t"}, "needs 'choices' and 'gold'"),
    ({"context": "c", "target": "t"}, "every line of a task file must be the same kind"),
])
def test_jsonl_errors_name_file_and_line(tmp_path, row, says):
    path = write_lines(tmp_path / "t.jsonl", {"context": "ok", "choices": ["a", "b"], "gold": 1},
                       row)
    with pytest.raises(EvalTaskError, match=f"t.jsonl:2: .*{says}"):
        read_jsonl_task(path)


def test_missing_empty_and_badly_named_task_files(tmp_path):
    with pytest.raises(EvalTaskError, match="no such eval task file"):
        read_jsonl_task(tmp_path / "absent.jsonl")
    with pytest.raises(EvalTaskError, match="has no examples"):
        read_jsonl_task(write_lines(tmp_path / "empty.jsonl", ""))
    good = write_lines(tmp_path / "g.jsonl", {"context": "c", "target": "t"})
    with pytest.raises(EvalTaskError, match="task name 'a b'"):
        read_jsonl_task(good, "a b")
    with pytest.raises(EvalTaskError, match="give name=path"):
        task_from_spec(f"={good}")
    assert task_from_spec(f"x={good}").name == "x" and task_from_spec(str(good)).name == "g"


def harness_yaml(tmp_path: Path, data: Path, **keys: object) -> Path:
    config = {"task": "h", "dataset_path": "json", "dataset_kwargs": {"data_files": str(data)},
              "test_split": "train", "output_type": "multiple_choice",
              "doc_to_text": "context", "doc_to_choice": "choices", "doc_to_target": "gold",
              "metric_list": [{"metric": "acc"}], "metadata": {"version": 1}, **keys}
    path = tmp_path / "h.yaml"
    path.write_text(json.dumps(config), encoding="utf-8")
    return path


def test_harness_yaml_fields_templates_and_targets(tmp_path):
    data = write_lines(tmp_path / "d.jsonl",
                       {"q": "Who?", "opts": ["me", "you"], "label": 1, "ans": "me"},
                       {"q": "Why?", "opts": ["so", "no"], "label": 0, "ans": "no"})
    task = read_harness_task(harness_yaml(
        tmp_path, data, doc_to_text="Q: {{ q }}\nA:", doc_to_choice="{{opts}}",
        doc_to_target="{{label}}", target_delimiter="\t"))
    assert (task.name, task.target_delimiter) == ("h", "\t")
    assert task.examples == (MultipleChoiceExample("Q: Who?\nA:", ("me", "you"), 1),
                             MultipleChoiceExample("Q: Why?\nA:", ("so", "no"), 0))
    # a choice string as target, a fixed list of choices
    task = read_task(harness_yaml(tmp_path, data, doc_to_text="q", doc_to_choice=["me", "no"],
                                  doc_to_target="ans"), "renamed")
    assert task.name == "renamed" and [e.gold for e in task.examples] == [0, 1]
    # loglikelihood: a cloze whose target is used as it is (no delimiter)
    cloze = read_harness_task(harness_yaml(tmp_path, data, output_type="loglikelihood",
                                           doc_to_text="q", doc_to_target="ans"))
    assert (cloze.kind, cloze.target_delimiter) == ("cloze", "")
    assert cloze.examples[1] == ClozeExample("Why?", "no")
    # a {split: file} mapping
    split = read_harness_task(harness_yaml(
        tmp_path, data, test_split="test", doc_to_text="q", doc_to_choice="opts",
        doc_to_target="label", dataset_kwargs={"data_files": {"test": str(data)}}))
    assert len(split.examples) == 2


@pytest.mark.parametrize(("keys", "says"), [
    ({"doc_to_text": "{{ q | upper }}"}, "doc_to_text: .* uses Jinja beyond"),
    ({"doc_to_target": "{{ ' ' + ans }}"}, "doc_to_target: .* uses Jinja beyond"),
    ({"doc_to_text": "{% if q %}x{% endif %}"}, "doc_to_text: .* uses Jinja beyond"),
    ({"process_docs": "x"}, "process_docs: not supported"),
    ({"fewshot_config": {"sampler": "first_n"}}, "fewshot_config: not supported"),
    ({"num_fewshot": 5}, "num_fewshot: lmforge scores zero-shot only"),
    ({"output_type": "generate_until"}, "output_type: 'generate_until' is not supported"),
    ({"dataset_path": "hellaswag"}, "dataset_path: 'hellaswag'; lmforge reads local files"),
    ({"test_split": "validation"}, "a plain data_files path is the split 'train'"),
    ({"doc_to_target": "{{label}}", "doc_to_choice": "opts", "_bad": 1}, "_bad: not supp"),
    ({"doc_to_text": "{{missing}}"}, r"d.jsonl:1 \(read by .*h.yaml\): doc_to_text: the row "
                                     "has no field 'missing'"),
    ({"doc_to_target": "{{ans}}"}, r"d.jsonl:2 .*doc_to_target: 'x' is not one of the choices"),
    ({"doc_to_choice": "options"}, "doc_to_choice: 'options' is neither a field of the data"),
])
def test_harness_yaml_refusals_name_the_key(tmp_path, keys, says):
    data = write_lines(tmp_path / "d.jsonl", {"q": "a", "opts": ["a", "b"], "label": 1,
                                              "ans": "a"},
                       {"q": "b", "opts": ["a", "b"], "label": 0, "ans": "x"})
    base = {"doc_to_text": "q", "doc_to_choice": "opts", "doc_to_target": "label"}
    with pytest.raises(EvalTaskError, match=says):
        read_harness_task(harness_yaml(tmp_path, data, **{**base, **keys}))


def test_harness_yaml_runs_no_code(tmp_path):
    path = tmp_path / "f.yaml"
    path.write_text("task: f\nprocess_results: !function utils.process\n", encoding="utf-8")
    with pytest.raises(EvalTaskError, match=r"f.yaml: .*!function.*line 2"):
        read_harness_task(path)
