"""Stages over ``data.mix`` without processes: the expansion (a mix stage prepares nothing
and needs no tokenizer copy; a task stage after it replaces the mix and reads the first
source's tokenizer) and the graph's ``--dry-run`` draws, stage by stage, continuing the
loader where ``init.loader: keep``."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from engine_helpers import shard_fixtures

from lmforge.launch.config import load_config
from lmforge.launch.config.stages import expand_stages
from lmforge.launch.stages.graph import describe_graph
from lmforge.pipeline.loader.order import MIXTURE_CHUNK

SEQ = 8
CONFIG = """\
name: plan
run_dir: {tmp}/run
data:
  mix:
    - {{path: {tmp}/a, weight: 3}}
    - {{path: {tmp}/b, weight: 1, max_epochs: 2}}
  seq_len: 8
tokenizer: {{vocab_size: 1000}}
model: {{preset: tiny, n_layers: 2, d_model: 64, n_heads: 4, n_kv_heads: 2, d_ff: 128}}
train: {{micro_batch_size: 16, max_steps: 20}}
launch: {{nproc_per_node: 2}}
tracking: {{enabled: false}}
stages:
  - name: pretrain
  - name: anneal
    data:
      mix:
        - {{path: {tmp}/a, weight: 1}}
        - {{path: {tmp}/b, weight: 1, max_epochs: 2}}    # a list replaces: restate the cap
    init: {{loader: keep}}
    train: {{max_steps: 128}}
  - name: sft
    data: {{task: {{kind: sft, train: [{tmp}/sft.jsonl]}}}}
    train: {{objective: sft, max_steps: 2}}
"""


@pytest.fixture(scope="module")
def config(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("plan")
    shards = shard_fixtures()
    shards.write_shards(tmp / "a", {"web": {"train": [40, 24], "val": [4]}}, seq_len=SEQ)
    shards.write_shards(tmp / "b", {"code": {"train": [100]}}, seq_len=SEQ, seed=1)
    path = tmp / "plan.yaml"
    path.write_text(CONFIG.format(tmp=tmp))
    return path


def test_mix_stages_prepare_nothing_and_a_task_stage_replaces_the_mix(config):
    tmp = config.parent
    pretrain, anneal, sft = expand_stages(load_config(config))
    assert [s.weight for s in anneal.config.data.mix] == [1.0, 1.0]
    assert anneal.config.tokenizer.model_path is None  # the sources carry their tokenizer
    assert sft.config.data.mix == [] and sft.config.data.task.kind == "sft"
    assert sft.config.tokenizer.model_path == str((tmp / "a" / "tokenizer.model").resolve())
    assert pretrain.config.data.mix[1].max_epochs == 2


def planned(stage: str) -> list[tuple[str, str, int]]:
    """(source, share, samples drawn) per ``data.mix[i]`` line of one stage's dry run."""
    return [(m[0], m[1], int(m[2].replace(",", "")) // SEQ) for m in re.findall(
        r"data\.mix\[\d\] (\w+): weight \S+ \(([\d.]+%)\), [\d,]+ tokens available, "
        r"([\d,]+) drawn", stage)]


def test_the_graph_dry_run_prints_each_stages_draws(config):
    text = describe_graph(load_config(config))
    stages = text.split("\n[")[1:]
    assert "data.mix of 2 prepared datasets (seq_len 8), nothing prepared" in stages[0]
    # pretrain: 20 steps x 16 x 2 ranks = 640 samples at 3:1; b's cap (2 x 100) not reached.
    assert "# data.mix: 640 samples x seq_len 8 = 5,120 tokens drawn" in stages[0]
    first = planned(stages[0])
    assert [(label, share) for label, share, _ in first] == [("a", "75.0%"), ("b", "25.0%")]
    assert sum(n for *_, n in first) == 640 and abs(first[1][2] - 160) < 40
    # anneal (loader kept): 128 x 32 = 4,096 samples = one mixture chunk at 1:1, so b would
    # take 2,048; its cap leaves it 200 less what pretrain took, and a fills the rest.
    assert "# data.mix: 4,096 samples" in stages[1]
    b_left = 200 - first[1][2]
    assert planned(stages[1]) == [("a", "50.0%", MIXTURE_CHUNK - b_left), ("b", "50.0%", b_left)]
    assert "WARNING: data.mix[1] b reaches max_epochs=2" in stages[1]
    assert "data.mix" not in stages[2] and "task sft" in stages[2]


def test_a_kept_loader_that_cannot_continue_is_named(config, tmp_path):
    shard_fixtures().write_shards(tmp_path / "c", {"other": {"train": [9]}}, seq_len=SEQ)
    text = config.read_text().replace(f"{config.parent}/b, weight: 1, max_epochs: 2}}\n",
                                      f"{tmp_path}/c, weight: 1}}\n")
    other = tmp_path / "other.yaml"
    other.write_text(text)
    out = describe_graph(load_config(other))
    assert "WARNING: init.loader: keep cannot continue the previous stage's loader" in out
