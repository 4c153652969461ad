"""``data.mix`` through the launcher: ``--dry-run`` prints each source's draws, and prepare
uses the sources as they are. A real two-source run, a reweighting stage and a resume on
another world size: tests/launch/stages/test_stages_mix.py."""

from __future__ import annotations

from pathlib import Path

import pytest
from engine_helpers import shard_fixtures

from lmforge.launch.cli import dry_run
from lmforge.launch.commands import prepare_data
from lmforge.launch.config import load_config
from lmforge.pipeline.config import MixSourceConfig
from lmforge.pipeline.loader.mix import MixError

CONFIG = """\
name: mix
data:
  mix:
    - {{path: {a}, weight: 3}}
    - {{path: {b}/manifest.json, weight: 1, max_epochs: 2}}
  output_dir: {never}
  seq_len: 32
tokenizer: {{vocab_size: 1000}}
model: {{preset: tiny, n_layers: 2, d_model: 64, n_heads: 4, n_kv_heads: 2, d_ff: 128}}
train:
  micro_batch_size: 4
  max_steps: 20
  log_every: 1
  eval_every: 0
  eval_batches: 1
  warmup_steps: 1
  precision: fp32
tracking: {{enabled: false}}
"""


@pytest.fixture(scope="module")
def config(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("mixrun")
    shards = shard_fixtures()
    shards.write_shards(tmp / "a", {"web": {"train": [32, 32], "val": [8]}}, seq_len=32)
    shards.write_shards(tmp / "b", {"code": {"train": [16], "val": [8]}}, seq_len=32, seed=1)
    path = tmp / "mix.yaml"
    path.write_text(CONFIG.format(a=tmp / "a", b=tmp / "b", never=tmp / "never"))
    return path


def test_dry_run_prints_each_sources_draws_and_the_cap(config, capsys):
    dry_run(load_config(config, ["--launch.nproc_per_node=2"]))
    out = capsys.readouterr().out
    # 20 steps x 4 x 2 ranks = 160 samples; b (16 samples) at 1/4 would be 40 > cap 32,
    # so a takes the rest: 128 samples of 64 = 2 epochs; tokens = samples x 32.
    assert "# data.mix: 160 samples x seq_len 32 = 5,120 tokens drawn" in out
    assert "data.mix[0] a: weight 3 (75.0%), 2,048 tokens available, 4,096 drawn = 2.00 " \
        "epochs" in out
    assert "data.mix[1] b: weight 1 (25.0%), 512 tokens available, 1,024 drawn = 2.00 epochs " \
        "(max_epochs 2)" in out
    assert "WARNING: data.mix[1] b reaches max_epochs=2" in out


def test_prepare_uses_the_sources_as_they_are_and_refuses_a_misfit(config, tmp_path):
    cfg = load_config(config)
    assert prepare_data(cfg) == (config.parent / "a" / "manifest.json").resolve()
    assert not (config.parent / "never").exists()
    shard_fixtures().write_shards(tmp_path, {"x": {"train": [2]}}, seq_len=16)
    cfg.data.mix.append(MixSourceConfig(str(tmp_path), weight=1.0))
    with pytest.raises(MixError, match=r"data.mix\[2\] .* seq_len 16 vs 32"):
        prepare_data(cfg)
