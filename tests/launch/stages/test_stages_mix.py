"""A stage graph over two prepared datasets (``data.mix``) through a real ``lmforge run``:
pretrain 3:1, then an anneal stage that only reweights to 1:3 and continues the loader. No
prepare runs and the sources stay untouched; each stage's draws (planned by ``--dry-run``,
counted after training) follow the weights; and the pretrain stage, stopped at step 3 on 2
ranks and resumed on 1, gives the uninterrupted run's losses.

Two DeepSpeed launches for the graph (one per stage) and one for the resume, module-scoped.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from engine_helpers import REPO, finish, losses, shard_fixtures, train

from lmforge.launch.config import load_config
from lmforge.launch.stages.graph import describe_graph
from lmforge.launch.stages.mix_draws import loader_state

pytestmark = pytest.mark.slow

SEQ = 16
ROWS, RANKS = 32, 2  # micro-batch rows per rank
CONFIG = """\
name: mixgraph
seed: 7
data:
  mix:
    - {{path: {a}, weight: 3}}
    - {{path: {b}/manifest.json, weight: 1}}
  output_dir: {never}
  seq_len: 16
  loader: {{num_workers: 0}}
tokenizer: {{vocab_size: 1000}}
model: {{preset: tiny, n_layers: 2, d_model: 64, n_heads: 4, n_kv_heads: 2, d_ff: 128}}
train: {{micro_batch_size: 32, max_steps: 6, checkpoint_every: 3, log_every: 1, eval_every: 0,
        eval_batches: 1, warmup_steps: 1, lr_schedule: constant, precision: fp32}}
deepspeed: {{zero_stage: 0}}
launch: {{nproc_per_node: 2}}
tracking: {{enabled: false}}
export: {{enabled: false}}
stages:
  - name: pretrain
  - name: anneal                  # the same prepared sources, new weights only
    data:
      mix:
        - {{path: {a}, weight: 1}}
        - {{path: {b}/manifest.json, weight: 3}}
    init: {{loader: keep}}
    train: {{max_steps: 64, checkpoint_every: 64}}
"""
# Anneal: 64 steps x 32 rows x 2 ranks = 4,096 samples, one whole mixture chunk, in which
# the loader's counts are exact: 1/4 and 3/4 of 4,096 (pipeline/loader/order.py).
ANNEAL_SAMPLES = 64 * ROWS * RANKS
RESHAPE_RTOL = 1e-3  # as test_engine_paths: the same samples, gradients summed in another order


def files(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``folder`` (lock files aside) with its mtime and size."""
    return {str(p.relative_to(folder)): (p.stat().st_mtime_ns, p.stat().st_size)
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != ".lmforge.lock"}


@pytest.fixture(scope="module")
def graph(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("mixgraph")
    shards = shard_fixtures()
    shards.write_shards(tmp / "a", {"web": {"train": [32, 32], "val": [8]}}, seq_len=SEQ)
    shards.write_shards(tmp / "b", {"code": {"train": [16], "val": [8]}}, seq_len=SEQ, seed=1)
    config = tmp / "mix.yaml"
    config.write_text(CONFIG.format(a=tmp / "a", b=tmp / "b", never=tmp / "never"))
    before = {s: files(tmp / s) for s in ("a", "b")}
    run = tmp / "run"
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "lmforge.launch.cli", "run", str(config),
                           f"--run_dir={run}"], capture_output=True, text=True, timeout=900,
                          cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    return {"tmp": tmp, "config": config, "run": run, "out": done.stdout + done.stderr,
            "before": before, "seconds": time.monotonic() - started}


def drawn_line(out: str) -> list[dict[str, int]]:
    """Each stage's ``data.mix drawn by this stage:`` counts, tokens per source."""
    return [{m[0]: int(m[1].replace(",", "")) for m in re.findall(r"(\w+) ([\d,]+) tokens", line)}
            for line in out.splitlines() if line.startswith("data.mix drawn by this stage:")]


