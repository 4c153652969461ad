"""``train.compile``: each block compiled with torch.compile (inductor's C++ backend on CPU).

In process: a compiled block equals the eager block (forward and gradients, within 1e-5;
also with LoRA adapters, which alone receive gradients),
parameter names do not change, evaluation and cached decoding stay eager, and the
combination that does not compose (ZeRO-3) is refused naming both keys. One real
``lmforge train`` with compile on (ZeRO-2, full activation checkpointing, packed documents, 1 rank)
whose losses equal an eager engine's over the same steps within 1e-4, and whose checkpoint
loads into an eager model with the eager run's weights.
"""

from __future__ import annotations

import json
import re
import statistics
from pathlib import Path

import pytest
import torch
from engine_helpers import finish, losses, shard_fixtures, train

from lmforge.launch.config import TrainableConfig, load_config, load_resolved
from lmforge.launch.train.activation_checkpointing import apply_activation_checkpointing
from lmforge.launch.train.callbacks import Callback
from lmforge.launch.train.compile_blocks import compile_blocks
from lmforge.launch.train.trainable import apply_trainable
from lmforge.model import ModelConfig

TINY = dict(family="decoder", vocab_size=96, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
            d_ff=64, max_seq_len=64, position="rope", norm="rmsnorm", activation="swiglu")


def _pair(**overrides):
    torch.manual_seed(0)
    cfg = ModelConfig(**{**TINY, **overrides})
    eager = cfg.build()
    compiled = cfg.build()
    compiled.load_state_dict(eager.state_dict())
    return eager, compiled


@pytest.fixture(scope="module")
def models():
    """An eager model and its compiled twin (full checkpointing on both), equal weights."""
    eager, compiled = _pair()
    assert compile_blocks(compiled, True) == 2
    for model in (eager, compiled):
        apply_activation_checkpointing(model, "full")
    return eager, compiled


def _step(model: torch.nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """One training forward and backward from zeroed gradients: (logits, grads by name)."""
    model.train()
    model.zero_grad()
    logits = model(ids)
    logits.float().pow(2).mean().backward()
    return logits.detach(), {n: p.grad for n, p in model.named_parameters()}


def test_compiled_blocks_equal_eager_forward_and_backward(models):
    eager, compiled = models
    ids = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(1))
    (out_e, grad_e), (out_c, grad_c) = _step(eager, ids), _step(compiled, ids)
    torch.testing.assert_close(out_c, out_e, atol=1e-5, rtol=1e-5)
    assert grad_c.keys() == grad_e.keys()
    for name in grad_e:
        torch.testing.assert_close(grad_c[name], grad_e[name], atol=1e-5, rtol=1e-5)
    # Compiled indeed; a second step of the same shape reuses the graph (no recompilation).
    frames = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert frames >= 1
    compiled(ids).sum().backward()
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == frames


def test_names_stay_and_eval_and_decoding_stay_eager(models):
    eager, compiled = models
    # No `_orig_mod.`: a checkpoint of the compiled model loads into an eager one as it is.
    assert list(compiled.state_dict()) == list(eager.state_dict())
    frames = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    compiled.eval()
    eager.eval()
    with torch.no_grad():
        ids = torch.randint(0, 96, (1, 5))
        torch.testing.assert_close(compiled(ids), eager(ids), atol=1e-5, rtol=1e-5)
        cache = compiled.new_cache(8)
        compiled(ids, cache=cache)
        compiled(ids[:, :1], cache=cache)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == frames


def test_compiled_lora_blocks_equal_eager_and_only_the_adapters_learn():
    """trainable.mode=lora with compile, in build.py's order: adapters injected, then the
    blocks compiled, then full checkpointing. B is moved off zero (on both models alike) so
    that the adapters take part in the output and in the gradients."""
    eager, compiled = _pair()
    lora = TrainableConfig(mode="lora", lora_rank=4)
    for model in (eager, compiled):
        apply_trainable(model, lora)
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, param in eager.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    compiled.load_state_dict(eager.state_dict())
    assert compile_blocks(compiled, True) == 2
    ids = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(3))
    for model in (eager, compiled):
        apply_activation_checkpointing(model, "full")
    (out_e, grad_e), (out_c, grad_c) = _step(eager, ids), _step(compiled, ids)
    torch.testing.assert_close(out_c, out_e, atol=1e-5, rtol=1e-5)
    learning = sorted(n for n, g in grad_c.items() if g is not None)
    assert learning == sorted(n for n, g in grad_e.items() if g is not None)
    assert learning and all("lora_" in n for n in learning)  # the base weights stay frozen
    assert any("lora_A" in n for n in learning) and any("lora_B" in n for n in learning)
    for name in learning:
        torch.testing.assert_close(grad_c[name], grad_e[name], atol=1e-5, rtol=1e-5)


def test_compile_off_leaves_the_model_alone():
    model = ModelConfig(**TINY).build()
    forwards = [block.forward for block in model.blocks()]
    assert compile_blocks(model, False) == 0
    assert [block.forward for block in model.blocks()] == forwards


