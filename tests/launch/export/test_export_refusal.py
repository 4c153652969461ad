"""Configs no transformers class represents are refused before anything runs, naming the
closest class and the fields that differ; the 2017 base model has its published size."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from lmforge.launch.config import ConfigError, load_config

CONFIGS = Path(__file__).resolve().parents[3] / "configs"


def lmforge(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lmforge.launch.cli", *args],
                          capture_output=True, text=True, timeout=300)


def test_transformer_base_dry_run_shows_the_papers_65m_parameters():
    proc = lmforge("run", str(CONFIGS / "transformer-base.yaml"), "--dry-run")
    assert proc.returncode == 0, proc.stderr
    count = int(re.search(r"# parameters: ([\d,]+)", proc.stdout).group(1).replace(",", ""))
    # Vaswani et al. 2017, Table 3: 65M for the base model (d 512, 6+6 layers, 37k vocab).
    assert 63e6 <= count <= 65e6, count
    assert "enabled: false" in proc.stdout.split("export:")[-1]


def test_exporting_the_2017_model_is_refused_at_dry_run():
    proc = lmforge("run", str(CONFIGS / "transformer-base.yaml"), "--dry-run",
                   "--export.enabled=true")
    assert proc.returncode == 2
    err = proc.stderr
    assert "lmforge: config error: export.enabled" in err
    assert "no transformers class represents this model exactly" in err
    assert "the closest, MarianMTModel, differs in position='sinusoidal'" in err
    assert "norm_eps=1e-06 (needs 1e-05)" in err
    assert "set export.enabled=false" in err


@pytest.mark.parametrize("config,override,closest,field", [
    ("tiny-bert.yaml", "--model.norm_position=pre", "BertForMaskedLM", "norm_position='pre'"),
    ("tiny-bert.yaml", "--model.position=rope", "BertForMaskedLM", "position='rope'"),
    ("tiny-seq2seq.yaml", "--model.norm_eps=1e-6", "BartForConditionalGeneration",
     "norm_eps=1e-06"),
    ("tiny.yaml", "--model.norm=layernorm", "LlamaForCausalLM", "norm='layernorm'"),
])
def test_unrepresentable_family_configs_are_refused_before_training(config, override, closest,
                                                                     field):
    with pytest.raises(ConfigError) as err:
        load_config(CONFIGS / config, [override])
    message = str(err.value)
    assert f"{config}: export.enabled: no transformers class represents" in message
    assert f"the closest, {closest}, differs in {field}" in message
    # Without an export the same model trains.
    assert load_config(CONFIGS / config, [override, "--export.enabled=false"])


def test_bundled_family_configs_pass_their_checks():
    for name in ("tiny.yaml", "tiny-bert.yaml", "tiny-seq2seq.yaml"):
        cfg = load_config(CONFIGS / name)
        assert cfg.export.enabled
    assert load_config(CONFIGS / "tiny-bert.yaml").train.objective == "masked_lm"
    assert load_config(CONFIGS / "tiny-seq2seq.yaml").train.objective == "denoising"


def test_fill_mask_prompts_need_the_mask_token():
    with pytest.raises(ConfigError, match=r"generate.prompts.*needs '<mask>' in every prompt"):
        load_config(CONFIGS / "tiny-bert.yaml", ["--generate.prompts=[no mask here]"])


def test_a_negative_tolerance_is_refused():
    with pytest.raises(ConfigError, match=r"export.verify_atol.*must be >= 0, got -1"):
        load_config(CONFIGS / "tiny.yaml", ["--export.verify_atol=-1"])
