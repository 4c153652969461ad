"""Bad configs stop `lmforge train` before any process starts: exit 2, a named error, and no
file written in the run directory (one real CLI subprocess per fault)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from engine_helpers import REPO, shard_fixtures

TINY = REPO / "configs" / "tiny.yaml"


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """A dataset prepared at seq_len 16 with a 1000-piece tokenizer and no mask token."""
    root = tmp_path_factory.mktemp("bad-configs") / "data"
    shard_fixtures().write_shards(root, {"d": {"train": [4], "val": [4]}}, seq_len=16)
    return root


CASES = {
    "zero_stage_4": (["--deepspeed.zero_stage=4"],
                     "deepspeed.zero_stage (set by --deepspeed.zero_stage=...): must be 0, 1, 2 "
                     "or 3, got 4"),
    "seq_len_above_positions": (["--data.seq_len=100000"],
                                "model.max_seq_len: 512 is shorter than data.seq_len 100000"),
    "vocab_smaller_than_tokenizer": (["--model.vocab_size=512", "--tokenizer.vocab_size=300"],
                                     "model.vocab_size: 512, but the tokenizer {data} was "
                                     "prepared with has 1000 pieces"),
    "no_mask_token_for_masked_lm": (["--model.family=encoder", "--train.objective=masked_lm",
                                     "--model.position=learned", "--model.vocab_size=null",
                                     "--generate.prompts=[a <mask> b]", "--export.enabled=false"],
                                    "train.objective: masked_lm needs a mask token"),
    "global_batch_does_not_divide": (["--train.global_batch_size=17"],
                                     "train.global_batch_size (set by --train.global_batch_size"
                                     "=...): 17 != micro_batch_size 8 x grad_accum_steps 1 x "
                                     "world size 2 (= 16)"),
    "unknown_preset": (["--model.preset=gpt5"], "model.preset (set by --model.preset=...): "
                                               "unknown preset 'gpt5'; known: "),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_config_fails_before_anything_starts(case, data, tmp_path):
    overrides, expected = CASES[case]
    run_dir = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "lmforge.launch.cli", "train", str(TINY), f"--run_dir={run_dir}",
         f"--data.output_dir={data}", "--data.seq_len=16", "--tokenizer.vocab_size=1000",
         *overrides],
        capture_output=True, text=True, timeout=300, cwd=REPO,
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.startswith("lmforge: config error: "), proc.stderr
    assert expected.format(data=data) in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
    assert not run_dir.exists() or not any(run_dir.rglob("*")), list(run_dir.rglob("*"))
