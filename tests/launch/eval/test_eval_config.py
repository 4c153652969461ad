"""The ``eval:`` section: task files named by path or ``{path, limit}``, relative to the
config file, every mistake named by key and line before any process starts."""

from __future__ import annotations

from pathlib import Path

import pytest

from lmforge.launch.config import ConfigError, EvalTaskSpec, load_config
from lmforge.launch.config.stages import expand_stages
from lmforge.launch.eval.in_loop import read_eval_tasks
from lmforge.launch.eval.tasks import EvalTaskError

ROOT = Path(__file__).resolve().parents[3]
TASKS = ROOT / "configs" / "eval"
BASE = """\
name: ev
data: {{datasets: [{{name: d, paths: [x.txt]}}], seq_len: 32}}
model: {{preset: tiny, n_layers: 2, d_model: 64, n_heads: 4, n_kv_heads: 2, d_ff: 128}}
{extra}
"""


def write(folder: Path, extra: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "cfg.yaml"
    path.write_text(BASE.format(extra=extra))
    return path


def test_the_tiny_config_scores_the_bundled_tasks(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # paths are read from the config file's folder, not here
    cfg = load_config(ROOT / "configs" / "tiny.yaml")
    assert cfg.eval.tasks == {
        "next_line": EvalTaskSpec(str(TASKS / "eval_next_line.jsonl"), 100),
        "word_order": EvalTaskSpec(str(TASKS / "eval_word_order.jsonl"), 100),
        "last_word": EvalTaskSpec(str(TASKS / "eval_last_word.jsonl"), None)}
    tasks = read_eval_tasks(cfg.eval)
    assert [(t.name, t.kind, len(t.examples)) for t in tasks] == [
        ("next_line", "multiple_choice", 100), ("word_order", "multiple_choice", 100),
        ("last_word", "cloze", 200)]
    cfg.save(tmp_path / "saved.yaml")  # the resolved config: absolute paths, loads anywhere
    assert load_config(tmp_path / "saved.yaml").eval == cfg.eval


def test_relative_to_the_file_and_overrides_to_the_current_directory(monkeypatch, tmp_path):
    (tmp_path / "conf" / "tasks").mkdir(parents=True)
    (tmp_path / "conf" / "tasks" / "mc.jsonl").write_text(
        '{"context": "a", "choices": ["b", "c"], "gold": 0}\n')
    (tmp_path / "here.jsonl").write_text('{"context": "a", "target": "b"}\n')
    config = write(tmp_path / "conf", "eval: {tasks: {mc: tasks/mc.jsonl}}\n"
                   "stages:\n  - name: one\n  - name: two\n"
                   "    eval: {tasks: {mc2: {path: tasks/mc.jsonl, limit: 1}}}")
    monkeypatch.chdir(tmp_path)
    cfg = load_config(config, ["--eval.tasks.cl=here.jsonl"])
    assert cfg.eval.tasks == {"mc": EvalTaskSpec(str(tmp_path / "conf/tasks/mc.jsonl")),
                              "cl": EvalTaskSpec(str(tmp_path / "here.jsonl"))}
    stages = expand_stages(cfg)
    assert set(stages[1].config.eval.tasks) == {"mc", "mc2", "cl"}  # merged onto the top
    assert stages[1].config.eval.tasks["mc2"] == EvalTaskSpec(
        str(tmp_path / "conf/tasks/mc.jsonl"), 1)


@pytest.mark.parametrize("extra,message", [
    ("eval: {tasks: {mc: nowhere.jsonl}}",
     r"cfg\.yaml:4: eval\.tasks\.mc: no such file '.*/nowhere\.jsonl'; fix the path"),
    ("eval:\n  tasks:\n    mc: {path: x.jsonl, limt: 3}",
     r"cfg\.yaml:6: eval\.tasks\.mc\.limt: unknown key; did you mean 'limit'\?"),
    ("eval: {task: {}}", r"cfg\.yaml:4: eval\.task: unknown key; did you mean 'tasks'\?"),
    ("eval: {tasks: {mc: data.txt}}", r"eval\.tasks\.mc: '.*/data\.txt' is not a task file"),
    ("eval: {tasks: {mc: {path: " + str(TASKS / "eval_next_line.jsonl") + ", limit: 0}}}",
     r"eval\.tasks\.mc\.limit: must be at least 1"),
    ("eval: {tasks: {'a b': " + str(TASKS / "eval_next_line.jsonl") + "}}",
     r"tasks\.a b: a task name may hold only letters"),
    ("eval: {batch_size: 0}", r"eval\.batch_size: must be at least 1"),
])
def test_mistakes_are_named(tmp_path, extra, message):
    config = write(tmp_path, extra)
    with pytest.raises(ConfigError, match=message):
        load_config(config)


def test_a_bad_task_file_is_named_with_its_key_and_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"context": "a", "choices": ["b", "c"], "gold": 0}\n'
                   '{"context": "a", "choices": ["b"], "gold": 0}\n')
    cfg = load_config(write(tmp_path, f"eval: {{tasks: {{mc: {bad}}}}}"))
    with pytest.raises(EvalTaskError, match=rf"^eval\.tasks\.mc: {bad}:2: 'choices' must be"):
        read_eval_tasks(cfg.eval)
