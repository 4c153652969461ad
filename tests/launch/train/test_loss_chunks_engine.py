"""``train.loss_chunk_tokens`` through the real engine: ZeRO-3 partitions ``lm_head``'s
weight, which the chunked loss calls outside the model's forward (once per chunk, again
per chunk in the backward); the losses must match the plain loss's run step by step."""

from __future__ import annotations

from pathlib import Path

import pytest
from engine_helpers import finish, losses, shard_fixtures, train

pytestmark = pytest.mark.slow

CONFIG = """\
name: chunks
data:
  datasets: [{{name: d, paths: [unused.txt]}}]
  output_dir: {data}
  seq_len: 32
  loader: {{document_masking: true}}
tokenizer: {{vocab_size: 1000}}
model: {{preset: tiny, n_layers: 2, d_model: 64, n_heads: 4, n_kv_heads: 2, d_ff: 128}}
train:
  micro_batch_size: 4
  max_steps: 6
  log_every: 1
  eval_every: 0
  eval_batches: 2
  warmup_steps: 2
  precision: fp32
deepspeed: {{zero_stage: 3}}
tracking: {{enabled: false}}
export: {{enabled: false}}
"""


def test_chunked_loss_under_zero3_matches_the_plain_loss(tmp_path: Path) -> None:
    shard_fixtures().write_shards(tmp_path / "data", {"d": {"train": [64], "val": [16]}},
                                  seq_len=32)
    config = tmp_path / "chunks.yaml"
    config.write_text(CONFIG.format(data=tmp_path / "data"))
    plain = train(config, tmp_path / "plain")
    chunked = train(config, tmp_path / "chunked", "--train.loss_chunk_tokens=24")
    finish(plain), finish(chunked)
    a, b = losses(tmp_path / "plain"), losses(tmp_path / "chunked")
    assert sorted(a) == sorted(b) == list(range(1, 7))
    for step in a:
        assert b[step] == pytest.approx(a[step], abs=1e-5), step
    assert a[6] != a[1]  # it trains
