"""Continue pretraining from a Hugging Face folder through `lmforge train`: a tiny Llama 3
style source (rope_type llama3, saved with transformers), imported with the gate passing on
rank 0, loaded into a ZeRO-3 model built partitioned (`deepspeed.zero.Init`), trained a few
steps at a negligible learning rate, and exported back as
LlamaForCausalLM with the source's rope parameters: the export's logits are the source's."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch
import transformers
from engine_helpers import finish, shard_fixtures, train
from safetensors.torch import load_file

from lmforge.launch.config import ExportConfig, load_resolved
from lmforge.launch.export.from_checkpoint import export_checkpoint, load_trained_model
from lmforge.pipeline.contract.dataset_manifest import DatasetManifest
from lmforge.pipeline.contract.dataset_tokenizer import file_sha256

pytestmark = pytest.mark.slow

ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16, "rope_theta": 10000.0}
CONFIG = """\
name: continue
data:
  datasets: [{{name: d, paths: [unused.txt]}}]
  output_dir: {data}
  seq_len: 32
tokenizer: {{vocab_size: 1000}}
init: {{source: {source}}}
train:
  micro_batch_size: 2
  max_steps: 3
  lr: 1.0e-12
  warmup_steps: 0
  lr_schedule: constant
  log_every: 1
  eval_every: 0
  eval_batches: 1
  precision: fp32
tracking: {{enabled: false}}
deepspeed: {{zero_stage: 3}}  # built under zero.Init, the source copied into the partitions
"""


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> tuple[Path, Path, str]:
    """(source folder, run directory, training output) of one `lmforge train`."""
    spec = importlib.util.spec_from_file_location(
        "test_export", Path(__file__).parents[1] / "export" / "test_export.py")
    test_export = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(test_export)
    train_spm = test_export.train_spm

    tmp = tmp_path_factory.mktemp("continue")
    shard_fixtures().write_shards(tmp / "data", {"d": {"train": [32], "val": [8]}}, seq_len=32)
    spm_model = train_spm(tmp / "spm")  # the export writes and verifies a real tokenizer
    shutil.copyfile(spm_model, tmp / "data" / "tokenizer.model")
    manifest = tmp / "data" / "manifest.json"
    layout = json.loads(manifest.read_text())
    layout["tokenizer"]["sha256"] = file_sha256(spm_model)
    manifest.write_text(json.dumps(layout))

    torch.manual_seed(0)
    source = tmp / "llama3-source"
    config = transformers.LlamaConfig(
        vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        initializer_range=0.1, rope_parameters=dict(ROPE), bos_token_id=2, eos_token_id=3)
    transformers.LlamaForCausalLM(config).save_pretrained(source)
    path = tmp / "continue.yaml"
    path.write_text(CONFIG.format(data=tmp / "data", source=source))
    run_dir = tmp / "run"
    out = finish(train(path, run_dir))
    return source, run_dir, out


def test_import_gate_passes_and_export_reproduces_the_source(run, tmp_path):
    source, run_dir, out = run
    assert "import verified: LlamaForCausalLM max |logit diff| lmforge vs transformers" in out
    assert "greedy tokens identical (8 tokens)" in out

    cfg = load_resolved(run_dir)  # the model section came from the source's config.json
    assert cfg.model.rope_scaling == {k: v for k, v in ROPE.items() if k != "rope_theta"}
    model = load_trained_model(cfg.model, run_dir / "checkpoints")
    manifest = DatasetManifest.read(Path(cfg.data.output_dir) / "manifest.json")
    export = export_checkpoint(model, cfg.model, ExportConfig(), manifest, tmp_path / "export")

    exported = json.loads((export / "config.json").read_text())
    assert exported["architectures"] == ["LlamaForCausalLM"]
    assert exported["rope_parameters"] == ROPE
    assert exported["initializer_range"] == 0.1  # a source field kept
    ids = torch.randint(0, 1000, (2, 32), generator=torch.Generator().manual_seed(5))
    logits = []
    for folder in (source, export):
        hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        with torch.no_grad():
            logits.append(hf.eval()(input_ids=ids).logits)
    assert (logits[0] - logits[1]).abs().max().item() <= 1e-4

    # bf16 weights in shards with an index: transformers reads what it reads of the source
    # cast to bf16.
    bf16 = export_checkpoint(model, cfg.model,
                             ExportConfig(dtype="bf16", max_shard_size="100KB"), manifest,
                             tmp_path / "export-bf16")
    index = json.loads((bf16 / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1
    for name in shards:  # within the limit, unless one tensor alone exceeds it (embeddings)
        tensors = load_file(bf16 / name)
        size = sum(t.numel() * t.element_size() for t in tensors.values())
        assert size <= 100_000 or len(tensors) == 1
    assert json.loads((bf16 / "config.json").read_text())["dtype"] == "bfloat16"
    rounded = transformers.AutoModelForCausalLM.from_pretrained(source, dtype=torch.bfloat16)
    exported = transformers.AutoModelForCausalLM.from_pretrained(bf16, dtype=torch.float32)
    with torch.no_grad():
        expected = rounded.float().eval()(input_ids=ids).logits
        assert (exported.eval()(input_ids=ids).logits - expected).abs().max().item() <= 1e-4
