"""The three training objectives: config cross-check, corruption, and real DeepSpeed runs.

The engine runs use 2 processes on gloo and the contract-format fixture shards of
``test_engine.py``, with a ``<mask>`` id added to the fixture manifest's tokenizer section.
The tokens are random, so the training split is one global batch (8 rows) seen every step:
the falling loss is memorisation, which a few steps can show.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from engine_helpers import finish, losses, shard_fixtures, train

from lmforge.launch.config import ConfigError, load_config
from lmforge.launch.train.objectives import (
    Denoising,
    MaskedLM,
    build_objective,
    corruption_generator,
    special_ids,
)
from lmforge.model.config import ModelConfig
from lmforge.pipeline.contract.dataset_manifest import DatasetManifest

REPO = Path(__file__).resolve().parents[3]
MASK_ID = 4
TINY = {"n_layers": 2, "d_model": 64, "n_heads": 4, "n_kv_heads": 2, "d_ff": 128}


def _with_mask(manifest: Path) -> None:
    data = json.loads(manifest.read_text())
    data["tokenizer"]["special_tokens"] = {"mask": {"piece": "<mask>", "id": MASK_ID}}
    manifest.write_text(json.dumps(data))


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("objectives") / "data"
    written = shard_fixtures().write_shards(
        root, {"d": {"train": [8], "val": [8]}}, seq_len=32
    )
    _with_mask(written.manifest)
    return root


def _model(family: str) -> ModelConfig:
    return ModelConfig.from_preset("tiny", family=family, vocab_size=1000, **TINY)


@pytest.mark.parametrize("family,objective", [("encoder", "causal_lm"),
                                              ("decoder", "masked_lm"),
                                              ("encoder_decoder", "masked_lm")])
def test_objective_must_fit_the_family(tmp_path, family, objective):
    path = tmp_path / "run.yaml"
    # A Llama-style encoder has no transformers counterpart: no export; the encoder's
    # fill-mask demonstration needs a mask token in its prompts.
    path.write_text("data: {datasets: [{name: d, paths: [c.txt]}], seq_len: 32}\n"
                    "tokenizer: {vocab_size: 1000}\nmodel: {preset: tiny}\n"
                    "export: {enabled: false}\ngenerate: {prompts: ['a <mask> b']}\n")
    overrides = [f"--model.family={family}", f"--train.objective={objective}"]
    with pytest.raises(ConfigError, match=r"train.objective.*does not fit model.family") as err:
        load_config(path, overrides)
    assert objective in str(err.value) and family in str(err.value)
    ok = {"decoder": "causal_lm", "encoder": "masked_lm", "encoder_decoder": "denoising"}
    assert load_config(path, [overrides[0], f"--train.objective={ok[family]}"])


def test_special_ids_come_from_the_manifest(shards):
    ids = special_ids(DatasetManifest.read(shards / "manifest.json").tokenizer)
    assert (ids.pad, ids.eos, ids.mask) == (0, 3, MASK_ID)
    assert set(ids.never_masked) == {0, 1, 2, 3, MASK_ID}


def test_objectives_without_a_mask_token_are_a_clear_error(tmp_path):
    written = shard_fixtures().write_shards(tmp_path, {"d": {"train": [4]}}, seq_len=8)
    with pytest.raises(ValueError, match="set tokenizer.mask_token"):
        build_objective("masked_lm", DatasetManifest.read(written.manifest).tokenizer, 1000, False)


def test_corruption_generator_depends_on_coordinates_only():
    draw = [torch.rand(4, generator=corruption_generator(0, 5, 1, 0)) for _ in range(2)]
    assert torch.equal(draw[0], draw[1])
    for other in [(1, 5, 1, 0), (0, 6, 1, 0), (0, 5, 0, 0), (0, 5, 1, 1)]:
        assert not torch.equal(draw[0], torch.rand(4, generator=corruption_generator(*other)))


def _batch(seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    rows = torch.randint(5, 1000, (2, 17), generator=gen)
    rows[1, -3:] = 0  # padding at the end of the last row, as the loader writes it
    labels = rows[:, 1:].masked_fill(rows[:, 1:] == 0, -100)
    return {"input_ids": rows[:, :-1], "labels": labels}


@pytest.mark.parametrize("family", ["encoder", "encoder_decoder"])
def test_objective_is_reproducible_and_counts_real_tokens(shards, family):
    torch.manual_seed(0)
    model = _model(family).build()
    ids = special_ids(DatasetManifest.read(shards / "manifest.json").tokenizer)
    objective = MaskedLM(ids, 1000, False) if family == "encoder" else Denoising(ids)
    batch = _batch()
    cpu = torch.device("cpu")
    first = objective(model, batch, cpu, corruption_generator(0, 3, 0, 0))
    again = objective(model, batch, cpu, corruption_generator(0, 3, 0, 0))
    other = objective(model, batch, cpu, corruption_generator(0, 4, 0, 0))
    value = first.loss.item()
    assert math.isfinite(value) and value > 0
    assert value == again.loss.item() and value != other.loss.item()
    assert first.tokens == 2 * 16 - 2  # the last row's input ends in 2 of its 3 pads
    if family == "encoder":
        assert 0 < first.targets < first.tokens  # ~15% of the real tokens are predicted
    else:
        assert first.targets == first.tokens  # the decoder reconstructs every real token
    first.loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def _config(shards: Path, tmp_path: Path, family: str, objective: str) -> Path:
    model = ", ".join(f"{k}: {v}" for k, v in TINY.items())
    masking = "true" if family == "encoder" else "false"
    path = tmp_path / f"{family}.yaml"
    path.write_text(
        f"name: {family}\n"
        f"data:\n  datasets: [{{name: d, paths: [unused.txt]}}]\n  output_dir: {shards}\n"
        f"  seq_len: 32\n  loader: {{document_masking: {masking}}}\n"
        "tokenizer: {vocab_size: 1000}\n"
        f"model: {{preset: tiny, family: {family}, {model}}}\n"
        f"train: {{objective: {objective}, micro_batch_size: 4, log_every: 1, eval_every: 0,\n"
        "        eval_batches: 2, warmup_steps: 2, lr: 0.003, precision: fp32}\n"
        "tracking: {enabled: false}\nexport: {enabled: false}\n"
        "generate: {prompts: ['a <mask> b']}\n"
    )
    return path


def _val_loss(run_dir: Path) -> float:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["val/loss"] for r in records if "val/loss" in r][-1]


@pytest.mark.slow
def test_masked_lm_trains_an_encoder(shards, tmp_path):
    config = _config(shards, tmp_path, "encoder", "masked_lm")
    run = tmp_path / "run"
    finish(train(config, run, "--train.max_steps=10"))
    loss = losses(run)
    assert sorted(loss) == list(range(1, 11))
    assert all(math.isfinite(v) for v in loss.values())
    assert loss[10] < loss[1] - 0.2, loss
    assert math.isfinite(_val_loss(run))


@pytest.mark.slow
def test_denoising_trains_an_encoder_decoder_and_resumes_exactly(shards, tmp_path):
    config = _config(shards, tmp_path, "encoder_decoder", "denoising")
    common = ["--train.max_steps=8", "--train.checkpoint_every=4", "--deepspeed.zero_stage=2"]
    straight = tmp_path / "straight"
    finish(train(config, straight, *common))
    resumed = tmp_path / "resumed"
    finish(train(config, resumed, *common,
                 resume=str(straight / "checkpoints" / "step_00000004")))
    a, b = losses(straight), losses(resumed)
    assert all(math.isfinite(v) for v in a.values())
    assert a[8] < a[1] - 0.5, a
    assert [b[s] for s in range(5, 9)] == [a[s] for s in range(5, 9)]
    assert math.isfinite(_val_loss(straight))
