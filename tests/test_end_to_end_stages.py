"""The bundled stage graphs end to end, as a user runs them: `lmforge run` of
`configs/tiny-stages.yaml` (pretrain → anneal → SFT of the decoder),
`configs/tiny-bert-classify.yaml` (masked LM → classification of the encoder) and the
encoder-decoder's denoising → seq2seq task (`configs/tiny-seq2seq.yaml` plus two stages).

Each config is shortened only (a 200 KB slice of the corpus, a few steps per stage,
temporary folders); the task data are the bundled sets, prepared by the real Ray pipeline
with the first stage's tokenizer, trained through DeepSpeed on 2 processes. The fine-tuned
exports are checked against `transformers` itself (the family's Auto class, logits of real
text equal to lmforge's model loaded from the stage's checkpoint, LoRA merged), the
registered model version against MLflow's registry, the task metrics' presence in each
stage's `STAGE_COMPLETE`, and frozen embeddings bit for bit across the stage boundary.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import sentencepiece as spm
import torch
import yaml

from lmforge.launch.config import load_resolved
from lmforge.launch.export.from_checkpoint import load_trained_model
from lmforge.launch.train.checkpoint import complete_checkpoints, consolidated_state_dict
from lmforge.pipeline.contract.dataset_manifest import DatasetManifest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
CORPUS = REPO / "configs" / "corpora" / "tinyshakespeare.txt"
STEPS = 6


def shortened(config: str, tmp: Path, extra_stages: list[dict] | None = None,
              **stage_keys: dict) -> Path:
    """The bundled config with only its sizes changed: corpus slice, 512 pieces, STEPS steps
    per stage, everything written under `tmp`; `stage_keys` update a stage by name."""
    cfg = yaml.safe_load((REPO / "configs" / config).read_text(encoding="utf-8"))
    corpus = tmp / "shakespeare.txt"
    corpus.write_text(CORPUS.read_text(encoding="utf-8")[:200_000], encoding="utf-8")
    cfg["run_dir"] = str(tmp / "run")
    cfg["data"]["output_dir"] = str(tmp / "data")
    cfg["data"]["seq_len"] = 64
    for dataset in cfg["data"]["datasets"]:
        dataset["paths"] = [str(corpus)]
    cfg["tokenizer"]["vocab_size"] = 512
    cfg["model"]["max_seq_len"] = 64
    cfg["train"].update(max_steps=STEPS, eval_every=STEPS, checkpoint_every=STEPS,
                        warmup_steps=1, log_every=1, eval_batches=4)
    cfg["tracking"]["system_metrics"] = False
    for name, task in cfg.get("eval", {}).get("tasks", {}).items():  # named from configs/
        cfg["eval"]["tasks"][name] = {**task, "path": str(REPO / "configs" / task["path"])}
    cfg["stages"] = cfg.get("stages", []) + (extra_stages or [])
    for stage in cfg["stages"]:
        for dataset in stage.get("data", {}).get("datasets", []):
            dataset["paths"] = [str(corpus)]
        if "train" in stage:
            stage["train"].update(max_steps=STEPS, eval_every=STEPS, checkpoint_every=STEPS,
                                  warmup_steps=min(stage["train"].get("warmup_steps", 0), 1))
        stage.update(stage_keys.get(stage["name"], {}))
    path = tmp / config
    path.write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
    return path


def lmforge_run(config: Path) -> str:
    proc = subprocess.run([sys.executable, "-m", "lmforge.launch.cli", "run", str(config)],
                          capture_output=True, text=True, cwd=REPO, timeout=1500)
    assert proc.returncode == 0, f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc.stdout


def stage_records(run_dir: Path) -> dict[str, dict]:
    """Each stage's STAGE_COMPLETE, by stage name (every stage must have one)."""
    records = {}
    for folder in sorted((run_dir / "stages").iterdir()):
        marker = folder / "STAGE_COMPLETE"
        assert marker.is_file(), f"{folder} did not complete"
        record = json.loads(marker.read_text())
        records[record["name"]] = {**record, "dir": folder}
    return records


def ids_of(stage_dir: Path, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded token ids of `texts` with the stage's prepared tokenizer, and the mask."""
    cfg = load_resolved(stage_dir)
    manifest = DatasetManifest.read(Path(cfg.data.output_dir))
    sp = spm.SentencePieceProcessor(model_file=str(manifest.tokenizer_path))
    rows = [sp.encode(t)[:48] for t in texts]
    width = max(map(len, rows))
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, :len(row)], mask[i, :len(row)] = torch.tensor(row), 1
    return ids, mask


