"""Every architecture `init.source` imports, through a real `lmforge train` (DeepSpeed, one
rank): a tiny random `transformers` model of each class is saved, imported with the gate's
line printed, trained 2 steps at a negligible learning rate, and exported back to its class;
`transformers` on the export gives the source's logits (<= 1e-4).

Llama 3 (rope_type llama3, ZeRO-3) has its own launch in test_hf_continue.py. The other rope
types ride on the other Llama-layout classes, whose RoPE is the same code in lmforge and in
transformers (`rope_parameters` is class-independent in transformers 5): Mistral with linear
scaling; Qwen2 (q/k/v biases, tied embeddings) with YaRN as Qwen2.5's long-context configs
use it, on data encoded with its own tokenizer.json; Qwen3 (q/k norms) with plain RoPE and
heads twice hidden / heads wide (Qwen3-0.6B's `head_dim`). GPT-2 trains as a causal LM, BERT
with its masked LM objective, BART with its denoising one.

One launch per class: a stage graph would start as many processes (each stage is a torchrun
of its own) and its stages share the top level's model section, which the worker checks
each source against. The launches run two at a time (a launch's start-up keeps one core
busy): ~50 CPU-seconds for the six.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import transformers
from engine_helpers import finish, shard_fixtures, train

from lmforge.launch.config import ExportConfig, load_resolved
from lmforge.launch.export.from_checkpoint import export_checkpoint, load_trained_model
from lmforge.pipeline.contract.dataset_manifest import DatasetManifest
from lmforge.pipeline.contract.dataset_tokenizer import file_sha256

pytestmark = pytest.mark.slow

CORPUS = Path(__file__).resolve().parents[3] / "configs" / "corpora" / "tinyshakespeare.txt"
V = 1000  # the fixture shards' vocabulary, and the sentencepiece model's the export writes
MASK_ID = 4  # train_spm's first user-defined symbol, <mask>
_DECODER = dict(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                initializer_range=0.1, bos_token_id=2, eos_token_id=3, pad_token_id=0)
SOURCES = {  # name: (config class, model class, config kwargs, objective)
    "mistral-linear": ("MistralConfig", "MistralForCausalLM", dict(
        _DECODER, sliding_window=None, rope_parameters={
            "rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0}), "causal_lm"),
    "qwen2-yarn": ("Qwen2Config", "Qwen2ForCausalLM", dict(
        _DECODER, tie_word_embeddings=True, rope_parameters={
            "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16,
            "rope_theta": 10000.0}), "causal_lm"),
    # Qwen3-0.6B's shape in small: heads wider than hidden / heads (q_proj 64 -> 128).
    "qwen3-head-dim": ("Qwen3Config", "Qwen3ForCausalLM", dict(_DECODER, head_dim=32),
                       "causal_lm"),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", dict(
        vocab_size=V, n_embd=64, n_layer=2, n_head=4, n_positions=64, initializer_range=0.1,
        bos_token_id=2, eos_token_id=3), "causal_lm"),
    "bert": ("BertConfig", "BertForMaskedLM", dict(
        vocab_size=V, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=96, max_position_embeddings=64, initializer_range=0.1,
        pad_token_id=0), "masked_lm"),
    "bart": ("BartConfig", "BartForConditionalGeneration", dict(
        vocab_size=V, d_model=64, encoder_layers=2, decoder_layers=2,
        encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=96,
        decoder_ffn_dim=96, max_position_embeddings=64, init_std=0.1, pad_token_id=0,
        bos_token_id=2, eos_token_id=3, decoder_start_token_id=3), "denoising"),
}
CONFIG = """\
name: {name}
data:
  datasets: [{{name: d, paths: [unused.txt]}}]
  output_dir: {data}
  seq_len: 32
tokenizer: {{{tokenizer}}}
init: {{source: {source}}}
train:
  objective: {objective}
  micro_batch_size: 2
  global_batch_size: 2
  max_steps: 2
  lr: 1.0e-12
  warmup_steps: 0
  lr_schedule: constant
  log_every: 1
  eval_every: 0
  eval_batches: 1
  precision: fp32
