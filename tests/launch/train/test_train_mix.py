"""``data.mix`` through the launcher: ``--dry-run`` prints each source's draws, and a real
two-source ``lmforge train`` (no prepare, no data.output_dir) checkpoints a loader state
that continues on another world size in step with the run."""

from __future__ import annotations

import dataclasses
import itertools
from collections import Counter
from pathlib import Path

import pytest
import torch
from engine_helpers import finish, shard_fixtures, train

from lmforge.launch.cli import dry_run
from lmforge.launch.commands import prepare_data
from lmforge.launch.config import load_config
from lmforge.pipeline.config import MixSourceConfig
from lmforge.pipeline.loader.mix import Mix, MixError
from lmforge.pipeline.loader.shard_loader import LoaderConfig, ShardLoader

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
    assert "data.mix[0] a: 2,048 tokens available, 4,096 drawn = 2.00 epochs" in out
    assert "data.mix[1] b: 512 tokens available, 1,024 drawn = 2.00 epochs (max_epochs 2)" in out
    assert "WARNING: data.mix[1] b reaches max_epochs=2" in out


def test_prepare_uses_the_sources_as_they_are_and_refuses_a_misfit(config, tmp_path):
    cfg = load_config(config)
    assert prepare_data(cfg) == (config.parent / "a" / "manifest.json").resolve()
    assert not (config.parent / "never").exists()
    shard_fixtures().write_shards(tmp_path, {"x": {"train": [2]}}, seq_len=16)
    cfg.data.mix.append(MixSourceConfig(str(tmp_path), weight=1.0))
    with pytest.raises(MixError, match=r"data.mix\[2\] .* seq_len 16 vs 32"):
        prepare_data(cfg)


@pytest.mark.slow
def test_two_source_mix_trains_without_prepare_and_resumes_on_another_world_size(
        config, tmp_path):
    run = tmp_path / "run"
    out = finish(train(config, run, "--train.max_steps=6", "--train.checkpoint_every=3",
                       "--launch.nproc_per_node=2"))
    assert "prepare" not in out and not (config.parent / "never").exists()

    def state(step: int) -> dict:
        folder = run / "checkpoints" / f"step_{step:08d}"
        return torch.load(folder / "mp_rank_00_model_states.pt", weights_only=False)["loader"]

    at3, at6 = state(3), state(6)
    assert at3["weights"] == {"a/web": 3.0, "b/code": 1.0}
    assert at3["caps"] == {"a/web": None, "b/code": 32}
    assert (at3["position"], at6["position"]) == (24, 48)  # 3 steps x 4 rows x 2 ranks
    # One rank with the whole global batch continues the step-3 state to the step-6 one,
    # drawing the rows the two ranks drew (the same global order: the loader tests).
    mix = Mix(load_config(config).data.mix)
    one = ShardLoader(mix, "train", 8, seed=at3["seed"])
    one.load_state_dict(at3)
    for _ in itertools.islice(one, 3):
        pass
    assert one.state_dict() == {**at6, "global_batch": 8}
    # An anneal stage that only reweights (init.loader: keep hands it this state) goes on
    # with the same shards, each source from where the run left it: the counts of each
    # source's rows among the run's 48 samples (read back in the same global order).
    cfg = LoaderConfig(return_keys=True)
    drawn = Counter(k.split("-")[0] for b in itertools.islice(
        ShardLoader(mix, "train", 8, seed=at3["seed"], config=cfg), 6) for k in b["keys"])
    anneal = Mix([dataclasses.replace(s, weight=w)
                  for s, w in zip(mix.sources, (1, 3), strict=True)])
    stage = ShardLoader(anneal, "train", 8, seed=at3["seed"])
    stage.load_state_dict(at6)
    after = stage.state_dict()
    assert after["offsets"] == {"a/web": drawn["web"], "b/code": drawn["code"]}
    assert (after["position"], after["generation"], after["weights"]["b/code"]) == (0, 1, 3)
