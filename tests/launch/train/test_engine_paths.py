"""Every ZeRO path through `lmforge train`: stages 0-3, optimizer offload, ZeRO-3 parameter
offload, and resume on another data-parallel world size (DeepSpeed's universal checkpoint).

Real DeepSpeed on gloo, tiny model, few steps. Losses are the mean over ranks that rank 0
writes to ``metrics.jsonl`` (exact floats).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from engine_helpers import finish, losses, shard_fixtures, train

from lmforge.launch.train.checkpoint import COMPLETE, UNIVERSAL

pytestmark = pytest.mark.slow

CONFIG = """\
name: paths
data:
  datasets: [{{name: d, paths: [unused.txt]}}]
  output_dir: {data}
  seq_len: 32
tokenizer: {{vocab_size: 1000}}
model: {{preset: tiny, n_layers: 2, d_model: 64, n_heads: 4, n_kv_heads: 2, d_ff: 128}}
train:
  micro_batch_size: 4
  log_every: 1
  eval_every: 0
  eval_batches: 2
  warmup_steps: 2
  lr_schedule: constant
  precision: fp32
tracking: {{enabled: false}}
"""

# Relative tolerance between runs on different world sizes: the same samples per optimizer
# step, but gradients are summed in another order (1 rank x 8 vs 2 ranks x 4 sequences).
RESHAPE_RTOL = 1e-3


def _tokens_seen(run_dir: Path) -> int:
    return json.loads((run_dir / "train_summary.json").read_text())["tokens_seen"]


@pytest.fixture(scope="module")
def config(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("paths")
    shard_fixtures().write_shards(
        tmp / "data", {"d": {"train": [64, 64, 64], "val": [16]}}, seq_len=32
    )
    path = tmp / "paths.yaml"
    path.write_text(CONFIG.format(data=tmp / "data"))
    return path


@pytest.fixture(scope="module")
def straight(config, tmp_path_factory):
    """``straight(zero_stage, *overrides)``: the uninterrupted 2-process run of 9 steps with
    checkpoints at 3, 6 and 9, trained once per set of arguments in this module (the exact
    resume and the reshape tests at ZeRO 0 and 1 compare with the same run)."""
    runs: dict[tuple[str, ...], Path] = {}

    def run(zero_stage: int, *overrides: str) -> Path:
        key = (f"--deepspeed.zero_stage={zero_stage}", *overrides)
        if key not in runs:
            folder = tmp_path_factory.mktemp("straight")
            finish(train(config, folder, *key, "--train.max_steps=9",
                         "--train.checkpoint_every=3"))
            runs[key] = folder
        return runs[key]

    return run


# ZeRO 2 and 3 without offload: test_engine.py; optimizer + parameter offload together: the
# reshape test below.
@pytest.mark.parametrize("zero_stage,offload_optimizer,offload_params", [
    (0, "none", "none"),
    (1, "none", "none"),
    (1, "cpu", "none"),
    (2, "cpu", "none"),
    (3, "cpu", "none"),
    (3, "none", "cpu"),
])
def test_stage_and_offload_resume_exactly(config, straight, tmp_path, zero_stage,
                                          offload_optimizer, offload_params):
    offloads = [f"--deepspeed.offload_{part}={where}" for part, where in
                (("optimizer", offload_optimizer), ("params", offload_params)) if where != "none"]
    reference = straight(zero_stage, *offloads)
    common = [f"--deepspeed.zero_stage={zero_stage}", *offloads, "--train.max_steps=9",
              "--train.checkpoint_every=3"]
    if zero_stage == 3 and offload_optimizer == "cpu":
        # ZeRO-3 builds the model partitioned (zero.Init, one gathered module initialised
        # at a time); from the same seed its losses equal a whole-built ZeRO-2 run's with
        # the same optimizer (one launch more, run after the other: two at once can wait
        # on each other's DeepSpeed op build).
        whole = tmp_path / "zero2"
        finish(train(config, whole, *common, "--deepspeed.zero_stage=2"))
        a, b = losses(reference), losses(whole)
        assert sorted(a) == sorted(b) == list(range(1, 10))
        for step in a:
            assert a[step] == pytest.approx(b[step], rel=1e-6, abs=1e-6), (step, a, b)
    checkpoint = reference / "checkpoints" / "step_00000003"
    resumed = tmp_path / "resumed"
    finish(train(config, resumed, *common, resume=str(checkpoint)))
    a, b = losses(reference), losses(resumed)
    assert sorted(a) == list(range(1, 10)) and sorted(b) == list(range(4, 10))
    assert [b[s] for s in range(4, 10)] == [a[s] for s in range(4, 10)]
    assert a[9] != a[4]  # the model is actually training
    assert _tokens_seen(resumed) == _tokens_seen(reference)  # counters restored exactly


# One case per stage, each adding a variant, to keep the suite short (12 runs): ZeRO 0 loads
# the whole optimizer state on any world size without conversion; bf16 on ZeRO 2; ZeRO 3
# with both offloads.
@pytest.mark.parametrize("zero_stage,extra", [
    (0, ()),
    (1, ()),
    (2, ("--train.precision=bf16",)),
    (3, ("--deepspeed.offload_optimizer=cpu", "--deepspeed.offload_params=cpu")),
])
def test_resume_on_another_world_size_continues_the_curve(config, straight, tmp_path,
                                                         zero_stage, extra):
    """2 → 1 → 2 processes, 8 sequences per step throughout (2 x micro 4, 1 x micro 8): the
    loader hands out the same samples, so every resumed step's loss matches the
    uninterrupted 2-process run within RESHAPE_RTOL."""
    stage = f"--deepspeed.zero_stage={zero_stage}"
    universal = zero_stage > 0  # ZeRO 0 keeps the optimizer state whole: no conversion
    straight = straight(zero_stage, *extra)  # 2 processes, checkpoints at 3, 6 and 9
    reference = losses(straight)
    assert reference[9] != reference[6]

    at_3 = straight / "checkpoints" / "step_00000003"
    on_one = tmp_path / "on_one"  # 2 -> 1, then writes step 6 with 1 process
    finish(train(config, on_one, stage, *extra, "--launch.nproc_per_node=1",
                 "--train.micro_batch_size=8", "--train.max_steps=6", resume=str(at_3)))
    at_6 = on_one / "checkpoints" / "step_00000006"
    on_two = tmp_path / "on_two"  # 1 -> 2
    finish(train(config, on_two, stage, *extra, "--train.max_steps=9", resume=str(at_6)))

    for folder, written_by in ((at_3, 2), (at_6, 1)):
        assert json.loads((folder / COMPLETE).read_text())["world_size"] == written_by
        assert (folder / UNIVERSAL).is_dir() == universal  # kept for a retry
        assert not (folder / f"{UNIVERSAL}.tmp").exists()
    resumed = {**losses(on_one), **losses(on_two)}
    assert sorted(resumed) == list(range(4, 10))
    assert _tokens_seen(on_two) == _tokens_seen(straight)
    for step, loss in resumed.items():
        assert math.isclose(loss, reference[step], rel_tol=RESHAPE_RTOL), (
            step, loss, reference[step])