tracking: {{enabled: false}}
generate: {{prompts: ["The <mask> is"]}}  # the fill-mask demonstration needs the mask
deepspeed: {{zero_stage: 0}}
launch: {{nproc_per_node: 1}}
"""
PARALLEL = 2


def _data(tmp: Path) -> Path:
    """Fixture shards whose manifest names a real sentencepiece model (the export writes and
    verifies the tokenizer) with a <mask> piece (the masked LM and denoising objectives)."""
    spec = importlib.util.spec_from_file_location(
        "test_export", Path(__file__).parents[1] / "export" / "test_export.py")
    test_export = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(test_export)
    data = tmp / "data"
    shard_fixtures().write_shards(data, {"d": {"train": [8], "val": [4]}}, seq_len=32)
    spm_model = test_export.train_spm(tmp / "spm")
    shutil.copyfile(spm_model, data / "tokenizer.model")
    manifest = data / "manifest.json"
    layout = json.loads(manifest.read_text())
    layout["tokenizer"]["sha256"] = file_sha256(spm_model)
    layout["tokenizer"]["special_tokens"] = {"mask": {"piece": "<mask>", "id": MASK_ID}}
    manifest.write_text(json.dumps(layout))
    return data


def _qwen_tokenizer_data(tmp: Path, source: Path) -> Path:
    """Fixture shards whose tokenizer is the source's own: a Qwen2 byte-level BPE trained with
    transformers' `Qwen2Tokenizer` (AutoTokenizer loads every `qwen2` folder with that class,
    whatever tokenizer_config.json says, so a sentencepiece tokenizer cannot go out with it)."""
    from lmforge.pipeline.config import TokenizerConfig
    from lmforge.pipeline.prepare.tokenizer import describe_tokenizer

    lines = CORPUS.read_text(encoding="utf-8").splitlines()[:5000]
    tokenizer = transformers.Qwen2Tokenizer().train_new_from_iterator(lines, vocab_size=V)
    tokenizer.save_pretrained(source)
    data = tmp / "data-qwen2"
    shard_fixtures().write_shards(data, {"d": {"train": [8], "val": [4]}}, seq_len=32)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(source / name, data / name)
    manifest = data / "manifest.json"
    layout = json.loads(manifest.read_text())
    layout["tokenizer"] = describe_tokenizer(source, TokenizerConfig())
    manifest.write_text(json.dumps(layout))
    return data


def save_source(name: str, folder: Path) -> Path:
    """A tiny random `transformers` model of `SOURCES[name]`, saved as a model folder."""
    config_class, model_class, kwargs, _ = SOURCES[name]
    torch.manual_seed(0)
    config = getattr(transformers, config_class)(**kwargs)
    getattr(transformers, model_class)(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, tuple[Path, Path, str]]:
    """name → (source folder, run directory, `lmforge train` output), one launch per source."""
    tmp = tmp_path_factory.mktemp("architectures")
    data = _data(tmp)
    pending: list[tuple[str, Path, Path]] = []
    for name, (_, _, _, objective) in SOURCES.items():
        source = save_source(name, tmp / f"{name}-source")
        own, tokenizer = data, f"vocab_size: {V}"
        if name.startswith("qwen2"):
            own, tokenizer = _qwen_tokenizer_data(tmp, source), f"model_path: {source}"
        config = tmp / f"{name}.yaml"
        config.write_text(CONFIG.format(name=name, data=own, tokenizer=tokenizer,
                                        source=source, objective=objective))
        pending.append((name, source, config))
    results: dict[str, tuple[Path, Path, str]] = {}
    running: list[tuple[str, Path, Path, subprocess.Popen]] = []
    try:
        while pending or running:
            while pending and len(running) < PARALLEL:
                name, source, config = pending.pop(0)
                run_dir = tmp / f"{name}-run"
                running.append((name, source, run_dir, train(config, run_dir)))
            name, source, run_dir, proc = running.pop(0)
            results[name] = (source, run_dir, finish(proc))
    finally:  # after a failed launch, the one beside it still ends before the test does
        for *_, proc in running:
            proc.communicate(timeout=600)
    return results


def _logits(folder: Path, ids: torch.Tensor) -> torch.Tensor:
    config = json.loads((folder / "config.json").read_text())
    model = getattr(transformers, config["architectures"][0]).from_pretrained(
        folder, dtype=torch.float32).eval()
    with torch.no_grad():
        if config["model_type"] == "bart":
            return model(input_ids=ids, decoder_input_ids=ids.flip(1)).logits
        return model(input_ids=ids).logits


@pytest.mark.parametrize("name", list(SOURCES))
def test_launch_imports_verified_and_exports_the_source(runs, name, tmp_path):
    source, run_dir, out = runs[name]
    model_class = SOURCES[name][1]
    assert f"import verified: {model_class} max |logit diff| lmforge vs transformers" in out
    assert "greedy tokens identical" in out or name == "bert", out[-3000:]  # BERT: no greedy

    cfg = load_resolved(run_dir)  # the model section came from the source's config.json
    model = load_trained_model(cfg.model, run_dir / "checkpoints")
    manifest = DatasetManifest.read(Path(cfg.data.output_dir) / "manifest.json")
    export = export_checkpoint(model, cfg.model, ExportConfig(), manifest, tmp_path / "export")

    exported = json.loads((export / "config.json").read_text())
    original = json.loads((source / "config.json").read_text())
    assert exported["architectures"] == [model_class]
    for key in ("rope_parameters", "tie_word_embeddings", "head_dim", "initializer_range",
                "init_std"):
        if key in original:
            assert exported.get(key) == original[key], key
    ids = torch.randint(5, V, (2, 32), generator=torch.Generator().manual_seed(5))
    diff = (_logits(export, ids) - _logits(source, ids)).abs().max().item()
    assert diff <= 1e-4, f"{name}: export vs source max |logit diff| {diff}"