def test_tiny_stages_pretrain_anneal_sft(tmp_path):
    from mlflow import MlflowClient
    from transformers import AutoModelForCausalLM

    out = lmforge_run(shortened("tiny-stages.yaml", tmp_path))
    stages = stage_records(tmp_path / "run")
    assert list(stages) == ["pretrain", "anneal", "sft"]
    for record in stages.values():
        assert math.isfinite(record["val_metrics"]["val_loss"])
        # Every stage scores the bundled tasks (multiple choice: four lines, chance 0.25).
        assert 0.0 <= record["val_metrics"]["eval/next_line/acc"] <= 1.0
        assert record["val_metrics"]["eval/word_order/chance"] == 0.25
    sft = stages["sft"]
    assert math.isfinite(sft["scratch_metrics"]["val_loss"])  # compare_from_scratch ran
    assert "from random init" in out
    # The final export is a causal LM transformers loads, with lmforge's logits.
    cfg = load_resolved(sft["dir"])
    model = load_trained_model(cfg.model, sft["dir"] / "checkpoints").eval()
    hf = AutoModelForCausalLM.from_pretrained(sft["export_dir"]).eval()
    ids, _ = ids_of(sft["dir"], ["Continue: But soft, what light through\n"])
    with torch.no_grad():
        torch.testing.assert_close(hf(input_ids=ids).logits.float(), model(ids).float(),
                                   rtol=0, atol=1e-4)
    # ... and the registry holds it as a version of the configured model, tagged.
    store = f"sqlite:///{tmp_path / 'run' / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=store, registry_uri=store)
    versions = client.search_model_versions("name='tiny-shakespeare-sft'")
    assert [v.tags.get("lmforge.stage") for v in versions] == ["sft"]


def test_tiny_bert_classify_mlm_then_classifier(tmp_path):
    from transformers import AutoModelForSequenceClassification

    config = shortened("tiny-bert-classify.yaml", tmp_path,
                       classify={"compare_from_scratch": False})
    lmforge_run(config)
    stages = stage_records(tmp_path / "run")
    classify = stages[list(stages)[-1]]
    cfg = load_resolved(classify["dir"])
    labels = DatasetManifest.read(Path(cfg.data.output_dir)).task.labels
    metrics = classify["val_metrics"]
    assert {"val_loss", "val_accuracy", "val_macro_f1"} <= set(metrics)
    assert {f"val_f1/{label}" for label in labels} <= set(metrics)
    assert 0.0 <= metrics["val_accuracy"] <= 1.0
    # The export (adapters merged when the stage trains LoRA) is a sequence classifier
    # with the task's label names and lmforge's scores.
    model = load_trained_model(cfg.model, classify["dir"] / "checkpoints").eval()
    hf = AutoModelForSequenceClassification.from_pretrained(classify["export_dir"]).eval()
    assert [hf.config.id2label[i] for i in range(len(labels))] == labels
    ids, mask = ids_of(classify["dir"], ["Stands here for God, his sovereign and himself,",
                                         "How fiery and forward our pedant is!"])
    with torch.no_grad():
        torch.testing.assert_close(hf(input_ids=ids, attention_mask=mask).logits.float(),
                                   model.classify(ids, mask).float(), rtol=0, atol=1e-4)


SEQ2SEQ_STAGES = [
    {"name": "denoise"},
    {"name": "reverse",
     "data": {"task": {"kind": "seq2seq",
                       "train": ["configs/tasks/shakespeare_reverse.jsonl"],
                       "val": ["configs/tasks/shakespeare_reverse_val.jsonl"]}},
     "train": {"objective": "seq2seq", "max_steps": STEPS, "lr": 1.0e-3},
     "trainable": {"mode": "freeze_embeddings"},
     "export": {"enabled": True}},
]


def test_seq2seq_denoising_then_task_with_frozen_embeddings(tmp_path):
    from transformers import AutoModelForSeq2SeqLM

    config = shortened("tiny-seq2seq.yaml", tmp_path, extra_stages=SEQ2SEQ_STAGES)
    data = yaml.safe_load(config.read_text())
    data["export"] = {"enabled": False}  # the task stage exports
    # fp32: under bf16 a warm start's weights are the source's rounded to bf16 (DeepSpeed
    # builds its fp32 master copy from the bf16 module), so "unchanged" is shown in fp32.
    data["train"]["precision"] = "fp32"
    config.write_text(yaml.safe_dump(data, sort_keys=False))
    lmforge_run(config)
    stages = stage_records(tmp_path / "run")
    reverse = stages["reverse"]
    assert {"val_loss", "val_exact_match", "val_bleu"} <= set(reverse["val_metrics"])
    assert 0.0 <= reverse["val_metrics"]["val_bleu"] <= 100.0
    # Embeddings frozen: bit-identical to the denoising stage's final ones; the rest trained.
    before = consolidated_state_dict(complete_checkpoints(stages["denoise"]["dir"] /
                                                          "checkpoints")[-1])
    after = consolidated_state_dict(complete_checkpoints(reverse["dir"] / "checkpoints")[-1])
    embeddings = [k for k in before if "emb" in k]
    assert embeddings and all(torch.equal(before[k], after[k]) for k in embeddings)
    assert any(not torch.equal(before[k], after[k]) for k in before if k not in embeddings)
    # The export is an encoder-decoder transformers loads, with lmforge's logits.
    cfg = load_resolved(reverse["dir"])
    model = load_trained_model(cfg.model, reverse["dir"] / "checkpoints").eval()
    hf = AutoModelForSeq2SeqLM.from_pretrained(reverse["export_dir"]).eval()
    ids, mask = ids_of(reverse["dir"], ["And he shall signify from time to time"])
    decoder = ids[:, :5]
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder)
        got = hf(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder).logits
    torch.testing.assert_close(got.float(), want.float(), rtol=0, atol=1e-4)
