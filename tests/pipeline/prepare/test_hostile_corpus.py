"""A hostile corpus through the whole Ray job: `lmforge prepare` as a subprocess.

Every kind of bad input at once (a binary file, invalid UTF-8, an empty file, a 100 MB
single line, malformed JSONL, truncated gzip and zstd, a parquet file whose text column is
not text): the job completes, each is counted with its file and line in stats.json and in
MLflow, and the peak memory of every process of the job stays bounded (the 100 MB line is
never held whole: data.max_record_bytes). With `data.strict: true` the job stops at the
first one, naming it.
"""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard
from mlflow import MlflowClient

from lmforge.launch.commands import log_prepared_dataset
from lmforge.launch.config import load_config
from lmforge.launch.tracking import Tracker
from lmforge.pipeline.contract.dataset_manifest import DatasetManifest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[3]
CORPUS = REPO / "configs" / "corpora" / "tinyshakespeare.txt"
HUGE_LINE_MB = 100
RSS_LIMIT_MB = 1000  # per process; a worker holding the line would need several copies of it

CONFIG = """\
name: hostile
data:
  datasets:
    - {{name: text, paths: ["{root}/*.txt", "{root}/*.txt.gz", "{root}/*.txt.zst"],
       txt_unit: paragraph}}
    - {{name: records, paths: ["{root}/*.jsonl", "{root}/*.parquet"], txt_unit: line}}
  output_dir: {out}
  seq_len: 32
  num_workers: 1
  max_record_bytes: 8388608
  shard_target_bytes: 65536
tokenizer: {{vocab_size: 1000, train_text_bytes: 100000}}
"""


def write_corpus(root: Path) -> None:
    root.mkdir()
    text = CORPUS.read_text()[:60_000]
    paragraphs = [p for p in text.split("\n\n") if p.strip()]
    (root / "good.txt").write_text("\n\n".join(paragraphs[:200]) + "\n")
    (root / "binary.txt").write_bytes(b"\x7fELF\x00\x01\x02" * 2000)
    (root / "utf8.txt").write_bytes(b"fine words\n\nbad \xff byte\n\nmore words\n")
    (root / "empty.txt").write_bytes(b"")
    cut = gzip.compress("\n\n".join(paragraphs[200:]).encode())
    (root / "cut.txt.gz").write_bytes(cut[: len(cut) // 2])
    zst = zstandard.ZstdCompressor().compress("\n\n".join(paragraphs[:150]).encode())
    (root / "cut.txt.zst").write_bytes(zst[: len(zst) // 2])
    lines = [json.dumps({"text": p}) for p in paragraphs[:50]]
    lines.insert(3, "{not json")
    (root / "records.jsonl").write_text("\n".join(lines) + "\n")
    with open(root / "huge.jsonl", "wb") as f:  # line 2 is one 100 MB record
        f.write(b'{"text": "before the long line"}\n{"text": "')
        block = b"z" * (1 << 20)
        for _ in range(HUGE_LINE_MB):
            f.write(block)
        f.write(b'"}\n{"text": "after the long line"}\n')
    pq.write_table(pa.table({"text": list(range(20))}), root / "numbers.parquet")


def run_prepare(config: Path, *overrides: str) -> tuple[subprocess.CompletedProcess, float]:
    """`lmforge prepare` with the peak RSS (MB) of any process of its tree, polled."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "lmforge.launch.cli", "prepare", str(config), *overrides],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=config.parent,
    )
    root, peak = psutil.Process(proc.pid), 0.0
    while proc.poll() is None:
        try:
            for p in [root, *root.children(recursive=True)]:
                peak = max(peak, p.memory_info().rss / 2**20)
        except psutil.Error:
            pass
        time.sleep(0.05)
    out, err = proc.communicate(timeout=60)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err), peak


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("hostile")
    write_corpus(root / "in")
    return root


def test_hostile_corpus_is_counted_and_the_job_completes(corpus, tmp_path):
    config = tmp_path / "hostile.yaml"
    config.write_text(CONFIG.format(root=corpus / "in", out=tmp_path / "data"))
    proc, peak_mb = run_prepare(config)
    assert proc.returncode == 0, proc.stderr[-4000:]
    print(f"peak RSS of any process of the prepare job: {peak_mb:.0f} MB")
    assert peak_mb < RSS_LIMIT_MB
    stats = json.loads((tmp_path / "data" / "stats.json").read_text())
    counts = stats["bad_input"]["counts"]
    assert counts == {"binary_file": 1, "invalid_utf8": 1, "empty_file": 1,
                      "record_too_long": 1, "malformed_json": 1,
                      "truncated_or_corrupt_file": 2, "text_not_a_string": 20}, counts
    where = {(e["kind"], Path(e["file"]).name, e["line"]) for e in stats["bad_input"]["examples"]}
    for expected in [("binary_file", "binary.txt", 0), ("invalid_utf8", "utf8.txt", 3),
                     ("empty_file", "empty.txt", 0), ("record_too_long", "huge.jsonl", 2),
                     ("malformed_json", "records.jsonl", 4),
                     ("text_not_a_string", "numbers.parquet", 1)]:
        assert expected in where, (expected, where)
    truncated = {Path(e["file"]).name for e in stats["bad_input"]["examples"]
                 if e["kind"] == "truncated_or_corrupt_file"}
    assert truncated == {"cut.txt.gz", "cut.txt.zst"}
    manifest = DatasetManifest.read(tmp_path / "data")
    assert sum(s.samples for s in manifest.datasets["records"].splits["train"].shards) > 0

    # The same counts reach MLflow the way `lmforge run` logs a prepared dataset.
    cfg = load_config(config, [f"--run_dir={tmp_path / 'run'}"])
    tracker = Tracker(cfg.tracking, tmp_path / "run")
    run_id = tracker.start(run_name="hostile", system_metrics=False)
    log_prepared_dataset(tracker, manifest)
    assert tracker.close("FINISHED")
    metrics = MlflowClient(f"sqlite:///{tmp_path / 'run' / 'mlflow.db'}").get_run(
        run_id).data.metrics
    for kind, count in counts.items():
        assert metrics[f"prepare/bad_input/{kind}"] == count


def test_strict_mode_stops_at_the_first_bad_record_naming_it(corpus, tmp_path):
    config = tmp_path / "hostile.yaml"
    config.write_text(CONFIG.format(root=corpus / "in", out=tmp_path / "data"))
    proc, _ = run_prepare(config, "--data.strict=true")
    assert proc.returncode == 1, proc.stderr[-4000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"lmforge: {corpus / 'in'}/"), last
    assert "fix the input or set data.strict=false" in last
    assert not (tmp_path / "data" / "manifest.json").exists()
