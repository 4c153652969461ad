"""Shared by the engine tests: fixture shards, `lmforge train` as a subprocess, losses."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parents[2]


def shard_fixtures() -> ModuleType:
    """tests/pipeline/shard_fixtures.py: tiny shards in the contract format."""
    path = REPO / "tests" / "pipeline" / "shard_fixtures.py"
    spec = importlib.util.spec_from_file_location("shard_fixtures", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def train(config: Path, run_dir: Path, *overrides: str, resume: str | None = None):
    """Starts `lmforge train CONFIG --run_dir=RUN_DIR OVERRIDES` (2 DeepSpeed processes)."""
    command = [sys.executable, "-m", "lmforge.launch.cli", "train", str(config),
               f"--run_dir={run_dir}", *overrides]
    if resume:
        command += ["--resume", resume]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(proc: subprocess.Popen, expect: int = 0) -> str:
    """Waits for a run and checks its exit status; returns its output."""
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == expect, out[-5000:]
    return out


def losses(run_dir: Path) -> dict[int, float]:
    """Step → mean training loss over ranks, as rank 0 wrote it to metrics.jsonl."""
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["train/loss"] for r in map(json.loads, lines) if "train/loss" in r}
