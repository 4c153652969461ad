"""Engine extras: the bad-loss policy (stop / skip), unit-level and through real DeepSpeed.

The real trigger for a loss spike: a decoder memorises a tiny training split (loss well
under 1), then resumes on a different split of random tokens, where its confident guesses
give a loss near 9, far above ``spike_factor`` x the running mean restored from the
checkpoint.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from engine_helpers import shard_fixtures

from lmforge.launch.config import TrainConfig, load_resolved
from lmforge.launch.train.loss_guard import BadLossError, LossGuard, skip_loss, zero_loss
from lmforge.launch.train.worker import flops_per_token, peak_flops
from lmforge.pipeline.contract.dataset_tokenizer import file_sha256

REPO = Path(__file__).resolve().parents[3]


def test_nonfinite_loss_stops_with_a_clear_error():
    guard = LossGuard(TrainConfig(bad_loss_policy="stop"))
    with pytest.raises(BadLossError) as err:
        guard.check(torch.tensor(float("nan")), step=7)
    message = str(err.value)
    assert message.startswith("step 7: the training loss is not finite")
    assert "train.lr" in message and "train.grad_clip" in message and "fp32" in message


def test_stop_skips_until_max_bad_steps_in_a_row():
    guard = LossGuard(TrainConfig(bad_loss_policy="stop", max_bad_steps=3))
    for step, loss in enumerate([2.0, float("inf"), 2.0, float("nan"), float("nan")], 1):
        assert guard.check(torch.tensor(loss), step) == (not math.isfinite(loss))
        guard.end_step()
    assert (guard.bad_steps, guard.in_a_row) == (3, 2)
    with pytest.raises(BadLossError, match=r"step 6: .* \(3 bad step"):
        guard.check(torch.tensor(float("nan")), step=6)


def test_spikes_count_against_the_running_mean_of_good_steps():
    guard = LossGuard(TrainConfig(bad_loss_policy="skip", spike_factor=2.0))
    results = []
    for step, loss in enumerate([4.0, 3.0, 7.0, 3.0, 100.0], 1):
        results.append(guard.check(torch.tensor(loss), step))
        guard.end_step()
    # mean 4.0, then 0.9 * 4 + 0.1 * 3 = 3.9: 7.0 is below 7.8, 100 is a spike.
    assert results == [False, False, False, False, True]
    assert guard.running_mean == pytest.approx(0.9 * (0.9 * 3.9 + 0.1 * 7.0) + 0.1 * 3.0)
    restored = LossGuard(TrainConfig())
    restored.load_state_dict(guard.state_dict())
    assert restored.state_dict() == guard.state_dict() and restored.bad_steps == 1


def test_zero_loss_gives_zero_gradients_even_for_nan_weights():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    with torch.no_grad():
        model[0].weight[0, 0] = float("nan")
    loss = zero_loss(model)
    loss.backward()
    assert loss.item() == 0.0
    for p in model.parameters():
        assert torch.equal(p.grad, torch.zeros_like(p))


def test_skip_loss_of_a_spike_zeroes_gradients_through_the_graph():
    model = torch.nn.Linear(3, 2)
    loss = model(torch.ones(1, 3)).sum() * 100.0
    skip_loss(loss, model, zero_stage=3).backward()
    for p in model.parameters():
        assert torch.equal(p.grad, torch.zeros_like(p))


def test_bad_loss_settings_are_validated():
    with pytest.raises(ValueError, match="^max_bad_steps: must be at least 1"):
        TrainConfig(max_bad_steps=0)
    with pytest.raises(ValueError, match="^spike_factor: .* above 1"):
        TrainConfig(spike_factor=0.5)
    with pytest.raises(ValueError, match="^peak_flops_per_device: must be positive"):
        TrainConfig(peak_flops_per_device=0.0)


def test_a_configured_peak_enables_mfu_on_any_device():
    assert peak_flops(2.5e11) == 2.5e11
    if not torch.cuda.is_available():
        assert peak_flops(None) is None  # no table entry for a CPU: no MFU unless configured


CONFIG = """\
name: spike
data:
  datasets: [{{name: d, paths: [unused.txt]}}]
  output_dir: {data}
  seq_len: 32
tokenizer: {{vocab_size: 1000}}
model: {{preset: tiny, n_layers: 2, d_model: 64, n_heads: 4, n_kv_heads: 2, d_ff: 128}}
train: {{micro_batch_size: 4, log_every: 1, eval_every: 0, eval_batches: 1, lr: 0.01,
        lr_schedule: constant, warmup_steps: 0, precision: fp32, spike_factor: 1.5}}
