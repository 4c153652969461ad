"""lmforge's scores equal lm-evaluation-harness's on the same export and task files.

The harness itself (``lm_eval``, the ``[eval]`` extra) scores two tiny random exports (a
Llama decoder, a BART encoder-decoder) through its ``HFLM`` and ``simple_evaluate`` on local
task YAMLs; lmforge scores the same examples from the JSONL files and from the same YAMLs.
``acc``/``acc_norm`` must be equal, every log-likelihood within 1e-4. ``lm_eval`` is in the
test extra: a suite without it fails here rather than skipping the agreement.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from lmforge.launch.eval.harness_yaml import read_harness_task
from lmforge.launch.eval.on_export import load_export
from lmforge.launch.eval.scoring import score_task
from lmforge.launch.eval.tasks import EvalTask, read_jsonl_task

YAMLS = {
    # the JSONL fields as they are
    "mc_fields": {"output_type": "multiple_choice", "doc_to_text": "context",
                  "doc_to_choice": "choices", "doc_to_target": "gold",
                  "metric_list": [{"metric": "acc"}, {"metric": "acc_norm"}]},
    # templates, another delimiter
    "mc_template": {"output_type": "multiple_choice",
                    "doc_to_text": "Passage: {{context}}\nThe next line:",
                    "doc_to_choice": "{{choices}}", "doc_to_target": "{{gold}}",
                    "target_delimiter": "\n",
                    "metric_list": [{"metric": "acc"}, {"metric": "acc_norm"}]},
    # the harness's own lambada form: the target carries its space
    "cloze_h": {"output_type": "loglikelihood", "doc_to_text": "{{context}}",
                "doc_to_target": "{{' ' + target}}",
                "metric_list": [{"metric": "acc"}, {"metric": "perplexity"}]},
}


def _write_yamls(folder: Path, files: dict[str, Path]) -> dict[str, Path]:
    paths = {}
    for name, keys in YAMLS.items():
        data = files["cloze" if name.startswith("cloze") else "mc"]
        config = {"task": name, "dataset_path": "json",
                  "dataset_kwargs": {"data_files": str(data)}, "test_split": "train", **keys}
        paths[name] = folder / f"{name}.yaml"
        paths[name].write_text(json.dumps(config), encoding="utf-8")  # JSON is YAML
    return paths


def _harness(export: Path, yamls: dict[str, Path], backend: str, cache: Path) -> dict:
    os.environ["HF_DATASETS_CACHE"] = str(cache)
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    lm = HFLM(pretrained=str(export), backend=backend, device="cpu", dtype="float32",
              batch_size=4)
    # Only these tasks: indexing the harness's thousands of bundled YAMLs takes seconds.
    manager = TaskManager(include_path=str(next(iter(yamls.values())).parent),
                          include_defaults=False)
    return lm_eval.simple_evaluate(model=lm, tasks=list(yamls), task_manager=manager,
                                   log_samples=True)


@pytest.fixture(scope="module", params=["causal", "seq2seq"])
def both(request, llama_export, bart_export, eval_task_files, tmp_path_factory):
    export = llama_export if request.param == "causal" else bart_export
    yamls = _write_yamls(tmp_path_factory.mktemp("yamls"), eval_task_files)
    harness = _harness(export, yamls, request.param, tmp_path_factory.mktemp("hf_datasets"))
    encoder, loglikelihood = load_export(export, batch_size=3)
    assert encoder.backend == request.param
    return harness, encoder, loglikelihood, yamls


def _harness_lls(harness: dict, task: str) -> list[list[float]]:
    samples = sorted(harness["samples"][task], key=lambda s: s["doc_id"])
    return [[resp[0][0] for resp in s["resps"]] for s in samples]


def _check(harness: dict, harness_task: str, ours: EvalTask, encoder, loglikelihood,
           metrics: tuple[str, ...]) -> None:
    score = score_task(ours, encoder, loglikelihood)
    theirs = _harness_lls(harness, harness_task)
    assert len(score.loglikelihoods) == len(theirs) == len(ours.examples)
    for i, (a, b) in enumerate(zip(score.loglikelihoods, theirs, strict=True)):
        assert a == pytest.approx(b, abs=1e-4), f"{ours.name} example {i}"
    got = score.metrics()
    for metric in metrics:
        assert got[metric] == harness["results"][harness_task][f"{metric},none"], metric


def test_multiple_choice_from_jsonl_and_from_the_harness_yaml(both, eval_task_files):
    harness, encoder, loglikelihood, yamls = both
    for ours in (read_jsonl_task(eval_task_files["mc"]), read_harness_task(yamls["mc_fields"])):
        _check(harness, "mc_fields", ours, encoder, loglikelihood, ("acc", "acc_norm"))
    # the examples differ in which choice wins, or the agreement would say little
    assert {max(range(4), key=lls.__getitem__) for lls in _harness_lls(harness, "mc_fields")
            if len(lls) == 4} != {0}


def test_templates_and_delimiter_of_a_harness_yaml(both):
    harness, encoder, loglikelihood, yamls = both
    ours = read_harness_task(yamls["mc_template"])
    assert ours.target_delimiter == "\n"
    assert ours.examples[0].context.startswith("Passage: ")
    _check(harness, "mc_template", ours, encoder, loglikelihood, ("acc", "acc_norm"))


def test_cloze_from_jsonl_equals_the_harness_lambada_form(both, eval_task_files):
    harness, encoder, loglikelihood, _ = both
    ours = read_jsonl_task(eval_task_files["cloze"])
    _check(harness, "cloze_h", ours, encoder, loglikelihood, ("acc",))
    perplexity = score_task(ours, encoder, loglikelihood).metrics()["perplexity"]
    assert perplexity == pytest.approx(harness["results"]["cloze_h"]["perplexity,none"],
                                       rel=1e-4)
