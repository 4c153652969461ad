"""Bring your own tokenizer: sentencepiece models without a pad piece (as Llama's
``tokenizer.model``), and without bos/eos, through `lmforge prepare` and `lmforge train`.

The expected tokens are computed here with sentencepiece itself, document by document; the
loader's labels must hold exactly those tokens, every one of them (ids equal to the
padding stand-in never occur among real tokens, so none is masked by mistake).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm
from engine_helpers import finish, train

from lmforge.launch.config import PREPARE_SECTIONS, load_config
from lmforge.pipeline.contract.dataset_manifest import DatasetManifest
from lmforge.pipeline.loader.shard_loader import LoaderConfig, ShardLoader
from lmforge.pipeline.prepare.driver import prepare

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[3]
CORPUS = REPO / "configs" / "corpora" / "tinyshakespeare.txt"
SEQ_LEN = 32
# Characters the tokenizer never saw: without byte fallback they encode to the unk piece,
# so a stand-in that reused a real id (unk is 0 here) would swallow real labels.
UNSEEN = "日本語 €"

CONFIG = """\
name: own-tokenizer
data:
  datasets: [{{name: d, paths: [{corpus}], format: jsonl}}]
  output_dir: {data}
  seq_len: 32
  val_fraction: 0.2
  dedup: false
  num_workers: 1
  clean: {{steps: []}}
  loader: {{num_workers: 0, document_masking: false}}
tokenizer: {{model_path: {model}}}
model: {{preset: tiny, n_layers: 2, d_model: 64, n_heads: 4, n_kv_heads: 2, d_ff: 128}}
train: {{micro_batch_size: 2, max_steps: 3, log_every: 1, eval_every: 3, eval_batches: 100,
        warmup_steps: 1, precision: fp32}}
tracking: {{enabled: false}}
"""


def documents() -> list[str]:
    paragraphs = [p for p in CORPUS.read_text()[:30_000].split("\n\n") if p.strip()]
    docs = paragraphs[:60]
    docs[3] += " " + UNSEEN
    docs[40] = UNSEEN + " " + docs[40]
    return docs


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("own-tok")
    path = folder / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in documents()))
    return path


def spm_model(folder: Path, **ids: int) -> Path:
    """A BPE model trained here, ASCII only, with the given special ids (-1: none)."""
    sample = folder / "sample.txt"
    sample.write_text(CORPUS.read_text()[:100_000].encode("ascii", "ignore").decode())
    spm.SentencePieceTrainer.train(
        input=str(sample), model_prefix=str(folder / "own"), vocab_size=300, model_type="bpe",
        num_threads=1, minloglevel=2, byte_fallback=False, **ids,
    )
    return folder / "own.model"


def expected_tokens(model: Path) -> Counter:
    """Every real token of the prepared stream: each document's ids, then eos if any."""
    sp = spm.SentencePieceProcessor(model_file=str(model))
    counts: Counter = Counter()
    for doc in documents():
        counts.update(sp.encode(doc))
        if sp.eos_id() >= 0:
            counts[sp.eos_id()] += 1
    return counts


def real_tokens(manifest: Path, split: str) -> tuple[Counter, int]:
    """(tokens, label positions) of one unshuffled pass: each row's first input and its
    labels that are not -100; padding rows past the pass end are skipped."""
    loader = ShardLoader(manifest, split, 4, infinite=False,
                         config=LoaderConfig(return_keys=True, document_masking=False))
    counts: Counter = Counter()
    labels = 0
    for batch in loader:
        for row, key in enumerate(batch["keys"]):
            if not key:
                assert (batch["labels"][row] == -100).all()
                continue
            kept = batch["labels"][row][batch["labels"][row] != -100].tolist()
            counts.update([int(batch["input_ids"][row, 0])] + kept)
            labels += len(kept)
    return counts, labels


# `lmforge prepare` + `lmforge train` run once, on the model with neither pad nor eos: an
# eos piece is an ordinary token to the causal loss, so it adds no training path.
@pytest.mark.parametrize(("ids", "trains"), [
    ({"unk_id": 0, "bos_id": 1, "eos_id": 2, "pad_id": -1}, False),  # Llama's layout
    ({"unk_id": 0, "bos_id": -1, "eos_id": -1, "pad_id": -1}, True),  # unk only
], ids=["no-pad", "no-pad-bos-eos"])
def test_prepare_and_train_with_a_tokenizer_without_pad(corpus, tmp_path, ids, trains):
    model = spm_model(tmp_path, **ids)
    vocab = spm.SentencePieceProcessor(model_file=str(model)).vocab_size()
    config = tmp_path / "run.yaml"
    data = tmp_path / "data"
    config.write_text(CONFIG.format(corpus=corpus, data=data, model=model))
    if trains:  # as a user runs it: `lmforge prepare`, Ray
        prepared = subprocess.run(
            [sys.executable, "-m", "lmforge.launch.cli", "prepare", str(config)],
            capture_output=True, text=True, timeout=600, cwd=tmp_path,
        )
        assert prepared.returncode == 0, prepared.stdout[-3000:] + prepared.stderr[-3000:]
    else:  # the same pipeline in-process (no Ray start-up): the check is the tokens
        cfg = load_config(config, sections=PREPARE_SECTIONS)
        prepare(cfg.data, cfg.tokenizer, progress=False, executor="local")

    manifest = DatasetManifest.read(data)
    assert manifest.tokenizer.pad_id == -1 and manifest.tokenizer.eos_id == ids["eos_id"]
    assert manifest.tokenizer.padding_id == vocab  # documented stand-in: one past the pieces
    expected = expected_tokens(model)
    assert expected[0] > 0  # the unseen characters really are unk tokens
    splits = manifest.datasets["d"].splits
    window = SEQ_LEN + 1
    found: Counter = Counter()
    for name, split in splits.items():
        assert split.samples == math.ceil(split.tokens / window)
        counts, labels = real_tokens(data, name)
        # Every real token but the first of each window is a label; nothing else is.
        assert labels == split.tokens - split.samples
        found += counts
    assert found == expected
    assert sum(s.tokens for s in splits.values()) == sum(expected.values())
    # The last window of a split holds the stand-in in its tail, on disk.
    last = splits["train"].shards[-1]
    assert last.tokens < last.samples * window
    if not trains:
        return

    run_dir = tmp_path / "run"
    finish(train(config, run_dir))
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train_losses = [r["train/loss"] for r in records if "train/loss" in r]
    val_losses = [r["val/loss"] for r in records if "val/loss" in r]
    assert len(train_losses) == 3 and len(val_losses) == 1
    # A fresh model predicts about uniformly over the vocabulary.
    assert np.isfinite(train_losses + val_losses).all()
    assert abs(train_losses[0] - math.log(vocab)) < 1.0
