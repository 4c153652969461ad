"""`configs/tiny-continue.yaml` end to end, the way the README says: the stand-in open model
made by `configs/make_open_model.py`, then `lmforge run configs/tiny-continue.yaml` (Ray
prepare with the model's own tokenizer.json, the import gate, DeepSpeed on 2 processes, the
export in the source's class, verified). The bundled config file itself is run; only
paths, the corpus (a slice) and the step count are overridden on the command line.

(Before the folder exists, the config names the script that makes it:
tests/launch/config/test_hf_source_config.py.)
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import transformers

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "tiny-continue.yaml"
CORPUS = REPO / "configs" / "corpora" / "tinyshakespeare.txt"
STEPS = 2


def _make_open_model(out: Path) -> Path:
    spec = importlib.util.spec_from_file_location(
        "make_open_model", REPO / "configs" / "make_open_model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.make_open_model(out)


def _lmforge(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lmforge.launch.cli", *args],
                          capture_output=True, text=True, cwd=REPO, timeout=1200)


def test_tiny_continue_imports_trains_and_exports_verified(tmp_path):
    model_dir = tmp_path / "open-model"
    overrides = [
        f"--run_dir={tmp_path / 'run'}", f"--data.output_dir={tmp_path / 'data'}",
        f"--init.source={model_dir}", f"--tokenizer.model_path={model_dir}",
        f"--train.max_steps={STEPS}", f"--train.eval_every={STEPS}", "--train.eval_batches=1",
        "--train.warmup_steps=1", "--train.log_every=1", "--tracking.system_metrics=false",
        "--generate.max_new_tokens=8",
    ]
    _make_open_model(model_dir)
    corpus = tmp_path / "shakespeare.txt"
    corpus.write_text(CORPUS.read_text(encoding="utf-8")[:150_000], encoding="utf-8")
    proc = _lmforge("run", str(CONFIG), *overrides, f"--data.datasets.0.paths=[{corpus}]")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    assert "import verified: LlamaForCausalLM max |logit diff| lmforge vs transformers" in out
    assert "greedy tokens identical (8 tokens)" in out
    assert "export verified: LlamaForCausalLM" in out

    export = tmp_path / "run" / "export"
    config = json.loads((export / "config.json").read_text())
    source = json.loads((model_dir / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["rope_parameters"] == source["rope_parameters"]  # llama3 scaling kept
    ours = transformers.AutoTokenizer.from_pretrained(export)
    theirs = transformers.AutoTokenizer.from_pretrained(model_dir)
    text = "ROMEO:\nBut soft, what light — ça va?"
    assert ours(text)["input_ids"] == theirs(text)["input_ids"]
    summary = json.loads((tmp_path / "run" / "train_summary.json").read_text())
    assert summary["step"] == STEPS, summary
