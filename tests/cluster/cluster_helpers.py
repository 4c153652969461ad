"""Helpers of the cluster tests: the tiny job's overrides, running the ``lmforge`` CLI,
reading a run's metrics."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "configs" / "tiny.yaml"
CORPUS = REPO / "configs" / "corpora" / "tinyshakespeare.txt"
STEPS = 60


def tiny_overrides(tmp: Path) -> list[str]:
    """The small job every cluster test runs: tests/test_end_to_end.py's sizes."""
    return [
        f"--data.output_dir={tmp / 'data'}",
        f"--data.datasets.0.paths=[{tmp / 'shakespeare.txt'}]",
        "--data.seq_len=64",
        "--tokenizer.vocab_size=512",
        "--model.n_layers=2",
        "--model.d_model=64",
        "--model.n_heads=4",
        "--model.n_kv_heads=2",
        "--model.d_ff=192",
        f"--train.max_steps={STEPS}",
        "--train.checkpoint_every=0",
        "--train.eval_every=0",
        "--train.eval_batches=2",
        "--train.log_every=1",
        "--train.warmup_steps=5",
        "--tracking.experiment=cluster",
        "--tracking.system_metrics=false",
        "--eval.tasks={}",  # tiny.yaml's downstream tasks: scored in tests/test_end_to_end.py
    ]


def write_corpus(tmp: Path) -> None:
    text = CORPUS.read_text(encoding="utf-8")[:200_000]
    (tmp / "shakespeare.txt").write_text(text, encoding="utf-8")


def lmforge(*args: str, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    """Runs the CLI as a user would; fails the test with its output on a non-zero exit."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "lmforge.launch.cli", *args],
        capture_output=True, text=True, cwd=cwd, timeout=timeout, env=env,
    )
    assert proc.returncode == 0, (
        f"lmforge {' '.join(args[:2])} failed ({proc.returncode}):\n"
        f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    )
    return proc


def metrics(run_dir: Path, key: str = "train/loss") -> dict[int, float]:
    """``{step: value}`` from the run's metrics.jsonl; later lines win for a repeated step."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return {}
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {r["step"]: r[key] for r in records if key in r}


def free_port_block(size: int, start: int = 30000, stop: int = 60000) -> int:
    """The first port of ``size`` consecutive free TCP ports (a Ray node needs many)."""
    import random
    import socket

    for _ in range(200):
        base = random.randrange(start, stop - size)
        try:
            for port in range(base, base + size):
                with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
                    sock.bind(("127.0.0.1", port))
        except OSError:
            continue
        return base
    raise RuntimeError(f"no {size} consecutive free ports between {start} and {stop}")


def ray_node_ports(base: int) -> list[str]:
    """Every port a Ray node opens, from ``base`` on, so nothing collides with other Rays."""
    return [
        f"--node-manager-port={base + 1}", f"--object-manager-port={base + 2}",
        f"--dashboard-agent-listen-port={base + 3}", f"--dashboard-agent-grpc-port={base + 4}",
        f"--metrics-export-port={base + 5}", f"--runtime-env-agent-port={base + 6}",
        f"--min-worker-port={base + 10}", f"--max-worker-port={base + 39}",
    ]


def session_members(sid: int) -> list[int]:
    """Processes in session ``sid`` (Ray's workers leave its process group, not its session)."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid:  # field 6 of /proc/PID/stat: the session id
            members.append(int(stat.parent.name))
    return members
