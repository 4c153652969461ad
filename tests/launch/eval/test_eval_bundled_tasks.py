"""The bundled eval tasks: what configs/eval/make_eval_tasks.py writes, their shape, and the
chance level a random-weight model scores on them."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from lmforge.launch.eval.on_export import load_export
from lmforge.launch.eval.scoring import score_task
from lmforge.launch.eval.task_files import read_task

ROOT = Path(__file__).resolve().parents[3]
TASKS = ROOT / "configs" / "eval"


def test_the_script_writes_the_bundled_files(tmp_path):
    spec = importlib.util.spec_from_file_location("make_eval_tasks",
                                                  TASKS / "make_eval_tasks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(tmp_path)
    for name in ("eval_next_line.jsonl", "eval_word_order.jsonl", "eval_last_word.jsonl"):
        assert (tmp_path / name).read_bytes() == (TASKS / name).read_bytes(), name


def test_shapes_and_the_harness_yaml(monkeypatch):
    next_line = read_task(TASKS / "eval_next_line.jsonl")
    last_word = read_task(TASKS / "eval_last_word.jsonl")
    assert (next_line.kind, len(next_line.examples)) == ("multiple_choice", 200)
    assert (last_word.kind, len(last_word.examples)) == ("cloze", 200)
    assert next_line.chance == 0.25
    assert [sum(e.gold == k for e in next_line.examples) for k in range(4)] == [50] * 4
    for example in next_line.examples:  # no choice stands out by its length
        words = [len(c.split()) for c in example.choices]
        assert max(words) - min(words) <= 4 and len(set(example.choices)) == 4
    assert all(e.target.isalpha() and len(e.target) >= 4 for e in last_word.examples)
    word_order = read_task(TASKS / "eval_word_order.jsonl")
    assert [sum(e.gold == k for e in word_order.examples) for k in range(4)] == [50] * 4
    for example, same in zip(word_order.examples, next_line.examples, strict=True):
        assert example.context == same.context
        assert example.choices[example.gold] == same.choices[same.gold]
        assert len({tuple(sorted(c.split())) for c in example.choices}) == 1  # the same words
    monkeypatch.chdir(ROOT)  # the YAML's data_files is relative, read from here as lm-eval does
    harness = read_task(TASKS / "eval_next_line.yaml")
    assert harness.name == "eval_next_line_harness" and harness.examples == next_line.examples


def test_a_random_weight_model_scores_chance(llama_export):
    encoder, loglikelihood = load_export(llama_export, batch_size=32)
    next_line = score_task(read_task(TASKS / "eval_next_line.jsonl"), encoder, loglikelihood)
    word_order = score_task(read_task(TASKS / "eval_word_order.jsonl"), encoder, loglikelihood)
    last_word = score_task(read_task(TASKS / "eval_last_word.jsonl"), encoder, loglikelihood)
    # 0.25 +- 3 standard deviations of a mean of 200 guesses (sqrt(.25 * .75 / 200) = 0.031)
    for metric in ("acc", "acc_norm"):
        for score in (next_line, word_order):
            assert score.metrics()[metric] == pytest.approx(0.25, abs=0.092), metric
    assert last_word.metrics()["acc"] == 0.0