def _tiny_yaml(tmp_path: Path) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text("name: c\ndata:\n  datasets: [{name: d, paths: [x.txt]}]\n"
                    "  seq_len: 128\ntokenizer: {vocab_size: 300}\nmodel: {preset: tiny}\n")
    return path


def test_compile_with_zero3_is_refused_naming_both_keys(tmp_path):
    with pytest.raises(ValueError, match=r"train\.compile.*deepspeed\.zero_stage=3.*"
                                         r"train\.compile=false"):
        load_config(_tiny_yaml(tmp_path), ["--train.compile=true", "--deepspeed.zero_stage=3"])
    for stage in (0, 1, 2):
        cfg = load_config(_tiny_yaml(tmp_path), ["--train.compile=true",
                                                 f"--deepspeed.zero_stage={stage}"])
        assert cfg.train.compile and cfg.deepspeed.zero_stage == stage


CONFIG = """\
name: compiled
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
  activation_checkpointing: full
  checkpoint_every: 3
deepspeed: {{zero_stage: 2}}
launch: {{nproc_per_node: 1}}
tracking: {{enabled: false}}
"""


class _Losses(Callback):
    """Writes down each step's loss (one rank: the logged mean)."""

    def __init__(self) -> None:
        self.by_step: dict[int, float] = {}

    def on_step_end(self, trainer, result) -> None:
        self.by_step[trainer.state.step] = result.loss


def _eager_losses(config: Path, run_dir: Path) -> dict[int, float]:
    """The same run without compile, on a real one-rank engine in this process (once per
    process: DeepSpeed keeps its process groups)."""
    import deepspeed
    import torch.distributed as dist

    from lmforge.launch.config.dataset_check import config_for_dataset, read_prepared
    from lmforge.launch.rundir import RunDir
    from lmforge.launch.train.build import build_trainer

    cfg = load_config(config, [f"--run_dir={run_dir}", "--train.compile=false"])
    manifest = read_prepared(cfg.data)
    cfg = config_for_dataset(cfg, manifest)
    dist.init_process_group("gloo", init_method=f"file://{run_dir.parent / 'store'}",
                            rank=0, world_size=1)
    try:
        deepspeed.init_distributed(dist_backend="gloo", verbose=False)
        recorder = _Losses()
        build_trainer(cfg, manifest, RunDir.of(run_dir), [recorder]).fit()
    finally:
        dist.destroy_process_group()
    return recorder.by_step


@pytest.mark.slow
def test_compiled_training_equals_eager_and_its_checkpoint_loads_eagerly(tmp_path, monkeypatch):
    shard_fixtures().write_shards(
        tmp_path / "data", {"d": {"train": [64, 64, 64], "val": [16]}}, seq_len=32)
    config = tmp_path / "compiled.yaml"
    config.write_text(CONFIG.format(data=tmp_path / "data"))
    run_dir = tmp_path / "compiled"
    monkeypatch.setenv("TORCH_LOGS", "recompiles")
    out = finish(train(config, run_dir, "--train.compile=true"))
    monkeypatch.delenv("TORCH_LOGS")
    # Compiled indeed (graphs traced around the CPU's per-document attention, which is a
    # graph break), and no step recompiled although each batch packs other documents.
    assert "train.compile: 2 blocks compiled" in out
    graphs = re.search(r"first block's forward compiled in [0-9.]+ s \((\d+) graphs", out)
    assert graphs and int(graphs.group(1)) >= 1, out[-3000:]
    assert "Recompiling" not in out
    compiled = losses(run_dir)
    assert sorted(compiled) == list(range(1, 7))
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    times = {r["step"]: r["train/step_time_s"] for r in rows if "train/step_time_s" in r}
    step = statistics.median(times[s] for s in range(2, 7))
    print(f"compile on first step {times[1] - step:.1f} s, step time {step:.3f} s")

    for name, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1",
                        "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "0"}.items():
        monkeypatch.setenv(name, value)
    eager_dir = tmp_path / "eager"
    eager = _eager_losses(config, eager_dir)
    assert sorted(eager) == list(range(1, 7))
    for s in eager:
        assert abs(eager[s] - compiled[s]) <= 1e-4, (s, eager[s], compiled[s])
    assert compiled[6] != compiled[1]  # it trains

    # The compiled run's checkpoint has the plain parameter names: it loads, strictly, into
    # an eager model, with the weights the eager run reached at the same step.
    from lmforge.launch.train.checkpoint import consolidated_state_dict

    folder = Path("checkpoints") / "step_00000003"
    weights = consolidated_state_dict(run_dir / folder)
    reference = consolidated_state_dict(eager_dir / folder)
    assert not [k for k in weights if "_orig_mod" in k] and weights.keys() == reference.keys()
    model = load_resolved(run_dir).model.build()
    model.load_state_dict(weights, strict=True)
    for key in reference:
        torch.testing.assert_close(weights[key], reference[key], atol=1e-4, rtol=1e-4)
