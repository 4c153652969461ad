"""A Hugging Face folder as `init.source` when the config loads: the model section comes
from its config.json, a contradicting `model.<key>` is named, what lmforge cannot represent
is refused by `--dry-run` before any process starts, and the data must carry the source's
tokenizer (checked against the dataset before training)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from engine_helpers import REPO, shard_fixtures

from lmforge.launch.config import ConfigError, load_config
from lmforge.launch.config.dataset_check import DatasetMismatchError, config_for_dataset
from lmforge.pipeline.contract.dataset_manifest import DatasetManifest

QWEN2 = {
    "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "vocab_size": 1000,
    "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64,
    "rms_norm_eps": 1e-6, "hidden_act": "silu", "tie_word_embeddings": True,
    "use_sliding_window": False, "sliding_window": 4096, "max_window_layers": 2,
    "rope_parameters": {"rope_type": "yarn", "factor": 2.0, "rope_theta": 1e6,
                        "original_max_position_embeddings": 32},
}
BASE = """\
name: hf
data: {{datasets: [{{name: d, paths: [unused.txt]}}], output_dir: {data}, seq_len: 16}}
tokenizer: {{vocab_size: 1000}}
init: {{source: {source}}}
"""


def _folder(tmp: Path, name: str, config: dict) -> Path:
    folder = tmp / name
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("hfsource") / "data"
    shard_fixtures().write_shards(root, {"d": {"train": [4], "val": [4]}}, seq_len=16)
    return root


def _load(tmp: Path, data: Path, source: Path, extra: str = "", *overrides: str):
    path = tmp / "run.yaml"
    path.write_text(BASE.format(data=data, source=source) + extra)
    return load_config(path, list(overrides))


def test_model_section_comes_from_config_json(tmp_path, data):
    source = _folder(tmp_path, "qwen2", QWEN2)
    cfg = _load(tmp_path, data, source, "model: {dropout: 0.1, d_model: 64}\n")
    model = cfg.model
    assert (model.d_model, model.n_layers, model.n_heads, model.kv_heads, model.ffn_dim,
            model.vocab_size, model.max_seq_len) == (64, 2, 4, 2, 128, 1000, 64)
    assert (model.bias, model.qkv_bias, model.qk_norm, model.tie_embeddings) == (
        False, True, False, True)
    assert model.rope_theta == 1e6
    assert model.rope_scaling == {"rope_type": "yarn", "factor": 2.0,
                                  "original_max_position_embeddings": 32}
    assert model.dropout == 0.1  # a training choice the run may make
    assert model.hf_config["architectures"] == ["Qwen2ForCausalLM"]


@pytest.mark.parametrize("extra, message", [
    ("model: {d_model: 128}\n", r"run.yaml:5: model\.d_model: model\.d_model=128 contradicts "
                                r"init.source's config.json \(.*gives model\.d_model=64\); "
                                r"remove it"),
    ("model: {preset: tiny}\n", r"run.yaml:5: model\.preset: model\.\w+=.* \(model\.preset "
                                r"tiny sets it\) contradicts"),
])
def test_a_contradicting_model_key_is_named(tmp_path, data, extra, message):
    source = _folder(tmp_path, "qwen2", QWEN2)
    with pytest.raises(ConfigError, match=message):
        _load(tmp_path, data, source, extra)


def test_dry_run_refuses_an_unknown_rope_type_before_any_process(tmp_path, data):
    config = {**QWEN2, "rope_parameters": {"rope_type": "longrope", "rope_theta": 1e6,
                                           "short_factor": [1.0], "long_factor": [1.0]}}
    source = _folder(tmp_path, "longrope", config)
    path = tmp_path / "run.yaml"
    path.write_text(BASE.format(data=data, source=source))
    run_dir = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "lmforge.launch.cli", "train", str(path),
                           "--dry-run", f"--run_dir={run_dir}"], capture_output=True,
                          text=True, cwd=REPO, timeout=120)
    assert proc.returncode != 0
    assert "init.source" in proc.stderr
    assert "rope_parameters.rope_type: 'longrope' is not supported" in proc.stderr
    assert not run_dir.exists()


def test_the_data_must_be_encoded_with_the_sources_tokenizer(tmp_path, data):
    from tokenizers import Tokenizer, models

    source = _folder(tmp_path, "qwen2", QWEN2)
    Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]")).save(
        str(source / "tokenizer.json"))
    cfg = _load(tmp_path, data, source)
    with pytest.raises(DatasetMismatchError) as err:
        config_for_dataset(cfg, DatasetManifest.read(data))
    assert f"init.source: {source} is a hf tokenizer, the data was encoded with a " \
           "sentencepiece one" in str(err.value)
    assert f"prepare {data} with tokenizer.model_path={source}" in str(err.value)


def test_a_preset_that_describes_the_source_is_accepted(tmp_path, data):
    """Fine-tuning from an lmforge export with the config that trained it."""
    from lmforge.model import ModelConfig, to_hf

    cfg = ModelConfig.from_preset("tiny", vocab_size=1000)
    config, _ = to_hf(cfg, cfg.build().state_dict())
    source = _folder(tmp_path, "export", config)
    loaded = _load(tmp_path, data, source, "model: {preset: tiny, dropout: 0.1}\n").model
    assert (loaded.d_model, loaded.n_layers, loaded.ffn_dim, loaded.dropout) == (
        cfg.d_model, cfg.n_layers, cfg.ffn_dim, 0.1)


@pytest.mark.parametrize("text, size", [("5GB", 5 * 10**9), ("500MB", 5 * 10**8),
                                        ("100KB", 10**5), ("12345", 12345), (2048, 2048)])
def test_export_shard_sizes(text, size):
    from lmforge.launch.config import ExportConfig

    assert ExportConfig(max_shard_size=text).max_shard_bytes() == size


def test_a_malformed_shard_size_is_refused():
    from lmforge.launch.config import ExportConfig

    with pytest.raises(ValueError, match="max_shard_size: '5 parsecs' is not a size"):
        ExportConfig(max_shard_size="5 parsecs")


def test_a_missing_source_folder_names_the_script_that_makes_it(tmp_path):
    """`lmforge run configs/tiny-continue.yaml --dry-run` before the model folder exists: a
    named error (the model section would otherwise silently be the default one)."""
    missing = tmp_path / "open-model"
    with pytest.raises(ConfigError, match=r"init\.source \(set by --init\.source=\.\.\.\): "
                       r".*open-model does not exist.*"
                       r"python configs/make_open_model\.py .*open-model"):
        load_config(REPO / "configs" / "tiny-continue.yaml", [f"--init.source={missing}"])