def planned(text: str) -> list[dict[str, int]]:
    """Each stage's planned draws in the graph's ``--dry-run``, tokens per source."""
    stages = text.split("\n[")[1:]
    return [{m[0]: int(m[1].replace(",", "")) for m in re.findall(
        r"data\.mix\[\d\] (\w+): weight \S+ \([\d.]+%\), [\d,]+ tokens available, ([\d,]+) drawn",
        stage)} for stage in stages]


def test_a_reweighting_anneal_stage_runs_without_prepare_and_draws_by_its_weights(graph):
    out, run, tmp = graph["out"], graph["run"], graph["tmp"]
    # Nothing prepared: both stages use the sources as they are, bytes and mtimes unchanged.
    assert out.count("prepare: skipped, data.mix uses 2 prepared datasets") == 2
    assert "prepare: corpus" not in out
    assert {s: files(tmp / s) for s in ("a", "b")} == graph["before"]
    assert not (tmp / "never").exists()
    assert not any((run / "stages" / s / "data").exists() for s in ("00-pretrain", "01-anneal"))
    # The anneal's draws, counted from its checkpointed loader states, by hand: one chunk.
    pre, anneal = drawn_line(out)
    assert anneal == {"a": ANNEAL_SAMPLES // 4 * SEQ, "b": ANNEAL_SAMPLES * 3 // 4 * SEQ}
    assert sum(pre.values()) == 6 * ROWS * RANKS * SEQ
    assert abs(pre["a"] / sum(pre.values()) - 0.75) < 0.1  # 384 samples, σ ≈ 0.022
    # It continued the pretrain loader: each source's offset is what pretrain drew.
    final = loader_state(run / "stages/01-anneal/checkpoints/step_00000064")
    assert final["weights"] == {"a/web": 1.0, "b/code": 3.0}
    assert final["offsets"] == {"a/web": pre["a"] // SEQ, "b/code": pre["b"] // SEQ}
    assert (final["position"], final["generation"]) == (ANNEAL_SAMPLES, 1)
    # The graph's --dry-run planned exactly these draws, stage by stage.
    text = describe_graph(load_config(graph["config"], [f"--run_dir={run}"]))
    assert "data.mix of 2 prepared datasets (seq_len 16), nothing prepared" in text
    assert "data.mix[1] b: weight 3 (75.0%)" in text
    assert planned(text) == [pre, anneal]
    print(f"graph run (2 stages, 2 DeepSpeed launches): {graph['seconds']:.1f} s")


def test_the_mix_resumes_exactly_on_another_world_size(graph, tmp_path):
    """Pretrain stopped at step 3 on 2 ranks, resumed on 1 rank with the whole global batch
    (micro 64): steps 4-6 give the 2-rank run's losses and the same loader state."""
    stage = graph["run"] / "stages/00-pretrain"
    started = time.monotonic()
    one = tmp_path / "one"
    finish(train(stage / "config.yaml", one, "--launch.nproc_per_node=1",
                 f"--train.micro_batch_size={ROWS * RANKS}",
                 resume=str(stage / "checkpoints/step_00000003")))
    reference, resumed = losses(stage), losses(one)
    assert sorted(reference) == list(range(1, 7)) and sorted(resumed) == [4, 5, 6]
    assert reference[6] != reference[4]  # it trains
    for step, loss in resumed.items():
        assert math.isclose(loss, reference[step], rel_tol=RESHAPE_RTOL), (
            step, loss, reference[step])
    assert loader_state(one / "checkpoints/step_00000006") == \
        loader_state(stage / "checkpoints/step_00000006")
    assert json.loads((one / "train_summary.json").read_text())["tokens_seen"] == \
        json.loads((stage / "train_summary.json").read_text())["tokens_seen"]
    print(f"resume on 1 rank (1 DeepSpeed launch): {time.monotonic() - started:.1f} s")
