"""benchmarks/gpu.py's CPU smoke run: every check's logic at a tiny size, as the GPU machine
would run it (without mlflow, ray, webdataset, transformers or zstandard, which it lacks).

The GPU figures themselves need a lent H100/H200 (see the script's docstring).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MISSING_ON_GPU_MACHINE = "mlflow,ray,webdataset,transformers,zstandard"


@pytest.mark.slow  # two real `lmforge train` runs (DeepSpeed, 1 process each)
def test_gpu_check_dry_run_passes_every_check(tmp_path):
    env = {**os.environ, "LMFORGE_BLOCK_IMPORTS": MISSING_ON_GPU_MACHINE,
           "PYTHONPATH": str(REPO / "tests" / "gpu_check_blocker")}
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "gpu.py"), "--dry-run", "--out",
         str(tmp_path)], capture_output=True, text=True, timeout=600, cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = [json.loads(line[len("BENCH "):]) for line in proc.stdout.splitlines()
             if line.startswith("BENCH ")]
    metrics = {line["metric"]: line for line in lines}
    assert set(metrics) == {"gloo_collectives", "tiny_bf16_gloo", "sdpa_kernel_causal",
                            "sdpa_kernel_document_mask", "fused_adamw", "mfu_1b",
                            "gpu_check_passed"}
    assert all(line["detail"]["ok"] for line in lines), [m for m in lines if not m["detail"]["ok"]]
    # The script's PaLM-formula MFU and lmforge's logged train/mfu count the same FLOPs
    # (they differ only by norms and the like): two computations, one answer.
    assert metrics["mfu_1b"]["detail"]["lmforge_vs_palm"] == pytest.approx(1.0, abs=0.01)
    # The 1B run is as a 1B pretraining runs: compiled blocks, packed documents masked, and
    # its MFU beside the published figure for a 1B model on one H100 (OLMo-core's README).
    one_b = metrics["mfu_1b"]["detail"]
    assert one_b["compile"] and one_b["document_masking"]
    assert one_b["reference"]["mfu"] == 0.40 and "OLMo-core" in one_b["reference"]["source"]
    assert "# mfu_1b:" in proc.stdout and "published" in proc.stdout
    assert json.loads((tmp_path / "gpu-bench.json").read_text()) == dict.fromkeys(metrics, True)