tracking: {{enabled: false}}
"""


def _run(config: Path, run_dir: Path, *overrides: str, resume: str | None = None):
    command = [sys.executable, "-m", "lmforge.launch.cli", "train", str(config),
               f"--run_dir={run_dir}", *overrides]
    if resume:
        command += ["--resume", resume]
    return subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=600)


def _metrics(run_dir: Path) -> dict[int, dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r for r in map(json.loads, lines) if "train/loss" in r}


@pytest.fixture(scope="module")
def configs(tmp_path_factory) -> tuple[Path, Path]:
    """(memorise, shifted): the same shapes, different random tokens."""
    tmp = tmp_path_factory.mktemp("spike")
    paths = []
    for name, seed in (("memorise", 0), ("shifted", 1)):
        shard_fixtures().write_shards(
            tmp / name, {"d": {"train": [8], "val": [8]}}, seq_len=32, seed=seed
        )
        path = tmp / f"{name}.yaml"
        path.write_text(CONFIG.format(data=tmp / name))
        paths.append(path)
    return paths[0], paths[1]


def _memorised(configs, tmp_path: Path, zero_stage: int) -> Path:
    """Trains 20 steps (with full activation checkpointing and a CPU peak: MFU and HFU)."""
    run = tmp_path / "memorise"
    done = _run(configs[0], run, "--train.max_steps=20", f"--deepspeed.zero_stage={zero_stage}",
                "--train.activation_checkpointing=full", "--train.peak_flops_per_device=1e9")
    assert done.returncode == 0, done.stdout[-3000:]
    metrics = _metrics(run)
    assert metrics[20]["train/loss"] < 1.0  # memorised: the shifted data will spike
    cfg = load_resolved(run)
    seq_len = cfg.data.seq_len  # the dataset's (the dataset check refuses another)
    ratio = flops_per_token(cfg, seq_len, hardware=True) / flops_per_token(cfg, seq_len)
    assert ratio > 1.1  # full recomputation of the blocks (the output head is not redone)
    for record in metrics.values():
        assert 0 < record["train/mfu"] < record["train/hfu"]
        assert record["train/hfu"] / record["train/mfu"] == pytest.approx(ratio, rel=1e-9)
    return run / "checkpoints" / "step_00000020"


@pytest.fixture(scope="module")
def memorised(configs, tmp_path_factory):
    """``memorised(zero_stage)``: the memorised step-20 checkpoint of that ZeRO stage, trained
    (and checked, see _memorised) once and shared by every test that resumes from it."""
    checkpoints: dict[int, Path] = {}

    def get(zero_stage: int) -> Path:
        if zero_stage not in checkpoints:
            tmp = tmp_path_factory.mktemp(f"memorised-zero{zero_stage}")
            checkpoints[zero_stage] = _memorised(configs, tmp, zero_stage)
        return checkpoints[zero_stage]

    return get


@pytest.mark.slow
def test_spike_stops_the_run_with_a_clear_error(configs, memorised, tmp_path):
    checkpoint = memorised(2)
    out = _run(configs[1], tmp_path / "stop", "--train.max_steps=24", resume=str(checkpoint))
    assert out.returncode != 0
    assert "step 21: the training loss" in out.stdout
    assert "is above train.spike_factor 1.5 x the running mean" in out.stdout
    assert "try a lower train.lr" in out.stdout
    assert not (tmp_path / "stop" / "checkpoints").exists()  # nothing saved after the spike


@pytest.mark.slow
@pytest.mark.parametrize("zero_stage", [2, 3])
def test_skip_zeroes_bad_steps_and_finishes(configs, memorised, tmp_path, zero_stage):
    checkpoint = memorised(zero_stage)
    run = tmp_path / "skip"
    out = _run(configs[1], run, "--train.max_steps=24", "--train.bad_loss_policy=skip",
               f"--deepspeed.zero_stage={zero_stage}", resume=str(checkpoint))
    assert out.returncode == 0, out.stdout[-3000:]
    metrics = _metrics(run)
    assert sorted(metrics) == [21, 22, 23, 24]
    assert [metrics[s]["train/bad_steps"] for s in range(21, 25)] == [1, 2, 3, 4]
    # A skipped step backpropagates exact zeros: the clipped global grad norm is 0.
    assert all(metrics[s]["train/grad_norm"] == 0.0 for s in range(21, 25))
    assert (run / "checkpoints" / "step_00000024").exists()


@pytest.fixture(scope="module")
def tokenizer_config(configs, tmp_path_factory) -> Path:
    """The memorise config with a real sentencepiece model next to its manifest."""
    import sentencepiece as spm

    data = configs[0].parent / "memorise"
    corpus = REPO / "configs" / "corpora" / "tinyshakespeare.txt"
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(data / "tokenizer"), vocab_size=1000,
        model_type="bpe", pad_id=0, unk_id=1, bos_id=2, eos_id=3, num_threads=1,
        input_sentence_size=20000, minloglevel=2,
    )
    manifest = data / "manifest.json"  # records the real tokenizer's sha256 (checked on open)
    layout = json.loads(manifest.read_text())
    layout["tokenizer"]["sha256"] = file_sha256(data / "tokenizer.model")
    manifest.write_text(json.dumps(layout))
    return configs[0]


@pytest.mark.slow
def test_generations_are_logged_during_training_without_changing_it(tokenizer_config, tmp_path):
    common = ["--train.max_steps=4", "--train.spike_factor=0", "--generate.max_new_tokens=6",
              "--generate.prompts=[\"The king\", \"Where\"]"]
    sampled, plain = tmp_path / "sampled", tmp_path / "plain"
    out = _run(tokenizer_config, sampled, *common, "--train.generate_every=2")
    assert out.returncode == 0, out.stdout[-3000:]
    lines = (sampled / "generations.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert [r["step"] for r in records] == [2, 4]
    for record in records:
        assert len(record["texts"]) == 2
        assert record["texts"][0].startswith("The king") and record["texts"][1].startswith("Where")
    assert _run(tokenizer_config, plain, *common).returncode == 0
    assert not (plain / "generations.jsonl").exists()
    # Generation uses its own generator and eval mode: training is unchanged, bit for bit.
    a, b = _metrics(sampled), _metrics(plain)
    assert [a[s]["train/loss"] for s in range(1, 5)] == [b[s]["train/loss"] for s in range(1, 5)]
