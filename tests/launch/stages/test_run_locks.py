"""One process per run directory, no prepare under a running job (issue 21 item 5): a second
`lmforge train`/`run` on a run directory in use, and a `lmforge prepare` of the dataset a job
is training on, are refused at once naming the holder, and the running job is untouched."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from engine_helpers import shard_fixtures, train

pytestmark = pytest.mark.slow

LMFORGE = [sys.executable, "-m", "lmforge.launch.cli"]
CONFIG = """\
name: locks
data:
  datasets: [{{name: d, paths: [{corpus}]}}]
  output_dir: {data}
  seq_len: 32
tokenizer: {{vocab_size: 1000}}
model: {{preset: tiny, n_layers: 1, d_model: 32, n_heads: 2, n_kv_heads: 2, d_ff: 64}}
train: {{micro_batch_size: 4, max_steps: 100000, log_every: 1, eval_every: 0,
         checkpoint_every: 0, warmup_steps: 1}}
export: {{enabled: false}}
tracking: {{enabled: false}}
"""


def wait_for_training(run_dir: Path, proc: subprocess.Popen, timeout: float = 300) -> None:
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        if metrics.exists() and metrics.read_text().count("\n") >= 2:
            return
        time.sleep(0.5)
    raise AssertionError("training did not start")


def test_a_second_job_and_a_prepare_are_refused_while_one_trains(tmp_path: Path) -> None:
    shard_fixtures().write_shards(tmp_path / "data", {"d": {"train": [64], "val": [16]}},
                                  seq_len=32)
    (tmp_path / "corpus.txt").write_text("a line of text\n" * 50)
    config = tmp_path / "locks.yaml"
    config.write_text(CONFIG.format(corpus=tmp_path / "corpus.txt", data=tmp_path / "data"))
    run_dir = tmp_path / "run"
    first = train(config, run_dir)
    try:
        wait_for_training(run_dir, first)
        for command in (["train", str(config), f"--run_dir={run_dir}", "--resume", "auto"],
                        ["run", str(config), f"--run_dir={run_dir}"]):
            proc = subprocess.run([*LMFORGE, *command], capture_output=True, text=True,
                                  timeout=120)
            assert proc.returncode == 1, proc.stderr[-3000:]
            assert f"{run_dir.resolve()} is in use" in proc.stderr
            assert f"pid={first.pid}" in proc.stderr and "purpose=lmforge train" in proc.stderr
        proc = subprocess.run([*LMFORGE, "prepare", str(config)], capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode == 1, proc.stderr[-3000:]
        assert f"{(tmp_path / 'data').resolve()} is in use" in proc.stderr
        assert f"pid={first.pid}" in proc.stderr
        assert first.poll() is None  # the running job was not disturbed
    finally:
        first.send_signal(signal.SIGTERM)
        first.wait(timeout=120)
