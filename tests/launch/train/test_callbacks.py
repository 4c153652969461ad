"""The typed Callback API on the real DeepSpeed engine: which events arrive, in which order,
with what (the API user hooks build on)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from engine_helpers import shard_fixtures

pytestmark = pytest.mark.slow

CONFIG = """\
name: callbacks
data:
  datasets: [{{name: d, paths: [unused.txt]}}]
  output_dir: {data}
  seq_len: 16
  loader: {{document_masking: false, shuffle: false}}
tokenizer: {{vocab_size: 1000}}
model: {{preset: tiny, n_layers: 1, d_model: 32, n_heads: 2, n_kv_heads: 1, d_ff: 64}}
train: {{micro_batch_size: 2, max_steps: 4, eval_every: 2, eval_batches: 1,
         checkpoint_every: 2, log_every: 1, warmup_steps: 1, precision: fp32}}
deepspeed: {{zero_stage: 2}}
launch: {{nproc_per_node: 1}}
tracking: {{enabled: false}}
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_callbacks_receive_every_event_in_order(tmp_path: Path) -> None:
    shard_fixtures().write_shards(tmp_path / "data", {"d": {"train": [32], "val": [8]}},
                                  seq_len=16)
    config = tmp_path / "callbacks.yaml"
    config.write_text(CONFIG.format(data=tmp_path / "data"))
    out = tmp_path / "events.json"
    env = {**os.environ, "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "OMP_NUM_THREADS": "1"}
    probe = Path(__file__).resolve().parents[1] / "callback_probe.py"
    proc = subprocess.run([sys.executable, str(probe), str(config), str(tmp_path / "run"),
                           str(out)], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    events = json.loads(out.read_text())
    tokens = 2 * 16  # micro batch 2 x seq_len 16: unshuffled, the padded last row never comes
    step = [["step_end", s, True, tokens] for s in range(1, 5)]
    metrics = ["val_loss", "val_ppl"]
    assert events == [
        ["train_start", 0],
        step[0], step[1],
        ["eval", 2, metrics],
        ["checkpoint", 2, "step_00000002", True],
        step[2], step[3],
        ["eval", 4, metrics],
        ["checkpoint", 4, "step_00000004", True],
        ["train_end", 4],
    ]
