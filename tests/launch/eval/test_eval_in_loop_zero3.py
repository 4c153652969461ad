"""Evaluation inside training under ZeRO-3 on 2 ranks (parameters partitioned, never
consolidated): the task scores and bits per byte equal those of the whole model in one
process (the ZeRO-0 computation) on the same final checkpoint, within 1e-5."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import pytest
import sentencepiece as spm
import torch
from conftest import CORPUS, corpus_lines
from engine_helpers import finish, shard_fixtures, train

from lmforge.launch.config import load_resolved
from lmforge.launch.eval.bpb import token_bytes
from lmforge.launch.eval.in_loop import dataset_encoder, read_eval_tasks
from lmforge.launch.eval.loglikelihood import causal_loglikelihood
from lmforge.launch.eval.scoring import score_task
from lmforge.launch.export.from_checkpoint import load_trained_model
from lmforge.pipeline.contract.dataset_manifest import DatasetManifest
from lmforge.pipeline.loader.shard_loader import ShardLoader

pytestmark = pytest.mark.slow

CONFIG = """\
name: zero3-eval
data:
  datasets: [{{name: d, paths: [unused.txt]}}]
  output_dir: {data}
  seq_len: 32
tokenizer: {{vocab_size: 1000}}
model: {{preset: tiny, n_layers: 2, d_model: 64, n_heads: 4, n_kv_heads: 2, d_ff: 128}}
train: {{micro_batch_size: 4, max_steps: 4, log_every: 1, eval_every: 0, eval_batches: 0,
        warmup_steps: 1, precision: fp32}}
deepspeed: {{zero_stage: 3}}
eval:
  tasks: {{mc: {mc}, cloze: {cloze}}}
  batch_size: 4
tracking: {{enabled: false}}
export: {{enabled: false}}
"""


def real_tokenizer(root: Path) -> None:
    """The fixture dataset with a real 1000-piece sentencepiece model (same special ids) in
    place of its placeholder, so task texts can be encoded and tokens counted in bytes."""
    prefix = root / "spm"
    spm.SentencePieceTrainer.train(
        input=str(CORPUS), model_prefix=str(prefix), vocab_size=1000, model_type="bpe",
        byte_fallback=True, pad_id=0, unk_id=1, bos_id=2, eos_id=3, input_sentence_size=5000,
        shuffle_input_sentence=True, num_threads=1, minloglevel=2)
    data = prefix.with_suffix(".model").read_bytes()
    (root / "tokenizer.model").write_bytes(data)
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["tokenizer"]["sha256"] = hashlib.sha256(data).hexdigest()
    (root / "manifest.json").write_text(json.dumps(manifest))


def test_zero3_scores_equal_the_whole_model(tmp_path):
    root = tmp_path / "data"
    shard_fixtures().write_shards(root, {"d": {"train": [64], "val": [13]}}, seq_len=32)
    real_tokenizer(root)
    lines = corpus_lines(40)
    mc = [{"context": lines[i], "choices": [lines[i + 1], lines[i + 2], lines[i + 3]],
           "gold": i % 3} for i in range(0, 27, 3)]  # 9 examples: the ranks' shares differ
    cloze = [{"context": " ".join(line.split()[:-1]), "target": line.split()[-1]}
             for line in lines[30:37]]
    for name, rows in (("mc", mc), ("cloze", cloze)):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = tmp_path / "zero3.yaml"
    config.write_text(CONFIG.format(data=root, mc=tmp_path / "mc.jsonl",
                                    cloze=tmp_path / "cloze.jsonl"))
    run_dir = tmp_path / "run"
    finish(train(config, run_dir))
    in_loop = json.loads((run_dir / "train_summary.json").read_text())["val_metrics"]

    cfg = load_resolved(run_dir)
    model = load_trained_model(cfg.model, run_dir / "checkpoints").float().eval()
    manifest = DatasetManifest.read(root)
    encoder = dataset_encoder(manifest.tokenizer_model, "causal")
    loglikelihood = causal_loglikelihood(lambda ids: model(input_ids=ids),
                                         cfg.model.max_seq_len, batch_size=16)
    for task in read_eval_tasks(cfg.eval):
        whole = score_task(task, encoder, loglikelihood).metrics()
        for metric, value in whole.items():
            got = in_loop[f"eval/{task.name}/{metric}"]
            if metric.startswith("acc"):
                assert got == value, (task.name, metric)
            else:
                assert got == pytest.approx(value, rel=1e-5, abs=1e-5), (task.name, metric)
    assert in_loop["eval/mc/chance"] == pytest.approx(1 / 3)

    # bits per byte over the whole validation split (eval_batches: 0), in one process
    table = token_bytes(manifest.tokenizer_model, cfg.model.vocab_size)
    nats = n_bytes = 0.0
    with torch.no_grad():
        for batch in ShardLoader(manifest, "val", 4, infinite=False):
            labels = batch["labels"]
            logits = model(input_ids=batch["input_ids"], segment_ids=batch["segment_ids"],
                           position_ids=batch["position_ids"])  # data.loader.document_masking
            nats += float(torch.nn.functional.cross_entropy(
                logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100,
                reduction="sum"))
            n_bytes += float(table[labels[labels != -100]].sum())
    assert in_loop["val/d/bpb"] == pytest.approx(nats / math.log(2) / n_bytes, rel=1e-5)
